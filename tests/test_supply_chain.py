"""What the project installs and what its code does, checked by the tools made for it:
bandit over the project's own packages, and the lock file in step with the pinned
requirements. pip-audit needs PyPI's per-release API or OSV, which CI's network does not
reach: it runs as `make audit` where they answer (README)."""

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import PROJECT_ROOT

BIN = Path(sys.executable).parent
LOCK_FILE = PROJECT_ROOT / "requirements" / "lock.txt"
PINNED_FILES = ("base.txt", "dev.txt")
CODE = ["flproject", "training", "visualization", "workers", "accounts"]

LOCKED = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", re.MULTILINE)


def canonical(name: str) -> str:
    """PEP 503's form of a project name: opt_einsum and opt-einsum are one project."""
    return re.sub(r"[-_.]+", "-", re.sub(r"\[.*\]", "", name)).lower()


def locked_versions() -> dict[str, str]:
    return {canonical(name): version for name, version in LOCKED.findall(LOCK_FILE.read_text())}


def pinned_versions() -> dict[str, str]:
    pins = {}
    for name in PINNED_FILES:
        text = (PROJECT_ROOT / "requirements" / name).read_text()
        for requirement, version in LOCKED.findall(text):
            pins[canonical(requirement)] = version
    return pins


def test_the_lock_file_holds_every_pinned_requirement_at_its_pinned_version():
    locked = locked_versions()

    for name, version in pinned_versions().items():
        # The lock names the build it hashed (torch's CPU wheel: 2.13.0+cpu).
        assert locked.get(name, "").split("+")[0] == version, (
            f"{name}=={version} is pinned but the lock has {locked.get(name)}: "
            "run the pip-compile command in requirements/lock.txt's header"
        )


def test_every_locked_requirement_has_a_hash():
    entries = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", LOCK_FILE.read_text())

    unhashed = [e.split()[0] for e in entries if "==" in e.split()[0] and "--hash" not in e]

    assert unhashed == []


def test_bandit_finds_nothing_in_the_projects_code():
    run = subprocess.run(
        [BIN / "bandit", "-c", "pyproject.toml", "-r", *CODE, "-f", "json", "-q"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = json.loads(run.stdout)

    findings = [
        f"{r['filename']}:{r['line_number']} {r['test_id']} {r['issue_text']}"
        for r in report["results"]
    ]
    assert findings == [] and report["errors"] == [], "\n".join(findings) + run.stderr
