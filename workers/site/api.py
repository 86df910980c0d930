"""The HTTP client of the server's Site API (``{server}/api/site/``).

Every request but enrolment carries ``Authorization: Site <credential>``; the server
decides from it which site is asking, so no request names the site. TLS is verified
against the system's CAs, or against the CA file the operator gave at enrolment.
Expected failures (unreachable server, refused credential, TLS, the server's validation
errors) become :class:`SiteApiError` with one sentence that says what to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import requests
import urllib3

from workers.site import AGENT_VERSION
from workers.site.home import SiteAgentError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 10
# Between two bytes of a response, not for a whole download.
READ_TIMEOUT_SECONDS = 120
DOWNLOAD_ATTEMPTS = 5
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
# Weights files kept in the cache besides the one in use: a late client of the previous
# round may still ask for its weights.
WEIGHTS_KEPT = 2
# The longest failure message the server stores.
MAX_ERROR_CHARACTERS = 4000
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


class SiteApiError(SiteAgentError):
    """The server answered with an error, or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_server_url(url: str) -> str:
    """The server's base URL without a trailing slash; https, or http to this machine."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise SiteAgentError(f"the server URL {url!r} must look like https://fedlens.example.org")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise SiteAgentError(
            f"refusing http:// to {parts.hostname}: the site's credentials would cross the "
            "network in clear; use the server's https:// URL"
        )
    return url.rstrip("/")


def error_detail(response: requests.Response) -> str:
    """DRF's error body in one line: ``{"detail": ...}`` or ``{"field": [messages]}``."""
    try:
        body = response.json()
    except ValueError:
        return response.reason or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        if "detail" in body:
            return str(body["detail"])
        parts = []
        for field, messages in body.items():
            text = " ".join(map(str, messages)) if isinstance(messages, list) else str(messages)
            parts.append(text if field == "non_field_errors" else f"{field}: {text}")
        return "; ".join(parts)
    if isinstance(body, list):
        return " ".join(map(str, body))
    return str(body)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(DOWNLOAD_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock between this node's worker processes (one per GPU), which share
    the weights cache and may fetch the same round's weights at once."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class SiteCredentialAuth(requests.auth.AuthBase):
    """``Authorization: Site <credential>``; none before enrolment."""

    def __init__(self, credential: str | None) -> None:
        self.credential = credential

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if self.credential:
            request.headers["Authorization"] = f"Site {self.credential}"
        return request


class SiteApi:
    def __init__(
        self, server: str, credential: str | None = None, *, ca_file: str | None = None
    ) -> None:
        self.server = check_server_url(server)
        # Proxies still come from the environment (a hospital may need one), but neither the
        # CA nor the Authorization header may: REQUESTS_CA_BUNDLE would replace a session's
        # CA file, and a ~/.netrc entry would replace a session's header.
        self.verify: str | bool = ca_file or True
        self.session = requests.Session()
        self.session.auth = SiteCredentialAuth(credential)
        self.session.headers["User-Agent"] = f"fedlens-site/{AGENT_VERSION}"

    def url(self, path: str) -> str:
        return f"{self.server}/api/site/{path}"

    def request(
        self, method: str, path: str, *, expected: tuple[int, ...] = (200,), **options: Any
    ) -> requests.Response:
        """Send a request; any status outside ``expected`` raises :class:`SiteApiError`."""
        options.setdefault("timeout", (CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS))
        options.setdefault("verify", self.verify)
        try:
            response = self.session.request(method, self.url(path), **options)
        except requests.exceptions.SSLError as error:
            raise SiteApiError(
                f"the TLS certificate of {self.server} could not be verified ({reason(error)}); "
                "if the server uses a private CA, enrol with --ca-file"
            ) from None
        except requests.exceptions.Timeout:
            raise SiteApiError(f"the server at {self.server} did not answer in time") from None
        except requests.exceptions.ConnectionError as error:
            raise SiteApiError(
                f"cannot reach the server at {self.server} ({reason(error)})"
            ) from None
        if response.status_code not in expected:
            raise self.failure(response)
        return response

    def failure(self, response: requests.Response) -> SiteApiError:
        status, detail = response.status_code, error_detail(response)
        if status == 401:
            message = (
                f"the server refused this site's credential ({detail}); it may have been "
                "revoked or rotated: enrol again with a new token"
            )
        elif status == 403:
            message = f"the server forbids this ({detail})"
        else:
            message = f"the server answered {status}: {detail}"
        return SiteApiError(message, status=status)

    # --- enrolment and the site itself ----------------------------------------------------
    def enrol(self, token: str, *, hostname: str, devices: list[dict[str, Any]]) -> dict[str, Any]:
        body = {
            "token": token,
            "agent_version": AGENT_VERSION,
            "hostname": hostname,
            "devices": devices,
        }
        response = self.request("POST", "enrol/", json=body, expected=(200, 201, 400))
        if response.status_code == 400:
            raise SiteApiError(
                f"enrolment refused: {error_detail(response)}; ask the FedLens admin for a new "
                "token",
                status=400,
            )
        enrolled: dict[str, Any] = response.json()
        return enrolled

    def me(self) -> dict[str, Any]:
        described: dict[str, Any] = self.request("GET", "me/").json()
        return described

    def heartbeat(self, body: Mapping[str, Any]) -> None:
        self.request("POST", "heartbeat/", json=dict(body))

    def rotate(self) -> dict[str, Any]:
        rotated: dict[str, Any] = self.request("POST", "credentials/rotate/").json()
        return rotated

    # --- datasets and approvals -----------------------------------------------------------
    def put_dataset(self, name: str, metadata: Mapping[str, Any]) -> None:
        response = self.request(
            "PUT", f"datasets/{name}/", json=dict(metadata), expected=(200, 201, 409)
        )
        if response.status_code == 409:
            raise SiteApiError(
                f"the server refused dataset {name!r}: {error_detail(response)}", status=409
            )

    def delete_dataset(self, name: str) -> None:
        self.request("DELETE", f"datasets/{name}/", expected=(204, 404))

    def list_datasets(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = self.request("GET", "datasets/").json()
        return listed

    def list_approvals(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = self.request("GET", "approvals/").json()
        return listed

    def decide(self, experiment: int, decision: str, reason: str = "") -> None:
        body = {"decision": decision, "reason": reason}
        self.request("POST", f"approvals/{experiment}/", json=body, expected=(200, 201))

    # --- a client's task ------------------------------------------------------------------
    def claim(self, client_update: int, round_id: int, worker: str) -> dict[str, Any] | None:
        """The task's description, or None when it is no longer to be done (409)."""
        response = self.request(
            "POST",
            f"tasks/{client_update}/claim/",
            json={"round": round_id, "worker": worker},
            expected=(200, 409),
        )
        if response.status_code == 409:
            return None
        described: dict[str, Any] = response.json()
        return described

    def download_weights(self, client_update: int, sha256: str, cache: Path) -> Path:
        """The round's starting weights in ``cache``, fetched once per round and node.

        A dropped connection resumes where it stopped (Range); the file is used only once
        its SHA-256 is ``sha256``, and older rounds' files are removed.
        """
        return self.download_file(f"tasks/{client_update}/weights/", sha256, cache)

    def download_payload(self, client_update: int, sha256: str, cache: Path) -> Path:
        """The strategy's payload for the task's round, checked against ``sha256``."""
        return self.download_file(f"tasks/{client_update}/payload/", sha256, cache)

    def download_evaluation_model(
        self, client_update: int, label: str, cache: Path, *, sha256: str | None = None
    ) -> Path:
        """A model the evaluate task names, checked against ``sha256`` when the task gives
        it, else against the SHA-256 the server gives for it (asked first, so that a model
        the node already holds is not fetched again)."""
        path = f"tasks/{client_update}/models/{quote(label, safe='')}/"
        if sha256 is None:
            sha256 = self.request("HEAD", path).headers.get("X-Content-SHA256", "")
            if not SHA256_HEX.fullmatch(sha256):
                raise SiteApiError(f"the server gave no SHA-256 for model {label!r} of the task")
        return self.download_file(path, sha256, cache)

    def download_file(self, path: str, sha256: str, cache: Path) -> Path:
        """The file at ``path`` in ``cache``, named by its SHA-256 and fetched once per node
        (resumed with Range after a dropped connection), used only if its SHA-256 is
        ``sha256``; the least recently used files are removed."""
        sha256 = sha256.lower()
        final = cache / f"{sha256}.safetensors"
        with locked(cache / ".lock"):
            if not final.exists():
                partial = cache / f"{sha256}.safetensors.part"
                self._download(path, partial, sha256)
                actual = file_sha256(partial)
                if actual != sha256:
                    partial.unlink()
                    raise SiteApiError(
                        f"the file downloaded from {path} has SHA-256 {actual}, not the "
                        f"expected {sha256}; the bytes were discarded"
                    )
                os.replace(partial, final)
            final.touch()  # the newest use decides which files the pruning keeps
            prune_cache(cache, keep=final)
        return final

    def _download(self, path: str, partial: Path, sha256: str) -> None:
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            offset = partial.stat().st_size if partial.exists() else 0
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            try:
                with self.request(
                    "GET", path, headers=headers, stream=True, expected=(200, 206, 416)
                ) as response:
                    if response.status_code == 416:  # the part is whole already, or stale
                        if offset and file_sha256(partial) == sha256:
                            return
                        partial.unlink(missing_ok=True)
                        continue
                    etag = response.headers.get("ETag", "").strip('"').removeprefix("W/")
                    if etag and etag.strip('"').lower() != sha256:
                        raise SiteApiError(
                            f"the server offers weights {etag} where the task expects {sha256}",
                            status=response.status_code,
                        )
                    resumed = response.status_code == 206
                    with partial.open("ab" if resumed else "wb") as handle:
                        # read1 hands over what has arrived, so that a dropped connection
                        # loses nothing that was received (iter_content drops a part chunk).
                        while chunk := response.raw.read1(DOWNLOAD_CHUNK_BYTES):
                            handle.write(chunk)
                    announced = response.headers.get("Content-Length")
                    expected_size = (offset if resumed else 0) + int(announced or -1)
                    if announced and partial.stat().st_size != expected_size:
                        raise urllib3.exceptions.ProtocolError("the connection closed early")
                return
            except (
                requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ConnectionError,
                requests.exceptions.Timeout,
                urllib3.exceptions.HTTPError,
                SiteApiError,
            ) as error:
                retryable = not isinstance(error, SiteApiError) or error.status is None
                if not retryable or attempt == DOWNLOAD_ATTEMPTS:
                    if isinstance(error, SiteApiError):
                        raise
                    raise SiteApiError(
                        f"the weights download from {self.server} kept failing ({reason(error)})"
                    ) from None
                time.sleep(min(2**attempt, 30) / 4)

    def upload_update(self, client_update: int, weights_file: Path, sha256: str) -> bool:
        """Send the trained weights, streamed from ``weights_file``; False when the server
        did not take them: no longer wanted (409), or refused (400, 413), which the server
        records as this client's failure itself."""
        with weights_file.open("rb") as body:
            response = self.request(
                "PUT",
                f"tasks/{client_update}/update/",
                data=body,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(weights_file.stat().st_size),
                    "X-Content-SHA256": sha256,
                },
                expected=(200, 201, 400, 409, 413),
            )
        if response.status_code in (400, 413):
            log.warning(
                "the server refused the update of task %s: %s",
                client_update,
                error_detail(response),
            )
        return response.status_code in (200, 201)

    def send_result(self, client_update: int, report: Mapping[str, Any]) -> bool:
        response = self.request(
            "POST", f"tasks/{client_update}/result/", json=dict(report), expected=(200, 409)
        )
        return bool(response.json().get("recorded", response.status_code == 200))

    def send_failure(self, client_update: int, error: str) -> bool:
        body = {"error": error[:MAX_ERROR_CHARACTERS]}
        response = self.request(
            "POST", f"tasks/{client_update}/failure/", json=body, expected=(200, 409)
        )
        return bool(response.json().get("recorded", response.status_code == 200))


def prune_cache(cache: Path, *, keep: Path) -> None:
    """Remove all but the most recently used weights files (``keep`` always stays)."""
    files = sorted(cache.glob("*.safetensors"), key=lambda f: f.stat().st_mtime, reverse=True)
    kept = {keep, *files[:WEIGHTS_KEPT]}
    for stale in files:
        if stale not in kept:
            stale.unlink(missing_ok=True)


def reason(error: BaseException) -> str:
    """The innermost cause of a requests error, which names what actually went wrong."""
    while error.__context__ is not None and error.__context__ is not error:
        error = error.__context__
    text = str(error) or type(error).__name__
    return text if len(text) < 200 else text[:200] + "..."
