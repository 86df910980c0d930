"""The client protocol's connection over HTTPS: a site's agent fetches the round's weights
and sends its update through the Site API, with its own credential."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from training.fl.client import GLOBAL_MODEL, ClientReport, ClientTask
from training.fl.weights import load_weights_file, save_weights
from workers.site.api import SiteApi
from workers.site.home import PrivateSiteState, SiteHome


def report_body(report: ClientReport) -> dict[str, Any]:
    """A report as the Site API's result endpoint takes it (JSON)."""
    return {
        "num_samples": report.num_samples,
        "metrics": dict(report.metrics),
        "extras": dict(report.extras),
        "evaluation": dict(report.evaluation),
    }


class RemoteConnection:
    """:class:`training.fl.client.ClientConnection` to the server, over its Site API."""

    def __init__(self, api: SiteApi, home: SiteHome) -> None:
        self.api = api
        self.home = home
        self.weights_cache = home.weights_cache

    def starting_weights(self, task: ClientTask) -> Mapping[str, torch.Tensor]:
        path = self.api.download_weights(
            task.client_update, task.weights_sha256, self.weights_cache
        )
        # Hashed again while read: the cached file may have changed on disk since.
        return load_weights_file(path, expected_sha256=task.weights_sha256)

    def strategy_payload(self, task: ClientTask) -> Mapping[str, torch.Tensor]:
        path = self.api.download_payload(
            task.client_update, task.payload_sha256, self.weights_cache
        )
        return load_weights_file(path, expected_sha256=task.payload_sha256)

    def site_state(self, task: ClientTask) -> PrivateSiteState:
        return self.home.site_state(task.experiment)

    def evaluation_weights(self, task: ClientTask, label: str) -> Mapping[str, torch.Tensor]:
        # The global model is the one the task starts from: the task names its hash.
        known = task.weights_sha256 if label == GLOBAL_MODEL else None
        path = self.api.download_evaluation_model(
            task.client_update, label, self.weights_cache, sha256=known
        )
        # The file is named by the SHA-256 it was checked against when downloaded.
        return load_weights_file(path, expected_sha256=path.name.removesuffix(".safetensors"))

    def send_update(
        self, task: ClientTask, weights: Mapping[str, torch.Tensor], report: ClientReport
    ) -> bool:
        # The update goes through a file so that the upload streams it rather than holding
        # a second copy of the model in memory.
        with tempfile.TemporaryDirectory(dir=self.weights_cache.parent) as folder:
            update = Path(folder) / f"update-{task.client_update}.safetensors"
            info = save_weights(weights, update)
            if not self.api.upload_update(task.client_update, update, info.sha256):
                return False
        return self.api.send_result(task.client_update, report_body(report))

    def send_evaluation(self, task: ClientTask, report: ClientReport) -> bool:
        return self.api.send_result(task.client_update, report_body(report))

    def send_failure(self, task: ClientTask, error: str) -> bool:
        return self.api.send_failure(task.client_update, error)
