"""Routes of the Site API, under /api/site/."""

from django.urls import path

from training.api import site_views

urlpatterns = [
    path("enrol/", site_views.EnrolView.as_view(), name="site-enrol"),
    path("me/", site_views.SiteStateView.as_view(), name="site-me"),
    path("heartbeat/", site_views.HeartbeatView.as_view(), name="site-heartbeat"),
    path(
        "credentials/rotate/",
        site_views.RotateCredentialView.as_view(),
        name="site-credentials-rotate",
    ),
    path("datasets/", site_views.SiteDatasetListView.as_view(), name="site-datasets"),
    path("datasets/<str:name>/", site_views.SiteDatasetView.as_view(), name="site-dataset"),
    path("approvals/", site_views.ApprovalListView.as_view(), name="site-approvals"),
    path(
        "approvals/<int:experiment_id>/",
        site_views.ApprovalDecisionView.as_view(),
        name="site-approval",
    ),
    path(
        "tasks/<int:client_update_id>/claim/",
        site_views.ClaimTaskView.as_view(),
        name="site-task-claim",
    ),
    path(
        "tasks/<int:client_update_id>/weights/",
        site_views.TaskWeightsView.as_view(),
        name="site-task-weights",
    ),
    path(
        "tasks/<int:client_update_id>/payload/",
        site_views.TaskPayloadView.as_view(),
        name="site-task-payload",
    ),
    path(
        "tasks/<int:client_update_id>/models/<str:label>/",
        site_views.TaskEvaluationModelView.as_view(),
        name="site-task-model",
    ),
    path(
        "tasks/<int:client_update_id>/update/",
        site_views.TaskUpdateView.as_view(),
        name="site-task-update",
    ),
    path(
        "tasks/<int:client_update_id>/result/",
        site_views.TaskResultView.as_view(),
        name="site-task-result",
    ),
    path(
        "tasks/<int:client_update_id>/failure/",
        site_views.TaskFailureView.as_view(),
        name="site-task-failure",
    ),
]
