"""What a dataset upload costs the web server: time, and peak memory against the archive's size.

    .venv/bin/python benchmarks/upload_memory.py [--megabytes 64,256]

Starts FedLens under uvicorn (embedded mode, a SQLite file under data/), signs in through the
login page like a browser, and uploads zips of uncompressed NIfTI volumes of noise (1 MiB
each, stored) to POST /api/datasets/upload/ with the session's CSRF token. The server's peak
resident memory (VmHWM) is read from /proc before and after each upload: the archive is
spooled to disk and unpacked member by member, so the growth should stay far below its size.
"""

import argparse
import http.cookiejar
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
import zipfile
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from training.fl.data import ImageArray, write_image  # noqa: E402

PASSWORD = "an upload benchmark password 42"  # noqa: S105 - a throwaway server's user
VOLUME_SIDE = 64  # 64^3 float32 voxels: 1 MiB per image


def make_archive(folder: Path, megabytes: int) -> Path:
    rng = np.random.default_rng(0)
    images = folder / f"images-{megabytes}"
    images.mkdir()
    rows = ["path,label"]
    for number in range(megabytes):
        volume = ImageArray(
            array=rng.normal(size=(VOLUME_SIDE,) * 3).astype(np.float32),
            spacing=(1.0, 1.0, 1.0),
            origin=(0.0, 0.0, 0.0),
            direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        )
        write_image(volume, images / f"volume-{number:04d}.nii")
        rows.append(f"volume-{number:04d}.nii,{number % 2}")
    (images / "labels.csv").write_text("\n".join(rows) + "\n")
    archive = folder / f"upload-{megabytes}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zipped:
        for path in sorted(images.iterdir()):
            zipped.write(path, path.name)
    return archive


def manage(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "manage.py", *args], cwd=PROJECT_ROOT, env=env, check=True,
                   capture_output=True, timeout=300)  # fmt: skip


def start_server(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "flproject.asgi:application", "--port", str(port)],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).read()  # noqa: S310 - local
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start") from None
            time.sleep(0.3)


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


class Session:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))

    def csrf_token(self) -> str:
        return next(cookie.value for cookie in self.cookies if cookie.name == "csrftoken")

    def sign_in(self, username: str, password: str) -> None:
        self.opener.open(f"{self.base_url}/accounts/login/").read()
        form = urllib.parse.urlencode(
            {"username": username, "password": password, "csrfmiddlewaretoken": self.csrf_token()}
        ).encode()
        request = urllib.request.Request(  # noqa: S310 - the benchmark's own server
            f"{self.base_url}/accounts/login/", data=form, headers={"Referer": self.base_url}
        )
        self.opener.open(request).read()

    def upload(self, archive: Path, name: str) -> int:
        boundary = uuid.uuid4().hex
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'
            f"--{boundary}\r\nContent-Disposition: form-data; "
            f'name="archive"; filename="{archive.name}"\r\n'
            "Content-Type: application/zip\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        size = len(head) + archive.stat().st_size + len(tail)

        def body():
            yield head
            with archive.open("rb") as handle:
                while chunk := handle.read(1024 * 1024):
                    yield chunk
            yield tail

        request = urllib.request.Request(  # noqa: S310 - the benchmark's own server
            f"{self.base_url}/api/datasets/upload/",
            data=body(),
            headers={
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Length": str(size),
                "X-CSRFToken": self.csrf_token(),
                "Referer": self.base_url,
            },
        )
        with self.opener.open(request, timeout=600) as answer:
            answer.read()
            return answer.status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", default="64,256", help="archive sizes, comma-separated")
    sizes = [int(size) for size in parser.parse_args().megabytes.split(",")]
    (PROJECT_ROOT / "data").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=PROJECT_ROOT / "data") as scratch:
        folder = Path(scratch)
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE")
        }
        env.update(
            DJANGO_SETTINGS_MODULE="flproject.settings.local",
            FEDLENS_DATA_DIR=str(folder / "server"),
            DJANGO_SUPERUSER_PASSWORD=PASSWORD,
            LOG_LEVEL="WARNING",
            PYTHONPATH=str(PROJECT_ROOT),
        )
        manage(env, "migrate", "--noinput")
        manage(env, "createsuperuser", "--noinput", "--username", "bench", "--email", "b@x.org")
        archives = {size: make_archive(folder, size) for size in sizes}
        server, url = start_server(env)
        try:
            session = Session(url)
            session.sign_in("bench", PASSWORD)
            rows = []
            for size, archive in archives.items():
                before = peak_rss_mb(server.pid)
                started = time.perf_counter()
                status = session.upload(archive, f"bench-{size}")
                seconds = time.perf_counter() - started
                after = peak_rss_mb(server.pid)
                archive_mb = archive.stat().st_size / (1024 * 1024)
                rows.append((archive_mb, status, seconds, archive_mb / seconds, before, after))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    print(
        f"{'archive MB':>10} {'status':>6} {'seconds':>8} {'MB/s':>6} "
        f"{'peak RSS before':>15} {'peak RSS after':>14} {'growth MB':>9}"
    )
    for archive_mb, status, seconds, rate, before, after in rows:
        print(
            f"{archive_mb:>10.0f} {status:>6} {seconds:>8.1f} {rate:>6.0f} "
            f"{before:>15.0f} {after:>14.0f} {after - before:>9.0f}"
        )


if __name__ == "__main__":
    main()
