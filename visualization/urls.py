from django.urls import path

from visualization import datasets, sweep_views, views

urlpatterns = [
    path("", views.home, name="home"),
    path("experiments/new/", views.new_experiment, name="new-experiment"),
    path("experiments/<int:experiment_id>/", views.experiment_detail, name="experiment-page"),
    path("compare/", views.compare, name="compare"),
    path("sites/", views.site_list, name="sites"),
    path("datasets/", datasets.dataset_list, name="datasets"),
    path("datasets/upload/", datasets.dataset_upload, name="dataset-upload-page"),
    path("sweeps/", sweep_views.sweep_list, name="sweeps"),
    path("sweeps/new/", sweep_views.new_sweep, name="new-sweep"),
    path("sweeps/<int:sweep_id>/", sweep_views.sweep_detail, name="sweep-page"),
]
