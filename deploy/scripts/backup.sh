#!/usr/bin/env bash
# Back up FedLens: the PostgreSQL ledger and the model store, into one dated folder.
#
# Usage: deploy/scripts/backup.sh [--dest DIR] [--keep N] [--verify]
#
#   --dest DIR   where backups go (default: $BACKUP_DIR)
#   --keep N     keep the N newest backups in DIR and delete older ones (default:
#                $BACKUP_KEEP, else 14)
#   --verify     first run `manage.py verify_model_store`, which reads every model file;
#                problems are reported (exit status 4) but the backup is still written
#
# Reads DATABASE_URL (postgres://user:password@host:port/name, as FedLens does) and
# FEDLENS_DATA_DIR (the model store is its models/ folder). It runs manage.py with
# $FEDLENS_PYTHON, else the checkout's .venv/bin/python, else python3. pg_dump must be of the
# server's major version or newer.
#
# It writes DIR/fedlens-YYYYmmddTHHMMSSZ/ (UTC) holding
#   database.dump        pg_dump --format=custom of the whole database
#   model-store.tar.gz   the files of models/ (checkpoints and client updates)
#   MANIFEST             the SHA-256 of both, the FedLens version and the applied migrations
# first under a hidden .partial name, renamed only when complete: a folder named fedlens-* is
# always a whole backup. restore.sh restores one.
#
# Schedule: nightly (cron, a systemd timer or a Kubernetes CronJob), and always right before
# an upgrade, since upgrades migrate the database and a backup can only be restored with code
# whose migrations match its own (the MANIFEST lists them). With the default --keep 14 that is
# two weeks of nightly backups. Copy DIR to another machine too: a backup on the database's
# own disk does not survive that disk.
#
# Order: the database first, then the files. Workers write a model file in full before the
# transaction that records it commits, and never rewrite a file once a committed row names
# it; so every row in the dump names a file that already exists, unchanged, when the archive
# is made afterwards. A file written after the dump may or may not be in the archive; no row
# of the backup names it, so it is harmless. (Archiving first would leave rows committed
# between the two steps naming files that the archive lacks.) The list of files is taken once,
# and the archive holds exactly that list.
#
# Exit status: 0 done; 1 failed, leaving no backup folder behind; 2 wrong usage; 4 backup
# written, but --verify found model files missing or different from the ledger.

set -euo pipefail
# A backup holds everything: password hashes, API tokens, all models.
umask 077

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

