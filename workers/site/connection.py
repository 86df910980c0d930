"""The client protocol's connection over HTTPS: a site's agent fetches the round's weights
and sends its update through the Site API, with its own credential."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from training.fl.client import ClientReport, ClientTask
from training.fl.weights import load_weights_file, save_weights
from workers.site.api import SiteApi


class RemoteConnection:
    """:class:`training.fl.client.ClientConnection` to the server, over its Site API."""

    def __init__(self, api: SiteApi, weights_cache: Path) -> None:
        self.api = api
        self.weights_cache = weights_cache

    def starting_weights(self, task: ClientTask) -> Mapping[str, torch.Tensor]:
        path = self.api.download_weights(
            task.client_update, task.weights_sha256, self.weights_cache
        )
        # Hashed again while read: the cached file may have changed on disk since.
        return load_weights_file(path, expected_sha256=task.weights_sha256)

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
        described = asdict(report)
        return self.api.send_result(
            task.client_update,
            {
                "num_samples": described["num_samples"],
                "metrics": dict(report.metrics),
                "extras": dict(report.extras),
                "evaluation": dict(report.evaluation),
            },
        )

    def send_failure(self, task: ClientTask, error: str) -> bool:
        return self.api.send_failure(task.client_update, error)
