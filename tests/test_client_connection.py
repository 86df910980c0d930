"""The in-process connection of simulated sites: their site state in the model store, kept
per experiment and site and deleted with the experiment, the strategy's payload, and the
evaluation each client reports, stored on its ledger row."""

import pytest
import torch

from tests.conftest import new_experiment
from training import clients, federation, modelstore, services
from training.models import ClientUpdate, ClientUpdateStatus, Experiment, model_store

pytestmark = pytest.mark.django_db


def started(dataset, **fields) -> tuple[Experiment, list[ClientUpdate]]:
    experiment = new_experiment(
        dataset, clients_per_round=2, min_clients=2, num_rounds=2, local_epochs=1, **fields
    )
    services.start_experiment(experiment.pk)
    pending = ClientUpdate.objects.filter(round__experiment=experiment).order_by("pk")
    claimed = [
        services.claim_client_update(
            update.pk, update.round_id, update.site_id, worker="test", task_id=update.task_id
        )
        for update in pending
    ]
    return experiment, claimed


def test_a_simulated_sites_state_is_kept_per_experiment_and_site_and_deleted_with_it(
    lesions_dataset, django_capture_on_commit_callbacks
):
    experiment = new_experiment(lesions_dataset, clients_per_round=2)
    kept = new_experiment(lesions_dataset, clients_per_round=2)
    state = clients.StoredSiteState(experiment.pk, "st-mary")
    other_site = clients.StoredSiteState(experiment.pk, "st-anne")
    other_experiment = clients.StoredSiteState(kept.pk, "st-mary")
    control = {"0.weight": torch.arange(4.0)}

    state.save("scaffold_control", control)
    other_experiment.save("scaffold_control", control)

    saved = state.load("scaffold_control")
    assert saved is not None and torch.equal(saved["0.weight"], control["0.weight"])
    assert other_site.load("scaffold_control") is None
    name = f"site-state/{experiment.pk}/st-mary/scaffold_control.safetensors"
    assert model_store().exists(name)
    with pytest.raises(ValueError, match="must match"):
        state.save("../../escape", control)

    with django_capture_on_commit_callbacks(execute=True):
        experiment.delete()

    assert state.load("scaffold_control") is None
    assert other_experiment.load("scaffold_control") is not None


def test_a_simulated_scaffold_client_reads_the_payload_and_keeps_its_variate_per_site(
    lesions_dataset,
):
    lesions_dataset.validation_fraction = 0.25
    lesions_dataset.save()
    experiment, claimed = started(lesions_dataset, strategy="scaffold")
    checkpoint, _ = federation.starting_checkpoint(experiment.pk, 1)
    start = modelstore.load_stored_weights(*federation.starting_checkpoint(experiment.pk, 1))
    payload = {name: torch.full_like(t, 0.01) for name, t in start.items()
               if t.is_floating_point()}  # fmt: skip
    modelstore.save_strategy_files(checkpoint, state={}, payload=payload)

    for update in claimed:
        assert clients.train_simulated_client(update), ClientUpdate.objects.get(pk=update.pk).error

    for update in claimed:
        row = ClientUpdate.objects.get(pk=update.pk)
        assert row.status == ClientUpdateStatus.SUCCEEDED
        assert row.metrics["extras"]["local_steps"] >= 1
        # The round's starting model, evaluated on the site's validation share first.
        assert row.evaluation["num_samples"] >= 1 and "accuracy" in row.evaluation
        kept = clients.StoredSiteState(experiment.pk, update.site.slug).load("scaffold_control")
        assert kept is not None and kept.keys() == payload.keys()
    variates = [
        clients.StoredSiteState(experiment.pk, update.site.slug).load("scaffold_control")
        for update in claimed
    ]
    assert not torch.equal(variates[0]["classifier.3.bias"], variates[1]["classifier.3.bias"])
