"""Django admin: sites, datasets and experiments are edited here; the ledger is read-only."""

from django import forms
from django.conf import settings
from django.contrib import admin, messages

from training import audit, services, sites
from training.fl.data import NormalizationError, check_normalization
from training.models import (
    Checkpoint,
    ClientUpdate,
    Dataset,
    Experiment,
    ExperimentApproval,
    ExperimentStatus,
    InvalidTransition,
    Round,
    Site,
    SiteCredential,
    SiteDataset,
)


class CredentialInline(admin.TabularInline):
    model = SiteCredential
    fields = ["key_prefix", "created_at", "last_used_at", "revoked_at", "issued_by"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


class DeclaredDatasetInline(admin.TabularInline):
    model = SiteDataset
    fields = ["dataset", "storage_format", "num_samples", "counts_per_class", "image_shape",
              "updated_at"]  # fmt: skip
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Site)
class SiteAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "queue", "is_active", "connected", "agent_version",
                    "last_seen", "created_at"]  # fmt: skip
    list_filter = ["is_active", "requires_approval"]
    search_fields = ["name", "slug", "description"]
    prepopulated_fields = {"slug": ["name"]}
    readonly_fields = ["last_seen", "created_at", "enrolled_at", "agent_version", "devices",
                       "requires_approval"]  # fmt: skip
    inlines = [CredentialInline, DeclaredDatasetInline]
    actions = ["issue_enrolment_token", "revoke"]

    @admin.display(boolean=True, description="connected")
    def connected(self, site: Site) -> bool:
        return site.is_connected

    @admin.action(description="Issue an enrolment token (shown once)")
    def issue_enrolment_token(self, request, queryset):
        for site in queryset:
            try:
                token = sites.issue_enrolment_token(site, created_by=request.user)
            except sites.SitesNotConfigured as missing:
                self.message_user(request, str(missing), messages.ERROR)
                return
            self.message_user(
                request,
                f"Enrolment token for {site.slug} (valid "
                f"{settings.FEDLENS_ENROLMENT_TOKEN_HOURS} h, one use; shown only now): {token}",
                messages.WARNING,
            )

    @admin.action(description="Revoke: refuse the site's agent from now on")
    def revoke(self, request, queryset):
        for site in queryset:
            sites.revoke_site(site)
        self.message_user(request, f"Revoked {queryset.count()} site(s).", messages.SUCCESS)


class DatasetAdminForm(forms.ModelForm):
    """Checks the normalization spec as the API does, and stores its canonical text (the
    admin supplies the model and its fields)."""

    def clean(self):
        cleaned = super().clean()
        try:
            cleaned["normalization"] = check_normalization(
                cleaned.get("normalization") or "", channels=cleaned.get("channels")
            )
        except NormalizationError as error:
            self.add_error("normalization", str(error))
        return cleaned


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    form = DatasetAdminForm
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


class ApprovalInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = ExperimentApproval
    fields = ["site", "status", "reason", "requested_at", "decided_at"]
    readonly_fields = fields
    extra = 0


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
    inlines = [ApprovalInline, RoundInline]
    actions = ["stop_experiments"]

    def get_readonly_fields(self, request, obj=None):
        # Once started, the configuration is part of the record (workers cache the sites).
        if obj is not None and obj.status != ExperimentStatus.DRAFT:
            return [field.name for field in Experiment._meta.fields] + ["members", "sites"]
        return self.readonly_fields

    @admin.display(description="round")
    def progress(self, experiment: Experiment) -> str:
        return experiment.round_progress

    @admin.action(description="Stop the selected experiments")
    def stop_experiments(self, request, queryset):
        stopped = 0
        for experiment in queryset:
            try:
                services.stop_experiment(experiment.pk, reason=f"Stopped by {request.user}.")
            except InvalidTransition as exc:
                self.message_user(request, str(exc), messages.WARNING)
            else:
                audit.record(experiment, "stop", actor=request.user)
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
