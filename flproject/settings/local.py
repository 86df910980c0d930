"""Settings for a developer's machine and `make demo`: debug on, a development secret key."""

from .base import *  # noqa: F403
from .base import env, env_bool

DEBUG = env_bool("DJANGO_DEBUG", True)
# Only for local use: production.py refuses to start without DJANGO_SECRET_KEY.
SECRET_KEY = env.str(
    "DJANGO_SECRET_KEY", default="fedlens-local-development-key-not-for-production"
)
