from django.urls import include, path
from rest_framework.routers import DefaultRouter

from training.api import sweeps, uploads, views

router = DefaultRouter()
router.register("sites", views.SiteViewSet, basename="site")
router.register("datasets", views.DatasetViewSet, basename="dataset")
router.register("experiments", views.ExperimentViewSet, basename="experiment")
router.register("rounds", views.RoundViewSet, basename="round")
router.register("client-updates", views.ClientUpdateViewSet, basename="client-update")
router.register("checkpoints", views.CheckpointViewSet, basename="checkpoint")
router.register("sweeps", sweeps.SweepViewSet, basename="sweep")


urlpatterns = [
    path("site/", include("training.api.site_urls")),
    # Before the router, whose datasets/<pk>/ would take "upload" for an id.
    path("datasets/upload/", uploads.DatasetUploadView.as_view(), name="dataset-upload"),
    path("strategies/", views.strategy_list, name="strategy-list"),
    path("", include(router.urls)),
]
