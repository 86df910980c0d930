"""Run again with changes: POST /api/experiments/{id}/clone/ makes a new draft of the caller
with the source's settings and the changes, remembering its source."""

import pytest

from tests.conftest import client_for
from tests.factories import DatasetFactory, ExperimentFactory, SiteFactory, UserFactory
from training.fl.strategies import validate_strategy_params
from training.models import Experiment, ExperimentStatus
from training.sweeps import experiment_settings

pytestmark = pytest.mark.django_db


@pytest.fixture
def source(dataset_root):
    owner = UserFactory(username="owner")
    return ExperimentFactory(
        owner=owner,
        dataset=DatasetFactory(owner=owner, path=str(dataset_root)),
        sites=SiteFactory.create_batch(4),
        clients_per_round=3,
        min_clients=2,
        num_rounds=7,
        learning_rate=0.02,
        seed=3,
        partition="dirichlet:0.5",
        strategy_params=validate_strategy_params("fedavg", {}),
        status=ExperimentStatus.COMPLETED,
    )


def clone(user, experiment, changes):
    return client_for(user).post(f"/api/experiments/{experiment.pk}/clone/", changes, format="json")


def test_a_clone_copies_the_settings_applies_the_changes_and_remembers_its_source(source):
    response = clone(source.owner, source, {"seed": 11, "learning_rate": 0.05})

    assert response.status_code == 201, response.json()
    copy = Experiment.objects.get(pk=response.json()["id"])
    assert (copy.cloned_from, copy.status, copy.owner) == (source, "draft", source.owner)
    expected = {**experiment_settings(source), "seed": 11, "learning_rate": 0.05}
    expected["name"] = f"{source.name} (again)"
    assert experiment_settings(copy) == expected
    assert response.json()["cloned_from"] == source.pk


def test_a_member_clones_into_an_experiment_of_their_own_on_the_same_dataset(source):
    member = UserFactory(username="member")
    source.members.add(member)

    response = clone(member, source, {"num_rounds": 2})

    assert response.status_code == 201, response.json()
    copy = Experiment.objects.get(pk=response.json()["id"])
    assert copy.owner == member and copy.dataset_id == source.dataset_id
    assert copy.num_rounds == 2


def test_someone_who_cannot_see_the_experiment_cannot_clone_it(source):
    response = clone(UserFactory(username="stranger"), source, {})

    assert response.status_code == 404
    assert Experiment.objects.count() == 1


def test_a_bad_change_is_refused_naming_the_field_and_nothing_is_stored(source):
    response = clone(source.owner, source, {"min_clients": 9})

    assert response.status_code == 400
    assert "min_clients" in response.json()
    assert Experiment.objects.count() == 1


def test_a_change_that_is_no_setting_is_refused(source):
    response = clone(source.owner, source, {"status": "completed"})

    assert response.status_code == 400
    assert "Not an experiment setting" in response.json()["status"][0]


def test_a_new_strategy_without_parameters_starts_from_its_defaults(source):
    source.strategy_params = {"a_parameter_of_another_strategy": 0.5}
    source.save()

    response = clone(source.owner, source, {"strategy": "fedavg"})

    assert response.status_code == 201, response.json()
    assert response.json()["strategy_params"] == validate_strategy_params("fedavg", {})


def test_a_count_of_clients_replaces_the_source_fraction(source):
    source.client_fraction, source.clients_per_round, source.min_clients = 0.5, 2, 1
    source.save()

    response = clone(source.owner, source, {"clients_per_round": 4})

    assert response.status_code == 201, response.json()
    assert (response.json()["client_fraction"], response.json()["clients_per_round"]) == (None, 4)
