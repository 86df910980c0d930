"""Who may act on what the API shows. Which rows a user sees is decided by each queryset
(`visible_to`); what they may do to them by their roles, asked through Django's permission
API as `fedlens.<verb>_<model>` (the rules are in accounts/rules.py)."""

from rest_framework.permissions import SAFE_METHODS, BasePermission

# The view's action -> the verb of the permission it needs. Reading needs none beyond
# seeing the row; cloning needs only the right to create.
ACTION_VERBS = {
    "create": "create",
    "clone": "create",
    "update": "change",
    "partial_update": "change",
    "destroy": "delete",
    "start": "start",
    "resume": "start",
    "stop": "stop",
}
CREATING = frozenset({"create", "clone"})


def action_of(view) -> str | None:
    """A ViewSet's action, or what a plain APIView declares it does (`role_action`)."""
    return getattr(view, "action", None) or getattr(view, "role_action", None)


def verb_of(request, view) -> str | None:
    action = action_of(view)
    if action in ACTION_VERBS:
        return ACTION_VERBS[action]
    return None if request.method in SAFE_METHODS else "change"


def model_name(view) -> str:
    declared = getattr(view, "role_model", None)
    return declared or view.get_queryset().model._meta.model_name


class RolePermission(BasePermission):
    """Creating needs the right to create that kind of object; changing, starting, stopping
    or deleting one needs the right to do so to that object."""

    def has_permission(self, request, view) -> bool:
        verb = verb_of(request, view)
        if action_of(view) not in CREATING:
            return True
        permitted = request.user.has_perm(f"fedlens.{verb}_{model_name(view)}")
        if not permitted:
            self.message = (
                f"Your role may not create {model_name(view)}s: ask an admin for the "
                "researcher role."
            )
        return permitted

    def has_object_permission(self, request, view, obj) -> bool:
        verb = verb_of(request, view)
        if verb is None or action_of(view) in CREATING:
            return True
        name = obj._meta.model_name
        permitted = request.user.has_perm(f"fedlens.{verb}_{name}", obj)
        if not permitted:
            self.message = (
                f"You may not {verb} this {name}: only "
                + ("an operator of the site" if name == "site" else "its owner")
                + " or an admin may."
            )
        return permitted
