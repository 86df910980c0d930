"""The agent's folder (``$FEDLENS_SITE_HOME``, by default ``~/.fedlens-site``).

It holds secrets (the site's API credential and broker password) and where the site's
data lives, so the folder is 0700 and every file in it 0600, written atomically: a crash
or a full disk never leaves a half-written credential behind.

    credentials.json   the server's URL, the API credential, the broker URL, the queue
    ca.pem             the CA that the server's certificate is checked against, if given
    datasets.json      dataset name -> {path, format}; paths never leave the node
    approvals.json     whether approval is required, and the operator's decisions
    cache/weights/     round weights, by SHA-256
    state/<experiment>/<name>.safetensors
                       what the site keeps between an experiment's rounds (FedBN's local
                       layers, SCAFFOLD's control variate); it never leaves the node
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from training.fl.client import SITE_STATE_NAME
from training.fl.weights import load_weights, weights_to_bytes

HOME_VARIABLE = "FEDLENS_SITE_HOME"
DEFAULT_HOME = "~/.fedlens-site"
PRIVATE_FOLDER = 0o700
PRIVATE_FILE = 0o600


class SiteAgentError(Exception):
    """An expected failure, told to the operator as one sentence (no traceback)."""


@dataclass(frozen=True, kw_only=True)
class Credentials:
    server: str
    credential: str
    broker_url: str
    queue: str
    slug: str
    name: str
    # The CA bundle that verifies the server's and the broker's TLS; a relative path is in
    # the home, so that a home copied elsewhere (a pod's emptyDir) still finds it.
    ca_file: str | None = None
    # Seconds after which the broker delivers an unacknowledged message again; it must
    # match the server's (its training time limit plus a margin).
    visibility_timeout: float = 4200.0


def write_private_file(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``, atomically and readable by the owner only."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        # mkstemp creates the file 0600 already; say so rather than rely on it.
        os.fchmod(descriptor, PRIVATE_FILE)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_private_json(path: Path, content: Any) -> None:
    """Replace ``path`` with ``content`` as JSON, atomically and readable by the owner only."""
    text = json.dumps(content, indent=2, sort_keys=True) + "\n"
    write_private_file(path, text.encode("utf-8"))


class PrivateSiteState:
    """The site's state in one experiment (training.fl.client.SiteState): safetensors
    files in a 0700 folder of the home, each 0600."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def file(self, name: str) -> Path:
        if not SITE_STATE_NAME.fullmatch(name):
            raise ValueError(f"a site state entry's name must match {SITE_STATE_NAME.pattern}")
        return self.folder / f"{name}.safetensors"

    def load(self, name: str) -> dict[str, torch.Tensor] | None:
        path = self.file(name)
        return load_weights(path) if path.exists() else None

    def save(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        SiteHome.private_folder(self.folder)
        write_private_file(self.file(name), weights_to_bytes(tensors))


class SiteHome:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()

    @classmethod
    def from_environment(cls) -> SiteHome:
        return cls(os.environ.get(HOME_VARIABLE) or DEFAULT_HOME)

    @property
    def credentials_file(self) -> Path:
        return self.path / "credentials.json"

    @property
    def datasets_file(self) -> Path:
        return self.path / "datasets.json"

    @property
    def approvals_file(self) -> Path:
        return self.path / "approvals.json"

    @property
    def ca_file(self) -> Path:
        return self.path / "ca.pem"

    @property
    def weights_cache(self) -> Path:
        return self.private_folder(self.path / "cache" / "weights")

    def site_state(self, experiment: int) -> PrivateSiteState:
        self.ensure()
        return PrivateSiteState(self.private_folder(self.path / "state") / str(int(experiment)))

    def ensure(self) -> Path:
        """Create the folder 0700, or narrow an existing one to 0700."""
        self.private_folder(self.path)
        return self.path

    @staticmethod
    def private_folder(path: Path) -> Path:
        path.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)
        if path.stat().st_mode & 0o077:
            path.chmod(PRIVATE_FOLDER)
        return path

    def read(self, path: Path, default: Any) -> Any:
        try:
            with path.open(encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return default
        except (OSError, json.JSONDecodeError) as error:
            raise SiteAgentError(f"cannot read {path}: {error}") from None

    def write(self, path: Path, content: Any) -> None:
        self.ensure()
        write_private_json(path, content)

    # --- credentials ----------------------------------------------------------------------
    def is_enrolled(self) -> bool:
        return self.credentials_file.exists()

    def credentials(self) -> Credentials:
        stored = self.read(self.credentials_file, None)
        if stored is None:
            raise SiteAgentError(
                f"this node is not enrolled ({self.credentials_file} does not exist); run "
                "`python -m workers.site enroll --server URL --token TOKEN` first"
            )
        try:
            credentials = Credentials(**stored)
        except TypeError:
            raise SiteAgentError(
                f"{self.credentials_file} is not a FedLens site credential file; enrol again"
            ) from None
        if credentials.ca_file:
            return replace(credentials, ca_file=str(self.path / credentials.ca_file))
        return credentials

    def save_credentials(self, credentials: Credentials) -> None:
        stored = asdict(credentials)
        if credentials.ca_file and Path(credentials.ca_file).parent == self.path:
            stored["ca_file"] = Path(credentials.ca_file).name
        self.write(self.credentials_file, stored)

    # --- datasets -------------------------------------------------------------------------
    def datasets(self) -> dict[str, dict[str, Any]]:
        declared: dict[str, dict[str, Any]] = self.read(self.datasets_file, {})
        return declared

    def save_datasets(self, datasets: Mapping[str, Mapping[str, Any]]) -> None:
        self.write(self.datasets_file, dict(datasets))

    # --- approvals ------------------------------------------------------------------------
    def approvals(self) -> dict[str, Any]:
        stored: dict[str, Any] = self.read(self.approvals_file, {})
        stored.setdefault("requires_approval", False)
        stored.setdefault("decisions", {})
        return stored

    def save_approvals(self, approvals: Mapping[str, Any]) -> None:
        self.write(self.approvals_file, dict(approvals))
