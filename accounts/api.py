"""People over the REST API: tokens (sign-in, sign-out), the audit log, and what a site's
operator does for their site (enrolment tokens, approvals)."""

from datetime import timedelta

import django_filters
from auditlog.models import LogEntry
from django.conf import settings
from django.contrib.auth import authenticate, get_user_model
from django.contrib.auth.models import update_last_login
from django.db.models import Q
from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from knox.auth import TokenAuthentication
from knox.models import AuthToken
from knox.settings import knox_settings
from rest_framework import serializers, status, viewsets
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.lockout import lockout_message
from training import audit, services, sites
from training.api.site_serializers import ApprovalDecisionSerializer, ApprovalSerializer
from training.models import ExperimentApproval, InvalidTransition, Site

WRONG_CREDENTIALS = "Unable to log in with provided credentials."


class SignInSerializer(serializers.Serializer):
    username = serializers.CharField(max_length=150, trim_whitespace=False)
    password = serializers.CharField(max_length=4096, trim_whitespace=False, write_only=True)


class IssuedTokenSerializer(serializers.Serializer):
    token = serializers.CharField(help_text="Send it as 'Authorization: Token <token>'.")
    expiry = serializers.DateTimeField(help_text="When it stops working; sign in again then.")


class TokenSignInView(APIView):
    """A new API token for a username and password, valid FEDLENS_API_TOKEN_HOURS.

    Every sign-in makes a new token (the earlier ones stay valid until they expire or the
    user signs them out); a password change ends them all."""

    authentication_classes = []
    permission_classes = [AllowAny]
    throttle_scope = "login"

    @extend_schema(
        request=SignInSerializer,
        responses={200: IssuedTokenSerializer, 400: OpenApiTypes.OBJECT, 429: OpenApiTypes.OBJECT},
    )
    def post(self, request):
        given = SignInSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        # The Django request: django-axes marks a locked-out sign-in on it.
        user = authenticate(request._request, **given.validated_data)
        if user is None:
            if getattr(request._request, "axes_locked_out", False):
                return Response(
                    {"detail": lockout_message(request._request)},
                    status=settings.AXES_HTTP_RESPONSE_CODE,
                )
            raise ValidationError({"non_field_errors": [WRONG_CREDENTIALS]})
        instance, token = AuthToken.objects.create(user=user, expiry=knox_settings.TOKEN_TTL)
        update_last_login(None, user)
        audit.record(
            user, "token-issued", actor=user, token=instance.token_key[:8],
            expiry=instance.expiry.isoformat(),
        )  # fmt: skip
        return Response({"token": token, "expiry": instance.expiry})


class TokenSignOutView(APIView):
    """Ends the token this request was made with (all the user's with ?all=true)."""

    authentication_classes = [TokenAuthentication]
    permission_classes = [IsAuthenticated]

    @extend_schema(request=None, responses={204: None})
    def post(self, request):
        if request.query_params.get("all") == "true":
            ended, _ = AuthToken.objects.filter(user=request.user).delete()
        else:
            request.auth.delete()
            ended = 1
        audit.record(request.user, "logout", actor=request.user, tokens=ended)
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- Audit log ---------------------------------------------------------------------------

CRUD_VERBS = {
    LogEntry.Action.CREATE: "create",
    LogEntry.Action.UPDATE: "update",
    LogEntry.Action.DELETE: "delete",
    LogEntry.Action.ACCESS: "access",
}


class AuditEntrySerializer(serializers.ModelSerializer):
    actor = serializers.CharField(
        source="actor.username", default=None, read_only=True, allow_null=True
    )
    action = serializers.SerializerMethodField(
        help_text="create, update or delete (a saved object), or what was done: start, stop, "
        "resume, approve, refuse, login, login-failed, logout, token-issued, tokens-revoked."
    )
    model = serializers.SerializerMethodField(help_text="app.model, e.g. training.experiment.")
    object_id = serializers.CharField(source="object_pk")
    changes = serializers.JSONField(source="changes_dict", help_text="field: [before, after]")
    details = serializers.SerializerMethodField()

    class Meta:
        model = LogEntry
        fields = ["id", "timestamp", "actor", "action", "model", "object_id", "object_repr",
                  "changes", "details", "remote_addr"]  # fmt: skip

    def get_action(self, entry) -> str:
        return (entry.additional_data or {}).get("verb") or CRUD_VERBS[entry.action]

    def get_model(self, entry) -> str:
        return f"{entry.content_type.app_label}.{entry.content_type.model}"

    def get_details(self, entry) -> dict:
        return {k: v for k, v in (entry.additional_data or {}).items() if k != "verb"}


