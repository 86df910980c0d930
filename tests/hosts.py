"""Three hosts on one machine: the server and two hospital sites, A and B.

The server (the ASGI web server over HTTPS and a Celery worker with the watchdog beat) runs
in the root network namespace as an unprivileged Unix user of its own. Each site has a network
namespace of its own that reaches the root namespace only over a veth pair (a /30 subnet per
site, no default route, no forwarding), a Unix user of its own and a data folder that only
that user can read. Everything is named after this process's id, so two runs on one machine
never collide, and everything is removed at teardown, whether the test passed or not.

Fixtures (function scope):

- `three_hosts` -> ThreeHosts: namespaces, users, folders, a Redis of the harness's own
  (ACL: no default user, one admin user), a throwaway CA and the server's certificate, and,
  where `nft` is available, a firewall that lets the sites reach only the web and Redis ports.
- `federation_server(three_hosts, transactional_db)` -> FederationServer: the server's
  processes, on pytest-django's test database (the server needs committed rows, hence
  `transactional_db`). Override the `federation_server_extra_env` fixture to give the
  server's processes more variables.

`three_hosts_context()` and `federation_server_context()` build the same things as context
managers, for a test that wants other scopes or settings. `run_as()` / `run_as_check()` start
a program as one of the users, inside a site's namespace when given one, with exactly the
environment given (plus PATH, HOME and LANG); `environment_of(pid)` reads it back.

Needs root, iproute2 (`ip`), `setpriv` or `runuser`, `useradd`/`userdel`, `openssl` and
`redis-server`; without them the fixtures skip, or fail with CI=true.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import ssl
import stat
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import pytest
import redis
from celery import Celery

from tests.conftest import PROJECT_ROOT, free_port

VENV_PYTHON = PROJECT_ROOT / ".venv" / "bin" / "python"
IN_CI = os.environ.get("CI", "").strip().lower() == "true"
RUN_ID = os.getpid()
# Several harnesses in one process (one per test) get names of their own.
_harness_numbers = count(1)
# Machine-wide: serialises subnet choice, user creation and folder-mode grants between runs.
LOCK_FILE = Path(tempfile.gettempdir()) / "fedlens-hosts.lock"
GRANTS_FILE = Path(tempfile.gettempdir()) / "fedlens-hosts-grants.json"
# Private ranges tried in turn for the sites' /30 subnets; one overlapping anything the machine
# already has (an address or a route) is skipped. 198.18.0.0/15 is reserved for benchmarks.
SUBNET_POOLS = ("10.251.0.0/16", "198.18.0.0/15", "100.127.0.0/16")
BASE_PATH = f"{VENV_PYTHON.parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SITE_LABELS = ("a", "b")


# --- Prerequisites ----------------------------------------------------------------------------
def unavailable(reason: str):
    """Skip, or fail with CI=true: CI must run these tests, never skip them silently."""
    if IN_CI:
        pytest.fail(f"CI=true but the three-hosts harness cannot run: {reason}", pytrace=False)
    pytest.skip(f"three-hosts harness: {reason}")


def tool(name: str) -> str | None:
    return shutil.which(name, path=BASE_PATH)


def missing_prerequisites() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("needs root (network namespaces, users)")
    for name in ("ip", "useradd", "userdel", "openssl", "redis-server"):
        if tool(name) is None:
            missing.append(f"needs `{name}`")
    if tool("setpriv") is None and tool("runuser") is None:
        missing.append("needs `setpriv` or `runuser`")
    if not VENV_PYTHON.exists():
        missing.append(f"needs the virtual environment ({VENV_PYTHON})")
    return missing


def require_prerequisites() -> None:
    missing = missing_prerequisites()
    if missing:
        unavailable("; ".join(missing))


# --- Small helpers ----------------------------------------------------------------------------
def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a command of the harness itself (as root, in the root namespace)."""
    result = subprocess.run(
        [tool(argv[0]) or argv[0], *argv[1:]],
        capture_output=True, encoding="utf-8", errors="replace", timeout=timeout,
    )  # fmt: skip
    if check and result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise RuntimeError(f"`{' '.join(argv)}` exited {result.returncode}: {output}")
    return result


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    with open(LOCK_FILE, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"({path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:])


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def pids_of_uids(uids: set[int]) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("Uid:"):
                if {int(field) for field in line.split()[1:]} & uids:
                    found.append(int(entry.name))
                break
    return found


def kill_processes_of(uids: set[int], timeout: float = 10) -> None:
    """SIGKILL every process of the run's own users, by pid, until none is left."""
    deadline = time.monotonic() + timeout
    while pids := pids_of_uids(uids):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} of users {sorted(uids)} would not die")
        time.sleep(0.05)


