"""DRF throttles whose rates come from settings when asked (DRF's own read them once, at
import), counted per user, per address when anonymous, and per scope where a view names one
(`login` for passwords tried, `upload` for dataset uploads)."""

from rest_framework.settings import api_settings
from rest_framework.throttling import AnonRateThrottle, ScopedRateThrottle, UserRateThrottle


class RatesFromSettings:
    def get_rate(self):
        return api_settings.DEFAULT_THROTTLE_RATES.get(self.scope)


class AnonymousRateThrottle(RatesFromSettings, AnonRateThrottle):
    pass


class PrincipalRateThrottle(RatesFromSettings, UserRateThrottle):
    """Per user; a site's agent (no user id) counts as its site, each site on its own."""

    def get_cache_key(self, request, view):
        user = request.user
        if not getattr(user, "is_authenticated", False):
            return None  # AnonymousRateThrottle counts these
        ident = user.pk if user.pk is not None else user.username
        return self.cache_format % {"scope": self.scope, "ident": ident}


class ScopeRateThrottle(RatesFromSettings, ScopedRateThrottle):
    """For views with a throttle_scope: per user, or per address when anonymous."""

    def get_cache_key(self, request, view):
        user = request.user
        if getattr(user, "is_authenticated", False):
            ident = user.pk if user.pk is not None else user.username
        else:
            ident = self.get_ident(request)
        return self.cache_format % {"scope": self.scope, "ident": ident}
