"""Routes of accounts/api.py, under /api/ (included before training's API)."""

from django.urls import path
from rest_framework.routers import SimpleRouter

from accounts import api

router = SimpleRouter()
router.register("audit-log", api.AuditLogViewSet, basename="audit-log")

urlpatterns = [
    path("auth/token/", api.TokenSignInView.as_view(), name="auth-token"),
    path("auth/logout/", api.TokenSignOutView.as_view(), name="auth-logout"),
    path(
        "sites/<int:site_id>/enrolment-token/",
        api.SiteEnrolmentTokenView.as_view(),
        name="site-enrolment-token",
    ),
    path(
        "sites/<int:site_id>/approvals/",
        api.SiteApprovalListView.as_view(),
        name="site-approvals-of",
    ),
    path(
        "sites/<int:site_id>/approvals/<int:experiment_id>/",
        api.SiteApprovalDecisionView.as_view(),
        name="site-approval-decision",
    ),
    *router.urls,
]