class AuditEntryFilter(django_filters.FilterSet):
    actor = django_filters.CharFilter(field_name="actor__username")
    action = django_filters.CharFilter(method="filter_action")
    model = django_filters.CharFilter(method="filter_model", help_text="e.g. training.experiment")
    object_id = django_filters.CharFilter(field_name="object_pk")
    since = django_filters.IsoDateTimeFilter(field_name="timestamp", lookup_expr="gte")
    until = django_filters.IsoDateTimeFilter(field_name="timestamp", lookup_expr="lt")

    class Meta:
        model = LogEntry
        fields = ["actor", "action", "model", "object_id", "since", "until"]

    def filter_action(self, queryset, name, value):
        crud = {verb: action for action, verb in CRUD_VERBS.items()}
        if value in crud:
            return queryset.filter(action=crud[value], additional_data__verb__isnull=True)
        return queryset.filter(additional_data__verb=value)

    def filter_model(self, queryset, name, value):
        app_label, _, model = value.partition(".")
        return queryset.filter(content_type__app_label=app_label, content_type__model=model)


class AuditLogViewSet(viewsets.ReadOnlyModelViewSet):
    """Who created, changed, started, stopped, resumed or deleted what, and sign-ins. Admins
    see every entry; others their own actions and what happened to their account (failed
    sign-ins included)."""

    queryset = LogEntry.objects.none()  # the schema's model; get_queryset filters
    serializer_class = AuditEntrySerializer
    filterset_class = AuditEntryFilter
    ordering_fields = ["timestamp"]
    search_fields = ["object_repr"]

    def get_queryset(self):
        entries = LogEntry.objects.select_related("actor", "content_type").order_by("-timestamp")
        user = self.request.user
        if user.has_perm("fedlens.view_all_audit_entries"):
            return entries
        own_account = Q(
            content_type__app_label=get_user_model()._meta.app_label,
            content_type__model=get_user_model()._meta.model_name,
            object_pk=str(user.pk),
        )
        return entries.filter(Q(actor=user) | own_account)


# --- A site's operator -------------------------------------------------------------------


def operated_site(request, site_id: int, permission: str) -> Site:
    site = get_object_or_404(Site, pk=site_id)
    if not request.user.has_perm(permission, site):
        raise PermissionDenied("Only an operator of this site (or an admin) may do this.")
    return site


class IssuedEnrolmentTokenSerializer(serializers.Serializer):
    token = serializers.CharField(help_text="Shown once: python -m workers.site enroll --token.")
    expires_at = serializers.DateTimeField()


class SiteEnrolmentTokenView(APIView):
    @extend_schema(
        request=None,
        responses={201: IssuedEnrolmentTokenSerializer, 403: OpenApiTypes.OBJECT},
    )
    def post(self, request, site_id: int):
        """A one-time enrolment token for the site's agent (its operator or an admin)."""
        site = operated_site(request, site_id, "fedlens.enrol_site")
        try:
            token = sites.issue_enrolment_token(site, created_by=request.user)
        except sites.SitesNotConfigured as missing:
            # How this server is set up, which its admin changes; not an outage that passes.
            return Response({"detail": str(missing)}, status=status.HTTP_409_CONFLICT)
        expires_at = timezone.now() + timedelta(hours=settings.FEDLENS_ENROLMENT_TOKEN_HOURS)
        return Response({"token": token, "expires_at": expires_at}, status=status.HTTP_201_CREATED)


class SiteApprovalListView(APIView):
    @extend_schema(responses=ApprovalSerializer(many=True))
    def get(self, request, site_id: int):
        """The experiments that asked this site for approval (its operator or an admin)."""
        site = operated_site(request, site_id, "fedlens.decide_approval")
        approvals = ExperimentApproval.objects.filter(site=site).select_related(
            "experiment__owner", "experiment__dataset"
        )
        return Response(ApprovalSerializer(approvals, many=True).data)


class SiteApprovalDecisionView(APIView):
    @extend_schema(
        request=ApprovalDecisionSerializer,
        responses={200: ApprovalSerializer, 404: OpenApiTypes.OBJECT, 409: OpenApiTypes.OBJECT},
    )
    def post(self, request, site_id: int, experiment_id: int):
        """Approve or refuse an experiment on this site's data, as its agent may."""
        site = operated_site(request, site_id, "fedlens.decide_approval")
        given = ApprovalDecisionSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        if not ExperimentApproval.objects.filter(site=site, experiment=experiment_id).exists():
            return Response(
                {"detail": f"Experiment {experiment_id} asked this site for no approval."},
                status=status.HTTP_404_NOT_FOUND,
            )
        approved = given.validated_data["decision"] == "approve"
        try:
            approval = services.decide_approval(
                experiment_id, site, approved=approved,
                reason=given.validated_data.get("reason", ""),
            )  # fmt: skip
        except InvalidTransition as closed:
            return Response({"detail": str(closed)}, status=status.HTTP_409_CONFLICT)
        audit.record(
            approval.experiment, "approve" if approved else "refuse", actor=request.user,
            site=site.slug,
        )  # fmt: skip
        return Response(ApprovalSerializer(approval).data)
