"""How a site's agent proves which site it is: `Authorization: Site <credential>`.

The Site API accepts nothing else, and the rest of the API does not accept this: a site
credential reaches only its own site's tasks, and a user's token reaches no site's.
"""

from dataclasses import dataclass

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.permissions import BasePermission

from training import sites
from training.models import Site, SiteCredential

KEYWORD = "Site"


@dataclass(frozen=True)
class SiteAgent:
    """The request's user when a site's agent calls: a site, not a person."""

    site: Site
    is_authenticated: bool = True
    is_staff: bool = False
    is_superuser: bool = False
    pk: None = None

    @property
    def username(self) -> str:
        return f"site:{self.site.slug}"


class SiteCredentialAuthentication(BaseAuthentication):
    def authenticate(self, request):
        header = get_authorization_header(request).split()
        if not header or header[0].decode(errors="replace") != KEYWORD:
            return None
        if len(header) != 2:
            raise AuthenticationFailed(f"Send the credential as 'Authorization: {KEYWORD} <key>'.")
        try:
            key = header[1].decode("ascii")
        except UnicodeDecodeError:
            raise AuthenticationFailed("A site credential is plain ASCII.") from None
        credential = sites.authenticate(key)
        if credential is None:
            raise AuthenticationFailed(
                "This site credential is unknown or revoked: enrol the node again with a new "
                "enrolment token (python -m workers.site enroll)."
            )
        return SiteAgent(credential.site), credential

    def authenticate_header(self, request) -> str:
        return f'{KEYWORD} realm="FedLens site API"'


class IsSiteAgent(BasePermission):
    message = "Only a site's agent, with its site credential, may call the Site API."

    def has_permission(self, request, view) -> bool:
        return isinstance(request.auth, SiteCredential)


class SiteCredentialScheme(OpenApiAuthenticationExtension):
    """How the OpenAPI schema describes the Site API's authentication."""

    target_class = SiteCredentialAuthentication
    name = "siteCredential"

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": f"'{KEYWORD} <credential>', as `python -m workers.site enroll` "
            "received it. Site agents only.",
        }
