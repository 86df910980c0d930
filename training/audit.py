"""Entries of the audit log for actions that are more than a saved field: starting, stopping
or resuming an experiment, deciding an approval, a login. Whoever performs the action records
it where the acting user is known (the API view, the admin action, the command), since the
services that carry it out are also called by workers acting for nobody.

Rows of the audited models that are created, changed or deleted are recorded by
django-auditlog itself (registered in accounts/audit.py); each entry's actor is the request's
user, or the one given here.
"""

from auditlog.models import LogEntry

# The entry's kind, as django-auditlog counts them: a lifecycle action changes its object;
# a login or a token issued concerns the user without changing them.
ACCESS_VERBS = frozenset({"login", "login-failed", "logout", "token-issued", "tokens-revoked"})


def record(instance, verb: str, *, actor=None, changes: dict | None = None, **details) -> LogEntry:
    """Write one entry: `actor` did `verb` to `instance` (details go into additional_data)."""
    action = LogEntry.Action.ACCESS if verb in ACCESS_VERBS else LogEntry.Action.UPDATE
    actor = actor if getattr(actor, "is_authenticated", False) and actor.pk else None
    return LogEntry.objects.log_create(
        instance,
        force_log=True,
        action=action,
        actor=actor,
        changes=changes or {},
        additional_data={"verb": verb, **details},
    )
