from axes.backends import AxesStandaloneBackend


class LoginAttemptsBackend(AxesStandaloneBackend):
    """django-axes' lockout check for sign-ins made by a request (the login page, the admin,
    /api/auth/token/). One without a request (a test client's login, a management command) is
    not a sign-in from anywhere, so there is no one to lock out: it passes on to the next
    backend instead of failing as django-axes' own backend does."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if request is None:
            return None
        return super().authenticate(request, username=username, password=password, **kwargs)
