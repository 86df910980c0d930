"""Query filters of the list endpoints (django-filter)."""

import django_filters

from training.models import Checkpoint, ClientUpdate, Dataset, Experiment, Round, Site


class SiteFilter(django_filters.FilterSet):
    class Meta:
        model = Site
        fields = ["is_active", "slug"]


class DatasetFilter(django_filters.FilterSet):
    class Meta:
        model = Dataset
        fields = ["modality", "storage_format", "num_classes"]


class ExperimentFilter(django_filters.FilterSet):
    owner = django_filters.CharFilter(field_name="owner__username")
    created_after = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = Experiment
        fields = ["status", "dataset", "strategy", "network", "owner"]


class RoundFilter(django_filters.FilterSet):
    class Meta:
        model = Round
        fields = ["experiment", "status", "number"]


class ClientUpdateFilter(django_filters.FilterSet):
    experiment = django_filters.NumberFilter(field_name="round__experiment")
    round_number = django_filters.NumberFilter(field_name="round__number")
    site = django_filters.CharFilter(field_name="site__slug")

    class Meta:
        model = ClientUpdate
        fields = ["experiment", "round", "round_number", "site", "status"]


class CheckpointFilter(django_filters.FilterSet):
    class Meta:
        model = Checkpoint
        fields = ["experiment", "round", "is_best"]
