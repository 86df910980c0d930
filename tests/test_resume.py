"""Resume: who may, what it sends again, when it is refused (409), and the page's button."""

import json
import logging
import logging.config
import os
import socket
from datetime import timedelta

import psutil
import pytest
from auditlog.models import LogEntry
from django.core.cache import cache
from django.utils import timezone

from tests.conftest import client_for, uses_redis
from tests.factories import ClientUpdateFactory, ExperimentFactory, RoundFactory, UserFactory
from training import services
from training.models import ClientUpdateStatus, ExperimentStatus, RoundStatus
from training.runner import quiet_task_logs
from visualization import worker_status
from workers.embedded import orphaned_experiments, resume_orphaned_experiments

pytestmark = pytest.mark.django_db

ROLES = ["anonymous", "owner", "member", "other", "staff"]


@pytest.fixture
def stalled():
    """A running experiment whose round 2 has one client reported, one claimed by a worker
    that died and one never claimed."""
    owner = UserFactory(username="owner")
    experiment = ExperimentFactory(
        owner=owner, members=[UserFactory(username="member")], clients_per_round=3
    )
    experiment.transition_to(ExperimentStatus.RUNNING)
    RoundFactory(experiment=experiment, number=1, status=RoundStatus.CLOSED)
    open_round = RoundFactory(
        experiment=experiment, number=2, deadline=timezone.now() + timedelta(seconds=5)
    )
    finished = ClientUpdateFactory(
        round=open_round, status=ClientUpdateStatus.SUCCEEDED, attempts=1, num_samples=10
    )
    claimed = ClientUpdateFactory(
        round=open_round, status=ClientUpdateStatus.RUNNING, attempts=1, worker="dead@host",
        started_at=timezone.now(), task_id="lost-task",
    )  # fmt: skip
    waiting = ClientUpdateFactory(round=open_round, attempts=1, task_id="never-run")
    experiment.current_round = 2
    experiment.save(update_fields=["current_round"])
    return {
        "experiment": experiment,
        "round": open_round,
        "finished": finished,
        "claimed": claimed,
        "waiting": waiting,
        "users": {
            "anonymous": None,
            "owner": owner,
            "member": experiment.members.get(),
            "other": UserFactory(username="other"),
            "staff": UserFactory(username="staff", is_staff=True),
        },
    }


def resume(user, experiment):
    return client_for(user).post(f"/api/experiments/{experiment.pk}/resume/")


@pytest.mark.parametrize(
    ("role", "expected"), list(zip(ROLES, [401, 200, 403, 404, 200], strict=True))
)
def test_only_who_may_start_an_experiment_may_resume_it(stalled, role, expected):
    response = resume(stalled["users"][role], stalled["experiment"])

    assert response.status_code == expected
    stalled["claimed"].refresh_from_db()
    assert (stalled["claimed"].attempts == 2) == (expected == 200)


def test_resume_sends_the_unfinished_clients_again_and_keeps_what_was_recorded(stalled):
    before = timezone.now()

    response = resume(stalled["users"]["owner"], stalled["experiment"])

    assert response.status_code == 200, response.json()
    assert response.json()["status"] == ExperimentStatus.RUNNING
    for key in ("claimed", "waiting"):
        update = stalled[key]
        old_task = update.task_id
        update.refresh_from_db()
        assert update.status == ClientUpdateStatus.PENDING
        assert update.worker == "" and update.started_at is None
        assert update.attempts == 2
        assert update.task_id != old_task
    stalled["finished"].refresh_from_db()
    assert stalled["finished"].status == ClientUpdateStatus.SUCCEEDED
    assert stalled["finished"].attempts == 1 and stalled["finished"].num_samples == 10
    stalled["round"].refresh_from_db()
    assert stalled["round"].status == RoundStatus.OPEN
    assert stalled["round"].recoveries == 1
    # A full round's time from the resume, not from the dead process's start.
    assert stalled["round"].deadline >= before + timedelta(
        seconds=stalled["experiment"].round_timeout_seconds
    )


def test_resume_is_written_to_the_audit_log_with_what_was_sent(stalled):
    owner = stalled["users"]["owner"]

    resume(owner, stalled["experiment"])

    entry = LogEntry.objects.get(additional_data__verb="resume")
    assert entry.actor == owner
    assert entry.object_pk == str(stalled["experiment"].pk)
    assert entry.additional_data["sent"] == "2 client task(s) of round 2"


def test_a_round_whose_clients_all_reported_is_closed_by_resume(stalled):
    for key in ("claimed", "waiting"):
        stalled[key].status = ClientUpdateStatus.SUCCEEDED
        stalled[key].save(update_fields=["status"])

    resume(stalled["users"]["owner"], stalled["experiment"])

    stalled["round"].refresh_from_db()
    assert stalled["round"].status == RoundStatus.AGGREGATING
    assert stalled["round"].aggregation_task_id


def test_an_aggregating_round_gets_its_aggregation_again(stalled):
    fl_round = stalled["round"]
    fl_round.status = RoundStatus.AGGREGATING
    fl_round.aggregation_task_id = "lost-aggregation"
    fl_round.save(update_fields=["status", "aggregation_task_id"])

    response = resume(stalled["users"]["owner"], stalled["experiment"])

    assert response.status_code == 200
    fl_round.refresh_from_db()
    assert fl_round.status == RoundStatus.AGGREGATING
    assert fl_round.aggregation_task_id not in ("", "lost-aggregation")
    assert fl_round.recoveries == 1


