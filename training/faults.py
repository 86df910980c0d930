"""What went wrong with an experiment's clients, as the page, the report, the exports and the
command line tell it.

A client's fault (an update file that did not verify, an image that could not be read, a
deadline missed) is recorded on its ClientUpdate row and never fails the experiment while
enough clients remain. That leaves a quiet way to lose a site altogether: one that fails
in every round while the experiment "completes" on the others. `lost_sites` finds those.
"""

from dataclasses import asdict, dataclass
from typing import Any

from training.models import (
    ClientUpdate,
    ClientUpdateStatus,
    Experiment,
    ExperimentStatus,
    RoundKind,
)

UNSUCCESSFUL = (ClientUpdateStatus.FAILED, ClientUpdateStatus.LATE)


@dataclass(frozen=True)
class ClientFailure:
    """One site's failure in one round."""

    round: int
    kind: str  # the round's kind: train, or evaluate for the cross-site round
    site: str
    status: str  # failed or late
    error: str


@dataclass(frozen=True)
class LostSite:
    """A site that took part in training rounds and succeeded in none of them."""

    site: str
    rounds: int  # the training rounds it was picked for
    last_error: str  # the reason of its last failure

    def sentence(self) -> str:
        times = "the only training round" if self.rounds == 1 else f"all {self.rounds} rounds"
        return f"Site {self.site} failed in {times} it was picked for: {self.last_error}"


def client_failures(experiment: Experiment) -> list[ClientFailure]:
    """Every failed or late client of the experiment, by round then site."""
    rows = (
        ClientUpdate.objects.filter(round__experiment=experiment, status__in=UNSUCCESSFUL)
        .order_by("round__number", "site__slug")
        .values_list("round__number", "round__kind", "site__slug", "status", "error")
    )
    return [ClientFailure(*row) for row in rows]


def lost_sites(experiment: Experiment) -> list[LostSite]:
    """The sites that failed (or were late) in every training round they were picked for,
    among the rounds that are over; by slug. A site still training counts for nothing yet."""
    outcomes: dict[str, list[tuple[int, str, str]]] = {}
    rows = (
        ClientUpdate.objects.filter(
            round__experiment=experiment,
            round__kind=RoundKind.TRAIN,
            status__in=(ClientUpdateStatus.SUCCEEDED, *UNSUCCESSFUL),
        )
        .order_by("round__number")
        .values_list("site__slug", "round__number", "status", "error")
    )
    for slug, number, status, error in rows:
        outcomes.setdefault(slug, []).append((number, status, error))
    lost = []
    for slug in sorted(outcomes):
        results = outcomes[slug]
        if all(status != ClientUpdateStatus.SUCCEEDED for _, status, _ in results):
            last_error = results[-1][2] or f"{results[-1][1]} without a recorded error"
            lost.append(LostSite(site=slug, rounds=len(results), last_error=last_error))
    return lost


def lost_sites_warning(experiment: Experiment) -> str:
    """One paragraph on the sites lost in every round; empty when none was."""
    lost = lost_sites(experiment)
    if not lost:
        return ""
    names = ", ".join(site.site for site in lost)
    outcome = (
        "The experiment completed without them"
        if experiment.status == ExperimentStatus.COMPLETED
        else "The global model was trained without them"
    )
    return f"{outcome}: {names} never contributed. " + " ".join(s.sentence() for s in lost)


def failures_summary(experiment: Experiment) -> dict[str, Any]:
    """The JSON form, for the command line's summary and metrics.json."""
    return {
        "sites_lost_every_round": [asdict(site) for site in lost_sites(experiment)],
        "client_failures": [asdict(failure) for failure in client_failures(experiment)],
    }
