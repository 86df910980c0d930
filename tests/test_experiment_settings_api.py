"""The experiment's research settings over the API: the strategy and its parameters (checked
against describe_strategies and described in the OpenAPI schema), client sampling by count
or fraction with the weighting, and the differential-privacy settings."""

import math

import pytest
import yaml

from tests.conftest import client_for
from tests.factories import DatasetFactory, ExperimentFactory, SiteFactory, UserFactory
from training import services
from training.fl.strategies import available_strategies, describe_strategies
from training.models import Experiment

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner():
    return UserFactory(username="owner")


@pytest.fixture
def payload(owner, dataset_root):
    dataset = DatasetFactory(owner=owner, path=str(dataset_root))
    sites = SiteFactory.create_batch(5)
    return {
        "name": "settings",
        "dataset": dataset.pk,
        "sites": [site.slug for site in sites],
        "clients_per_round": 3,
        "min_clients": 2,
    }


def a_strategy_with_a_bounded_parameter() -> tuple[str, dict]:
    """A strategy and one of its parameters that has a lower bound (from the registry)."""
    for strategy in describe_strategies():
        for parameter in strategy["parameters"]:
            if parameter.get("minimum") is not None:
                return strategy["name"], parameter
    raise AssertionError("no strategy declares a bounded parameter")


def post(owner, body):
    return client_for(owner).post("/api/experiments/", body, format="json")


def test_an_unknown_strategy_is_refused_naming_the_field(owner, payload):
    response = post(owner, {**payload, "strategy": "fedmagic"})

    assert response.status_code == 400
    assert "fedmagic" in response.json()["strategy"][0]
    assert not Experiment.objects.exists()


def test_an_unknown_strategy_parameter_is_refused_naming_it(owner, payload):
    response = post(owner, {**payload, "strategy": "fedavg", "strategy_params": {"momentum_x": 1}})

    assert response.status_code == 400
    assert "momentum_x" in " ".join(response.json()["strategy_params"])
    assert not Experiment.objects.exists()


def test_a_strategy_parameter_out_of_its_range_is_refused_naming_it(owner, payload):
    strategy, parameter = a_strategy_with_a_bounded_parameter()
    below = parameter["minimum"] - 1

    response = post(
        owner, {**payload, "strategy": strategy, "strategy_params": {parameter["name"]: below}}
    )

    assert response.status_code == 400
    assert parameter["name"] in " ".join(response.json()["strategy_params"])


def test_strategy_params_must_be_an_object(owner, payload):
    response = post(owner, {**payload, "strategy_params": [1, 2]})

    assert response.status_code == 400
    assert "Give an object" in response.json()["strategy_params"][0]


def test_stored_strategy_params_have_the_defaults_filled_in(owner, payload):
    strategy, parameter = a_strategy_with_a_bounded_parameter()

    response = post(owner, {**payload, "strategy": strategy, "strategy_params": {}})

    assert response.status_code == 201, response.json()
    stored = Experiment.objects.get().strategy_params
    assert stored[parameter["name"]] == parameter["default"]


def test_the_schema_lists_every_strategy_and_describes_its_parameters(owner):
    response = client_for(owner).get("/api/schema/")

    schema = yaml.safe_load(response.content)
    experiment = schema["components"]["schemas"]["ExperimentRequest"]["properties"]
    strategy = experiment["strategy"]
    enum = (
        strategy.get("enum")
        or schema["components"]["schemas"][strategy["allOf"][0]["$ref"].rsplit("/", 1)[-1]]["enum"]
    )
    assert sorted(enum) == available_strategies()
    variants = {variant["title"]: variant for variant in experiment["strategy_params"]["anyOf"]}
    assert sorted(variants) == available_strategies()
    for description in describe_strategies():
        properties = variants[description["name"]]["properties"]
        assert sorted(properties) == sorted(p["name"] for p in description["parameters"])
        for parameter in description["parameters"]:
            assert properties[parameter["name"]]["default"] == parameter["default"]


