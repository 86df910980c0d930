from rest_framework.permissions import SAFE_METHODS, BasePermission


class IsStaffOrReadOnly(BasePermission):
    """Everyone signed in may read; only staff may change (sites are the consortium's)."""

    message = "Only staff can change sites."

    def has_permission(self, request, view) -> bool:
        return request.method in SAFE_METHODS or request.user.is_staff


class IsOwnerOrStaffToChange(BasePermission):
    """Members may read what is shared with them; only its owner or staff may change it."""

    message = "Only the owner or staff can change this."

    def has_object_permission(self, request, view, obj) -> bool:
        if request.method in SAFE_METHODS:
            return True
        return request.user.is_staff or obj.owner_id == request.user.pk