def stop_group(process: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the process group `process` leads, then SIGKILL what is left of it."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


# --- Users ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: Path


def account(user: str | int | object) -> Account:
    """A user by name, uid, or any object with a `user` attribute (SiteHost, ServerHost)."""
    if hasattr(user, "user"):
        user = user.user
    entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(str(user))
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))


def create_user(name: str, home: Path) -> Account:
    """A system user with its own group, no login shell, and `home` (mode 0700) as home."""
    with contextlib.suppress(KeyError):
        # Left behind by a run that died with this same pid: it is ours by its name.
        stale = pwd.getpwnam(name)
        kill_processes_of({stale.pw_uid})
        sh("userdel", name, check=False)
    shell = tool("nologin") or "/bin/false"
    for attempt in range(20):
        # useradd fails when another program holds /etc/passwd's lock: try again.
        result = sh(
            "useradd", "--system", "--user-group", "--no-create-home", "--home-dir", str(home),
            "--shell", shell, name, check=False,
        )  # fmt: skip
        if result.returncode == 0:
            break
        if attempt == 19 or "lock" not in (result.stderr or "").lower():
            raise RuntimeError(f"useradd {name} failed: {result.stderr.strip()}")
        time.sleep(0.25)
    user = account(name)
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, user.uid, user.gid)
    home.chmod(0o700)
    return user


def delete_user(user: Account) -> None:
    kill_processes_of({user.uid})
    for attempt in range(20):
        result = sh("userdel", user.name, check=False)
        if result.returncode in (0, 6):  # 6: no such user
            return
        if attempt == 19:
            raise RuntimeError(f"userdel {user.name} failed: {result.stderr.strip()}")
        time.sleep(0.25)


# --- Folder modes: traverse rights for the test users -----------------------------------------
def folders_to_traverse() -> list[Path]:
    """Every folder above the project and above the venv's real interpreter (a pyenv or uv
    Python may live under /root) that the test users must pass through."""
    targets = [PROJECT_ROOT, Path(os.path.realpath(VENV_PYTHON)).parent.parent]
    folders: list[Path] = []
    for target in targets:
        for folder in reversed(target.parents):
            if folder not in folders:
                folders.append(folder)
    return folders


def grant_traverse(folders: Sequence[Path]) -> list[Path]:
    """Give others the traverse (x) right on `folders` that lack it, e.g. /root when the
    project or its Python lives under it; returns those changed. There is no setfacl on every
    machine, so this is `chmod o+x`; a machine-wide record of who needs which grant lets
    `release_traverse` restore each mode only when the last run that needed it is done."""
    changed = []
    with machine_lock():
        grants = _read_grants()
        for folder in folders:
            key = str(folder)
            mode = folder.stat().st_mode
            if key in grants:
                grants[key]["holders"] = sorted({*grants[key]["holders"], RUN_ID})
            elif not mode & stat.S_IXOTH:
                grants[key] = {"holders": [RUN_ID]}
                folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
            else:
                continue
            changed.append(folder)
        _write_grants(grants)
    return changed


def release_traverse(folders: Sequence[Path]) -> None:
    with machine_lock():
        grants = _read_grants()
        for folder in folders:
            entry = grants.get(str(folder))
            if entry is None:
                continue
            entry["holders"] = [pid for pid in entry["holders"] if pid != RUN_ID and alive(pid)]
            if not entry["holders"]:
                del grants[str(folder)]
                with contextlib.suppress(OSError):
                    folder.chmod(stat.S_IMODE(folder.stat().st_mode) & ~stat.S_IXOTH)
        _write_grants(grants)


def _read_grants() -> dict:
    try:
        grants = json.loads(GRANTS_FILE.read_text())
    except (OSError, ValueError):
        return {}
    # A run that died without its teardown leaves its grant: the next run's release undoes it.
    for entry in grants.values():
        entry["holders"] = [pid for pid in entry["holders"] if alive(pid)]
    return grants


