"""The FedLens site agent: runs at a hospital, next to its data.

    python -m workers.site enroll --server https://fedlens.example.org --token TOKEN
    python -m workers.site datasets add --name lesions --path /data/lesions
    python -m workers.site run

It enrols the node once (a one-time token for a credential of its own), declares the
metadata of its datasets (never their paths or images), records its operator's approvals,
and runs one Celery worker per GPU that consumes only the site's own queue and talks to
the server over HTTPS. It imports no Django and needs no database or model store: only
``training.fl``, ``training.queues`` and ``training.site_broker`` of the server's code.
"""

AGENT_VERSION = "0.1.0"
