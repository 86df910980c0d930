"""A strategy's state and payload between rounds, through the ledger and the model store.

Rounds run in this process as the workers run them (each simulated client through the
client protocol, then the round's aggregation), so that what one round's aggregation left
in the store is what the next one starts from, whichever process aggregates it.
"""

import pytest
import torch

from tests.conftest import new_experiment
from tests.factories import claim
from training import clients, federation, modelstore, services
from training.fl.strategies import build_strategy
from training.models import Checkpoint, ClientUpdateStatus, Round, RoundStatus

pytestmark = pytest.mark.django_db


def run_round(experiment, number):
    """Train every client of round ``number``, aggregate, and return its stored updates."""
    fl_round = Round.objects.get(experiment=experiment, number=number)
    for update in fl_round.client_updates.order_by("pk"):
        claimed = claim(update, worker="w@test")
        assert claimed is not None
        assert clients.train_simulated_client(claimed)
    fl_round.refresh_from_db()
    assert fl_round.status == RoundStatus.AGGREGATING
    # Every aggregation starts from nothing this process kept, as in a fresh worker.
    federation.forget_ledger_reads()
    fl_round.experiment = federation.experiment_configuration(experiment.pk)
    assert services.complete_round(fl_round, federation.run_aggregation(fl_round))
    return [
        modelstore.load_stored_weights(update.update_file.name, update.update_sha256)
        for update in fl_round.client_updates.filter(status=ClientUpdateStatus.SUCCEEDED)
        .order_by("pk")
    ]  # fmt: skip


def checkpoint_weights(experiment, number):
    checkpoint = Checkpoint.objects.get(experiment=experiment, round__number=number)
    return checkpoint, modelstore.load_stored_weights(checkpoint.file.name, checkpoint.sha256)


def test_fedadam_state_persisted_beside_each_checkpoint_carries_its_moments_across_rounds(
    lesions_dataset,
):
    # Given a FedAdam experiment over three simulated sites, weighted uniformly
    params = {"server_learning_rate": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.01}
    experiment = new_experiment(
        lesions_dataset, strategy="fedadam", strategy_params=params, clients_per_round=3,
        min_clients=3, num_rounds=3, aggregation_weighting="uniform",
    )  # fmt: skip
    services.start_experiment(experiment.pk)
    initial = Checkpoint.objects.get(experiment=experiment, round__isnull=True)
    # When two rounds run, each aggregated as in a fresh worker process
    first_updates = run_round(experiment, 1)
    second_updates = run_round(experiment, 2)
    # Then one FedAdam that carried its moments in memory over the same updates gives the
    # same global models
    reference = build_strategy("fedadam", weighting="uniform", **params)
    weights = modelstore.load_stored_weights(initial.file.name, initial.sha256)
    for number, updates in ((1, first_updates), (2, second_updates)):
        reference.begin_round(weights)
        for update, stored in zip(
            updates,
            Round.objects.get(experiment=experiment, number=number)
            .client_updates.filter(status=ClientUpdateStatus.SUCCEEDED).order_by("pk"),
            strict=True,
        ):  # fmt: skip
            reference.accumulate(update, num_samples=stored.num_samples)
        weights = reference.finish_round()
        checkpoint, stored_weights = checkpoint_weights(experiment, number)
        for name, tensor in weights.items():
            assert torch.equal(stored_weights[name], tensor), (number, name)
        # And the state stored beside the checkpoint is the strategy's after that round
        state = modelstore.load_strategy_state(checkpoint.file.name)
        assert int(state["rounds"]) == number
        expected_state = reference.state_dict()
        assert state.keys() == expected_state.keys()
        for key, tensor in expected_state.items():
            assert torch.equal(state[key], tensor), (number, key)
    # And a FedAdam that forgot its moments would not have reached round 2's model
    forgetful = build_strategy("fedadam", weighting="uniform", **params)
    _, round_one = checkpoint_weights(experiment, 1)
    forgetful.begin_round(round_one)
    for update in second_updates:
        forgetful.accumulate(update, num_samples=1)
    _, round_two = checkpoint_weights(experiment, 2)
    assert any(not torch.equal(t, round_two[n]) for n, t in forgetful.finish_round().items())


def test_a_stateless_strategy_stores_nothing_beside_its_checkpoints(lesions_dataset):
    experiment = new_experiment(
        lesions_dataset, strategy="fedmedian", clients_per_round=3, min_clients=3, num_rounds=2
    )
    services.start_experiment(experiment.pk)
    run_round(experiment, 1)
    checkpoint, _ = checkpoint_weights(experiment, 1)
    assert modelstore.load_strategy_state(checkpoint.file.name) == {}
    assert federation.strategy_payload_file(experiment.pk, 2) is None


def test_scaffold_sends_the_control_variate_of_the_previous_round_to_every_client(
    lesions_dataset,
):
    # Given a SCAFFOLD experiment over three simulated sites
    experiment = new_experiment(
        lesions_dataset, strategy="scaffold", clients_per_round=3, min_clients=3, num_rounds=2
    )
    services.start_experiment(experiment.pk)
    first = Round.objects.get(experiment=experiment, number=1)
    # Round 1's clients get no payload: they start from c = 0
    assert {federation.client_task(u).payload_sha256 for u in first.client_updates.all()} == {""}
    # When round 1 is aggregated
    run_round(experiment, 1)
    # Then round 2's clients are sent the server control variate stored beside round 1's
    # checkpoint, by its hash
    checkpoint, weights = checkpoint_weights(experiment, 1)
    name, sha256 = federation.strategy_payload_file(experiment.pk, 2)
    assert name == modelstore.strategy_payload_name(checkpoint.file.name)
    second = Round.objects.get(experiment=experiment, number=2)
    tasks = [federation.client_task(claim(u, worker="w@test")) for u in second.client_updates.all()]
    assert {task.payload_sha256 for task in tasks} == {sha256}
    assert tasks[0].options["scaffold"] is True
    control = modelstore.load_stored_weights(name, sha256)
    floating = {n for n, t in weights.items() if t.is_floating_point()}
    assert set(control) == floating
    assert any(float(t.abs().max()) > 0 for t in control.values())
    state = modelstore.load_strategy_state(checkpoint.file.name)
    for tensor_name, tensor in control.items():
        assert torch.equal(state[f"control.{tensor_name}"], tensor)
