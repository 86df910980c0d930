"""Print `export PG...=...` lines for a postgres:// DATABASE_URL, for backup.sh and restore.sh.

libpq's PG* variables rather than a URL on the command line, which `ps` would show with its
password. Usage: eval "$(python libpq_environment.py "$DATABASE_URL")"
"""

import shlex
import sys
from urllib.parse import parse_qsl, unquote, urlsplit

LIBPQ_OPTIONS = {
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "connect_timeout": "PGCONNECT_TIMEOUT",
}


def main(database_url: str) -> None:
    url = urlsplit(database_url)
    if url.scheme not in {"postgres", "postgresql", "pgsql"}:
        sys.exit(
            f"DATABASE_URL must be a postgres:// URL, not {url.scheme}:// (for the embedded "
            "SQLite default, stop FedLens and copy FEDLENS_DATA_DIR instead)"
        )
    values = {
        "PGHOST": unquote(url.hostname or ""),
        "PGPORT": str(url.port or ""),
        "PGUSER": unquote(url.username or ""),
        "PGPASSWORD": unquote(url.password or ""),
        "PGDATABASE": unquote(url.path.lstrip("/")),
    }
    for key, value in parse_qsl(url.query):
        if key in LIBPQ_OPTIONS:
            values[LIBPQ_OPTIONS[key]] = value
    if not values["PGDATABASE"]:
        sys.exit("DATABASE_URL names no database")
    for name, value in values.items():
        if value:
            print(f"export {name}={shlex.quote(value)}")


if __name__ == "__main__":
    main(sys.argv[1])