@pytest.mark.parametrize(
    ("status", "says"),
    [
        (ExperimentStatus.DRAFT, "is a draft: start it instead"),
        (ExperimentStatus.QUEUED, "waits for its sites' approvals"),
        (ExperimentStatus.COMPLETED, "an experiment that ended cannot be resumed"),
        (ExperimentStatus.FAILED, "an experiment that ended cannot be resumed"),
        (ExperimentStatus.STOPPED, "an experiment that ended cannot be resumed"),
    ],
)
def test_an_experiment_that_is_not_running_is_refused_with_the_reason(status, says):
    experiment = ExperimentFactory(status=status)

    response = resume(experiment.owner, experiment)

    assert response.status_code == 409
    assert says in response.json()["detail"]
    assert not LogEntry.objects.filter(additional_data__verb="resume").exists()


def register_process(folder, *, pid: int, started: float, experiments: list[int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    entry = {"hostname": socket.gethostname(), "pid": pid, "started": started,
             "experiments": experiments}  # fmt: skip
    (folder / f"{socket.gethostname()}-{pid}.json").write_text(json.dumps(entry))


@pytest.fixture
def embedded(settings, tmp_path):
    settings.FEDLENS_EMBEDDED = True
    settings.FEDLENS_DATA_DIR = tmp_path
    return tmp_path / "embedded-processes"


def test_embedded_an_experiment_that_a_live_process_runs_is_refused(stalled, embedded):
    this_process = psutil.Process()
    register_process(
        embedded,
        pid=this_process.pid,
        started=this_process.create_time(),
        experiments=[stalled["experiment"].pk],
    )

    response = resume(stalled["users"]["owner"], stalled["experiment"])

    assert response.status_code == 409
    assert f"is being run by process {os.getpid()}" in response.json()["detail"]


def test_embedded_an_experiment_whose_process_died_resumes(stalled, embedded):
    # This pid's process started after the recorded time: the recorded one is gone.
    this_process = psutil.Process()
    register_process(
        embedded,
        pid=this_process.pid,
        started=this_process.create_time() - 1000,
        experiments=[stalled["experiment"].pk],
    )

    response = resume(stalled["users"]["owner"], stalled["experiment"])

    assert response.status_code == 200, response.json()
    assert not list(embedded.glob("*.json"))  # the dead process's entry was removed


def page(user, experiment):
    client = client_for(None)
    client.force_login(user)
    return client.get(f"/experiments/{experiment.pk}/").content.decode()


def test_the_page_offers_resume_and_says_no_process_runs_an_orphaned_experiment(stalled, embedded):
    html = page(stalled["users"]["owner"], stalled["experiment"])

    assert 'id="resume"' in html
    assert 'id="no-worker"' in html and "No process is running this experiment" in html


def test_the_page_offers_no_resume_to_a_viewer_nor_while_a_live_process_runs_it(stalled, embedded):
    assert 'id="resume"' not in page(stalled["users"]["member"], stalled["experiment"])
    this_process = psutil.Process()
    register_process(
        embedded,
        pid=this_process.pid,
        started=this_process.create_time(),
        experiments=[stalled["experiment"].pk],
    )

    html = page(stalled["users"]["owner"], stalled["experiment"])

    assert 'id="resume"' not in html and 'id="no-worker"' not in html


def test_the_page_offers_no_resume_for_an_experiment_that_ended(embedded):
    experiment = ExperimentFactory(status=ExperimentStatus.COMPLETED)

    html = page(experiment.owner, experiment)

    assert 'id="resume"' not in html and 'id="no-worker"' not in html


@pytest.mark.skipif(not uses_redis(), reason="needs Redis (CI=true makes it required)")
def test_the_page_says_when_no_worker_consumes_the_experiments_queues(stalled):
    cache.delete(worker_status.CONSUMED_QUEUES_CACHE_KEY)  # this suite starts no worker

    html = page(stalled["users"]["owner"], stalled["experiment"])

    assert 'id="no-worker"' in html
    assert "No worker is alive on queue training, aggregation" in html
    assert 'id="resume"' not in html  # the watchdog's job in distributed mode


def test_the_embedded_server_resumes_only_the_experiments_of_dead_processes(stalled, embedded):
    alive = ExperimentFactory(clients_per_round=1)
    alive.transition_to(ExperimentStatus.RUNNING)
    this_process = psutil.Process()
    register_process(
        embedded, pid=this_process.pid, started=this_process.create_time(), experiments=[alive.pk]
    )

    resumed = resume_orphaned_experiments()

    assert [each.experiment.pk for each in resumed] == [stalled["experiment"].pk]


def test_an_embedded_watchdog_leaves_a_dead_processs_overdue_round_to_resume(stalled, embedded):
    later = timezone.now() + timedelta(minutes=1)  # round 2's deadline has passed

    closed = services.close_overdue_rounds(later, leave_alone=frozenset(orphaned_experiments()))

    assert closed == []
    stalled["experiment"].refresh_from_db()
    assert stalled["experiment"].status == ExperimentStatus.RUNNING


def test_quiet_task_logs_outlast_django_setting_logging_up_again(settings):
    trace = logging.getLogger("celery.app.trace")
    configured = settings.LOGGING["loggers"]["celery"]["level"]

    with quiet_task_logs(verbosity=1):
        # What Celery's Django fix-up does as the embedded worker starts.
        logging.config.dictConfig(settings.LOGGING)
        quiet = not trace.isEnabledFor(logging.INFO)
    logging.config.dictConfig(settings.LOGGING)

    assert quiet
    assert settings.LOGGING["loggers"]["celery"]["level"] == configured  # restored on exit
