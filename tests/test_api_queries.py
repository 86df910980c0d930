"""List endpoints run a fixed number of queries however many rows they return."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.conftest import client_for
from tests.factories import (
    CheckpointFactory,
    ClientUpdateFactory,
    ExperimentFactory,
    RoundFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db


def make_ledger(owner, members):
    experiment = ExperimentFactory(owner=owner, members=members)
    for number in (1, 2):
        ledger_round = RoundFactory(experiment=experiment, number=number)
        ClientUpdateFactory(round=ledger_round, site=experiment.sites.first())
        CheckpointFactory(experiment=experiment, round=ledger_round)


def count_queries(client, url) -> int:
    with CaptureQueriesContext(connection) as captured:
        assert client.get(url).status_code == 200
    return len(captured.captured_queries)


@pytest.mark.parametrize(
    "url",
    [
        "/api/experiments/",
        "/api/rounds/",
        "/api/client-updates/",
        "/api/checkpoints/",
        "/api/datasets/",
        "/api/sites/",
    ],
)
@pytest.mark.parametrize("staff", [False, True])
def test_list_queries_do_not_grow_with_rows(url, staff):
    user = UserFactory(is_staff=staff)
    members = UserFactory.create_batch(2)
    client = client_for(user)
    make_ledger(user, members)
    with_few = count_queries(client, url)

    for _ in range(5):
        make_ledger(user, members)
    with_many = count_queries(client, url)

    assert with_many == with_few
