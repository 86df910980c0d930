"""The audit log (django-auditlog): which models it records, who the actor of an entry is,
and the entries of sign-ins, failed sign-ins, sign-outs and password changes.

Lifecycle actions (start, stop, resume, approvals) are recorded where they are performed,
through training/audit.py. Fields that the workers rewrite every round or every heartbeat
(status, current round, last seen) are left out: the ledger keeps those, and the log keeps
what people did.
"""

import ipaddress
from contextvars import ContextVar

from auditlog.models import LogEntry
from auditlog.registry import auditlog
from django.contrib.auth import get_user_model, user_logged_in, user_logged_out, user_login_failed
from django.contrib.auth.models import Group
from django.contrib.contenttypes.models import ContentType
from django.db.models.signals import m2m_changed, post_save, pre_save
from django.dispatch import receiver
from knox.models import AuthToken

from accounts.models import SiteOperator
from accounts.rules import ADMIN
from training import audit
from training.models import (
    Dataset,
    EnrolmentToken,
    Experiment,
    ExperimentApproval,
    Site,
    SiteCredential,
    Sweep,
)

# The request being answered, so that an entry written anywhere during it names its user.
current_request: ContextVar = ContextVar("audit_request", default=None)


# The fields left out are rewritten by the workers (every round, every heartbeat) or are
# secrets' hashes; the ledger keeps the former, and the latter must never be copied.
EXPERIMENT_FIELDS_NOT_AUDITED = [
    "status", "current_round", "failure_reason", "updated_at", "started_at", "finished_at",
]  # fmt: skip
SITE_FIELDS_NOT_AUDITED = ["last_seen", "agent_version", "devices", "enrolled_at"]
CREDENTIAL_FIELDS_NOT_AUDITED = ["key_sha256", "broker_password_sha256", "last_used_at"]
# Who may sign in and with which roles; never the password's hash.
USER_FIELDS_AUDITED = ["username", "is_active", "is_staff", "is_superuser"]


def register_audited_models() -> None:
    registrations = [
        (
            Experiment,
            {"exclude_fields": EXPERIMENT_FIELDS_NOT_AUDITED, "m2m_fields": {"members", "sites"}},
        ),
        (Dataset, {}),
        (Site, {"exclude_fields": SITE_FIELDS_NOT_AUDITED}),
        (Sweep, {}),
        (EnrolmentToken, {"exclude_fields": ["token_sha256"]}),
        (SiteCredential, {"exclude_fields": CREDENTIAL_FIELDS_NOT_AUDITED}),
        (ExperimentApproval, {}),
        (SiteOperator, {}),
        (get_user_model(), {"include_fields": USER_FIELDS_AUDITED, "m2m_fields": {"groups"}}),
    ]
    for model, options in registrations:
        if not auditlog.contains(model):
            auditlog.register(model, **options)


class AuditActorMiddleware:
    """Makes the request's user the actor of the entries written while answering it.

    django-auditlog's own middleware reads the user before the view runs, when a user signed
    in with an API token is not known yet (DRF authenticates in the view); the user is read
    here when an entry is saved instead.
    """

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        token = current_request.set(request)
        try:
            return self.get_response(request)
        finally:
            current_request.reset(token)


def client_address(request) -> str | None:
    address = request.META.get("REMOTE_ADDR", "")
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None


@receiver(pre_save, sender=LogEntry, dispatch_uid="audit-actor")
def stamp_actor(sender, instance: LogEntry, **kwargs) -> None:
    request = current_request.get()
    if request is None:
        return
    user = getattr(request, "user", None)
    if instance.actor_id is None and getattr(user, "is_authenticated", False) and user.pk:
        instance.actor = user
    if instance.remote_addr is None:
        instance.remote_addr = client_address(request)


@receiver(user_logged_in, dispatch_uid="audit-login")
def record_login(sender, request, user, **kwargs) -> None:
    audit.record(user, "login", actor=user)


@receiver(user_logged_out, dispatch_uid="audit-logout")
def record_logout(sender, request, user, **kwargs) -> None:
    if user is not None:
        audit.record(user, "logout", actor=user)


@receiver(user_login_failed, dispatch_uid="audit-login-failed")
def record_failed_login(sender, credentials, request=None, **kwargs) -> None:
    """Names the account tried, when it exists (its owner sees the attempt in their log)."""
    User = get_user_model()
    username = str(credentials.get("username", ""))[:150]
    account = User._default_manager.filter(username=username).first()
    LogEntry.objects.create(
        content_type=ContentType.objects.get_for_model(User),
        object_pk=str(account.pk) if account else "",
        object_id=account.pk if account else None,
        object_repr=username,
        action=LogEntry.Action.ACCESS,
        changes={},
        additional_data={"verb": "login-failed"},
        remote_addr=client_address(request) if request is not None else None,
    )


@receiver(pre_save, sender=get_user_model(), dispatch_uid="password-change-seen")
def notice_password_change(sender, instance, update_fields=None, **kwargs) -> None:
    if instance.pk is None or (update_fields is not None and "password" not in update_fields):
        return
    stored = sender._default_manager.filter(pk=instance.pk).values_list("password", flat=True)
    instance._password_changed = stored.first() not in (None, instance.password)


@receiver(post_save, sender=get_user_model(), dispatch_uid="password-change-revokes-tokens")
def revoke_tokens_on_password_change(sender, instance, created, **kwargs) -> None:
    """A new password ends every API token of the user: whoever knew the old one may hold
    a token made with it. (Django already ends the user's other sessions.)"""
    if created or not getattr(instance, "_password_changed", False):
        return
    instance._password_changed = False
    revoked, _ = AuthToken.objects.filter(user=instance).delete()
    audit.record(instance, "tokens-revoked", reason="password changed", tokens=revoked)


@receiver(m2m_changed, sender=get_user_model().groups.through, dispatch_uid="admin-is-staff")
def admin_role_makes_staff(sender, instance, action, reverse, pk_set, **kwargs) -> None:
    """Joining the admin group makes a user staff and leaving it (unless superuser) ends that:
    the visibility querysets and the Django admin know staff, the rules know roles."""
    if action not in ("post_add", "post_remove"):
        return
    admin_group = Group.objects.filter(name=ADMIN).first()
    if admin_group is None:
        return
    if reverse:
        if instance.pk != admin_group.pk:
            return
        users = list(get_user_model()._default_manager.filter(pk__in=pk_set))
    else:
        if admin_group.pk not in pk_set:
            return
        users = [instance]
    for user in users:
        staff = action == "post_add" or user.is_superuser
        if user.is_staff != staff:
            user.is_staff = staff
            user.save(update_fields=["is_staff"])
        user.__dict__.pop("_fedlens_roles", None)
