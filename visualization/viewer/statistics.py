"""Per-site statistics of a dataset, and the sites whose data differ from the others.

Federated training suffers when sites' images differ in ways the network should not have
to learn (scanner gain, pixel spacing, image size) or when their class balance differs a
lot; these numbers and flags show where. Intensities come from at most `SAMPLES_PER_SITE`
images per site, so that the answer stays quick on large datasets; class counts use every
label. With masks (segmentation), each site's class volumes (voxels, mm³) come from the same
sampled images. The per-image and per-site measurements are training/fl/data/statistics.py's, which
site agents also use to describe their datasets.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from training.fl.data import ImageArray
from training.fl.data.statistics import (
    SiteSummary,
    measure_image,
    summarise_site,
)
from training.models import Dataset
from visualization.viewer.cache import ProcessCache
from visualization.viewer.images import (
    DataUnavailable,
    ImageRecord,
    catalog_for,
    class_names_of,
    data_key,
    read_raw_pair,
)

SAMPLES_PER_SITE = 200
HISTOGRAM_BINS = 64
# A site's mean intensity this many pooled standard deviations from the typical site's.
INTENSITY_FLAG_STDS = 2.0
# Total variation distance between a site's class proportions and the other sites'.
CLASS_BALANCE_FLAG_DISTANCE = 0.25


@dataclass(frozen=True)
class Flag:
    site: str | None  # None: a difference among all sites rather than one site's
    kind: str  # intensity, spacing, shape or class-balance
    message: str


def _typical_value(
    summaries: Sequence[SiteSummary], attribute: str
) -> tuple[dict[str, tuple], tuple | None, int]:
    """Each site's most common shape or spacing, the value most sites share (None when
    no single value is shared by more sites than any other), and how many share it."""
    per_site = {
        summary.site: getattr(summary, attribute).most_common(1)[0][0]
        for summary in summaries
        if getattr(summary, attribute)
    }
    ranking = Counter(per_site.values()).most_common()
    if not ranking:
        return per_site, None, 0
    value, count = ranking[0]
    unique_leader = len(ranking) == 1 or ranking[1][1] < count
    return per_site, (value if unique_leader and count >= 2 else None), count


def _format_grid(values: tuple, unit: str = "") -> str:
    return " x ".join(f"{value:.3g}" for value in values) + unit


def _geometry_flags(summaries: Sequence[SiteSummary], attribute: str) -> list[Flag]:
    if attribute == "spacings":
        kind, noun, unit = "spacing", "pixel spacing", " mm"
    else:
        kind, noun, unit = "shape", "image size", " pixels"
    per_site, typical, sharing = _typical_value(summaries, attribute)
    if len(set(per_site.values())) < 2:
        return []
    consequence = (
        "the same anatomy then covers different numbers of pixels unless images are "
        "resampled to one spacing."
        if kind == "spacing"
        else "training resizes every image to the dataset's image_shape, so the same structure "
        "ends up a different number of pixels wide at different sites."
    )
    if typical is None:
        listing = "; ".join(
            f"{site} {_format_grid(value, unit)}" for site, value in per_site.items()
        )
        return [Flag(None, kind, f"The sites differ in {noun} ({listing}); {consequence}")]
    return [
        Flag(
            site,
            kind,
            f"{site}: {noun} {_format_grid(value, unit)} differs from the "
            f"{_format_grid(typical, unit)} of {sharing} other sites; {consequence}",
        )
        for site, value in per_site.items()
        if value != typical
    ]


def _reference(values: Sequence[npt.NDArray[np.float64]], own: int) -> npt.NDArray[np.float64]:
    """What site `own` is compared with: the median site when there are three or more, so
    that one odd site does not drag the reference along; with two, the other site."""
    if len(values) == 2:
        return values[1 - own]
    return np.median(np.stack(values), axis=0)


def _reference_name(count: int) -> str:
    return "the other site's" if count == 2 else "the typical site's"


def _intensity_flags(summaries: Sequence[SiteSummary]) -> list[Flag]:
    measured = [summary for summary in summaries if summary.pixel_count]
    if len(measured) < 2:
        return []
    total = sum(summary.pixel_count for summary in measured)
    pooled_std = math.sqrt(sum(s.variance * s.pixel_count for s in measured) / total)
    if pooled_std == 0:
        return []
    means = [np.array([summary.mean]) for summary in measured]
    flags = []
    for position, summary in enumerate(measured):
        typical = float(_reference(means, position)[0])
        distance = (summary.mean - typical) / pooled_std
        if abs(distance) > INTENSITY_FLAG_STDS:
            flags.append(
                Flag(
                    summary.site,
                    "intensity",
                    f"{summary.site}: mean intensity {summary.mean:.4g} is {abs(distance):.1f} "
                    f"pooled standard deviations {'above' if distance > 0 else 'below'} "
                    f"{_reference_name(len(measured))} {typical:.4g}; its scanner's gain or "
                    "offset may differ from the others'.",
                )
            )
    return flags


def _proportions_text(shares: npt.NDArray[np.float64], class_names: Sequence[str]) -> str:
    return ", ".join(f"{name} {share:.0%}" for name, share in zip(class_names, shares, strict=True))


def _class_balance_flags(
    summaries: Sequence[SiteSummary], class_names: Sequence[str]
) -> list[Flag]:
    counted = [summary for summary in summaries if summary.num_samples]
    if len(counted) < 2:
        return []
    counts = [np.asarray(summary.class_counts, dtype=np.float64) for summary in counted]
    shares = [own / own.sum() for own in counts]
    everyone = sum(counts)
    flags = []
    for position, summary in enumerate(counted):
        reference = _reference(shares, position)
        reference = reference / reference.sum()
        distance = 0.5 * float(np.abs(shares[position] - reference).sum())
        others = everyone - counts[position]
        missing = [
            name
            for name, own, elsewhere in zip(class_names, counts[position], others, strict=True)
            if not own and elsewhere
        ]
        if distance > CLASS_BALANCE_FLAG_DISTANCE:
            own_text = _proportions_text(shares[position], class_names)
            reference_text = _proportions_text(reference, class_names)
            message = (
                f"{summary.site}: class balance ({own_text}) is far from "
                f"{_reference_name(len(counted))} ({reference_text}); expect its local models "
                "to pull the global one towards its majority class."
            )
        elif missing:
            message = (
                f"{summary.site}: has no {', '.join(missing)} samples while other sites do; its "
                "local training never sees that class."
            )
        else:
            continue
        flags.append(Flag(summary.site, "class-balance", message))
    return flags


def find_site_differences(
    summaries: Sequence[SiteSummary], class_names: Sequence[str]
) -> list[Flag]:
    """Sites whose data differ from the others', each with a sentence saying how."""
    return [
        *_intensity_flags(summaries),
        *_geometry_flags(summaries, "spacings"),
        *_geometry_flags(summaries, "shapes"),
        *_class_balance_flags(summaries, class_names),
    ]


