"""Turn a bad setting into one clear sentence at start-up instead of a traceback."""

import sys

from django.core.exceptions import ImproperlyConfigured


def exit_on_bad_settings() -> None:
    """Load the settings now; if a variable is missing or malformed, print why and exit."""
    from django.conf import settings

    try:
        settings.INSTALLED_APPS  # noqa: B018 - forces the settings module to load
    except ImproperlyConfigured as exc:
        sys.exit(f"FedLens cannot start: {exc}")
