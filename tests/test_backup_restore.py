"""Backups (deploy/scripts/backup.sh) and restores (restore.sh) against the real PostgreSQL:
a finished experiment survives the round trip whole and is served from the restored copy;
a damaged backup or a target that is not empty is refused before anything changes."""

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from email.message import Message
from pathlib import Path
from urllib.parse import quote

import psycopg2
import pytest
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.management import CommandError, call_command
from django.db import connection

from tests.conftest import (
    PROJECT_ROOT,
    WorkerProcess,
    free_port,
    needs_redis,
    new_experiment,
    service_env,
    stop_process,
    wait_until_finished,
)
from tests.factories import ClientUpdateFactory, ExperimentFactory, RoundFactory, api_token
from training import services
from training.models import Checkpoint, ClientUpdate, ExperimentStatus, model_store

BACKUP_SCRIPT = PROJECT_ROOT / "deploy" / "scripts" / "backup.sh"
RESTORE_SCRIPT = PROJECT_ROOT / "deploy" / "scripts" / "restore.sh"
BACKUP_NAME = re.compile(r"fedlens-\d{8}T\d{6}Z")


def uses_the_scripts(test):
    """The real PostgreSQL and its client tools; skipped only on a developer's machine in
    embedded (SQLite) mode or without the tools: with CI=true it must run."""
    for mark in (
        pytest.mark.postgres,
        pytest.mark.skipif(
            os.environ.get("CI", "").lower() != "true"
            and not (
                settings.DATABASES["default"]["ENGINE"].endswith("postgresql")
                and all(shutil.which(tool) for tool in ("pg_dump", "pg_restore", "psql"))
            ),
            reason="needs the real PostgreSQL and pg_dump, pg_restore, psql (CI=true: required)",
        ),
        pytest.mark.django_db(transaction=True),  # the scripts see only committed rows
    ):
        test = mark(test)
    return test


def database_url(name: str) -> str:
    database = connection.settings_dict
    credentials = quote(database["USER"], safe="")
    if database.get("PASSWORD"):
        credentials += ":" + quote(database["PASSWORD"], safe="")
    return f"postgres://{credentials}@{database['HOST']}:{database['PORT']}/{name}"


def connect(name: str):
    database = connection.settings_dict
    return psycopg2.connect(
        dbname=name, user=database["USER"], password=database.get("PASSWORD") or None,
        host=database["HOST"], port=database["PORT"],
    )  # fmt: skip


def query(name: str, sql: str) -> list[tuple]:
    with connect(name) as link, link.cursor() as cursor:
        cursor.execute(sql)
        rows = cursor.fetchall()
    link.close()
    return rows


