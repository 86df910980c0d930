"""Celery side of FedLens: tasks, queue routing, the embedded in-process worker."""
