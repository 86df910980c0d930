"""A client's fault fails that client, never the experiment, while enough clients remain.

Rounds run in this process as the workers run them: each simulated client through the
client protocol, then the aggregation task itself. The faults are real files: an update
changed on disk after its hash was recorded, or rewritten with tensors that are not the
network's, and an image cut short on the server's disk.
"""

import pytest
import torch
from django.urls import reverse

from tests.conftest import new_experiment
from tests.factories import (
    ClientUpdateFactory,
    ExperimentFactory,
    RoundFactory,
    SiteFactory,
    claim,
)
from training import clients, faults, federation, modelstore, runner, services
from training.fl.weights import sha256_hex, weights_to_bytes
from training.models import (
    Checkpoint,
    ClientUpdate,
    ClientUpdateStatus,
    ExperimentStatus,
    Round,
    RoundStatus,
    model_store,
)
from visualization import reports
from workers.tasks import aggregate_round

pytestmark = pytest.mark.django_db


def train_round(experiment, number):
    """Every client of round `number` trains and reports, in this process."""
    fl_round = Round.objects.get(experiment=experiment, number=number)
    for update in fl_round.client_updates.order_by("pk"):
        claimed = claim(update, worker="w@test")
        assert claimed is not None
        clients.train_simulated_client(claimed)
    fl_round.refresh_from_db()
    return fl_round


def aggregate(fl_round):
    """The aggregation task, as a fresh worker process runs it."""
    federation.forget_ledger_reads()
    return aggregate_round(fl_round.pk)


def update_weights(update):
    return modelstore.load_stored_weights(update.update_file.name, update.update_sha256)


def rewrite_update(update, weights, *, record_hash=True):
    """Replace the update's file on disk; with `record_hash`, the ledger's hash too (the
    file then passes the hash check and must be caught by what it holds)."""
    data = weights_to_bytes(weights)
    with open(model_store().path(update.update_file.name), "wb") as handle:
        handle.write(data)
    if record_hash:
        ClientUpdate.objects.filter(pk=update.pk).update(update_sha256=sha256_hex(data))


def tamper_bytes(update):
    """Change the file after its hash was recorded (the ledger keeps the old hash)."""
    weights = {name: tensor.clone() for name, tensor in update_weights(update).items()}
    first = next(name for name, t in weights.items() if t.dtype.is_floating_point)
    weights[first] += 1.0
    rewrite_update(update, weights, record_hash=False)


def garbage(update):
    path = model_store().path(update.update_file.name)
    with open(path, "wb") as handle:
        handle.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + bytes(64))
    with open(path, "rb") as handle:
        digest = sha256_hex(handle.read())
    ClientUpdate.objects.filter(pk=update.pk).update(update_sha256=digest)


def renamed_tensor(update):
    weights = dict(update_weights(update))
    name = next(iter(weights))
    weights[f"{name}.renamed"] = weights.pop(name)
    rewrite_update(update, weights)


def wrong_shape(update):
    weights = dict(update_weights(update))
    name = next(name for name, t in weights.items() if t.dim() >= 1)
    weights[name] = torch.zeros(weights[name].numel() + 1, dtype=weights[name].dtype)
    rewrite_update(update, weights)


def wrong_dtype(update):
    weights = dict(update_weights(update))
    name = next(name for name, t in weights.items() if t.dtype == torch.float32)
    weights[name] = weights[name].to(torch.float64)
    rewrite_update(update, weights)


def not_finite(update):
    weights = {name: tensor.clone() for name, tensor in update_weights(update).items()}
    name = next(name for name, t in weights.items() if t.dtype.is_floating_point)
    weights[name].view(-1)[0] = float("nan")
    rewrite_update(update, weights)