def sample_records(
    records: Sequence[ImageRecord], limit: int, rng: np.random.Generator
) -> list[ImageRecord]:
    if len(records) <= limit:
        return list(records)
    chosen = np.sort(rng.choice(len(records), size=limit, replace=False))
    return [records[i] for i in chosen]


def compute_statistics(
    records_by_site: dict[str, Sequence[ImageRecord]],
    read: Callable[[ImageRecord], ImageArray],
    class_names: Sequence[str],
    *,
    samples_per_site: int = SAMPLES_PER_SITE,
    bins: int = HISTOGRAM_BINS,
    seed: int = 0,
    read_mask: Callable[[ImageRecord], ImageArray | None] | None = None,
) -> dict:
    """The statistics of every site, read through `read` (and `read_mask`, for class
    volumes); the same seed, the same sample."""
    rng = np.random.default_rng(seed)
    summaries = []
    names = list(class_names)
    for site, records in sorted(records_by_site.items()):
        labels = [record.label for record in records]
        names += [f"class {label}" for label in range(len(names), max(labels, default=-1) + 1)]
        measurements, unreadable, first_error = [], 0, ""
        for record in sample_records(records, samples_per_site, rng):
            try:
                mask = read_mask(record) if read_mask is not None else None
                measurements.append(measure_image(read(record), rng, mask, len(names)))
            except DataUnavailable as error:
                unreadable += 1
                first_error = first_error or str(error)
        class_counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(names))
        summary = summarise_site(site, class_counts.tolist(), measurements)
        summary.num_unreadable, summary.first_error = unreadable, first_error
        summaries.append(summary)
    for summary in summaries:  # a later site may have brought a class label of its own
        summary.class_counts += [0] * (len(names) - len(summary.class_counts))

    pooled = np.concatenate([s.pixel_sample for s in summaries]) if summaries else np.empty(0)
    low, high = (float(v) for v in np.percentile(pooled, [1, 99])) if pooled.size else (0.0, 1.0)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    flags = find_site_differences(summaries, names)
    flagged = {flag.site for flag in flags}
    return {
        "sample_limit": samples_per_site,
        "class_names": names,
        "histogram": {"low": low, "high": high, "bins": bins, "edges": edges.tolist()},
        "sites": [_site_result(summary, edges, names, flagged) for summary in summaries],
        "flags": [{"site": f.site, "kind": f.kind, "message": f.message} for f in flags],
    }


