"""Dashboard pages of the comparison workflow: the experiment form's strategy parameters
and research settings, "run again with changes", the sweep form, list and comparison page,
and the compare page's table."""

import json

import pytest
from django.urls import reverse

from tests.factories import (
    DatasetFactory,
    ExperimentFactory,
    RoundFactory,
    SiteFactory,
    UserFactory,
)
from training.fl.strategies import describe_strategies, validate_strategy_params
from training.models import Experiment, ExperimentStatus, Sweep

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner(client):
    user = UserFactory(username="ana")
    client.force_login(user)
    return user


@pytest.fixture
def form_data(owner, dataset_root):
    dataset = DatasetFactory(owner=owner, path=str(dataset_root))
    sites = SiteFactory.create_batch(4)
    return {"name": "from the form", "dataset": dataset.pk, "sites": [s.slug for s in sites],
            "clients_per_round": "2", "min_clients": "1", "num_rounds": "3"}  # fmt: skip


def first_parameter() -> tuple[str, dict]:
    for strategy in describe_strategies():
        if strategy["parameters"]:
            return strategy["name"], strategy["parameters"][0]
    raise AssertionError("no strategy has parameters")


def test_the_form_carries_every_strategy_description_for_its_parameter_fields(client, owner):
    page = client.get(reverse("new-experiment")).content.decode()

    embedded = page.split('id="strategy-descriptions" type="application/json">')[1]
    assert json.loads(embedded.split("</script>")[0]) == describe_strategies()
    assert "experiment_form.js" in page
    for field in ("client_fraction", "aggregation_weighting", "dp_clip", "dp_noise", "dp_delta",
                  "dp_at", "local_dp_noise", "local_dp_clip"):  # fmt: skip
        assert f'name="{field}"' in page


def test_the_form_stores_the_strategy_parameters_and_research_settings(client, form_data):
    strategy, parameter = first_parameter()
    value = parameter["default"] if parameter["maximum"] is None else parameter["maximum"]

    response = client.post(reverse("new-experiment"), {
        **form_data, "strategy": strategy, f"strategy_params.{parameter['name']}": str(value),
        "client_fraction": "0.5", "aggregation_weighting": "uniform", "dp_clip": "1.5",
        "dp_noise": "0.7", "dp_delta": "1e-5", "dp_at": "server",
    })  # fmt: skip

    assert response.status_code == 302, response.content.decode()[:2000]
    experiment = Experiment.objects.get(name="from the form")
    assert experiment.strategy_params[parameter["name"]] == value
    assert (experiment.client_fraction, experiment.clients_per_round) == (0.5, 2)
    assert (experiment.aggregation_weighting, experiment.dp_clip, experiment.dp_noise) == (
        "uniform", 1.5, 0.7,
    )  # fmt: skip


def test_the_form_names_a_bad_strategy_parameter(client, form_data):
    strategy, parameter = first_parameter()

    response = client.post(reverse("new-experiment"), {
        **form_data, "strategy": strategy, f"strategy_params.{parameter['name']}": "-1e9",
    })  # fmt: skip

    assert response.status_code == 200
    assert parameter["name"] in response.content.decode()
    assert not Experiment.objects.exists()


def test_run_again_opens_the_form_filled_with_the_experiments_settings(client, owner):
    source = ExperimentFactory(owner=owner, name="baseline", learning_rate=0.0123, seed=42,
                               status=ExperimentStatus.COMPLETED)  # fmt: skip

    experiment_page = client.get(reverse("experiment-page", args=[source.pk])).content.decode()
    form = client.get(reverse("new-experiment"), {"clone": source.pk}).content.decode()

    assert f"?clone={source.pk}" in experiment_page and "Run again with changes" in experiment_page
    assert 'value="baseline (again)"' in form
    assert 'value="0.0123"' in form and 'value="42"' in form
    assert f'name="cloned_from" value="{source.pk}"' in form