def _write_grants(grants: dict) -> None:
    GRANTS_FILE.write_text(json.dumps(grants))
    GRANTS_FILE.chmod(0o600)


# --- Network ----------------------------------------------------------------------------------
def networks_in_use() -> list[ipaddress.IPv4Network]:
    used = []
    for line in sh("ip", "-4", "-o", "addr", "show").stdout.splitlines():
        words = line.split()
        if "inet" in words:
            used.append(ipaddress.ip_interface(words[words.index("inet") + 1]).network)
    route_types = {"unicast", "local", "broadcast", "multicast", "anycast", "blackhole",
                   "unreachable", "prohibit", "throw", "nat"}  # fmt: skip
    for line in sh("ip", "-4", "route", "show", "table", "all").stdout.splitlines():
        words = line.split()
        if words and words[0] in route_types:
            words = words[1:]
        if words and words[0] != "default":
            with contextlib.suppress(ValueError):
                used.append(ipaddress.ip_network(words[0], strict=False))
    return used


def free_subnets(number: int) -> list[ipaddress.IPv4Network]:
    """`number` /30 subnets that overlap nothing the machine has; call under machine_lock()
    and assign them before releasing it."""
    used = networks_in_use()
    chosen: list[ipaddress.IPv4Network] = []
    for pool in map(ipaddress.ip_network, SUBNET_POOLS):
        size = pool.num_addresses // 4
        start = (RUN_ID * 8) % size
        for step in range(size):
            candidate = ipaddress.ip_network(
                (int(pool.network_address) + 4 * ((start + step) % size), 30)
            )
            if not any(candidate.overlaps(network) for network in [*used, *chosen]):
                chosen.append(candidate)
                if len(chosen) == number:
                    return chosen
    raise RuntimeError(f"no free /30 subnet in {', '.join(SUBNET_POOLS)}")


# --- Leftovers of runs killed before their teardown (SIGKILL, a lost CI runner) ---------------
STALE_NAME = re.compile(r"^(?:fl(?:srv|sa|sb)?|fedlens_|fedlens-hosts-)(\d+)x\d+")


def of_dead_run(name: str) -> bool:
    match = STALE_NAME.match(name)
    return bool(match) and int(match[1]) != RUN_ID and not alive(int(match[1]))


def sweep_stale() -> None:
    """Remove what harnesses of dead processes left: every name carries its run's pid."""
    for entry in Path("/proc").iterdir():
        # Redis rewrites its command line; its working folder, <base>/redis, names its run.
        with contextlib.suppress(OSError):
            redis_server = (entry / "comm").read_text().strip() == "redis-server"
            if redis_server and of_dead_run(Path(os.readlink(entry / "cwd")).parent.name):
                os.kill(int(entry.name), signal.SIGKILL)
    for user in pwd.getpwall():
        if of_dead_run(user.pw_name):
            delete_user(account(user.pw_name))
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        if line.split() and of_dead_run(line.split()[0]):
            sh("ip", "netns", "delete", line.split()[0], check=False)
    if tool("nft"):
        for line in sh("nft", "list", "tables", check=False).stdout.splitlines():
            words = line.split()
            if len(words) == 3 and words[1] == "inet" and of_dead_run(words[2]):
                sh("nft", "delete", "table", "inet", words[2], check=False)
    for folder in Path(tempfile.gettempdir()).glob("fedlens-hosts-*x*-*"):
        if of_dead_run(folder.name):
            shutil.rmtree(folder, ignore_errors=True)


# --- Hosts ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteHost:
    label: str  # "a" or "b"
    namespace: str
    user: str
    uid: int
    gid: int
    home: Path
    data_dir: Path  # mode 0700, owned by the site's user
    address: str  # the site's end of its veth pair, inside its namespace
    server_address: str  # the root namespace's end of the site's veth pair
    veth: str  # the root-side interface's name
    server_url: str  # https://<the server's public address>:<web port>
    broker_host: str  # the server's public address: the harness's Redis listens there
    broker_port: int
    ca_file: Path

    def broker_url(self, username: str, password: str, db: int = 0) -> str:
        """A Redis URL as the site reaches the broker, for an ACL user the test creates."""
        credentials = f"{urllib.parse.quote(username)}:{urllib.parse.quote(password)}@"
        return f"redis://{credentials}{self.broker_host}:{self.broker_port}/{db}"


