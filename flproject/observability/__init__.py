"""Operations: Prometheus metrics (metrics.py), JSON logs with request and task ids (logs.py),
and the endpoints that probes and Prometheus call (endpoints.py)."""
