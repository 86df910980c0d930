"""Operations: Prometheus metrics (metrics.py), JSON logs with request and task ids (logs.py),
and the endpoints that probes and Prometheus call (endpoints.py). A Django app (apps.py), so
that the metrics subscribe to the ledger's signals once the apps are ready."""
