"""The viewer's REST endpoints (under /api/, beside training.api's) and its page."""

from django.urls import path

from visualization.viewer import views

urlpatterns = [
    path(
        "api/datasets/<int:dataset_id>/images/",
        views.DatasetImageListView.as_view(),
        name="dataset-images",
    ),
    path(
        "api/datasets/<int:dataset_id>/images/<int:index>/",
        views.DatasetImageView.as_view(),
        name="dataset-image",
    ),
    path(
        "api/datasets/<int:dataset_id>/images/<int:index>.png",
        views.DatasetImagePNGView.as_view(),
        name="dataset-image-png",
    ),
    path(
        "api/datasets/<int:dataset_id>/images/<int:index>/prediction/",
        views.DatasetImagePredictionView.as_view(),
        name="dataset-image-prediction",
    ),
    path(
        "api/datasets/<int:dataset_id>/images/<int:index>/overlay/",
        views.DatasetImageOverlayView.as_view(),
        name="dataset-image-overlay",
    ),
    path(
        "api/datasets/<int:dataset_id>/statistics/",
        views.DatasetStatisticsView.as_view(),
        name="dataset-statistics",
    ),
    path("datasets/<int:dataset_id>/viewer/", views.dataset_viewer, name="dataset-viewer"),
]
