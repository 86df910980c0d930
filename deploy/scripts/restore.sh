#!/usr/bin/env bash
# Restore a FedLens backup made by backup.sh into an empty database and model store.
#
# Usage: deploy/scripts/restore.sh [--force] BACKUP_DIR
#
#   BACKUP_DIR   a fedlens-YYYYmmddTHHMMSSZ folder written by backup.sh
#   --force      restore even into a database that has tables (the backup's tables, data and
#                sequences replace those of the same names; others stay) and over a model
#                store that has files (it is moved aside to models.replaced-<time>)
#
# Reads DATABASE_URL (the target database, which must exist: createdb NAME) and
# FEDLENS_DATA_DIR (the store goes to its models/ folder). It runs manage.py with
# $FEDLENS_PYTHON, else the checkout's .venv/bin/python, else python3. Stop FedLens's web
# server, workers and beat first, and run it as the user FedLens runs as, so that the restored
# files are theirs.
#
# Before it touches anything it checks the MANIFEST's SHA-256 of both files, that the dump and
# the archive can be read, and that the targets are empty. Then it extracts the model store
# next to its place, restores the database in a single transaction (all or nothing), and
# moves the store into place. Last it checks the result: the database's applied migrations
# are the backup's; `manage.py showmigrations` finds none of this code's migrations missing
# (else the backup is older than the code: migrate it if that is the intent); and
# `manage.py verify_model_store` finds every file the ledger names, unchanged.
#
# Exit status: 0 restored and checked; 1 failed; 2 wrong usage; 3 refused, nothing changed
# (damaged backup, or a target that is not empty); 4 restored, but a check failed.

set -euo pipefail

program=${0##*/}
project_root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)

fail() {
    local status=$1
    shift
    printf '%s: error: %s\n' "$program" "$*" >&2
    exit "$status"
}

note() {
    printf '%s: %s\n' "$program" "$*" >&2
}

usage() {
    sed -n '4,10s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    exit 0
}

force=false
backup=
while (($#)); do
    case $1 in
        --force) force=true; shift ;;
        -h | --help) usage ;;
        -*) fail 2 "unknown option '$1' (see --help)" ;;
        *)
            [[ -z $backup ]] || fail 2 "one backup folder only (got '$backup' and '$1')"
            backup=$1
            shift
            ;;
    esac
done
[[ -n $backup ]] || fail 2 "which backup? usage: $program [--force] BACKUP_DIR"
[[ -d $backup ]] || fail 2 "$backup is not a folder"
backup=$(cd -- "$backup" && pwd)

for tool in pg_restore psql tar gzip sha256sum; do
    command -v "$tool" >/dev/null || fail 1 "'$tool' is not installed (PostgreSQL client tools: apt-get install postgresql-client)"
done

python=${FEDLENS_PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x $project_root/.venv/bin/python ]]; then
        python=$project_root/.venv/bin/python
    else
        python=python3
    fi
fi
command -v "$python" >/dev/null || fail 1 "no Python at '$python' (set FEDLENS_PYTHON)"

manage() {
    "$python" "$project_root/manage.py" "$@"
}

# --- The backup must be whole before anything is touched -------------------------------------
manifest=$backup/MANIFEST
[[ -f $manifest ]] || fail 3 "$backup has no MANIFEST: it is not a complete backup; nothing was restored"
[[ $(head -n 1 -- "$manifest") == "fedlens-backup-manifest 1" ]] ||
    fail 3 "$manifest is not a FedLens backup manifest (version 1); nothing was restored"
checksums=$(awk '$1 == "sha256" { print $2 "  " $3 }' "$manifest")
for file in database.dump model-store.tar.gz; do
    grep -q "  $file\$" <<<"$checksums" ||
        fail 3 "the MANIFEST records no SHA-256 of $file; nothing was restored"
    [[ -f $backup/$file ]] || fail 3 "$backup/$file is missing; nothing was restored"
done
note "checking the SHA-256 of database.dump and model-store.tar.gz"
if ! damaged=$(cd -- "$backup" && sha256sum --check --strict --quiet <<<"$checksums" 2>&1); then
    fail 3 "the backup is damaged, its files do not match the MANIFEST's SHA-256; nothing was restored:
$damaged"
fi
pg_restore --list "$backup/database.dump" >/dev/null ||
    fail 3 "database.dump cannot be read by this pg_restore; nothing was restored"
members=$(tar --list --gzip --file="$backup/model-store.tar.gz") ||
    fail 3 "model-store.tar.gz cannot be read; nothing was restored"
if [[ -n $members ]] && grep -v -q '^models/' <<<"$members"; then
    fail 3 "model-store.tar.gz holds files outside models/; nothing was restored"
fi

