"""The three-hosts harness (tests/hosts.py) isolates what it says it isolates: each site
reaches the server over its veth pair and nothing else, reads only its own data, and runs with
only the environment it is given."""

import json
import os
from pathlib import Path

import pytest

from tests import hosts
from tests.hosts import (
    VENV_PYTHON,
    environment_of,
    program_pid,
    run_as,
    run_as_check,
)

pytestmark = pytest.mark.e2e

# The harness's fixtures, made this module's own.
three_hosts = hosts.three_hosts
federation_server = hosts.federation_server
federation_server_extra_env = hosts.federation_server_extra_env

# Tries each host:port given as an argument; prints {target: "connected" or the errno's name}.
PROBE = """
import errno, json, socket, sys
results = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        results[target] = "connected"
    except OSError as exc:
        results[target] = errno.errorcode.get(exc.errno, str(exc))
print(json.dumps(results))
"""

HTTPS_GET = """
import ssl, sys, urllib.request
context = ssl.create_default_context(cafile=sys.argv[2])
with urllib.request.urlopen(sys.argv[1], context=context, timeout=10) as response:
    print(response.status, response.read().decode())
"""


def probe(site, *targets: str) -> dict[str, str]:
    result = run_as_check(
        site, [str(VENV_PYTHON), "-c", PROBE, *targets], env={}, namespace=site.namespace
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.postgres
@pytest.mark.worker
def test_a_site_reaches_the_server_over_https_but_not_postgresql(federation_server):
    hosts = federation_server.hosts
    site = hosts.site_a
    assert federation_server.get("/healthz")[0] == 200  # from the root namespace

    result = run_as_check(
        site, [str(VENV_PYTHON), "-c", HTTPS_GET, f"{site.server_url}/healthz", str(site.ca_file)],
        env={}, namespace=site.namespace,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("200 "), result.stdout
    server_side = f"{site.server_address}:5432"
    reached = probe(site, "127.0.0.1:5432", server_side, f"{site.broker_host}:{site.broker_port}")
    assert reached["127.0.0.1:5432"] == "ECONNREFUSED"  # the namespace's own loopback
    assert reached[f"{site.broker_host}:{site.broker_port}"] == "connected"
    if hosts.firewall:
        assert reached[server_side] != "connected"


def test_a_site_cannot_reach_the_other_site(three_hosts):
    site_a, site_b = three_hosts.sites
    web = three_hosts.server.web_port
    listener = run_as(
        site_b, [str(VENV_PYTHON), "-m", "http.server", "--bind", site_b.address, "8000"],
        env={}, namespace=site_b.namespace, cwd=site_b.home,
    )  # fmt: skip
    try:
        # B's own listener answers inside B's namespace, so a failure from A means isolation.
        for _ in range(50):
            if probe(site_b, f"{site_b.address}:8000")[f"{site_b.address}:8000"] == "connected":
                break
        else:
            pytest.fail("site B's listener never answered")

        reached = probe(
            site_a, f"{site_b.address}:8000", f"{site_b.server_address}:{web}",
            f"{site_a.server_address}:{site_a.broker_port}",
        )  # fmt: skip
    finally:
        listener.kill()
        listener.wait()

    assert reached[f"{site_b.address}:8000"] == "ENETUNREACH"
    assert reached[f"{site_b.server_address}:{web}"] == "ENETUNREACH"
    assert reached[f"{site_a.server_address}:{site_a.broker_port}"] == "connected"  # control


def test_each_sites_data_is_readable_by_its_own_user_only(three_hosts):
    site_a, site_b = three_hosts.sites
    for site in (site_a, site_b):
        secret = site.data_dir / "patients.csv"
        secret.write_text(f"site {site.label}\n")
        os.chown(secret, site.uid, site.gid)
        secret.chmod(0o644)  # the folder's mode alone keeps it private
        assert (site.data_dir.stat().st_mode & 0o777, site.data_dir.stat().st_uid) == (
            0o700, site.uid,
        )  # fmt: skip

    own = run_as_check(site_a, ["cat", str(site_a.data_dir / "patients.csv")], env={})
    assert (own.returncode, own.stdout) == (0, "site a\n"), own.stderr  # control

    for reader, site in ((site_a, site_b), (three_hosts.server, site_a),
                         (three_hosts.server, site_b)):  # fmt: skip
        for argv in (["cat", str(site.data_dir / "patients.csv")], ["ls", str(site.data_dir)]):
            result = run_as_check(reader, argv, env={})
            assert result.returncode != 0, (reader.user, argv, result.stdout)
            assert "Permission denied" in result.stderr, (reader.user, argv, result.stderr)


def test_run_as_gives_exactly_the_environment_passed(three_hosts, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgres://leak@127.0.0.1/leak")
    site = three_hosts.site_a
    process = run_as(
        site, [str(VENV_PYTHON), "-c", "import time; print('ready', flush=True); time.sleep(30)"],
        env={"FEDLENS_SITE": "a"}, namespace=site.namespace, stdout=-1, encoding="utf-8",
    )  # fmt: skip
    try:
        assert process.stdout.readline() == "ready\n"
        pid = program_pid(process)
        environment = environment_of(pid)
        uids = next(
            line.split()[1:]
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("Uid:")
        )
        net_namespace = os.stat(f"/proc/{pid}/ns/net").st_ino
    finally:
        process.kill()
        process.wait()

    assert environment == {
        "PATH": environment["PATH"], "HOME": str(site.home), "LANG": "C.UTF-8",
        "FEDLENS_SITE": "a",
    }  # fmt: skip
    assert "DATABASE_URL" not in environment
    assert set(uids) == {str(site.uid)}
    assert net_namespace == os.stat(f"/run/netns/{site.namespace}").st_ino