def test_the_strategies_endpoint_describes_them(owner):
    response = client_for(owner).get("/api/strategies/")

    assert response.status_code == 200
    assert response.json() == describe_strategies()


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5])
def test_a_client_fraction_outside_zero_to_one_is_refused(owner, payload, fraction):
    response = post(owner, {**payload, "client_fraction": fraction})

    assert response.status_code == 400
    assert "(0, 1]" in response.json()["client_fraction"][0]


def test_a_fraction_sets_the_clients_per_round_from_the_sites(owner, payload):
    response = post(owner, {**payload, "client_fraction": 0.5, "min_clients": 1})

    assert response.status_code == 201, response.json()
    assert response.json()["clients_per_round"] == math.ceil(0.5 * 5)


def test_min_clients_above_what_a_fraction_gives_is_refused(owner, payload):
    response = post(owner, {**payload, "client_fraction": 0.2, "min_clients": 2})

    assert response.status_code == 400
    assert "ceil(0.2 x 5 sites)" in response.json()["min_clients"][0]


def test_a_round_picks_the_fraction_of_the_pool_reproducibly():
    sites = SiteFactory.create_batch(10)
    experiment = ExperimentFactory(sites=sites, client_fraction=0.3, clients_per_round=3, seed=4)

    first = services.pick_clients(experiment, 2)

    assert len(first) == 3  # 0.3 x 10, not one more from rounding
    assert services.pick_clients(experiment, 2) == first


def test_weighting_is_stored_and_checked(owner, payload):
    assert post(owner, {**payload, "aggregation_weighting": "uniform"}).status_code == 201
    refused = post(owner, {**payload, "aggregation_weighting": "by-age"})
    assert refused.status_code == 400
    assert "aggregation_weighting" in refused.json()


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"dp_noise": 1.0}, "dp_clip", "give a clipping norm"),
        ({"dp_clip": 0}, "dp_clip", "positive L2 norm"),
        ({"dp_at": "client"}, "dp_at", "needs a clipping norm"),
        ({"dp_at": "moon"}, "dp_at", "not a valid choice"),
        ({"dp_clip": 1.0, "dp_noise": 1.0, "dp_delta": 0}, "dp_delta", "delta in (0, 1)"),
        ({"dp_noise": 101}, "dp_noise", "less than or equal to 100"),
        ({"local_dp_noise": 1.0}, "local_dp_clip", "give both or neither"),
        ({"local_dp_clip": 1.0}, "local_dp_noise", "give both or neither"),
        ({"local_dp_noise": 1.0, "local_dp_clip": 0}, "local_dp_clip", "positive"),
    ],
)
def test_bad_privacy_settings_are_refused_naming_the_field(owner, payload, change, field, message):
    response = post(owner, {**payload, **change})

    assert response.status_code == 400
    assert message in " ".join(map(str, response.json()[field]))
    assert not Experiment.objects.exists()


def test_privacy_settings_are_stored(owner, payload):
    settings = {"dp_clip": 0.5, "dp_noise": 1.1, "dp_delta": 1e-4, "dp_at": "client",
                "local_dp_noise": 0.8, "local_dp_clip": 2.0}  # fmt: skip

    response = post(owner, {**payload, **settings})

    assert response.status_code == 201, response.json()
    stored = Experiment.objects.get()
    assert {name: getattr(stored, name) for name in settings} == settings


def test_krum_with_fewer_updates_than_it_needs_is_refused_before_it_runs(owner, payload):
    body = {**payload, "strategy": "krum", "strategy_params": {"f": 1}}

    refused = post(owner, {**body, "clients_per_round": 5, "min_clients": 4})
    accepted = post(owner, {**body, "clients_per_round": 5, "min_clients": 5})

    assert refused.status_code == 400
    assert "f=1 needs at least 5" in refused.json()["min_clients"][0]
    assert accepted.status_code == 201, accepted.json()
