"""Settings shared by every environment. Values come from the environment (see .env.example).

A missing or malformed variable raises ImproperlyConfigured with one sentence naming it;
manage.py, asgi.py and wsgi.py print that sentence and exit.
"""

import re
import sys
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import environ
from django.core.exceptions import ImproperlyConfigured
from kombu import Queue

# Modules, not their upper-case names, which would become settings. They import no Django.
from flproject import machine
from training import queues

BASE_DIR = Path(__file__).resolve().parent.parent.parent
env = environ.Env()

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}
LOG_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def env_bool(name: str, default: bool) -> bool:
    """A strict boolean: a typo such as DJANGO_DEBUG=ture must not silently mean False."""
    raw = env.str(name, default=str(default)).strip().lower()
    if raw in TRUE_WORDS:
        return True
    if raw in FALSE_WORDS:
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, not {raw!r}.")


def env_int(name: str, default: int, *, minimum: int = 1) -> int:
    raw = env.str(name, default=str(default)).strip()
    if not raw.isdigit() or int(raw) < minimum:
        raise ImproperlyConfigured(
            f"{name} must be a whole number of at least {minimum}, not {raw!r}."
        )
    return int(raw)


def env_rate(name: str, default: str) -> str:
    """A request rate as DRF's throttles take it: a number of requests per second, minute,
    hour or day."""
    raw = env.str(name, default=default).strip()
    if not re.fullmatch(r"[1-9][0-9]*/(second|minute|hour|day)", raw):
        raise ImproperlyConfigured(
            f"{name} must be a number of requests per second, minute, hour or day, such as "
            f"600/minute, not {raw!r}."
        )
    return raw


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in env.str(name, default=default).split(",") if item.strip()]


