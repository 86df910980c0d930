"""The site agent's command line: ``python -m workers.site <command>``.

    enroll --server URL --token TOKEN [--ca-file PATH]
    datasets add --name NAME --path PATH [--format folder|npz] [--class-names a,b]
    datasets list | datasets remove --name NAME
    approvals require on|off | approvals list
    approvals approve EXPERIMENT_ID | approvals refuse EXPERIMENT_ID --reason TEXT
    run [--loglevel INFO]
    status | rotate

The agent's folder is $FEDLENS_SITE_HOME (default ~/.fedlens-site). Expected errors are
one sentence on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from workers.site import AGENT_VERSION
from workers.site.api import SiteApi, SiteApiError, check_server_url
from workers.site.home import Credentials, SiteAgentError, SiteHome

HEARTBEAT_VARIABLE = "FEDLENS_SITE_HEARTBEAT_SECONDS"
DEFAULT_HEARTBEAT_SECONDS = 30.0
# Options of the site's workers: everything that would publish to or read from keys other
# than the site's own queue is off (its broker user could not anyway).
SITE_WORKER_OPTIONS = ("--without-gossip", "--without-mingle", "--without-heartbeat")


def api_for(home: SiteHome) -> tuple[SiteApi, Credentials]:
    credentials = home.credentials()
    api = SiteApi(credentials.server, credentials.credential, ca_file=credentials.ca_file)
    return api, credentials


# --- enroll ---------------------------------------------------------------------------------
def enroll(home: SiteHome, args: argparse.Namespace) -> int:
    from workers.site.describe import describe_devices

    server = check_server_url(args.server)
    if home.is_enrolled() and not args.force:
        enrolled = home.credentials()
        raise SiteAgentError(
            f"this node is already enrolled as site {enrolled.slug!r} with {enrolled.server}; "
            "pass --force to enrol it again with a new token"
        )
    ca_file = None
    if args.ca_file:
        source = Path(args.ca_file).expanduser()
        if not source.is_file():
            raise SiteAgentError(f"the CA file {source} does not exist")
        home.ensure()
        # A copy in the home: later commands verify TLS against it wherever the original was.
        shutil.copyfile(source, home.ca_file)
        home.ca_file.chmod(0o600)
        ca_file = str(home.ca_file)
    api = SiteApi(server, ca_file=ca_file)
    enrolled = api.enrol(args.token, hostname=socket.gethostname(), devices=describe_devices())
    try:
        site = enrolled["site"]
        credentials = Credentials(
            server=server,
            credential=enrolled["credential"],
            broker_url=enrolled["broker_url"],
            queue=enrolled["queue"],
            slug=site["slug"],
            name=site.get("name", site["slug"]),
            ca_file=ca_file,
            visibility_timeout=float(enrolled.get("visibility_timeout", 4200.0)),
        )
    except (KeyError, TypeError, ValueError):
        raise SiteAgentError(
            "the server's enrolment answer is not what this agent expects"
        ) from None
    home.save_credentials(credentials)
    print(f"enrolled as site {credentials.name} ({credentials.slug}); queue {credentials.queue}")
    print(f"credentials written to {home.credentials_file}")
    return 0


# --- datasets -------------------------------------------------------------------------------
def datasets_add(home: SiteHome, args: argparse.Namespace) -> int:
    from training.fl.data import Preprocessor
    from workers.site.describe import check_dataset_name, dataset_metadata, open_dataset

    name = check_dataset_name(args.name)
    api, _ = api_for(home)
    path = Path(args.path).expanduser().resolve()
    class_names = (
        [part.strip() for part in args.class_names.split(",")] if args.class_names else None
    )
    # Declared statistics describe the stored intensities, whatever a task normalizes them to.
    dataset = open_dataset(path, args.format, Preprocessor(normalization="none"), class_names)
    metadata = dataset_metadata(dataset, class_names=class_names)
    api.put_dataset(name, metadata)
    declared = home.datasets()
    declared[name] = {"path": str(path), "format": metadata["storage_format"]}
    home.save_datasets(declared)
    counts = ", ".join(str(count) for count in metadata["counts_per_class"])
    print(
        f"declared {name}: {metadata['num_samples']} samples, {metadata['num_classes']} classes "
        f"({counts}), images {'x'.join(map(str, metadata['image_shape']))}"
    )
    return 0


def datasets_list(home: SiteHome, args: argparse.Namespace) -> int:
    declared = home.datasets()
    on_server: dict[str, Any] = {}
    try:
        api, _ = api_for(home)
        on_server = {entry.get("name"): entry for entry in api.list_datasets()}
    except SiteApiError as error:
        print(f"(the server's list is unavailable: {error})", file=sys.stderr)
    for name in sorted(set(declared) | set(on_server)):
        here = declared.get(name)
        where = f"{here['path']} ({here['format']})" if here else "not declared on this node"
        server = "declared on the server" if name in on_server else "not on the server"
        print(f"{name}: {where}; {server}")
    if not declared and not on_server:
        print("no datasets declared")
    return 0


def datasets_remove(home: SiteHome, args: argparse.Namespace) -> int:
    api, _ = api_for(home)
    declared = home.datasets()
    api.delete_dataset(args.name)
    if declared.pop(args.name, None) is not None:
        home.save_datasets(declared)
    print(f"removed {args.name}")
    return 0


# --- approvals ------------------------------------------------------------------------------
def approvals_require(home: SiteHome, args: argparse.Namespace) -> int:
    from workers.site.describe import describe_devices

    approvals = home.approvals()
    approvals["requires_approval"] = args.state == "on"
    # Locally first: the workers enforce the local file whether or not the server heard.
    home.save_approvals(approvals)
    api, _ = api_for(home)
    api.heartbeat(heartbeat_body(describe_devices(), approvals["requires_approval"]))
    print(f"approval {'required' if approvals['requires_approval'] else 'not required'}")
    return 0


def approvals_list(home: SiteHome, args: argparse.Namespace) -> int:
    api, _ = api_for(home)
    local = home.approvals()
    print(f"approval required: {'yes' if local['requires_approval'] else 'no'}")
    for entry in api.list_approvals():
        decided = local["decisions"].get(str(entry.get("experiment")), {})
        status = decided.get("decision", entry.get("status", "pending"))
        print(
            f"experiment {entry.get('experiment')} {entry.get('name', '')!r} by "
            f"{entry.get('owner', '?')}: {status} (dataset {entry.get('dataset')}, "
            f"{entry.get('network')}, {entry.get('strategy')}, {entry.get('rounds')} rounds)"
        )
    return 0


def decide(home: SiteHome, experiment: int, decision: str, reason: str) -> None:
    approvals = home.approvals()
    approvals["decisions"][str(experiment)] = {
        "decision": decision,
        "reason": reason,
        "decided_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    home.save_approvals(approvals)
    api, _ = api_for(home)
    api.decide(experiment, decision, reason)


def approvals_approve(home: SiteHome, args: argparse.Namespace) -> int:
    decide(home, args.experiment, "approve", "")
    print(f"experiment {args.experiment} approved")
    return 0


def approvals_refuse(home: SiteHome, args: argparse.Namespace) -> int:
    decide(home, args.experiment, "refuse", args.reason)
    print(f"experiment {args.experiment} refused")
    return 0


# --- run ------------------------------------------------------------------------------------
def heartbeat_body(devices: list[dict[str, Any]], requires_approval: bool) -> dict[str, Any]:
    return {
        "agent_version": AGENT_VERSION,
        "devices": devices,
        "requires_approval": requires_approval,
    }


def heartbeat_seconds() -> float:
    value = os.environ.get(HEARTBEAT_VARIABLE, "")
    try:
        seconds = float(value) if value else DEFAULT_HEARTBEAT_SECONDS
    except ValueError:
        raise SiteAgentError(f"{HEARTBEAT_VARIABLE} must be a number of seconds") from None
    if seconds <= 0:
        raise SiteAgentError(f"{HEARTBEAT_VARIABLE} must be positive")
    return seconds


def beat(home: SiteHome, devices: list[dict[str, Any]], stop: threading.Event) -> None:
    """Tell the server every few seconds that this site is up, until ``stop`` is set."""
    interval = heartbeat_seconds()
    while not stop.is_set():
        try:
            api, _ = api_for(home)  # read again: `rotate` may have replaced the credential
            api.heartbeat(heartbeat_body(devices, home.approvals()["requires_approval"]))
        except SiteAgentError as error:
            print(f"heartbeat failed: {error}", file=sys.stderr, flush=True)
        stop.wait(interval)


def run(home: SiteHome, args: argparse.Namespace) -> int:
    from workers.launch import Supervisor, plan_workers, visible_gpu_ids
    from workers.site.describe import describe_devices

    credentials = home.credentials()
    heartbeat_seconds()  # a bad setting fails now, not in the thread
    plans = plan_workers(visible_gpu_ids(), args.hostname)
    devices = describe_devices()
    stop = threading.Event()
    heart = threading.Thread(target=beat, args=(home, devices, stop), daemon=True)
    heart.start()
    # The workers find the home through the environment they inherit.
    os.environ["FEDLENS_SITE_HOME"] = str(home.path)
    supervisor = Supervisor(
        plans,
        credentials.queue,
        args.loglevel,
        app="workers.site.worker",
        options=SITE_WORKER_OPTIONS,
    )
    try:
        return supervisor.run()
    finally:
        stop.set()


# --- status and rotate ----------------------------------------------------------------------
def status(home: SiteHome, args: argparse.Namespace) -> int:
    api, credentials = api_for(home)
    print(f"server: {credentials.server}")
    me = api.me()  # raises with the reason when unreachable or refused
    print("server reachable: yes")
    print("credential accepted: yes")
    print(f"site: {me.get('name')} ({me.get('slug')}), queue {me.get('queue')}")
    print(f"approval required: {'yes' if me.get('requires_approval') else 'no'}")
    declared = home.datasets()
    here = set(declared)
    there = {entry.get("name") if isinstance(entry, dict) else entry for entry in me["datasets"]}
    print(f"datasets declared here: {', '.join(sorted(here)) or 'none'}")
    print(f"datasets on the server: {', '.join(sorted(map(str, there))) or 'none'}")
    # Cheap enough for a container's health check: the folder or file, not every image.
    unreadable = [name for name, entry in sorted(declared.items()) if not readable(entry)]
    for name in unreadable:
        print(f"dataset {name}: {declared[name]['path']} cannot be read by this user")
    if here != there or unreadable:
        missing = sorted(here - there)
        extra = sorted(map(str, there - here))
        if missing:
            print(f"not on the server: {', '.join(missing)} (run `datasets add` again)")
        if extra:
            print(f"on the server only: {', '.join(extra)} (declare them here or remove them)")
        return 1
    return 0


def readable(entry: dict[str, Any]) -> bool:
    path = Path(entry["path"])
    target = path / "labels.csv" if entry.get("format") == "folder" else path
    return os.access(target, os.R_OK)


def rotate(home: SiteHome, args: argparse.Namespace) -> int:
    api, credentials = api_for(home)
    rotated = api.rotate()
    try:
        credentials = replace(
            credentials, credential=rotated["credential"], broker_url=rotated["broker_url"]
        )
    except (KeyError, TypeError):
        raise SiteAgentError(
            "the server's answer to the rotation is not what this agent expects; the old "
            "credential may no longer work: enrol again with a new token"
        ) from None
    home.save_credentials(credentials)
    print(
        "credentials rotated; restart `python -m workers.site run` to use the new broker password"
    )
    return 0


# --- the parser -----------------------------------------------------------------------------
def experiment_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an experiment id") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an experiment id")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m workers.site", description="The FedLens site agent."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def command(
        group: Any, name: str, handler: Callable[[SiteHome, argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    sub = command(commands, "enroll", enroll, "Enrol this node with a one-time token.")
    sub.add_argument("--server", required=True, help="the server's URL, https://...")
    sub.add_argument("--token", required=True, help="the enrolment token from the FedLens admin")
    sub.add_argument("--ca-file", help="the CA certificate(s) the server's TLS is checked with")
    sub.add_argument("--force", action="store_true", help="replace an existing enrolment")

    datasets = commands.add_parser("datasets", help="Declare this site's datasets.")
    datasets_commands = datasets.add_subparsers(dest="datasets_command", required=True)
    sub = command(datasets_commands, "add", datasets_add, "Declare a dataset to the server.")
    sub.add_argument("--name", required=True, help="the federated dataset's name")
    sub.add_argument("--path", required=True, help="its folder or .npz file on this node")
    sub.add_argument(
        "--format",
        help="its format's name (training/fl/data/formats/: folder, npz, msd, maskfolder, ...); "
        "detected when omitted",
    )
    sub.add_argument(
        "--class-names",
        help="comma-separated, in label order (segmentation: the background first)",
    )
    command(datasets_commands, "list", datasets_list, "List the declared datasets.")
    sub = command(datasets_commands, "remove", datasets_remove, "Withdraw a dataset.")
    sub.add_argument("--name", required=True)

    approvals = commands.add_parser("approvals", help="Approve experiments on this site's data.")
    approvals_commands = approvals.add_subparsers(dest="approvals_command", required=True)
    sub = command(approvals_commands, "require", approvals_require, "Require approvals or not.")
    sub.add_argument("state", choices=("on", "off"))
    command(approvals_commands, "list", approvals_list, "List experiments and decisions.")
    sub = command(approvals_commands, "approve", approvals_approve, "Approve an experiment.")
    sub.add_argument("experiment", type=experiment_id)
    sub = command(approvals_commands, "refuse", approvals_refuse, "Refuse an experiment.")
    sub.add_argument("experiment", type=experiment_id)
    sub.add_argument("--reason", required=True)

    sub = command(commands, "run", run, "Run one worker per GPU on this site's queue.")
    sub.add_argument("--loglevel", default=os.environ.get("LOG_LEVEL", "INFO"))
    sub.add_argument("--hostname", default=socket.gethostname(), help="names the workers")
    command(commands, "status", status, "Check the server, the credential and the datasets.")
    command(commands, "rotate", rotate, "Replace this site's credential.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    home = SiteHome.from_environment()
    try:
        code: int = args.handler(home, args)
    except SiteAgentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
