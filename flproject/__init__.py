"""The FedLens Django project; the Celery app is loaded with it so tasks find their app."""

from .celery import app as celery_app

__all__ = ["celery_app"]
__version__ = "0.1.0"