def create_folder(name: str, folder: Path) -> None:
    """Create the folder that variable `name` needs, or say why it cannot be created."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImproperlyConfigured(
            f"{name}: the folder {folder} cannot be created: {exc.strerror}."
        ) from exc


# --- Core -------------------------------------------------------------------------------------
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS")
# local.py and test.py give a development key; production.py requires one from the environment.
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="")

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO").strip().upper()
if LOG_LEVEL not in LOG_LEVELS:
    raise ImproperlyConfigured(f"LOG_LEVEL must be one of {', '.join(sorted(LOG_LEVELS))}.")
# JSON lines for log collectors; plain text by default only when a person watches a terminal.
LOG_FORMAT = env.str("LOG_FORMAT", default="").strip().lower() or (
    "plain" if sys.stderr.isatty() else "json"
)
if LOG_FORMAT not in {"json", "plain"}:
    raise ImproperlyConfigured(f"LOG_FORMAT must be json or plain, not {LOG_FORMAT!r}.")
# Also write the log to this file, rotated at 10 MB, keeping 10 old files.
LOG_FILE = env.str("LOG_FILE", default="").strip()
if LOG_FILE:
    create_folder("LOG_FILE", Path(LOG_FILE).resolve().parent)

# --- Data folder: model store, uploads and the default SQLite database --------------------------
FEDLENS_DATA_DIR = Path(env.str("FEDLENS_DATA_DIR", default=str(BASE_DIR / "data"))).resolve()
try:
    # Created here because SQLite cannot create the folder of its own file.
    FEDLENS_DATA_DIR.mkdir(parents=True, exist_ok=True)
except OSError as exc:
    raise ImproperlyConfigured(
        f"FEDLENS_DATA_DIR ({FEDLENS_DATA_DIR}) cannot be created: {exc.strerror}."
    ) from exc
FEDLENS_MODEL_STORE_DIR = FEDLENS_DATA_DIR / "models"
# Server-side dataset paths must lie under one of these folders, so that an API user cannot
# point a dataset at arbitrary files of the server.
FEDLENS_DATASET_ROOTS = [
    Path(root).resolve()
    for root in env_list("FEDLENS_DATASET_ROOTS", str(FEDLENS_DATA_DIR / "datasets"))
]

# --- Request limits (training/api/parsers.py, training/api/errors.py) -----------------------
# Bodies read into memory: JSON and forms. Larger ones are answered 413.
FEDLENS_MAX_REQUEST_MB = env_int("FEDLENS_MAX_REQUEST_MB", 10)
DATA_UPLOAD_MAX_MEMORY_SIZE = FEDLENS_MAX_REQUEST_MB * 1024 * 1024
DATA_UPLOAD_MAX_NUMBER_FIELDS = env_int("FEDLENS_MAX_FORM_FIELDS", 1000)
# Uploaded files go to a temporary file past this size, never whole into memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
# Deeper JSON is refused with a 400 (Python's parser would recurse until it fails).
FEDLENS_MAX_JSON_DEPTH = env_int("FEDLENS_MAX_JSON_DEPTH", 32)

# --- Dataset uploads (training/uploads.py) --------------------------------------------------
# The largest archive POST /api/datasets/upload/ accepts.
FEDLENS_MAX_UPLOAD_MB = env_int("FEDLENS_MAX_UPLOAD_MB", 2048)
# Refused beyond: this many times the archive's size once unpacked (a zip or gzip bomb) ...
FEDLENS_UPLOAD_MAX_RATIO = env_int("FEDLENS_UPLOAD_MAX_RATIO", 100)
# ... this many megabytes unpacked, and this many files.
FEDLENS_UPLOAD_MAX_UNPACKED_MB = env_int("FEDLENS_UPLOAD_MAX_UNPACKED_MB", 20480)
FEDLENS_UPLOAD_MAX_FILES = env_int("FEDLENS_UPLOAD_MAX_FILES", 100_000)
# The largest image (voxels times components) a dataset may hold: larger ones are refused,
# naming the file, before their pixels are read. Default 512^3 (512 MiB as float32).
FEDLENS_MAX_VOLUME_VOXELS = env_int("FEDLENS_MAX_VOLUME_VOXELS", 512**3)
# Decoded datasets (preprocessed images and masks) on disk, written by the first worker
# process that trains on a dataset and memory-mapped by the others and by later runs
# (training/fl/data/cache.py). Safe to delete; entries of changed data are replaced.
FEDLENS_DATASET_CACHE_DIR = Path(
    env.str("FEDLENS_DATASET_CACHE_DIR", default="") or FEDLENS_DATA_DIR / "cache" / "datasets"
).resolve()
# A worker process keeps the datasets it opened while the decoded samples they hold or map
# add up to at most this many megabytes (the least recently used are closed first; one
# dataset larger than this is kept alone while it is used).
FEDLENS_DATASET_CACHE_MB = env_int("FEDLENS_DATASET_CACHE_MB", 2048, minimum=0)
# Each uploader's datasets go into a folder of their own under this one, which must lie
# under FEDLENS_DATASET_ROOTS (the first root by default).
FEDLENS_UPLOADS_DIR = Path(
    env.str("FEDLENS_UPLOADS_DIR", default="").strip()
    or (FEDLENS_DATASET_ROOTS or [FEDLENS_DATA_DIR / "datasets"])[0] / "uploads"
).resolve()
if FEDLENS_DATASET_ROOTS and not any(
    root == FEDLENS_UPLOADS_DIR or root in FEDLENS_UPLOADS_DIR.parents
    for root in FEDLENS_DATASET_ROOTS
):
    raise ImproperlyConfigured(
        f"FEDLENS_UPLOADS_DIR ({FEDLENS_UPLOADS_DIR}) must lie under one of "
        "FEDLENS_DATASET_ROOTS, or uploaded datasets could not be read."
    )

# --- Database ---------------------------------------------------------------------------------
DATABASE_URL = env.str(
    "DATABASE_URL", default=f"sqlite:///{FEDLENS_DATA_DIR / 'fedlens.sqlite3'}"
).strip()
if urlsplit(DATABASE_URL).scheme not in {"sqlite", "postgres", "postgresql", "pgsql"}:
    raise ImproperlyConfigured(
        "DATABASE_URL must be a postgres://user:password@host:port/name or sqlite:///path URL."
    )
DATABASES = {"default": env.db_url_config(DATABASE_URL)}
DATABASES["default"]["ATOMIC_REQUESTS"] = False
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The embedded worker writes from its own thread: wait for locks instead of failing, and
    # take the write lock at BEGIN so that two writers never deadlock on an upgrade.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
else:
    # Reusing connections spares each Celery task a new PostgreSQL backend (about 10 ms).
    DATABASES["default"]["CONN_MAX_AGE"] = env_int("DJANGO_CONN_MAX_AGE", 60, minimum=0)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# django-prometheus's subclasses of the same engines count queries, their errors and latency.
DATABASES["default"]["ENGINE"] = DATABASES["default"]["ENGINE"].replace(
    "django.db.backends.", "django_prometheus.db.backends.", 1
)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: unset means embedded mode (in-memory broker and channel layer, in-process worker) --
REDIS_URL = env.str("REDIS_URL", default="").strip()
if REDIS_URL and urlsplit(REDIS_URL).scheme not in {"redis", "rediss"}:
    raise ImproperlyConfigured("REDIS_URL must be a redis://host:port/db URL, or unset.")
FEDLENS_EMBEDDED = not REDIS_URL

# --- Real sites (docs/sites.md) ---------------------------------------------------------------
# The broker as the sites' agents reach it (rediss:// in production); each site gets a Redis
# ACL user of its own, made by this server through REDIS_URL. Unset: no site can enrol.
FEDLENS_SITE_BROKER_URL = env.str("FEDLENS_SITE_BROKER_URL", default="").strip()
if FEDLENS_SITE_BROKER_URL and urlsplit(FEDLENS_SITE_BROKER_URL).scheme not in {
    "redis",
    "rediss",
}:
    raise ImproperlyConfigured(
        "FEDLENS_SITE_BROKER_URL must be a rediss://host:port/db URL (redis:// on a test bench)."
    )
FEDLENS_ENROLMENT_TOKEN_HOURS = env_int("FEDLENS_ENROLMENT_TOKEN_HOURS", 24)
FEDLENS_SITE_BROKER_SYNC_SECONDS = env_int("FEDLENS_SITE_BROKER_SYNC_SECONDS", 300)

# --- Applications -----------------------------------------------------------------------------
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "knox",
    "rules.apps.AutodiscoverRulesConfig",
    "axes",
    "auditlog",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "django_prometheus",
    "training",
    "visualization",
    "workers",
    "flproject.observability",
    "accounts",
]

MIDDLEWARE = [
    # First and last: django-prometheus times and counts requests between the two.
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "flproject.observability.logs.RequestIdMiddleware",
    "flproject.observability.endpoints.MachineEndpointsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "accounts.audit.AuditActorMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # After the others: it turns a login refused for too many failures into its answer.
    "axes.middleware.AxesMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "flproject.urls"
WSGI_APPLICATION = "flproject.wsgi.application"
ASGI_APPLICATION = "flproject.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# The first refuses sign-ins while a username is locked out (django-axes); rules' backend
# answers the roles' permissions (accounts/rules.py); ModelBackend checks passwords.
AUTHENTICATION_BACKENDS = [
    "accounts.backends.LoginAttemptsBackend",
    "rules.permissions.ObjectPermissionBackend",
    "django.contrib.auth.backends.ModelBackend",
]
# What a user in no role group may do: researcher or viewer (accounts/rules.py).
FEDLENS_DEFAULT_ROLE = env.str("FEDLENS_DEFAULT_ROLE", default="researcher").strip()
if FEDLENS_DEFAULT_ROLE not in {"researcher", "viewer"}:
    raise ImproperlyConfigured(
        f"FEDLENS_DEFAULT_ROLE must be researcher or viewer, not {FEDLENS_DEFAULT_ROLE!r}."
    )
# After this many wrong passwords for one username from one address, sign-ins of that
# username from there are refused (429) for FEDLENS_LOGIN_LOCKOUT_MINUTES, on the login
# page, the admin and /api/auth/token/ alike. `manage.py axes_reset` lifts every lockout.
AXES_FAILURE_LIMIT = env_int("FEDLENS_LOGIN_FAILURE_LIMIT", 5)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("FEDLENS_LOGIN_LOCKOUT_MINUTES", 15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "accounts.lockout.lockout_response"
AXES_VERBOSE = False
# API tokens (django-rest-knox): a new one at each sign-in, stored as a hash, valid this many
# hours, all of a user's ended by a password change (accounts/audit.py).
REST_KNOX = {
    "TOKEN_TTL": timedelta(hours=env_int("FEDLENS_API_TOKEN_HOURS", 10)),
    "AUTH_HEADER_PREFIX": "Token",
}
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
MEDIA_ROOT = FEDLENS_DATA_DIR / "uploads"
STORAGES = {
    "default": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(MEDIA_ROOT)},
    },
    # Global checkpoints and client updates (safetensors files), addressed by the ledger.
    "models": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(FEDLENS_MODEL_STORE_DIR)},
    },
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

# --- REST API ---------------------------------------------------------------------------------
REST_FRAMEWORK = {
    # Token first: its WWW-Authenticate header makes anonymous requests 401 rather than 403.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "knox.auth.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.SearchFilter",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_PAGINATION_CLASS": "training.api.pagination.StandardPagination",
    "DEFAULT_PARSER_CLASSES": [
        "training.api.parsers.StrictJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "training.api.errors.exception_handler",
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    # Per user (a site's agent counts as its site) and per address for anonymous requests;
    # views with a throttle_scope also count in that scope (accounts/throttles.py).
    "DEFAULT_THROTTLE_CLASSES": [
        "accounts.throttles.AnonymousRateThrottle",
        "accounts.throttles.PrincipalRateThrottle",
        "accounts.throttles.ScopeRateThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "anon": env_rate("FEDLENS_THROTTLE_ANON", "600/minute"),
        "user": env_rate("FEDLENS_THROTTLE_USER", "6000/minute"),
        # Passwords tried at /api/auth/token/, per address.
        "login": env_rate("FEDLENS_THROTTLE_LOGIN", "30/minute"),
        "upload": env_rate("FEDLENS_THROTTLE_UPLOAD", "60/hour"),
        # Enrolment is the one anonymous endpoint that takes a secret: guessing is slowed.
        "site-enrolment": "30/hour",
    },
}
SPECTACULAR_SETTINGS = {
    "TITLE": "FedLens API",
    "DESCRIPTION": "Federated learning for medical imaging: sites, datasets, experiments, "
    "rounds, client updates and checkpoints.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "ExperimentStatusEnum": "training.models.ExperimentStatus",
        "RoundStatusEnum": "training.models.RoundStatus",
        "ClientUpdateStatusEnum": "training.models.ClientUpdateStatus",
    },
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "flproject.api_schema.document_error_responses",
    ],
}

# --- Celery -----------------------------------------------------------------------------------
# The longest task (local training) is killed after this many seconds; the broker must not
# redeliver a late-acknowledged task before then, hence the visibility timeout above it.
FEDLENS_TASK_TIME_LIMIT = env_int("FEDLENS_TASK_TIME_LIMIT", 3600, minimum=60)
# The in-process broker names a host only because kombu warns at every connection that
# names none (the memory transport ignores it).
CELERY_BROKER_URL = REDIS_URL or "memory://localhost/"
CELERY_RESULT_BACKEND = REDIS_URL or "cache+memory://"
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": FEDLENS_TASK_TIME_LIMIT + 600}
if FEDLENS_EMBEDDED:
    # kombu polls its in-memory queues once a second by default: far too slow for a round.
    CELERY_BROKER_TRANSPORT_OPTIONS["polling_interval"] = 0.005
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_RESULT_EXPIRES = 24 * 3600
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = FEDLENS_TASK_TIME_LIMIT
CELERY_TASK_SOFT_TIME_LIMIT = FEDLENS_TASK_TIME_LIMIT - 30
CELERY_TASK_DEFAULT_QUEUE = queues.TRAINING_QUEUE
CELERY_TASK_QUEUES = (Queue(queues.TRAINING_QUEUE), Queue(queues.AGGREGATION_QUEUE))
CELERY_TASK_ROUTES = ("workers.routing.route_task",)
# Task events cost a Redis message each, as much as the task itself. Workers send them only
# while Flower watches: Flower switches them on at its start and every 5 s after (its
# enable_events option). Senders never add "task-sent": the ledger shows pending clients.
CELERY_TASK_SEND_SENT_EVENT = False
CELERY_WORKER_SEND_TASK_EVENTS = False
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Celery's Django fixup otherwise closes the database connection around every task, and a
# new PostgreSQL backend costs more than a small task; workers/tasks.py still drops a broken
# or aged connection before each task, as Django does per request.
CELERY_DB_REUSE_MAX = 1000
CELERY_TIMEZONE = TIME_ZONE
# Embedded mode: clients of a round trained at once, each by its own consumer thread of the
# in-process worker (PyTorch releases the GIL in its kernels). Default: the CPUs this process
# may use (its affinity mask, capped by a container's CPU quota).
FEDLENS_EMBEDDED_CONCURRENCY = env_int("FEDLENS_EMBEDDED_CONCURRENCY", machine.available_cpus())
# PyTorch threads per training client. Embedded mode: each concurrent client's share of the
# CPUs. A worker process of the distributed mode: one, as it trains one task at a time (on its
# GPU when it has one) and more threads spin against the other workers of the node; CPU-only
# nodes training larger networks may raise it. The CPU kernels split their sums by thread,
# so final weights are bit-for-bit repeatable for a given value, not across values.
FEDLENS_TORCH_THREADS = env_int(
    "FEDLENS_TORCH_THREADS",
    max(1, machine.available_cpus() // FEDLENS_EMBEDDED_CONCURRENCY) if FEDLENS_EMBEDDED else 1,
)
# PyTorch threads of the aggregation task (the server's held-out evaluation of the new
# model). Embedded mode: every CPU, since the round's clients have all reported when it runs
# (one thread left the other cores idle and took 1.5 s a round of resnet18-small's
# evaluation here). A worker process: FEDLENS_TORCH_THREADS, as its neighbours may train.
FEDLENS_AGGREGATION_TORCH_THREADS = env_int(
    "FEDLENS_AGGREGATION_TORCH_THREADS",
    machine.available_cpus() if FEDLENS_EMBEDDED else FEDLENS_TORCH_THREADS,
)
# Clients training on a CUDA GPU use mixed precision (float16 autocast, a gradient scaler);
# off trains in float32 throughout. Sent with each client task (TrainConfig.mixed_precision).
FEDLENS_MIXED_PRECISION = env_bool("FEDLENS_MIXED_PRECISION", True)
# How often the watchdog looks for rounds past their deadline.
FEDLENS_WATCHDOG_INTERVAL_SECONDS = env_int("FEDLENS_WATCHDOG_INTERVAL_SECONDS", 15)
# A client's task is sent at most this many times (its first send included) when the
# watchdog finds it lost with its worker or its broker; then the client is recorded failed.
FEDLENS_CLIENT_TASK_MAX_SENDS = env_int("FEDLENS_CLIENT_TASK_MAX_SENDS", 3, minimum=1)
# A task the watchdog misses in the broker and at every live worker is looked for once more
# after this many seconds before it counts as lost (it may have been between the two).
FEDLENS_RECOVERY_CONFIRM_SECONDS = env_int("FEDLENS_RECOVERY_CONFIRM_SECONDS", 2, minimum=0)
# Tries of a client's report or an aggregation's completion when the database connection
# breaks under it (training/reconnect.py).
FEDLENS_LEDGER_WRITE_ATTEMPTS = env_int("FEDLENS_LEDGER_WRITE_ATTEMPTS", 5, minimum=1)
CELERY_BEAT_SCHEDULE = {
    "close-overdue-rounds": {
        "task": queues.CLOSE_OVERDUE_ROUNDS_TASK,
        "schedule": FEDLENS_WATCHDOG_INTERVAL_SECONDS,
        # A late watchdog run is useless once the next one is due.
        "options": {"expires": FEDLENS_WATCHDOG_INTERVAL_SECONDS},
    },
    # Sites' broker users come from the ledger: a broker restarted without them gets them back.
    "sync-site-broker-users": {
        "task": queues.SYNC_SITE_BROKER_USERS_TASK,
        "schedule": FEDLENS_SITE_BROKER_SYNC_SECONDS,
        "options": {"expires": FEDLENS_SITE_BROKER_SYNC_SECONDS},
    },
}

# --- Channels ---------------------------------------------------------------------------------
if FEDLENS_EMBEDDED:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # No socket timeout: the layer waits for messages in blocking pops of 5 s, which
            # redis-py 8's default of 5 s cut off, closing every quiet WebSocket; and any read
            # timeout made some cancelled receives ignore their cancellation and poll forever.
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": None}]},
        }
    }

# --- Metrics ----------------------------------------------------------------------------------
# See flproject/observability/metrics.py. prometheus-client reads PROMETHEUS_MULTIPROC_DIR
# itself; the folder is created here, before the first metric writes its file into it.
if "PROMETHEUS_MULTIPROC_DIR" in env.ENVIRON:
    prometheus_folder = env.str("PROMETHEUS_MULTIPROC_DIR").strip()
    if not prometheus_folder:
        # prometheus-client would write its files into the current folder.
        raise ImproperlyConfigured("PROMETHEUS_MULTIPROC_DIR is empty: name a folder or unset it.")
    create_folder("PROMETHEUS_MULTIPROC_DIR", Path(prometheus_folder))
# A `celery worker` serves its metrics on this port; 0 serves none.
FEDLENS_WORKER_METRICS_PORT = env_int("FEDLENS_WORKER_METRICS_PORT", 0, minimum=0)
if FEDLENS_WORKER_METRICS_PORT > 65535:
    raise ImproperlyConfigured("FEDLENS_WORKER_METRICS_PORT must be a port number, or 0 for none.")
# /metrics asks for `Authorization: Bearer <token>` only when set: production.py reads it.
FEDLENS_METRICS_TOKEN = ""

# --- Logging ----------------------------------------------------------------------------------
# See flproject/observability/logs.py. The filter gives every line its request and task ids.
LOG_HANDLERS = ["console", "file"] if LOG_FILE else ["console"]
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "context": {"()": "flproject.observability.logs.LogContextFilter"},
        "redact": {"()": "flproject.observability.logs.RedactSecretsFilter"},
    },
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        "json": {"()": "flproject.observability.logs.json_formatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["context", "redact"],
        },
    },
    "root": {"handlers": LOG_HANDLERS, "level": LOG_LEVEL},
    "loggers": {
        "django": {"handlers": LOG_HANDLERS, "level": LOG_LEVEL, "propagate": False},
        "celery": {"handlers": LOG_HANDLERS, "level": LOG_LEVEL, "propagate": False},
        # Replaces uvicorn's own handlers (set before it loads the app), so that its access
        # lines are formatted like every other line.
        "uvicorn": {"handlers": LOG_HANDLERS, "level": LOG_LEVEL, "propagate": False},
    },
}
if LOG_FILE:
    LOGGING["handlers"]["file"] = {
        "class": "logging.handlers.RotatingFileHandler",
        "filename": LOG_FILE,
        "maxBytes": 10 * 1024 * 1024,
        "backupCount": 10,
        "encoding": "utf-8",
        "formatter": LOG_FORMAT,
        "filters": ["context", "redact"],
    }