@dataclass(frozen=True)
class ServerHost:
    user: str
    uid: int
    gid: int
    home: Path
    data_dir: Path  # FEDLENS_DATA_DIR of the server's processes, mode 0700
    web_port: int  # reserved for the web server
    url: str  # https://127.0.0.1:<web_port>
    ca_file: Path  # the throwaway CA (readable by everyone)
    cert_file: Path  # the server's certificate: SAN 127.0.0.1 and both root-side addresses
    key_file: Path  # readable by the server's user only
    redis_admin_url: str  # redis://fladmin:<password>@127.0.0.1:<port>/0, full rights
    redis_host: str  # 127.0.0.1
    redis_port: int
    addresses: tuple[str, ...]  # where the server answers: 127.0.0.1, public, root-side ends
    public_address: str  # the one address both sites reach the server and broker at


@dataclass
class ThreeHosts:
    server: ServerHost
    site_a: SiteHost
    site_b: SiteHost
    base_dir: Path  # the run's folder of homes, data, TLS files and Redis (removed at teardown)
    log_dir: Path  # logs of the processes the harness starts (kept, under the test's tmp_path)
    firewall: bool  # True when nft limits what the sites reach to the web and Redis ports

    @property
    def sites(self) -> tuple[SiteHost, SiteHost]:
        return (self.site_a, self.site_b)

    @property
    def uids(self) -> set[int]:
        return {self.server.uid, self.site_a.uid, self.site_b.uid}

    def redis_admin(self) -> redis.Redis:
        return redis.Redis.from_url(self.server.redis_admin_url)


@contextlib.contextmanager
def three_hosts_context(log_dir: Path, *, web_port: int | None = None) -> Iterator[ThreeHosts]:
    """Build the three hosts; undo everything on exit, including after a failed set-up."""
    require_prerequisites()
    number = next(_harness_numbers)
    tag = f"{RUN_ID}x{number}"  # at most 7 + 1 + a few characters: interface names take 15
    log_dir.mkdir(parents=True, exist_ok=True)
    with machine_lock():
        sweep_stale()
    web_port = web_port or free_port()
    cleanup = contextlib.ExitStack()
    with cleanup:
        # Not under pytest's tmp_path: pytest keeps /tmp/pytest-of-root at mode 0700, and
        # every other pytest run that starts meanwhile sets it back, locking the users out.
        base = Path(tempfile.mkdtemp(prefix=f"fedlens-hosts-{tag}-"))
        cleanup.callback(shutil.rmtree, base, ignore_errors=True)
        base.chmod(0o755)

        granted = grant_traverse(folders_to_traverse())
        cleanup.callback(release_traverse, granted)

        # Users first: their teardown (after everything else) kills whatever they still run.
        homes = base / "home"
        homes.mkdir(mode=0o755)
        users = {}
        for role in ("srv", "sa", "sb"):
            name = f"fl{role}{tag}"
            with machine_lock():
                users[role] = create_user(name, homes / name)
            cleanup.callback(delete_user, users[role])

        namespaces, veths, subnets, public = setup_network(tag, cleanup)
        redis_port = free_port()
        firewall = setup_firewall(tag, veths, (web_port, redis_port), cleanup)

        server_addresses = ("127.0.0.1", public, *(str(next(s.hosts())) for s in subnets))
        tls = make_tls(base / "tls", server_addresses, users["srv"])
        password = secrets.token_hex(16)
        admin_url = f"redis://fladmin:{password}@127.0.0.1:{redis_port}/0"
        start_redis(base / "redis", log_dir, redis_port, server_addresses, password, cleanup)

        data = base / "data"
        data.mkdir(mode=0o755)
        server_user = users["srv"]
        server = ServerHost(
            user=server_user.name, uid=server_user.uid, gid=server_user.gid,
            home=server_user.home, data_dir=private_folder(data / "server", server_user),
            web_port=web_port, url=f"https://127.0.0.1:{web_port}", ca_file=tls["ca"],
            cert_file=tls["cert"], key_file=tls["key"], redis_admin_url=admin_url,
            redis_host="127.0.0.1", redis_port=redis_port, addresses=server_addresses,
            public_address=public,
        )  # fmt: skip
        sites = []
        for label, role, namespace, veth, subnet in zip(
            SITE_LABELS, ("sa", "sb"), namespaces, veths, subnets, strict=True
        ):
            user = users[role]
            root_end, site_end = (str(address) for address in subnet.hosts())
            sites.append(
                SiteHost(
                    label=label,
                    namespace=namespace,
                    user=user.name,
                    uid=user.uid,
                    gid=user.gid,
                    home=user.home,
                    data_dir=private_folder(data / f"site-{label}", user),
                    address=site_end,
                    server_address=root_end,
                    veth=veth,
                    server_url=f"https://{public}:{web_port}",
                    broker_host=public,
                    broker_port=redis_port,
                    ca_file=tls["ca"],
                )
            )
        hosts = ThreeHosts(server, *sites, base_dir=base, log_dir=log_dir, firewall=firewall)
        check_users_can_run_python(hosts)
        yield hosts


