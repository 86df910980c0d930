"""Celery side of FedLens: tasks, queue routing, the embedded in-process worker, the
commands that run experiments on it (`run_experiment`, `demo`), and the work queued in
answer to the ledger's signals (receivers.py)."""
