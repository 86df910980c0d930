from django.contrib import admin

from accounts.models import SiteOperator


@admin.register(SiteOperator)
class SiteOperatorAdmin(admin.ModelAdmin):
    """Who operates which site; the role itself is the "site operator" group."""

    list_display = ["user", "site", "created_at"]
    search_fields = ["user__username", "site__name", "site__slug"]
    list_select_related = ["user", "site"]
    raw_id_fields = ["user"]
