"""Django admin: sites, datasets and experiments are edited here; the ledger is read-only."""

from django.contrib import admin, messages

from training import services
from training.models import (
    Checkpoint,
    ClientUpdate,
    Dataset,
    Experiment,
    ExperimentStatus,
    InvalidTransition,
    Round,
    Site,
)


@admin.register(Site)
class SiteAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "queue", "is_active", "last_seen", "created_at"]
    list_filter = ["is_active"]
    search_fields = ["name", "slug", "description"]
    prepopulated_fields = {"slug": ["name"]}
    readonly_fields = ["last_seen", "created_at"]


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ["name", "owner", "modality", "storage_format", "num_classes", "created_at"]
    list_filter = ["modality", "storage_format"]
    search_fields = ["name", "description", "owner__username"]
    list_select_related = ["owner"]
    raw_id_fields = ["owner"]


class ReadOnlyAdminMixin:
    """The ledger is written by the services and the workers, never by hand."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class RoundInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = Round
    fields = ["number", "status", "opened_at", "closed_at", "deadline"]
    readonly_fields = fields
    extra = 0
    show_change_link = True


@admin.register(Experiment)
class ExperimentAdmin(admin.ModelAdmin):
    list_display = ["name", "owner", "dataset", "strategy", "status", "progress", "created_at"]
    list_filter = ["status", "strategy", "network", "optimizer"]
    search_fields = ["name", "description", "owner__username", "dataset__name"]
    list_select_related = ["owner", "dataset"]
    raw_id_fields = ["owner", "dataset"]
    filter_horizontal = ["members", "sites"]
    readonly_fields = [
        "status",
        "current_round",
        "failure_reason",
        "created_at",
        "updated_at",
        "started_at",
        "finished_at",
    ]
    date_hierarchy = "created_at"
    inlines = [RoundInline]
    actions = ["stop_experiments"]

    def get_readonly_fields(self, request, obj=None):
        # Once started, the configuration is part of the record (workers cache the sites).
        if obj is not None and obj.status != ExperimentStatus.DRAFT:
            return [field.name for field in Experiment._meta.fields] + ["members", "sites"]
        return self.readonly_fields

    @admin.display(description="round")
    def progress(self, experiment: Experiment) -> str:
        return f"{experiment.current_round}/{experiment.num_rounds}"

    @admin.action(description="Stop the selected experiments")
    def stop_experiments(self, request, queryset):
        stopped = 0
        for experiment in queryset:
            try:
                services.stop_experiment(experiment.pk, reason=f"Stopped by {request.user}.")
            except InvalidTransition as exc:
                self.message_user(request, str(exc), messages.WARNING)
            else:
                stopped += 1
        if stopped:
            self.message_user(request, f"Stopped {stopped} experiment(s).", messages.SUCCESS)


@admin.register(Round)
class RoundAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["experiment", "number", "status", "opened_at", "closed_at", "deadline"]
    list_filter = ["status"]
    search_fields = ["experiment__name"]
    list_select_related = ["experiment"]


@admin.register(ClientUpdate)
class ClientUpdateAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["round", "site", "status", "worker", "num_samples", "started_at", "finished_at"]
    list_filter = ["status", "site"]
    search_fields = ["round__experiment__name", "site__name", "task_id", "worker", "error"]
    list_select_related = ["round__experiment", "site"]


@admin.register(Checkpoint)
class CheckpointAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = [
        "experiment",
        "round",
        "sha256",
        "size_bytes",
        "num_parameters",
        "is_best",
        "created_at",
    ]
    list_filter = ["is_best"]
    search_fields = ["experiment__name", "sha256"]
    list_select_related = ["experiment", "round__experiment"]
