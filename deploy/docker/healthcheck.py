#!/usr/bin/env python
"""Container health probe of the FedLens images (installed as /usr/local/bin/fedlens-healthcheck).

    fedlens-healthcheck [URL]

Exits 0 when URL (by default the web server's /health) answers 200, and 1 otherwise: a 503
from /health (database or broker down), a refused connection or a time-out. Only the standard
library is used, so the slim image needs no curl.

Django answers 400 to a Host header that is not in ALLOWED_HOSTS, and a deployment lists its
public names there, not 127.0.0.1; so the probe presents the first name of
DJANGO_ALLOWED_HOSTS. It also says X-Forwarded-Proto: https, as the TLS proxy in front does,
so that the HTTPS redirect never applies to it.
"""

import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000/health"
TIMEOUT_SECONDS = 5


def probe_host() -> str:
    """The first concrete host name of DJANGO_ALLOWED_HOSTS ('.example.org' -> 'example.org')."""
    for entry in os.environ.get("DJANGO_ALLOWED_HOSTS", "").split(","):
        host = entry.strip().lstrip(".")
        if host and host != "*":
            return host
    return "localhost"


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else DEFAULT_URL
    if not url.startswith(("http://", "https://")):
        print(f"usage: fedlens-healthcheck [http://HOST:PORT/PATH], not {url!r}", file=sys.stderr)
        return 2
    headers = {"Host": probe_host(), "X-Forwarded-Proto": "https"}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - http(s) checked above
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {url} answered {exc.code}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url} did not answer: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