def _site_result(
    summary: SiteSummary,
    edges: npt.NDArray[np.float64],
    names: Sequence[str],
    flagged: set[str | None],
) -> dict:
    pixels = summary.pixel_sample
    counts, _ = np.histogram(pixels, bins=edges)
    # Fractions of the site's pixels, so that sites of any size compare; what falls outside
    # the dataset-wide range is reported beside the histogram rather than hidden.
    scale = 1 / pixels.size if pixels.size else 0.0
    return {
        "site": summary.site,
        "num_samples": summary.num_samples,
        "num_sampled": summary.num_sampled,
        "num_unreadable": summary.num_unreadable,
        "first_error": summary.first_error,
        "class_counts": [
            {"label": label, "name": name, "count": count}
            for label, (name, count) in enumerate(zip(names, summary.class_counts, strict=True))
        ],
        "histogram": (counts * scale).tolist(),
        "below_range": float((pixels < edges[0]).sum() * scale),
        "above_range": float((pixels > edges[-1]).sum() * scale),
        "mean": summary.mean,
        "std": summary.std,
        "shapes": [
            {"shape": list(shape), "count": count} for shape, count in summary.shapes.most_common()
        ],
        "spacings": [
            {"spacing": list(spacing), "count": count}
            for spacing, count in summary.spacings.most_common()
        ],
        "flagged": summary.site in flagged,
        **({"class_volumes": _class_volumes(summary, names)} if summary.class_voxels else {}),
    }


def _class_volumes(summary: SiteSummary, names: Sequence[str]) -> list[dict]:
    """Each class's voxels and mm³ over the site's sampled masks."""
    return [
        {
            "label": label,
            "name": names[label] if label < len(names) else f"class {label}",
            "voxels": voxels,
            "mm3": mm3,
        }
        for label, (voxels, mm3) in enumerate(
            zip(summary.class_voxels, summary.class_mm3, strict=True)
        )
    ]


_statistics: ProcessCache[tuple, dict] = ProcessCache(maxsize=16)


def dataset_statistics(dataset: Dataset) -> dict:
    """Statistics of the dataset's images on this server, computed once per process."""
    key = (*data_key(dataset), dataset.num_classes, tuple(dataset.class_names or ()))

    def compute() -> dict:
        catalog = catalog_for(dataset)
        by_site: dict[str, list[ImageRecord]] = {site: [] for site in catalog.sites}
        for record in catalog.records:
            by_site[record.site].append(record)
        # The sampled record's image and mask, read once for both measurements.
        last: dict[int, tuple[ImageArray, ImageArray | None]] = {}

        def pair(record: ImageRecord) -> tuple[ImageArray, ImageArray | None]:
            if record.index not in last:
                last.clear()
                last[record.index] = read_raw_pair(dataset, record)
            return last[record.index]

        result = compute_statistics(
            by_site,
            lambda record: pair(record)[0],
            class_names_of(dataset),
            read_mask=lambda record: pair(record)[1],
        )
        result["unavailable_sites"] = [
            {"site": site, "reason": reason} for site, reason in catalog.unavailable_sites.items()
        ]
        return result

    return _statistics.get_or_compute(key, compute)