# --- The targets must be empty ---------------------------------------------------------------
[[ -n ${DATABASE_URL:-} ]] || fail 1 "DATABASE_URL is not set: it names the database to restore into"
# libpq's PG* variables rather than a URL on the command line, which `ps` would show with
# its password.
libpq_environment=$("$python" "$project_root/deploy/scripts/libpq_environment.py" "$DATABASE_URL") || fail 1 "cannot read DATABASE_URL"
eval "$libpq_environment"
export PGCONNECT_TIMEOUT=${PGCONNECT_TIMEOUT:-10}

query() {
    psql --no-psqlrc --no-password --quiet --tuples-only --no-align --command "$1"
}

# pg_class, not information_schema: that shows only the tables this user may read.
tables=$(query "SELECT count(*) FROM pg_catalog.pg_class AS c
                JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
                WHERE c.relkind IN ('r', 'p')
                  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                  AND n.nspname NOT LIKE 'pg\_toast%'") ||
    fail 1 "cannot connect to database '$PGDATABASE' on ${PGHOST:-the local socket}; it must exist (createdb $PGDATABASE)"
clean_options=()
if ((tables > 0)); then
    [[ $force == true ]] ||
        fail 3 "database '$PGDATABASE' is not empty ($tables tables); restore into a new, empty database, or pass --force to replace its tables with the backup's; nothing was restored"
    note "--force: the backup's tables replace those in '$PGDATABASE' ($tables tables now)"
    clean_options=(--clean --if-exists)
fi

data_dir=${FEDLENS_DATA_DIR:-$project_root/data}
model_store=$data_dir/models
if [[ -d $model_store ]] && [[ -n $(find "$model_store" -mindepth 1 -print -quit) ]]; then
    [[ $force == true ]] ||
        fail 3 "the model store $model_store is not empty; point FEDLENS_DATA_DIR at an empty folder, or pass --force to move it aside; nothing was restored"
fi

# --- Restore ---------------------------------------------------------------------------------
mkdir -p -- "$data_dir" || fail 1 "cannot create $data_dir"
staging=$data_dir/.models-restoring-$$
mkdir -- "$staging"
trap 'rm -rf -- "$staging"' EXIT

note "extracting the model store ($(grep -c . <<<"$members") files)"
tar --extract --gzip --file="$backup/model-store.tar.gz" --directory="$staging" ||
    fail 1 "extracting model-store.tar.gz into $staging failed; the database was not touched"
mkdir -p -- "$staging/models"

note "restoring database '$PGDATABASE'"
pg_restore --no-password --no-owner --no-privileges --exit-on-error --single-transaction \
    "${clean_options[@]}" --dbname="$PGDATABASE" "$backup/database.dump" ||
    fail 1 "pg_restore failed and rolled back; the database is as it was and the model store was not touched"

if [[ -d $model_store ]]; then
    if [[ -n $(find "$model_store" -mindepth 1 -print -quit) ]]; then
        replaced=$model_store.replaced-$(date -u +%Y%m%dT%H%M%SZ)
        note "--force: moving the model store that was there to $replaced"
        mv --no-target-directory -- "$model_store" "$replaced"
    else
        rmdir -- "$model_store"
    fi
fi
mv --no-target-directory -- "$staging/models" "$model_store" ||
    fail 1 "the database is restored, but moving the model store from $staging/models to $model_store failed"
note "restored the database '$PGDATABASE' and the model store $model_store"

# --- Check -----------------------------------------------------------------------------------
check_failed=false
restored_migrations=$(query "SELECT 'migration ' || app || ' ' || name FROM django_migrations" |
    LC_ALL=C sort) || restored_migrations="(the restored database has no django_migrations table)"
backed_up_migrations=$(grep '^migration ' "$manifest" | LC_ALL=C sort)
if [[ $restored_migrations != "$backed_up_migrations" ]]; then
    note "CHECK FAILED: the restored database's applied migrations differ from the MANIFEST's:"
    diff <(echo "$backed_up_migrations") <(echo "$restored_migrations") >&2 || true
    check_failed=true
fi

# The model check reads the tables through this code's models: only if the schema fits them.
if ! plan=$(manage showmigrations --plan 2>&1); then
    note "CHECK FAILED: manage.py showmigrations failed:"
    printf '%s\n' "$plan" >&2
    check_failed=true
elif unapplied=$(grep '^\[ \]' <<<"$plan"); then
    note "CHECK FAILED: the backup is older than this code, whose migrations it lacks:"
    printf '%s\n' "$unapplied" >&2
    note "run 'manage.py migrate' if upgrading it is what you want, then 'manage.py verify_model_store'"
    check_failed=true
elif ! manage verify_model_store; then
    note "CHECK FAILED: files the ledger names are missing from the model store or differ"
    check_failed=true
fi

backup_version=$(awk '$1 == "fedlens_version" { print $2 }' "$manifest")
code_version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$project_root/flproject/__init__.py")
if [[ $backup_version != "$code_version" ]]; then
    note "the backup was made by FedLens $backup_version; this code is $code_version"
fi
if [[ $check_failed == true ]]; then
    exit 4
fi
note "all checks passed"
