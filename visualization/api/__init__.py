"""The REST API of the dashboard app (DRF): an experiment's report and metric downloads."""
