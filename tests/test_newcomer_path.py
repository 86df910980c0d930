"""The first steps of a new user: `make demo` on a busy port, the CLI's progress output."""

import io
import socket

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError, OutputWrapper

from tests.factories import ClientUpdateFactory, ExperimentFactory, RoundFactory, UserFactory
from training.models import (
    ClientUpdateStatus,
    Dataset,
    Experiment,
    ExperimentStatus,
    RoundStatus,
)
from training.runner import watch_experiment

pytestmark = pytest.mark.django_db


def test_demo_on_a_busy_port_says_how_to_pick_another_and_creates_nothing():
    UserFactory(username="admin", is_superuser=True, is_staff=True)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(CommandError, match=rf"PORT={port + 1}"):
            call_command("demo", "--port", str(port))

    assert not Experiment.objects.exists()
    assert not Dataset.objects.exists()


def test_progress_bars_refresh_in_place_through_a_command_output():
    experiment = ExperimentFactory(status=ExperimentStatus.COMPLETED, current_round=2)
    for number in (1, 2):
        fl_round = RoundFactory(experiment=experiment, number=number, status=RoundStatus.CLOSED)
        for _ in range(3):
            ClientUpdateFactory(round=fl_round, status=ClientUpdateStatus.SUCCEEDED)
    captured = io.StringIO()

    watch_experiment(experiment.pk, out=OutputWrapper(captured))

    # One bar for the round being shown, refreshed with carriage returns and ended once;
    # a line ending appended to every refresh printed one line per refresh.
    lines = captured.getvalue().split("\n")
    assert len([line for line in lines if line.strip()]) == 1
    assert "round 2" in lines[0] and "3/3" in lines[0]
