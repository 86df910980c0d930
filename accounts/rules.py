"""Roles and what each may do: the one place that decides who may create, change, start,
stop or delete what. Which rows a user may see at all stays with the models' `visible_to`
querysets (filtered in SQL); these rules decide the actions on the rows they see.

Roles are Django groups, made by accounts/migrations/0002_role_groups.py:
- admin: everything (also any staff user or superuser; joining the group makes one staff,
  see accounts/audit.py, so that the visibility querysets and the Django admin agree);
- researcher: registers datasets and creates experiments and sweeps; changes, starts, stops
  and deletes their own;
- viewer: reads what is shared with them (an experiment's members), changes nothing;
- site operator: changes the sites they operate (accounts.SiteOperator), enrols their
  agents and decides their approvals.
A user in no role group has FEDLENS_DEFAULT_ROLE (researcher unless set otherwise). Roles add
up: a researcher may also operate a site.

Why django-rules and not django-guardian: every decision here follows from facts the ledger
already holds (an experiment's owner, a dataset's owner, who operates which site) and the
user's role. django-rules evaluates predicates over those facts when asked, with nothing to
keep in step. django-guardian stores one row per user or group, permission and object: each
new experiment, each change of owner or membership would have to write or delete rows beside
it, a missed write would silently grant or keep access, and the table grows with users times
objects. Guardian suits permissions granted by hand object by object; FedLens's are derived
from ownership, so rules is the smaller and safer fit, and needs no tables of its own.

Checked through Django's permission API (`user.has_perm("fedlens.start_experiment", obj)`,
answered by rules' ObjectPermissionBackend), so that training's API asks without importing
this app.
"""

import rules
from django.conf import settings

ADMIN = "admin"
RESEARCHER = "researcher"
VIEWER = "viewer"
SITE_OPERATOR = "site operator"
ROLES = (ADMIN, RESEARCHER, VIEWER, SITE_OPERATOR)


def roles_of(user) -> frozenset[str]:
    """The user's roles, read once per user object (a request's user)."""
    if not getattr(user, "is_authenticated", False) or getattr(user, "pk", None) is None:
        return frozenset()
    cached = getattr(user, "_fedlens_roles", None)
    if cached is None:
        cached = frozenset(user.groups.filter(name__in=ROLES).values_list("name", flat=True))
        if not cached:
            cached = frozenset({settings.FEDLENS_DEFAULT_ROLE})
        if user.is_staff or user.is_superuser:
            cached |= {ADMIN}
        user._fedlens_roles = cached
    return cached


@rules.predicate
def is_admin(user) -> bool:
    return ADMIN in roles_of(user)


@rules.predicate
def is_researcher(user) -> bool:
    return RESEARCHER in roles_of(user)


@rules.predicate
def is_site_operator(user) -> bool:
    return SITE_OPERATOR in roles_of(user)


@rules.predicate
def owns(user, obj) -> bool:
    return obj is not None and obj.owner_id == user.pk


@rules.predicate
def operates(user, site) -> bool:
    """The user operates this site (the object is a Site, or anything with a site)."""
    site_id = getattr(site, "site_id", None) or getattr(site, "pk", None)
    return site_id is not None and user.operated_sites.filter(site_id=site_id).exists()


may_create = is_admin | is_researcher
may_manage_own = is_admin | (is_researcher & owns)
may_operate = is_admin | (is_site_operator & operates)

for model in ("experiment", "dataset", "sweep"):
    rules.add_perm(f"fedlens.create_{model}", may_create)
    rules.add_perm(f"fedlens.change_{model}", may_manage_own)
    rules.add_perm(f"fedlens.delete_{model}", may_manage_own)
rules.add_perm("fedlens.start_experiment", may_manage_own)
rules.add_perm("fedlens.stop_experiment", may_manage_own)

rules.add_perm("fedlens.create_site", is_admin)
rules.add_perm("fedlens.delete_site", is_admin)
rules.add_perm("fedlens.change_site", may_operate)
# A site's slug names its queue and its agents' credentials, and is_active decides whether
# experiments may use it: an operator changes the rest of their site, an admin these.
rules.add_perm("fedlens.administer_site", is_admin)
rules.add_perm("fedlens.enrol_site", may_operate)
rules.add_perm("fedlens.decide_approval", may_operate)

# Staff read the whole audit log; everyone else the entries of their own actions.
rules.add_perm("fedlens.view_all_audit_entries", is_admin)