def private_folder(path: Path, user: Account) -> Path:
    path.mkdir()
    os.chown(path, user.uid, user.gid)
    path.chmod(0o700)
    return path


def setup_network(tag: str, cleanup: contextlib.ExitStack):
    """One veth pair per site, and the server's public address: one address both sites reach
    (as real sites reach one server name), on the root namespace's loopback, with a host route
    to it in each site's namespace. Returns namespaces, root-side veths, their subnets and
    the public address."""
    namespaces, veths = [], []
    with machine_lock():  # held until the subnets' addresses are assigned
        *subnets, public_subnet = free_subnets(len(SITE_LABELS) + 1)
        public = str(next(public_subnet.hosts()))
        sh("ip", "addr", "add", f"{public}/32", "dev", "lo")
        cleanup.callback(sh, "ip", "addr", "delete", f"{public}/32", "dev", "lo", check=False)
        for label, subnet in zip(SITE_LABELS, subnets, strict=True):
            namespace, veth, peer = f"fl{tag}{label}", f"fl{tag}{label}", f"fl{tag}{label}s"
            result = sh("ip", "netns", "add", namespace, check=False)
            if result.returncode != 0:
                unavailable(f"`ip netns add` failed: {result.stderr.strip()}")
            cleanup.callback(sh, "ip", "netns", "delete", namespace, check=False)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", peer, "netns", namespace)
            # Deleting the namespace deletes the pair; this is for a failure in between.
            cleanup.callback(sh, "ip", "link", "delete", veth, check=False)
            root_end, site_end = subnet.hosts()
            sh("ip", "addr", "add", f"{root_end}/30", "dev", veth)
            sh("ip", "link", "set", veth, "up")
            sh("ip", "-n", namespace, "addr", "add", f"{site_end}/30", "dev", peer)
            sh("ip", "-n", namespace, "link", "set", peer, "up")
            sh("ip", "-n", namespace, "link", "set", "lo", "up")
            # No default route: the site reaches its own /30 and the server's public address.
            sh("ip", "-n", namespace, "route", "add", f"{public}/32", "via", str(root_end))
            namespaces.append(namespace)
            veths.append(veth)
    return namespaces, veths, subnets, public


def setup_firewall(
    tag: str, veths: Sequence[str], ports: Sequence[int], cleanup: contextlib.ExitStack
) -> bool:
    """Where nft works: packets from the sites' veths reach the root namespace only on the
    web and Redis ports, so that a service listening on 0.0.0.0 (a CI PostgreSQL container,
    say) stays out of the sites' reach. Without nft, the sites still have no route anywhere
    but their own /30, but could reach anything listening on 0.0.0.0 of the root namespace."""
    if tool("nft") is None:
        return False
    table = f"fedlens_{tag}"
    interfaces = ", ".join(f'"{veth}"' for veth in veths)
    allowed = ", ".join(str(port) for port in ports)
    ruleset = f"""
table inet {table} {{
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname {{ {interfaces} }} ct state established,related accept
        iifname {{ {interfaces} }} tcp dport {{ {allowed} }} accept
        iifname {{ {interfaces} }} reject
    }}
}}
"""
    result = subprocess.run(
        [tool("nft"), "-f", "-"], input=ruleset, capture_output=True, encoding="utf-8",
        timeout=30,
    )  # fmt: skip
    if result.returncode != 0:
        if IN_CI:
            raise RuntimeError(f"nft could not load the sites' firewall: {result.stderr.strip()}")
        return False
    cleanup.callback(sh, "nft", "delete", "table", "inet", table, check=False)
    return True