dest=${BACKUP_DIR:-}
keep=${BACKUP_KEEP:-14}
verify=false
while (($#)); do
    case $1 in
        --dest)
            (($# >= 2)) || fail 2 "--dest needs a folder"
            dest=$2
            shift 2
            ;;
        --dest=*) dest=${1#--dest=}; shift ;;
        --keep)
            (($# >= 2)) || fail 2 "--keep needs a number"
            keep=$2
            shift 2
            ;;
        --keep=*) keep=${1#--keep=}; shift ;;
        --verify) verify=true; shift ;;
        -h | --help) usage ;;
        *) fail 2 "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -n $dest ]] || fail 2 "no destination: pass --dest DIR or set BACKUP_DIR"
[[ $keep =~ ^[1-9][0-9]*$ ]] || fail 2 "--keep (BACKUP_KEEP) must be a whole number of 1 or more, not '$keep'"

for tool in pg_dump pg_restore psql tar gzip sha256sum find sort; do
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

# libpq's PG* variables rather than a URL on the command line, which `ps` would show with
# its password.
[[ -n ${DATABASE_URL:-} ]] || fail 1 "DATABASE_URL is not set; backup.sh backs up a PostgreSQL deployment (for the embedded SQLite default, stop FedLens and copy FEDLENS_DATA_DIR)"
libpq_environment=$("$python" "$project_root/deploy/scripts/libpq_environment.py" "$DATABASE_URL") || fail 1 "cannot read DATABASE_URL"
eval "$libpq_environment"
export PGCONNECT_TIMEOUT=${PGCONNECT_TIMEOUT:-10}

data_dir=${FEDLENS_DATA_DIR:-$project_root/data}
model_store=$data_dir/models

psql --no-psqlrc --no-password --quiet --tuples-only --command 'SELECT 1' >/dev/null ||
    fail 1 "cannot connect to database '$PGDATABASE' on ${PGHOST:-the local socket} (see the message above)"
if [[ ! -d $model_store ]]; then
    checkpoints=$(psql --no-psqlrc --no-password --quiet --tuples-only --no-align \
        --command 'SELECT count(*) FROM training_checkpoint') ||
        fail 1 "the database has no training_checkpoint table: is DATABASE_URL the FedLens database?"
    # A missing store with checkpoints in the ledger means FEDLENS_DATA_DIR points elsewhere.
    ((checkpoints == 0)) ||
        fail 1 "there is no model store at $model_store, but the database records $checkpoints checkpoints: is FEDLENS_DATA_DIR right?"
fi

mkdir -p -- "$dest" || fail 1 "cannot create $dest"
dest=$(cd -- "$dest" && pwd)

# One backup at a time per folder; then any .partial folder left is a crashed run's.
if command -v flock >/dev/null; then
    exec 9>"$dest/.backup.lock"
    flock --nonblock 9 || fail 1 "another backup is writing into $dest"
    for stale in "$dest"/.fedlens-*.partial; do
        [[ -e $stale ]] || continue
        note "removing $stale, left by an interrupted backup"
        rm -rf -- "$stale"
    done
fi

stamp=$(date -u +%Y%m%dT%H%M%SZ)
final=$dest/fedlens-$stamp
work=$dest/.fedlens-$stamp.partial
[[ ! -e $final ]] || fail 1 "$final already exists (two backups in one second?)"
mkdir -- "$work"
completed=false
remove_unfinished_backup() {
    if [[ $completed != true ]]; then
        rm -rf -- "$work"
    fi
}
trap remove_unfinished_backup EXIT

verify_status=0
if [[ $verify == true ]]; then
    note "verifying the model store against the ledger"
    manage verify_model_store >&2 || verify_status=$?
    ((verify_status == 0)) || note "the model store does not match the ledger; backing it up as it is"
fi

note "dumping database '$PGDATABASE'"
pg_dump --no-password --format=custom --file="$work/database.dump" ||
    fail 1 "pg_dump failed (see the message above)"
pg_restore --list "$work/database.dump" >/dev/null || fail 1 "the dump just written cannot be read"
server_version=$(psql --no-psqlrc --no-password --quiet --tuples-only --no-align \
    --command 'SHOW server_version')

# The migrations applied in the dump itself (not a second query that could see another state):
# restore.sh compares them with the restored database, and they say which code fits.
migrations=$(
    pg_restore --data-only --table=django_migrations --file=- "$work/database.dump" | awk -F'\t' '
        /^COPY [^ ]*django_migrations \(/ {
            header = $0
            sub(/^[^(]*\(/, "", header)
            sub(/\).*$/, "", header)
            count = split(header, columns, ", ")
            for (i = 1; i <= count; i++) {
                if (columns[i] == "app") app = i
                if (columns[i] == "name") name = i
            }
            copying = 1
            next
        }
        copying && $0 == "\\." { copying = 0; next }
        copying { print "migration " $app " " $name }
    ' | LC_ALL=C sort
) || fail 1 "cannot read the applied migrations from the dump"
[[ -n $migrations ]] || fail 1 "the dump has no applied migrations: is DATABASE_URL the FedLens database?"

note "archiving the model store $model_store"
file_list=$work/.model-files
if [[ -d $model_store ]]; then
    (cd -- "$data_dir" && find models -type f -print0 | LC_ALL=C sort --zero-terminated) >"$file_list"
else
    : >"$file_list"
fi
model_files=$(tr -cd '\0' <"$file_list" | wc -c)
tar_status=0
tar --create --gzip --file="$work/model-store.tar.gz" --directory="$data_dir" \
    --ignore-failed-read --warning=no-file-changed --no-recursion \
    --null --files-from="$file_list" || tar_status=$?
# 1 is GNU tar's "a file changed while it was read": only a file with no row in the dump.
((tar_status <= 1)) || fail 1 "tar failed (status $tar_status) while archiving $model_store"
rm -f -- "$file_list"

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$project_root/flproject/__init__.py")
revision=unknown
if command -v git >/dev/null && git -C "$project_root" rev-parse --git-dir >/dev/null 2>&1; then
    revision=$(git -C "$project_root" describe --always --dirty 2>/dev/null || echo unknown)
fi
{
    echo "fedlens-backup-manifest 1"
    echo "created $stamp"
    echo "fedlens_version ${version:-unknown}"
    echo "source_revision $revision"
    echo "database $PGDATABASE"
    echo "postgres_server $server_version"
    echo "model_store_files $model_files"
    (cd -- "$work" && sha256sum database.dump model-store.tar.gz) |
        while read -r digest file; do echo "sha256 $digest $file"; done
    echo "$migrations"
} >"$work/MANIFEST"

sync -- "$work"/* 2>/dev/null || sync
mv --no-target-directory -- "$work" "$final"
completed=true
note "backup written to $final ($(du -sh -- "$final" | cut -f1), $model_files model files)"

# Retention: only complete backups count, newest last (the names sort by time).
shopt -s nullglob
backups=("$dest"/fedlens-[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]T[0-9][0-9][0-9][0-9][0-9][0-9]Z)
shopt -u nullglob
mapfile -t backups < <(printf '%s\n' "${backups[@]}" | LC_ALL=C sort)
excess=$((${#backups[@]} - keep))
for ((i = 0; i < excess; i++)); do
    note "removing ${backups[i]} (keeping the $keep newest)"
    rm -rf -- "${backups[i]}"
done

echo "$final"
if ((verify_status != 0)); then
    exit 4
fi