def table_names(name: str) -> list[str]:
    rows = query(name, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return sorted(row[0] for row in rows)


@pytest.fixture
def fresh_database():
    """An empty database of this test's own, dropped at the end."""
    name = f"test_fedlens_restore_{uuid.uuid4().hex[:12]}"
    link = connect(connection.settings_dict["NAME"])
    link.autocommit = True
    with link.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    yield name
    with link.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    link.close()


def run_script(script: Path, *args: str, database: str, data_dir: Path):
    return subprocess.run(
        [str(script), *args],
        cwd=PROJECT_ROOT, capture_output=True, encoding="utf-8", timeout=300,
        env=service_env(DATABASE_URL=database_url(database), FEDLENS_DATA_DIR=str(data_dir),
                        FEDLENS_PYTHON=sys.executable),
    )  # fmt: skip


def back_up(data_dir: Path, dest: Path, *args: str) -> Path:
    """Back up the test database and `data_dir`'s model store; returns the new folder."""
    result = run_script(
        BACKUP_SCRIPT, "--dest", str(dest), *args,
        database=connection.settings_dict["NAME"], data_dir=data_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip().splitlines()[-1])


def restore(backup: Path, database: str, data_dir: Path, *args: str):
    return run_script(RESTORE_SCRIPT, *args, str(backup), database=database, data_dir=data_dir)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model_files(tmp_path) -> dict[str, str]:
    """A few files in the test's model store (tmp_path/models); name to SHA-256."""
    files = {}
    for number in (1, 2):
        path = (
            tmp_path / "models" / "experiments" / "1" / f"round-000{number}" / "global.safetensors"
        )
        path.parent.mkdir(parents=True)
        path.write_bytes(os.urandom(256))
        files[str(path.relative_to(tmp_path))] = sha256_of(path)
    return files


def manifest_entries(backup: Path) -> list[list[str]]:
    return [line.split(" ") for line in (backup / "MANIFEST").read_text().splitlines()]


# --- verify_model_store ----------------------------------------------------------------------


def store_checkpoint(experiment, round_number: int, content: bytes) -> Checkpoint:
    name = f"experiments/{experiment.pk}/round-{round_number:04d}/global.safetensors"
    stored_name = model_store().save(name, ContentFile(content))
    return Checkpoint.objects.create(
        experiment=experiment, round=RoundFactory(experiment=experiment, number=round_number),
        file=stored_name, sha256=hashlib.sha256(content).hexdigest(), size_bytes=len(content),
        num_parameters=1,
    )  # fmt: skip


@pytest.fixture
def recorded_files(db):
    """Two checkpoints and a client update whose files are in the model store as recorded."""
    experiment = ExperimentFactory()
    first, second = (store_checkpoint(experiment, number, os.urandom(64)) for number in (1, 2))
    content = os.urandom(64)
    stored_name = model_store().save("site-a.safetensors", ContentFile(content))
    update = ClientUpdateFactory(
        round=first.round,
        update_file=stored_name,
        update_sha256=hashlib.sha256(content).hexdigest(),
    )
    return first, second, update


def test_verify_model_store_passes_when_every_recorded_file_is_there_unchanged(recorded_files):
    output = io.StringIO()

    call_command("verify_model_store", stdout=output)

    assert "checked 2 checkpoint and 1 client update files; 3 match, 0 missing, 0 different" in (
        output.getvalue()
    )


def test_verify_model_store_names_missing_and_changed_files_and_fails(recorded_files):
    first, _, update = recorded_files
    model_store().delete(first.file.name)
    with model_store().open(update.update_file.name, "wb") as handle:
        handle.write(b"not what was recorded")
    output, errors = io.StringIO(), io.StringIO()

    with pytest.raises(CommandError, match="2 of 3 files the ledger names are missing"):
        call_command("verify_model_store", stdout=output, stderr=errors)

    assert "1 match, 1 missing, 1 different" in output.getvalue()
    assert f"missing: checkpoint {first.pk}: {first.file.name}" in errors.getvalue()
    assert f"different: client update {update.pk}: {update.update_file.name}" in errors.getvalue()
    assert len(errors.getvalue().splitlines()) == 2  # nothing about the intact second file


# --- backup.sh -------------------------------------------------------------------------------


@uses_the_scripts
def test_a_backup_is_a_dated_folder_of_the_dump_the_model_store_and_their_manifest(
    tmp_path, model_files
):
    backup = back_up(tmp_path, tmp_path / "backups")

    assert BACKUP_NAME.fullmatch(backup.name)
    assert sorted(p.name for p in (tmp_path / "backups").iterdir()) == [".backup.lock", backup.name]
    assert sorted(p.name for p in backup.iterdir()) == [
        "MANIFEST", "database.dump", "model-store.tar.gz",
    ]  # fmt: skip
    entries = manifest_entries(backup)
    assert entries[0] == ["fedlens-backup-manifest", "1"]
    fields = {entry[0]: entry[1:] for entry in entries}
    assert fields["fedlens_version"] == ["0.1.0"]
    assert fields["model_store_files"] == ["2"]
    checksums = {entry[2]: entry[1] for entry in entries if entry[0] == "sha256"}
    assert checksums == {
        "database.dump": sha256_of(backup / "database.dump"),
        "model-store.tar.gz": sha256_of(backup / "model-store.tar.gz"),
    }
    migrations = [entry[1:] for entry in entries if entry[0] == "migration"]
    applied = query(connection.settings_dict["NAME"], "SELECT app, name FROM django_migrations")
    assert sorted(migrations) == sorted([app, name] for app, name in applied)
    archived = subprocess.run(
        ["tar", "--list", "--gzip", "--file", str(backup / "model-store.tar.gz")],
        capture_output=True, encoding="utf-8", check=True,
    ).stdout.split()  # fmt: skip
    assert sorted(archived) == sorted(model_files)


@uses_the_scripts
def test_a_backup_that_fails_leaves_no_folder_behind(tmp_path, fresh_database):
    (tmp_path / "models").mkdir()

    # An empty database: pg_dump succeeds, then the dump turns out to hold no FedLens ledger.
    result = run_script(
        BACKUP_SCRIPT, "--dest", str(tmp_path / "backups"),
        database=fresh_database, data_dir=tmp_path,
    )  # fmt: skip

    assert result.returncode == 1
    assert "the dump has no applied migrations" in result.stderr
    assert [p.name for p in (tmp_path / "backups").iterdir()] == [".backup.lock"]


@uses_the_scripts
def test_backup_keeps_only_the_newest_backups(tmp_path, model_files):
    backups = tmp_path / "backups"
    older = ["fedlens-20240101T000000Z", "fedlens-20240102T000000Z", "fedlens-20240103T000000Z"]
    for name in [*older, ".fedlens-20240104T000000Z.partial", "notes"]:
        (backups / name).mkdir(parents=True)

    newest = back_up(tmp_path, backups, "--keep", "2")

    # The partial folder was an interrupted backup's; folders of other names are not backups.
    remaining = sorted(p.name for p in backups.iterdir())
    assert remaining == [".backup.lock", "fedlens-20240103T000000Z", newest.name, "notes"]


@uses_the_scripts
def test_backup_with_verify_reports_a_model_store_that_differs_and_still_backs_it_up(tmp_path):
    experiment = ExperimentFactory()
    checkpoint = store_checkpoint(experiment, 1, b"weights")
    model_store().delete(checkpoint.file.name)

    result = run_script(
        BACKUP_SCRIPT, "--dest", str(tmp_path / "backups"), "--verify",
        database=connection.settings_dict["NAME"], data_dir=tmp_path,
    )  # fmt: skip

    assert result.returncode == 4, result.stderr
    assert f"missing: checkpoint {checkpoint.pk}" in result.stderr
    assert BACKUP_NAME.fullmatch(Path(result.stdout.strip()).name)
    assert (Path(result.stdout.strip()) / "MANIFEST").exists()


# --- restore.sh ------------------------------------------------------------------------------


@uses_the_scripts
def test_restore_refuses_a_database_that_has_tables(tmp_path, model_files):
    backup = back_up(tmp_path, tmp_path / "backups")
    test_database = connection.settings_dict["NAME"]
    tables_before = table_names(test_database)

    result = restore(backup, test_database, tmp_path / "restored")

    assert result.returncode == 3
    assert f"database '{test_database}' is not empty" in result.stderr
    assert "nothing was restored" in result.stderr
    assert table_names(test_database) == tables_before
    assert not (tmp_path / "restored").exists()


@uses_the_scripts
def test_restore_refuses_a_model_store_that_has_files(tmp_path, model_files, fresh_database):
    backup = back_up(tmp_path, tmp_path / "backups")

    result = restore(backup, fresh_database, tmp_path)  # the store the backup was made of

    assert result.returncode == 3
    assert f"the model store {tmp_path / 'models'} is not empty" in result.stderr
    assert table_names(fresh_database) == []


@uses_the_scripts
def test_restore_refuses_a_damaged_backup_before_changing_anything(
    tmp_path, model_files, fresh_database
):
    backup = back_up(tmp_path, tmp_path / "backups")
    archive = backup / "model-store.tar.gz"
    damaged = bytearray(archive.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    archive.write_bytes(bytes(damaged))

    result = restore(backup, fresh_database, tmp_path / "restored")

    assert result.returncode == 3
    assert "the backup is damaged" in result.stderr
    assert "model-store.tar.gz: FAILED" in result.stderr
    assert table_names(fresh_database) == []
    assert not (tmp_path / "restored").exists()


# --- The round trip --------------------------------------------------------------------------


def ledger_rows(database: str) -> dict[str, list[tuple]]:
    """Every row of every training_* table, in id order."""
    return {
        table: query(database, f'SELECT * FROM "{table}" ORDER BY id')  # noqa: S608 - our names
        for table in table_names(database)
        if table.startswith("training_")
    }


def row_counts(database: str) -> dict[str, int]:
    return {
        table: query(database, f'SELECT count(*) FROM "{table}"')[0][0]  # noqa: S608 - our names
        for table in table_names(database)
    }


def get(url: str, token: str) -> tuple[int, Message, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Token {token}"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - local server
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def start_server(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "flproject.asgi:application", "--port", str(port)],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        encoding="utf-8", errors="replace",
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{base_url}/healthz", timeout=2)  # noqa: S310 - local server
            return server, base_url
        except urllib.error.HTTPError:
            return server, base_url  # it answers
        except OSError as exc:
            if server.poll() is not None or time.monotonic() > deadline:
                stop_process(server)
                raise AssertionError(f"the server did not start:\n{server.stdout.read()}") from exc
            time.sleep(0.3)


@uses_the_scripts
@pytest.mark.redis
@pytest.mark.worker
@needs_redis
def test_a_restored_backup_serves_the_finished_experiment_with_the_same_ledger_and_files(
    lesions_dataset, worker_env, tmp_path, fresh_database
):
    # Given an experiment that a real worker ran to the end, and an API token
    experiment = new_experiment(lesions_dataset, num_rounds=2, clients_per_round=2, min_clients=2)
    worker = WorkerProcess(f"backup-{uuid.uuid4().hex[:6]}@test", worker_env)
    try:
        services.start_experiment(experiment.pk)
        wait_until_finished(experiment)
    finally:
        worker.stop()
    assert experiment.status == ExperimentStatus.COMPLETED, experiment.failure_reason
    token = api_token(experiment.owner)
    best = Checkpoint.objects.get(experiment=experiment, is_best=True)
    source_database = connection.settings_dict["NAME"]

    # When it is backed up, and restored into a new database and a new data folder
    backup = back_up(tmp_path, tmp_path / "backups")
    restored_data = tmp_path / "restored"
    result = restore(backup, fresh_database, restored_data)

    # Then the restore's own checks pass, and the ledger and the files are the same
    assert result.returncode == 0, result.stderr
    assert "checked 3 checkpoint and 4 client update files; 7 match" in result.stdout
    assert row_counts(fresh_database) == row_counts(source_database)
    assert ledger_rows(fresh_database) == ledger_rows(source_database)
    # The cross-site round's evaluation tasks upload no weights.
    uploads = ClientUpdate.objects.filter(round__experiment=experiment).exclude(update_file="")
    stored_files = [*Checkpoint.objects.filter(experiment=experiment).values_list("file", "sha256"),
                    *uploads.values_list("update_file", "update_sha256")]  # fmt: skip
    assert len(stored_files) == 3 + 4  # initial + 2 rounds; 2 clients in each of 2 rounds
    for name, recorded in stored_files:
        assert sha256_of(restored_data / "models" / name) == recorded
        assert sha256_of(tmp_path / "models" / name) == recorded

    # And a server on the restored copy serves the experiment and its best checkpoint
    server, base_url = start_server(
        service_env(DATABASE_URL=database_url(fresh_database), FEDLENS_DATA_DIR=str(restored_data))
    )
    try:
        status, _, body = get(f"{base_url}/api/experiments/{experiment.pk}/", token)
        download_status, headers, weights = get(
            f"{base_url}/api/checkpoints/{best.pk}/download/", token
        )
    finally:
        stop_process(server)
    assert status == 200, body
    served = json.loads(body)
    # Round 3 is the cross-site evaluation that follows the 2 training rounds.
    assert (served["status"], served["current_round"]) == ("completed", 3)
    assert download_status == 200, weights
    assert hashlib.sha256(weights).hexdigest() == best.sha256 == headers["X-Checksum-SHA256"]