def make_tls(folder: Path, addresses: Sequence[str], server_user: Account) -> dict[str, Path]:
    """A throwaway CA (its key stays root's) and a server certificate for `addresses`."""
    folder.mkdir(mode=0o755)
    ca_key, ca, key, request, cert = (
        folder / name for name in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )
    extensions = folder / "server.ext"
    extensions.write_text(
        "subjectAltName = " + ", ".join(f"IP:{address}" for address in addresses) + "\n"
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid, issuer\n"
    )
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    sh(
        "openssl", "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", "/CN=FedLens test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    sh(
        "openssl", "req", "-new", *ec, "-keyout", str(key), "-out", str(request),
        "-subj", "/CN=fedlens-server",
    )  # fmt: skip
    sh(
        "openssl", "x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(extensions),
    )  # fmt: skip
    ca_key.chmod(0o600)
    os.chown(key, server_user.uid, server_user.gid)
    key.chmod(0o600)
    ca.chmod(0o644)
    cert.chmod(0o644)
    return {"ca": ca, "cert": cert, "key": key}


def start_redis(
    folder: Path,
    log_dir: Path,
    port: int,
    addresses: Sequence[str],
    password: str,
    cleanup: contextlib.ExitStack,
) -> None:
    """redis-server on 127.0.0.1 and the root-side addresses, nothing saved, no default user."""
    folder.mkdir(mode=0o700)
    config = folder / "redis.conf"
    config.write_text(
        f"port {port}\n"
        f"bind {' '.join(addresses)}\n"
        f"dir {folder}\n"
        'save ""\n'
        "appendonly no\n"
        "daemonize no\n"
        "user default off\n"
        f"user fladmin on >{password} ~* &* +@all\n"
    )
    config.chmod(0o600)
    log = log_dir / "redis.log"
    with open(log, "ab") as output:
        process = subprocess.Popen(
            [tool("redis-server"), str(config)], stdout=output, stderr=subprocess.STDOUT,
            cwd=folder, start_new_session=True,
        )  # fmt: skip
    cleanup.callback(stop_group, process, 5)
    client = redis.Redis(host="127.0.0.1", port=port, username="fladmin", password=password)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.RedisError as exc:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start ({exc}):\n{tail(log)}") from exc
            time.sleep(0.05)
        finally:
            client.close()