FAULTS = {
    "sha256": (tamper_bytes, "SHA-256 mismatch"),
    "unreadable": (garbage, "safetensors header is not JSON"),
    "names": (renamed_tensor, "tensors are not the network's"),
    "shape": (wrong_shape, "the network's is"),
    "dtype": (wrong_dtype, "torch.float64"),
    "nan": (not_finite, "NaN or infinite"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_bad_update_file_fails_its_client_and_the_round_aggregates_the_others(
    lesions_dataset, fault
):
    # Given a FedAvg round of three simulated sites (two needed) whose clients all reported
    experiment = new_experiment(
        lesions_dataset, clients_per_round=3, min_clients=2, num_rounds=2,
        aggregation_weighting="uniform",
    )  # fmt: skip
    services.start_experiment(experiment.pk)
    fl_round = train_round(experiment, 1)
    assert fl_round.status == RoundStatus.AGGREGATING
    bad, *good = fl_round.client_updates.order_by("pk")
    good_weights = [update_weights(update) for update in good]
    # When one client's update file is spoilt before aggregation
    spoil, message = FAULTS[fault]
    spoil(bad)
    # Then the round still aggregates, over the two good updates alone
    assert aggregate(fl_round) == "completed"
    fl_round.refresh_from_db()
    assert fl_round.status == RoundStatus.CLOSED
    checkpoint = Checkpoint.objects.get(round=fl_round)
    aggregated = modelstore.load_stored_weights(checkpoint.file.name, checkpoint.sha256)
    for name, tensor in aggregated.items():
        if tensor.dtype.is_floating_point:
            expected = (good_weights[0][name] + good_weights[1][name]) / 2
            torch.testing.assert_close(tensor, expected)
    # And the spoilt client is recorded failed with why, the others succeeded
    bad.refresh_from_db()
    assert bad.status == ClientUpdateStatus.FAILED
    assert message in bad.error
    assert "left out of aggregation" in bad.error
    assert all(u.status == ClientUpdateStatus.SUCCEEDED for u in ClientUpdate.objects.filter(
        pk__in=[u.pk for u in good]))  # fmt: skip
    # And the experiment goes on to round 2
    experiment.refresh_from_db()
    assert experiment.status == ExperimentStatus.RUNNING
    assert experiment.current_round == 2


def test_a_bad_update_that_leaves_too_few_fails_the_experiment_naming_site_and_reason(
    lesions_dataset,
):
    # Given a round of three sites that needs all three
    experiment = new_experiment(lesions_dataset, clients_per_round=3, min_clients=3, num_rounds=2)
    services.start_experiment(experiment.pk)
    fl_round = train_round(experiment, 1)
    bad = fl_round.client_updates.order_by("pk").first()
    # When one update was changed on disk after its hash was recorded
    tamper_bytes(bad)
    # Then aggregation fails the experiment, saying which site and why
    assert aggregate(fl_round) == "failed"
    experiment.refresh_from_db()
    assert experiment.status == ExperimentStatus.FAILED
    assert "2 of its 3 client updates could be used" in experiment.failure_reason
    assert f"{bad.site.slug}: Its update was left out" in experiment.failure_reason
    assert "SHA-256 mismatch" in experiment.failure_reason
    # And that client is recorded failed with the same reason
    bad.refresh_from_db()
    assert bad.status == ClientUpdateStatus.FAILED
    assert "SHA-256 mismatch" in bad.error


def break_an_image_of(experiment, site):
    """Cut short one image of the site's share of the server's dataset; its file name."""
    data = federation.simulated_client_data(experiment, site.pk)
    path = data.dataset.paths[data.indices[0]]
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    federation.forget_ledger_reads()
    federation.OPENED_DATASETS.clear()  # no dataset opened before the damage survives
    return path.name


def test_a_site_with_an_unreadable_image_fails_every_round_and_the_experiment_says_so(
    lesions_dataset,
):
    # Given an experiment of three sites, two needed, two rounds, no cross-site round
    lesions_dataset.validation_fraction = 0.0
    lesions_dataset.save(update_fields=["validation_fraction"])
    experiment = new_experiment(lesions_dataset, clients_per_round=3, min_clients=2, num_rounds=2)
    broken_site = experiment.sites.order_by("pk").first()
    # When one image of the first site's share is truncated on disk
    broken_file = break_an_image_of(experiment, broken_site)
    services.start_experiment(experiment.pk)
    for number in (1, 2):
        assert aggregate(train_round(experiment, number)) == "completed"
    # Then that site failed in both rounds, its error naming the file
    experiment.refresh_from_db()
    assert experiment.status == ExperimentStatus.COMPLETED
    failures = faults.client_failures(experiment)
    assert [(f.round, f.site) for f in failures] == [(1, broken_site.slug), (2, broken_site.slug)]
    assert all(broken_file in f.error and "truncated" in f.error for f in failures)
    # And the experiment says that it completed without that site
    lost = faults.lost_sites(experiment)
    assert [(site.site, site.rounds) for site in lost] == [(broken_site.slug, 2)]
    warning = faults.lost_sites_warning(experiment)
    assert warning.startswith(f"The experiment completed without them: {broken_site.slug}")
    assert broken_file in warning
    # ... in the CSV export (an error column) and the JSON export
    csv_text = reports.metrics_csv(experiment)
    assert "client_error" in csv_text.splitlines()[0]
    assert sum(broken_file in line for line in csv_text.splitlines()) == 2
    exported = reports.metrics_json(experiment)
    assert exported["sites_lost_every_round"][0]["site"] == broken_site.slug
    # ... in the report (its SVG keeps text as text)
    drawn = reports.render_report(experiment, "svg").decode()
    assert f"WARNING: sites lost in every round: {broken_site.slug}" in drawn
    assert f"round 2, {broken_site.slug}: failed: ImageReadError" in drawn
    # ... and in the command line's JSON summary
    summary = runner.summarize(experiment, wall_seconds=1.0)
    assert summary["sites_lost_every_round"][0]["site"] == broken_site.slug
    assert len(summary["client_failures"]) == 2


def test_when_every_client_fails_the_reason_quotes_their_error(lesions_dataset):
    # Given a round whose three clients all fail with the same error
    experiment = new_experiment(lesions_dataset, clients_per_round=3, min_clients=2, num_rounds=1)
    services.start_experiment(experiment.pk)
    fl_round = Round.objects.get(experiment=experiment, number=1)
    for update in fl_round.client_updates.order_by("pk"):
        claimed = claim(update, worker="w@test")
        services.record_client_result(claimed, error="ValueError: partition needs 4 sites")
    # Then the experiment's reason says how many succeeded and why the others did not
    experiment.refresh_from_db()
    assert experiment.status == ExperimentStatus.FAILED
    slugs = ", ".join(sorted(experiment.sites.values_list("slug", flat=True)))
    assert experiment.failure_reason == (
        "Round 1: 0 of 3 clients succeeded, fewer than the minimum of 2. "
        f"{slugs}: ValueError: partition needs 4 sites"
    )


def test_the_experiment_page_lists_client_failures_and_the_site_lost_every_round(client):
    # Given a completed experiment whose site "east" failed in both of its rounds
    sites = [SiteFactory(slug="east"), SiteFactory(slug="west")]
    experiment = ExperimentFactory(sites=sites, status=ExperimentStatus.COMPLETED, num_rounds=2)
    for number in (1, 2):
        fl_round = RoundFactory(experiment=experiment, number=number, status=RoundStatus.CLOSED)
        error = f"ImageReadError: east/img-000{number}.nii.gz: truncated"
        ClientUpdateFactory(
            round=fl_round, site=sites[0], status=ClientUpdateStatus.FAILED, error=error
        )
        ClientUpdateFactory(round=fl_round, site=sites[1], status=ClientUpdateStatus.SUCCEEDED)
    client.force_login(experiment.owner)
    # When its page is opened
    page = client.get(reverse("experiment-page", args=[experiment.pk])).content.decode()
    # Then each failure is listed with its reason, and the lost site is named
    assert 'id="failures-card" hidden' not in page
    assert page.count('data-site="east"') == 2
    assert "east/img-0002.nii.gz: truncated" in page
    assert "The experiment completed without them: east never contributed." in page
    assert "Site east failed in all 2 rounds it was picked for" in page
