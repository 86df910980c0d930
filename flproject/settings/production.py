"""Settings for a deployment: every secret from the environment, HTTPS everywhere."""

from django.core.exceptions import ImproperlyConfigured

from .base import *  # noqa: F403
from .base import ALLOWED_HOSTS, REDIS_URL, SECRET_KEY, env, env_bool, env_int

if not SECRET_KEY:
    raise ImproperlyConfigured(
        "DJANGO_SECRET_KEY must be set in production (50 or more random characters)."
    )
if len(SECRET_KEY) < 50 or len(set(SECRET_KEY)) < 5:
    raise ImproperlyConfigured("DJANGO_SECRET_KEY is too weak: use 50 or more random characters.")
if not ALLOWED_HOSTS:
    raise ImproperlyConfigured("DJANGO_ALLOWED_HOSTS must list the host names FedLens serves.")

DEBUG = env_bool("DJANGO_DEBUG", False)

# When set, /metrics answers only to `Authorization: Bearer <token>`. A deployment whose network
# policy already keeps everyone but Prometheus away from the web port may leave it unset.
FEDLENS_METRICS_TOKEN = env.str("FEDLENS_METRICS_TOKEN", default="").strip()
if FEDLENS_METRICS_TOKEN and len(FEDLENS_METRICS_TOKEN) < 32:
    raise ImproperlyConfigured(
        "FEDLENS_METRICS_TOKEN is too weak: use 32 or more random characters."
    )

# The API's request counts (accounts/throttles.py) are shared by every web process, or each
# of uvicorn's workers would allow the whole rate on its own.
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "fedlens-cache",
        }
    }

# TLS ends at the reverse proxy (nginx or the ingress), which sets X-Forwarded-Proto.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", True)
# /health and the probes are asked over plain HTTP from inside the deployment.
SECURE_REDIRECT_EXEMPT = [r"^health$", r"^healthz$", r"^readyz$"]
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 31536000, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
SECURE_HSTS_PRELOAD = True
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