def check_users_can_run_python(hosts: ThreeHosts) -> None:
    """The venv and the project must be readable by the test users: say so plainly if not."""
    for who in (hosts.server, hosts.site_a):
        result = run_as_check(
            who, [str(VENV_PYTHON), "-c", "import django, celery, flproject"],
            env={"PYTHONPATH": str(PROJECT_ROOT)},
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(
                f"user {who.user} cannot run the project's Python ({VENV_PYTHON}); the project "
                f"folder and .venv must be readable by others:\n{result.stderr.strip()}"
            )


# --- Processes as the test users --------------------------------------------------------------
def user_environment(user: str | int | object, env: Mapping[str, str]) -> dict[str, str]:
    """PATH, HOME and LANG, then `env`: nothing of the test process's own environment."""
    return {"PATH": BASE_PATH, "HOME": str(account(user).home), "LANG": "C.UTF-8", **env}


def as_user_argv(user: str | int | object, argv: Sequence[str], namespace: str | None):
    who = account(user)
    command = [tool("ip"), "netns", "exec", namespace] if namespace else []
    if tool("setpriv"):
        # setpriv execs the program in place: the Popen's pid is the program's own.
        command += [
            tool("setpriv"), f"--reuid={who.uid}", f"--regid={who.gid}", "--init-groups",
            "--no-new-privs", "--",
        ]  # fmt: skip
    else:
        # runuser forks: Popen's pid is runuser's; see program_pid(). `env -i` since runuser
        # sets HOME, SHELL, USER and LOGNAME of its own.
        command += [tool("runuser"), "-u", who.name, "--", "/usr/bin/env", "-i"]
    return command


def run_as(
    user: str | int | object,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    namespace: str | None = None,
    cwd: Path | str = PROJECT_ROOT,
    **popen: object,
) -> subprocess.Popen:
    """Start `argv` as `user` (a name, uid, SiteHost or ServerHost), inside `namespace` when
    given, with exactly PATH, HOME, LANG and `env` as its environment, in a session of its own
    (so os.killpg(process.pid, ...) reaches its children). More Popen arguments pass through."""
    environment = user_environment(user, env)
    command = as_user_argv(user, argv, namespace)
    if not tool("setpriv"):
        command += [f"{key}={value}" for key, value in environment.items()]
    popen.setdefault("start_new_session", True)
    return subprocess.Popen([*command, *argv], env=environment, cwd=cwd, **popen)


def run_as_check(
    user: str | int | object,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    namespace: str | None = None,
    cwd: Path | str = PROJECT_ROOT,
    timeout: float = 60,
    input: str | None = None,
) -> subprocess.CompletedProcess:
    """run_as, waited for: returns its exit status and output (text). Does not raise on a
    non-zero exit: the caller asserts on returncode/stdout/stderr."""
    process = run_as(
        user, argv, env=env, namespace=namespace, cwd=cwd, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace",
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(process, 1)
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def program_pid(process: subprocess.Popen, timeout: float = 5) -> int:
    """The pid of the program run_as started: the Popen's own with setpriv; with runuser,
    the child it forks (once it has forked)."""
    if tool("setpriv"):
        return process.pid
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        with contextlib.suppress(OSError):
            if pids := children.read_text().split():
                return int(pids[0])
        time.sleep(0.02)
    raise RuntimeError(f"runuser (pid {process.pid}) started no program")


def environment_of(pid: int) -> dict[str, str]:
    """The environment a running process was started with (/proc/<pid>/environ)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


# --- The server's processes -------------------------------------------------------------------
@dataclass
class FederationServer:
    hosts: ThreeHosts
    url: str  # https://127.0.0.1:<port>; each site uses its own SiteHost.server_url
    ca_file: Path
    redis_admin_url: str
    worker_name: str
    env: dict[str, str]  # what the web server and the worker were given
    web: subprocess.Popen
    worker: subprocess.Popen
    logs: dict[str, Path]  # "web", "worker", "redis" -> log file

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def get(self, path: str, timeout: float = 10) -> tuple[int, bytes]:
        """An HTTPS GET from the test process (root namespace), verified with the CA."""
        with urllib.request.urlopen(  # noqa: S310 - https to the harness's own server
            self.url + path, timeout=timeout, context=self.ssl_context()
        ) as response:
            return response.status, response.read()

    @contextlib.contextmanager
    def celery_app(self) -> Iterator[Celery]:
        """A Celery app with the project's settings on the harness's Redis (the test process's
        own `flproject.celery.app` talks to the suite's Redis, not to this server's)."""
        client = Celery("fedlens-hosts", set_as_current=False)
        client.config_from_object("django.conf:settings", namespace="CELERY")
        client.conf.update(broker_url=self.redis_admin_url, result_backend=self.redis_admin_url)
        try:
            yield client
        finally:
            client.close()

    def log_tails(self, lines: int = 60) -> str:
        return "\n".join(
            f"----- {name} ({path}) -----\n{tail(path, lines)}" for name, path in self.logs.items()
        )


def database_url() -> str:
    """pytest-django's test database, as the test process uses it."""
    from django.db import connection

    if connection.vendor != "postgresql":
        unavailable("the server's processes need PostgreSQL (the suite fell back to SQLite)")
    database = connection.settings_dict
    credentials = urllib.parse.quote(database["USER"] or "")
    if database.get("PASSWORD"):
        credentials += ":" + urllib.parse.quote(database["PASSWORD"])
    return (
        f"postgres://{credentials}@{database['HOST'] or '127.0.0.1'}:{database['PORT'] or 5432}"
        f"/{database['NAME']}"
    )


def server_environment(hosts: ThreeHosts, extra: Mapping[str, str]) -> dict[str, str]:
    server = hosts.server
    return {
        "PYTHONPATH": str(PROJECT_ROOT),
        "DJANGO_SETTINGS_MODULE": os.environ.get(
            "DJANGO_SETTINGS_MODULE", "flproject.settings.test"
        ),
        "DATABASE_URL": database_url(),
        "REDIS_URL": server.redis_admin_url,
        "FEDLENS_DATA_DIR": str(server.data_dir),
        "DJANGO_ALLOWED_HOSTS": ",".join(("localhost", *server.addresses)),
        "FEDLENS_WATCHDOG_INTERVAL_SECONDS": "1",
        "LOG_FORMAT": "plain",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def wait_until(check, processes: Mapping[str, subprocess.Popen], timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for name, process in processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"the {name} exited ({process.returncode}) before {what}")
        try:
            if check():
                return
        except Exception as exc:  # reported if it never succeeds
            last_error = exc
        time.sleep(0.2)
    raise RuntimeError(f"no {what} within {timeout} s (last error: {last_error})")


@contextlib.contextmanager
def federation_server_context(
    hosts: ThreeHosts, extra_env: Mapping[str, str] | None = None, *, timeout: float = 90
) -> Iterator[FederationServer]:
    """Start the web server and the worker (with beat) as the server's user; stop both on
    exit. A failed start raises with the tails of their logs."""
    server = hosts.server
    env = server_environment(hosts, extra_env or {})
    worker_name = f"server-{RUN_ID}-{secrets.token_hex(3)}@fedlens"
    logs = {name: hosts.log_dir / f"{name}.log" for name in ("web", "worker")}
    logs["redis"] = hosts.log_dir / "redis.log"
    python = str(VENV_PYTHON)
    commands = {
        "web": [
            python, "-m", "uvicorn", "flproject.asgi:application", "--host", "0.0.0.0",  # noqa: S104
            "--port", str(server.web_port), "--ssl-keyfile", str(server.key_file),
            "--ssl-certfile", str(server.cert_file),
        ],
        "worker": [
            python, "-m", "celery", "-A", "flproject", "worker", "--pool", "prefork",
            "--concurrency", "1", "--queues", "training,aggregation", "--hostname", worker_name,
            "--loglevel", "INFO", "--without-gossip", "--without-mingle",
            "--beat", "--schedule", str(server.data_dir / "beat"),
        ],
    }  # fmt: skip
    processes: dict[str, subprocess.Popen] = {}
    with contextlib.ExitStack() as cleanup:
        for name, command in commands.items():
            with open(logs[name], "ab") as output:
                processes[name] = run_as(
                    server, command, env=env, stdout=output, stderr=subprocess.STDOUT
                )
            cleanup.callback(stop_group, processes[name])
        running = FederationServer(
            hosts=hosts, url=server.url, ca_file=server.ca_file,
            redis_admin_url=server.redis_admin_url, worker_name=worker_name, env=env,
            web=processes["web"], worker=processes["worker"], logs=logs,
        )  # fmt: skip
        try:
            wait_until(
                lambda: running.get("/healthz", timeout=2)[0] == 200,
                processes, timeout, "answer from https://127.0.0.1/healthz",
            )  # fmt: skip
            with running.celery_app() as client:
                wait_until(
                    lambda: client.control.ping(destination=[worker_name], timeout=0.5),
                    processes, timeout, f"ping from worker {worker_name}",
                )  # fmt: skip
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{running.log_tails()}") from exc
        yield running


# --- Fixtures ---------------------------------------------------------------------------------
def show_logs_if_failed(request: pytest.FixtureRequest, failed_before: int, text) -> None:
    """After a failed test, print the logs past pytest's output capture."""
    if request.session.testsfailed <= failed_before:
        return
    capture = request.config.pluginmanager.getplugin("capturemanager")
    guard = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
    with guard:
        print(f"\n===== three-hosts logs for {request.node.nodeid} =====\n{text()}", flush=True)


@pytest.fixture
def three_hosts(request, tmp_path) -> Iterator[ThreeHosts]:
    failed_before = request.session.testsfailed
    with three_hosts_context(tmp_path / "logs") as hosts:
        yield hosts
        show_logs_if_failed(request, failed_before, lambda: tail(hosts.log_dir / "redis.log", 20))


@pytest.fixture
def federation_server_extra_env() -> dict[str, str]:
    """More variables for the server's processes: override in a test module."""
    return {}


@pytest.fixture
def federation_server(
    request, three_hosts, transactional_db, federation_server_extra_env
) -> Iterator[FederationServer]:
    failed_before = request.session.testsfailed
    with federation_server_context(three_hosts, federation_server_extra_env) as running:
        yield running
        show_logs_if_failed(request, failed_before, running.log_tails)
