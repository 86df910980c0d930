"""The site's Celery app and its training task (no Django).

    celery -A workers.site.worker worker --queues site.<slug> ...   (started by `run`)

The server sends ``TRAIN_CLIENT_TASK`` with ``[client_update_id, round_id, site_id]`` to
the site's queue. The task claims its ledger row over HTTPS (the server answers with the
task's description, or 409 when it is no longer to be done), checks the operator's local
approval, opens the declared dataset and runs the client protocol with a
:class:`RemoteConnection`. The broker connection is the site's own ACL user, which can
touch only its queue and its own unacknowledged-message keys (training/site_broker.py),
so the app sends nothing else through the broker: no results, events, remote control,
gossip, mingle or heartbeats.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from kombu import Exchange, Queue
from torch import nn

from training.fl.client import ClientTask, LocalData, TaskFormatError, run_client_task
from training.fl.data import ClassificationDataset, Preprocessor
from training.fl.networks import build_network
from training.queues import TRAIN_CLIENT_TASK, site_queue
from training.site_broker import transport_options
from workers.site.api import SiteApi
from workers.site.connection import RemoteConnection
from workers.site.describe import open_dataset
from workers.site.home import Credentials, SiteAgentError, SiteHome

log = logging.getLogger(__name__)

# Opened datasets and built networks kept per worker process, most recent last.
CACHED_PER_PROCESS = 4


def no_dataset_message(name: str) -> str:
    return (
        f"this site has no dataset named {name}; declare it with "
        "`python -m workers.site datasets add`"
    )


def approval_refusal(approvals: Mapping[str, Any], experiment: int) -> str | None:
    """Why this site's operator does not let ``experiment`` use the site's data, or None.

    An explicit refusal always holds; otherwise an experiment needs an approval only while
    the operator requires approvals.
    """
    decision = approvals.get("decisions", {}).get(str(experiment), {})
    refused = decision.get("decision") == "refuse"
    approved = decision.get("decision") == "approve"
    if refused or (approvals.get("requires_approval") and not approved):
        message = f"experiment {experiment} is not approved by this site's operator"
        reason = decision.get("reason") if refused else ""
        return f"{message} (refused: {reason})" if reason else message
    return None


class _ProcessCache:
    """A few recently used values (datasets, networks) of this worker process."""

    def __init__(self) -> None:
        self.values: dict[Any, Any] = {}

    def get(self, key: Any, build: Any) -> Any:
        if key in self.values:
            self.values[key] = self.values.pop(key)  # most recent last
        else:
            self.values[key] = build()
            while len(self.values) > CACHED_PER_PROCESS:
                self.values.pop(next(iter(self.values)))
        return self.values[key]


_datasets = _ProcessCache()
_networks = _ProcessCache()


def open_local_data(task: ClientTask, declared: Mapping[str, Any]) -> LocalData:
    """The declared dataset, preprocessed to the task's image shape, channels and
    normalization; all of its samples are this client's."""
    # image_shape is in array order ((depth,) height, width); resampling takes x, y(, z).
    size = tuple(reversed(task.data.image_shape)) or None
    # A segmentation dataset's masks are checked against the experiment's classes.
    class_names = list(task.data.class_names) or None
    key = (
        declared["path"],
        declared["format"],
        size,
        task.data.channels,
        task.data.normalization,
        tuple(class_names or ()),
    )

    def load() -> ClassificationDataset:
        preprocessor = Preprocessor(
            size=size, channels=task.data.channels, normalization=task.data.normalization
        )
        return open_dataset(declared["path"], declared["format"], preprocessor, class_names)

    dataset: ClassificationDataset = _datasets.get(key, load)
    if int(dataset.labels.max()) >= task.data.num_classes:
        raise ValueError(
            f"dataset {task.data.name} here has labels up to {int(dataset.labels.max())}, "
            f"but the experiment has {task.data.num_classes} classes"
        )
    return dataset, list(range(len(dataset)))


def network_for(task: ClientTask) -> nn.Module:
    """A module of the task's architecture, reused across the experiment's rounds (its
    weights are replaced by the round's)."""
    spec = task.network
    key = (task.experiment, json.dumps(task.to_json()["network"], sort_keys=True))

    def build() -> nn.Module:
        return build_network(
            spec.name,
            in_channels=spec.in_channels,
            num_classes=spec.num_classes,
            spatial_dims=spec.spatial_dims,
            **spec.params,
        )

    module: nn.Module = _networks.get(key, build)
    return module


def api_for(credentials: Credentials) -> SiteApi:
    return SiteApi(credentials.server, credentials.credential, ca_file=credentials.ca_file)


def run_site_task(home: SiteHome, client_update_id: int, round_id: int, worker: str) -> str:
    """Do one training task; returns what became of it (for the worker's log)."""
    # Read per task: the operator may rotate the credential, declare a dataset or decide
    # on an approval while the worker runs.
    api = api_for(home.credentials())
    described = api.claim(client_update_id, round_id, worker)
    if described is None:
        log.info("client update %s is no longer to be done; dropped", client_update_id)
        return "dropped"
    try:
        task = ClientTask.from_json(described)
    except TaskFormatError as error:
        api.send_failure(client_update_id, str(error))
        return "failed"
    connection = RemoteConnection(api, home)
    refusal = approval_refusal(home.approvals(), task.experiment)
    if refusal:
        connection.send_failure(task, refusal)
        return "refused"
    declared = home.datasets().get(task.data.name)
    if declared is None:
        connection.send_failure(task, no_dataset_message(task.data.name))
        return "failed"
    counted = run_client_task(
        task,
        connection,
        local_data=lambda task: open_local_data(task, declared),
        network=network_for,
    )
    return "counted" if counted else "not counted"


def create_app(home: SiteHome) -> Celery:
    credentials = home.credentials()
    queue = site_queue(credentials.slug)
    app = Celery("fedlens-site", set_as_current=False)
    app.conf.update(
        broker_url=credentials.broker_url,
        broker_transport_options=transport_options(
            credentials.slug, credentials.visibility_timeout
        ),
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        task_queues=[Queue(queue, Exchange(queue, type="direct"), routing_key=queue)],
        task_default_queue=queue,
        task_create_missing_queues=False,
        # Ended before the broker would hand the message to another worker.
        task_time_limit=max(credentials.visibility_timeout - 300, 60),
    )
    if urlsplit(credentials.broker_url).scheme == "rediss":
        app.conf.broker_use_ssl = {
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
            "ssl_ca_certs": credentials.ca_file,
        }

    @app.task(name=TRAIN_CLIENT_TASK, bind=True, ignore_result=True)
    def train_client(self: Any, client_update_id: int, round_id: int, site_id: int) -> str:
        # site_id is the server's; the credential tells the server which site asks.
        outcome = run_site_task(home, client_update_id, round_id, self.request.hostname or "")
        log.info("client update %s: %s", client_update_id, outcome)
        return outcome

    return app


_app: Celery | None = None


def __getattr__(name: str) -> Celery:
    # `celery -A workers.site.worker` reads the module's `app`; it is built on first use so
    # that the CLI and the tests import this module on a node not enrolled yet.
    global _app
    if name != "app":
        raise AttributeError(name)
    if _app is None:
        try:
            _app = create_app(SiteHome.from_environment())
        except SiteAgentError as error:
            raise SystemExit(f"error: {error}") from None
    return _app
