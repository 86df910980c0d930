"""The REST API of the training app (DRF)."""
