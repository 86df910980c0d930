from django.conf import settings
from django.db import models


class SiteOperator(models.Model):
    """A user who runs a site: with the site operator role they may change the site, enrol
    its agent and decide its approvals (accounts/rules.py)."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="operated_sites"
    )
    site = models.ForeignKey("training.Site", on_delete=models.CASCADE, related_name="operators")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["site_id", "user_id"]
        constraints = [
            models.UniqueConstraint(fields=["user", "site"], name="site_operator_once"),
        ]

    def __str__(self) -> str:
        return f"{self.user} operates {self.site}"