def test_a_member_runs_someone_elses_experiment_again_with_a_change(client, dataset_root):
    source = ExperimentFactory(
        dataset=DatasetFactory(path=str(dataset_root)), name="shared", seed=1,
        strategy_params=validate_strategy_params("fedavg", {}),
    )  # fmt: skip
    member = UserFactory(username="member")
    source.members.add(member)
    client.force_login(member)
    form = client.get(reverse("new-experiment"), {"clone": source.pk}).content.decode()
    assert f'<option value="{source.dataset_id}" selected' in form

    response = client.post(reverse("new-experiment"), {
        "cloned_from": source.pk, "name": "mine now", "dataset": source.dataset_id,
        "sites": [site.slug for site in source.sites.all()], "clients_per_round": "2",
        "min_clients": "1", "seed": "2", "strategy": "fedavg", "client_fraction": "",
    })  # fmt: skip

    assert response.status_code == 302, response.content.decode()[:2000]
    clone = Experiment.objects.get(name="mine now")
    assert (clone.owner, clone.cloned_from, clone.seed) == (member, source, 2)


def test_the_sweep_form_creates_a_queued_grid_and_opens_its_comparison(client, form_data):
    response = client.post(reverse("new-sweep"), {
        "name": "lr sweep", "dataset": form_data["dataset"], "sites": form_data["sites"],
        "strategies": ["fedavg"], "partitions": "iid, dirichlet:0.5", "seeds": "0, 1",
        "extra_grid": '{"learning_rate": [0.01, 0.1]}', "num_rounds": "2",
        "clients_per_round": "2", "min_clients": "1", "max_running": "3",
        "target_metric": "accuracy", "target_value": "0.75",
    })  # fmt: skip

    sweep = Sweep.objects.get(name="lr sweep")
    assert response.status_code == 302
    assert response["Location"] == reverse("sweep-page", args=[sweep.pk])
    assert sweep.experiments.count() == 2 * 2 * 2
    assert sweep.experiments.filter(status=ExperimentStatus.RUNNING).count() == 3
    assert (sweep.max_running, sweep.target_value) == (3, 0.75)
    page = client.get(response["Location"]).content.decode()
    assert "sweep.js" in page and "lr sweep" in page
    assert "lr sweep" in client.get(reverse("sweeps")).content.decode()


def test_the_sweep_form_names_what_is_wrong_and_stores_nothing(client, form_data):
    response = client.post(reverse("new-sweep"), {
        "name": "bad", "dataset": form_data["dataset"], "sites": form_data["sites"],
        "strategies": ["fedavg"], "partitions": "iid, zipf", "seeds": "0",
        "clients_per_round": "2", "min_clients": "1",
    })  # fmt: skip

    assert response.status_code == 200
    assert "partition=zipf" in response.content.decode()
    assert not Sweep.objects.exists()


def test_a_sweep_page_is_404_for_someone_else(client, owner):
    sweep = Sweep.objects.create(owner=UserFactory(), name="theirs", grid={"seed": [0]})

    assert client.get(reverse("sweep-page", args=[sweep.pk])).status_code == 404
    assert "theirs" not in client.get(reverse("sweeps")).content.decode()


def test_compare_shows_final_metrics_and_rounds_to_the_target(client, owner):
    fast = ExperimentFactory(owner=owner, name="fast")
    slow = ExperimentFactory(owner=owner, name="slow")
    for experiment, accuracies in ((fast, [0.85, 0.9]), (slow, [0.5, 0.6])):
        for number, accuracy in enumerate(accuracies, start=1):
            RoundFactory(experiment=experiment, number=number, status="closed",
                         metrics={"global": {"accuracy": accuracy}})  # fmt: skip

    page = client.get(reverse("compare"), {"experiment": [fast.pk, slow.pk]}).content.decode()

    table = page.split('id="compare-summary"')[1].split("</table>")[0]
    fast_row, slow_row = table.split("<tr>")[2:4]
    assert "0.9000" in fast_row and "1.0 (1/1)" in fast_row
    assert "0.6000" in slow_row and "not reached" in slow_row


def test_the_experiment_page_shows_the_strategy_parameters_and_sampling(client, owner):
    experiment = ExperimentFactory(
        owner=owner, strategy_params={"server_learning_rate": 0.5}, client_fraction=0.5,
        clients_per_round=1, aggregation_weighting="uniform",
    )  # fmt: skip

    page = client.get(reverse("experiment-page", args=[experiment.pk])).content.decode()

    assert "fedavg (server_learning_rate=0.5)" in page
    assert "0.5 of the sites (min 1), uniform" in page
