"""The round ledger: who takes part, on what data, and what every round produced.

Status changes go through `Experiment.transition_to`, the one place that knows which moves
are allowed; training/services.py composes them into start, stop, open and close.
"""

from datetime import timedelta

from django.conf import settings
from django.core.files.storage import storages
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from training.queues import site_queue


def model_store():
    """The storage that holds checkpoints and client updates (see STORAGES["models"])."""
    return storages["models"]


class InvalidTransition(Exception):
    """A status change that the life cycle does not allow (the API answers 409)."""


class Site(models.Model):
    """A participant: a hospital's node running the site agent, or a simulated client.

    A site that enrolled talks to the server with a credential of its own (SiteCredential)
    and trains on the data it declared (SiteDataset); a simulated site trains on its share
    of a dataset the server holds.
    """

    name = models.CharField(max_length=100, unique=True)
    slug = models.SlugField(max_length=50, unique=True, help_text="Names the site's queue.")
    description = models.TextField(blank=True)
    is_active = models.BooleanField(default=True, db_index=True)
    last_seen = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    enrolled_at = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="When its agent first enrolled."
    )
    agent_version = models.CharField(max_length=50, blank=True, editable=False)
    devices = models.JSONField(
        default=list, blank=True, editable=False, help_text="What its agent last reported."
    )
    requires_approval = models.BooleanField(
        default=False,
        editable=False,
        help_text="Set by the site's operator: each experiment needs their approval first.",
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def queue(self) -> str:
        return site_queue(self.slug)

    @property
    def is_connected(self) -> bool:
        """Its agent was heard from within the last few heartbeats."""
        return (
            self.last_seen is not None and timezone.now() - self.last_seen < SITE_CONNECTED_WITHIN
        )


# An agent sends a heartbeat every 30 s; a site silent for longer than this is shown offline.
SITE_CONNECTED_WITHIN = timedelta(seconds=90)


class EnrolmentTokenQuerySet(models.QuerySet):
    def usable(self) -> "EnrolmentTokenQuerySet":
        return self.filter(used_at__isnull=True, expires_at__gt=timezone.now())


class EnrolmentToken(models.Model):
    """A one-time secret an admin hands to a site's IT staff, exchanged for its credential.

    Only its SHA-256 is stored: a database dump does not let anyone enrol."""

    site = models.ForeignKey(Site, on_delete=models.CASCADE, related_name="enrolment_tokens")
    token_sha256 = models.CharField(max_length=64, unique=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = EnrolmentTokenQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"enrolment token for {self.site} (expires {self.expires_at:%Y-%m-%d %H:%M})"


class SiteCredentialQuerySet(models.QuerySet):
    def active(self) -> "SiteCredentialQuerySet":
        return self.filter(revoked_at__isnull=True)


class SiteCredential(models.Model):
    """What a site's agent proves it is with: an API key and the password of its own broker
    user. Both are stored as SHA-256 hashes only (Redis ACLs accept a password's hash)."""

    site = models.ForeignKey(Site, on_delete=models.CASCADE, related_name="credentials")
    # The key's public first part, to find the row without scanning hashes.
    key_prefix = models.CharField(max_length=16, unique=True)
    key_sha256 = models.CharField(max_length=64)
    broker_password_sha256 = models.CharField(max_length=64)
    issued_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    objects = SiteCredentialQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["site"],
                condition=Q(revoked_at__isnull=True),
                name="site_credential_one_active_per_site",
            ),
        ]

    def __str__(self) -> str:
        state = "revoked" if self.revoked_at else "active"
        return f"{self.site} credential {self.key_prefix} ({state})"


class Modality(models.TextChoices):
    CT = "CT", "CT"
    MR = "MR", "MR"
    XRAY = "XR", "X-ray"
    OTHER = "OT", "Other"


class StorageFormat(models.TextChoices):
    """One value per module of the format registry (training/fl/data/formats/)."""

    FOLDER = "folder", "Image folder with labels.csv"
    NPZ = "npz", "MedMNIST .npz"
    MSD = "msd", "Medical Segmentation Decathlon (dataset.json, imagesTr/, labelsTr/)"
    MASK_FOLDER = "maskfolder", "Image folder with labels.csv (image,mask[,site])"


class Task(models.TextChoices):
    """What a dataset's labels are, and so what its experiments learn."""

    CLASSIFICATION = "classification", "Classification"
    SEGMENTATION = "segmentation", "Segmentation"


class DatasetQuerySet(models.QuerySet):
    def visible_to(self, user) -> "DatasetQuerySet":
        """Staff see every dataset; others the ones they registered."""
        return self if user.is_staff else self.filter(owner_id=user.pk)


class Dataset(models.Model):
    name = models.CharField(max_length=100, unique=True)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="datasets"
    )
    description = models.TextField(blank=True)
    modality = models.CharField(max_length=2, choices=Modality.choices, default=Modality.OTHER)
    storage_format = models.CharField(max_length=10, choices=StorageFormat.choices, blank=True)
    task = models.CharField(
        max_length=20,
        choices=Task.choices,
        default=Task.CLASSIFICATION,
        help_text="Classification (a label per image) or segmentation (a mask per image; "
        "num_classes then counts the background).",
    )
    num_classes = models.PositiveSmallIntegerField(
        validators=[MinValueValidator(2), MaxValueValidator(1000)]
    )
    class_names = models.JSONField(default=list, blank=True)
    channels = models.PositiveSmallIntegerField(
        default=1, choices=[(1, "1 (grey)"), (3, "3 (colour)")], help_text="Image channels."
    )
    image_shape = models.JSONField(
        default=list,
        blank=True,
        help_text="e.g. [64, 64] or [32, 64, 64]; images are resampled to it.",
    )
    spacing = models.JSONField(default=list, blank=True, help_text="millimetres per voxel")
    path = models.CharField(
        max_length=500,
        blank=True,
        help_text="Where the data lives on the server: simulated sites split it; for a "
        "federated dataset it is the server's own held-out evaluation data, if any.",
    )
    normalization = models.CharField(
        max_length=100,
        blank=True,
        help_text="Intensity normalization: none, minmax, zscore (per image), "
        "mean-std:M,S (per channel) or ct-window:LEVEL,WIDTH; blank uses the format's "
        "default (mean-std:0.5,0.5 for 8-bit .npz).",
    )
    validation_fraction = models.FloatField(
        default=0.2,
        validators=[MinValueValidator(0.0), MaxValueValidator(0.9)],
        help_text="The seeded share of each site's data kept for federated evaluation.",
    )
    is_federated = models.BooleanField(
        default=False,
        help_text="The data stays at the sites that declared a dataset of this name; "
        "the server keeps only what they declared about it (SiteDataset).",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = DatasetQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class SiteDataset(models.Model):
    """What a site declared about its part of a federated dataset: metadata only. The
    images and their path never leave the site."""

    site = models.ForeignKey(Site, on_delete=models.CASCADE, related_name="declared_datasets")
    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="declarations")
    storage_format = models.CharField(max_length=10, choices=StorageFormat.choices)
    num_samples = models.PositiveIntegerField()
    counts_per_class = models.JSONField(default=list, help_text="Samples per class index.")
    image_shape = models.JSONField(default=list, blank=True, help_text="The site's own shape.")
    spacing = models.JSONField(default=list, blank=True)
    statistics = models.JSONField(default=dict, blank=True)
    declared_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["dataset_id", "site_id"]
        constraints = [
            models.UniqueConstraint(fields=["site", "dataset"], name="site_dataset_once"),
        ]

    def __str__(self) -> str:
        return f"{self.dataset} at {self.site}"


class ExperimentStatus(models.TextChoices):
    DRAFT = "draft", "Draft"
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    STOPPED = "stopped", "Stopped"


TERMINAL_EXPERIMENT_STATUSES = frozenset(
    {ExperimentStatus.COMPLETED, ExperimentStatus.FAILED, ExperimentStatus.STOPPED}
)
# Every allowed move of the life cycle; anything else is an InvalidTransition.
EXPERIMENT_TRANSITIONS: dict[str, frozenset[str]] = {
    ExperimentStatus.DRAFT: frozenset({ExperimentStatus.QUEUED, ExperimentStatus.RUNNING}),
    ExperimentStatus.QUEUED: frozenset(
        {ExperimentStatus.RUNNING, ExperimentStatus.STOPPED, ExperimentStatus.FAILED}
    ),
    ExperimentStatus.RUNNING: frozenset(
        {ExperimentStatus.COMPLETED, ExperimentStatus.STOPPED, ExperimentStatus.FAILED}
    ),
    ExperimentStatus.COMPLETED: frozenset(),
    ExperimentStatus.FAILED: frozenset(),
    ExperimentStatus.STOPPED: frozenset(),
}


class Optimizer(models.TextChoices):
    SGD = "sgd", "SGD with momentum"
    ADAM = "adam", "Adam"


class AggregationWeighting(models.TextChoices):
    SAMPLES = "samples", "By number of samples"
    UNIFORM = "uniform", "Uniform"


class NoiseLocation(models.TextChoices):
    SERVER = "server", "At the server"
    CLIENT = "client", "At each client"


class Sweep(models.Model):
    """A grid of experiments made from one request: every combination of the values in
    ``grid`` applied to ``base_settings``, queued and compared together."""

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="sweeps"
    )
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    base_settings = models.JSONField(default=dict, help_text="Experiment fields shared by all.")
    grid = models.JSONField(default=dict, help_text="Experiment field -> list of values.")
    max_running = models.PositiveIntegerField(
        default=2,
        validators=[MinValueValidator(1), MaxValueValidator(100)],
        help_text="Experiments of this sweep running at once; the others wait queued.",
    )
    target_metric = models.CharField(max_length=50, default="accuracy")
    target_value = models.FloatField(default=0.8)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name


class ExperimentQuerySet(models.QuerySet):
    def visible_to(self, user) -> "ExperimentQuerySet":
        """Staff see every experiment; others their own and those shared with them."""
        if user.is_staff:
            return self
        shared = Experiment.members.through.objects.filter(
            experiment=OuterRef("pk"), user_id=user.pk
        )
        return self.filter(Q(owner_id=user.pk) | Exists(shared))


class Experiment(models.Model):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="owned_experiments"
    )
    members = models.ManyToManyField(
        settings.AUTH_USER_MODEL,
        blank=True,
        related_name="shared_experiments",
        help_text="Users who may watch this experiment (read-only).",
    )
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="experiments")
    sites = models.ManyToManyField(
        Site, related_name="experiments", help_text="Sites that may be picked as clients."
    )
    network = models.CharField(max_length=50, default="cnn-small")
    network_params = models.JSONField(default=dict, blank=True)
    strategy = models.CharField(max_length=50, default="fedavg", db_index=True)
    strategy_params = models.JSONField(default=dict, blank=True)
    partition = models.CharField(
        max_length=200,
        default="iid",
        help_text="How simulated sites split a server-side dataset: iid, dirichlet:<alpha>, "
        "quantity:<alpha>, site or file:<path>.",
    )
    patch_size = models.JSONField(
        default=list,
        blank=True,
        help_text="Segmentation: train on random label-balanced patches of this shape "
        "(e.g. [64, 64, 32]) and evaluate by sliding window; empty: whole images.",
    )
    num_rounds = models.PositiveIntegerField(
        default=5, validators=[MinValueValidator(1), MaxValueValidator(10_000)]
    )
    clients_per_round = models.PositiveIntegerField(
        default=2, validators=[MinValueValidator(1), MaxValueValidator(10_000)]
    )
    min_clients = models.PositiveIntegerField(
        default=1,
        validators=[MinValueValidator(1)],
        help_text="A round closes at its deadline if at least this many clients reported.",
    )
    local_epochs = models.PositiveIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(1000)]
    )
    batch_size = models.PositiveIntegerField(
        default=32, validators=[MinValueValidator(1), MaxValueValidator(65_536)]
    )
    learning_rate = models.FloatField(
        default=0.01, validators=[MinValueValidator(1e-8), MaxValueValidator(10.0)]
    )
    optimizer = models.CharField(max_length=10, choices=Optimizer.choices, default=Optimizer.SGD)
    seed = models.PositiveIntegerField(default=0, validators=[MaxValueValidator(2**31 - 1)])
    round_timeout_seconds = models.PositiveIntegerField(
        default=3600, validators=[MinValueValidator(10), MaxValueValidator(7 * 24 * 3600)]
    )
    client_fraction = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Clients per round as a share of the pool; overrides clients_per_round.",
    )
    aggregation_weighting = models.CharField(
        max_length=10, choices=AggregationWeighting.choices, default=AggregationWeighting.SAMPLES
    )
    # Client-level differential privacy (DP-FedAvg, McMahan et al. 2018): each update is
    # clipped to dp_clip and Gaussian noise of std dp_noise * dp_clip is added.
    dp_clip = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.0)],
        help_text="L2 norm each client update is clipped to; empty: no clipping.",
    )
    dp_noise = models.FloatField(
        default=0.0,
        validators=[MinValueValidator(0.0), MaxValueValidator(100.0)],
        help_text="Noise multiplier (std of the noise over the clipping norm).",
    )
    dp_delta = models.FloatField(
        default=1e-5, validators=[MinValueValidator(0.0), MaxValueValidator(0.1)]
    )
    dp_at = models.CharField(
        max_length=10, choices=NoiseLocation.choices, default=NoiseLocation.SERVER
    )
    # Local DP-SGD through Opacus, applied by each client to its own training.
    local_dp_noise = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(0.0), MaxValueValidator(100.0)]
    )
    local_dp_clip = models.FloatField(null=True, blank=True, validators=[MinValueValidator(0.0)])
    cloned_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="clones"
    )
    sweep = models.ForeignKey(
        Sweep, null=True, blank=True, on_delete=models.SET_NULL, related_name="experiments"
    )
    status = models.CharField(
        max_length=10,
        choices=ExperimentStatus.choices,
        default=ExperimentStatus.DRAFT,
        db_index=True,
        editable=False,
    )
    current_round = models.PositiveIntegerField(default=0, editable=False)
    failure_reason = models.TextField(blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True, editable=False)
    finished_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = ExperimentQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(min_clients__lte=models.F("clients_per_round")),
                name="experiment_min_clients_within_clients_per_round",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_EXPERIMENT_STATUSES

    @property
    def task(self) -> str:
        """Classification or segmentation: the dataset's, never chosen apart from it."""
        return self.dataset.task

    @property
    def round_progress(self) -> str:
        """Training rounds reached, "3/5"; the cross-site round after the last one (its
        number is num_rounds + 1) is named while it runs."""
        if self.current_round <= self.num_rounds:
            return f"{self.current_round}/{self.num_rounds}"
        done = f"{self.num_rounds}/{self.num_rounds}"
        return done if self.is_terminal else f"{done}, cross-site evaluation"

    def can_transition_to(self, status: str) -> bool:
        return status in EXPERIMENT_TRANSITIONS[self.status]

    def transition_to(self, status: str, *, reason: str = "") -> None:
        """Move to `status` if the life cycle allows it, stamping the times; saves the row."""
        if not self.can_transition_to(status):
            raise InvalidTransition(
                f"Experiment {self.pk} is {self.status} and cannot become {status}."
            )
        now = timezone.now()
        self.status = status
        fields = ["status", "updated_at"]
        if status == ExperimentStatus.RUNNING and self.started_at is None:
            self.started_at = now
            fields.append("started_at")
        if status in TERMINAL_EXPERIMENT_STATUSES:
            self.finished_at = now
            fields.append("finished_at")
        if reason:
            self.failure_reason = reason
            fields.append("failure_reason")
        self.save(update_fields=fields)


class ApprovalStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    APPROVED = "approved", "Approved"
    REFUSED = "refused", "Refused"


class ExperimentApproval(models.Model):
    """A site operator's decision on an experiment that wants to train on their data."""

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="approvals")
    site = models.ForeignKey(Site, on_delete=models.CASCADE, related_name="approvals")
    status = models.CharField(
        max_length=10, choices=ApprovalStatus.choices, default=ApprovalStatus.PENDING
    )
    reason = models.TextField(blank=True)
    requested_at = models.DateTimeField(auto_now_add=True)
    decided_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["experiment_id", "site_id"]
        constraints = [
            models.UniqueConstraint(fields=["experiment", "site"], name="approval_once_per_site"),
        ]

    def __str__(self) -> str:
        return f"{self.site} on {self.experiment}: {self.status}"


class RoundStatus(models.TextChoices):
    OPEN = "open", "Open"
    AGGREGATING = "aggregating", "Aggregating"
    CLOSED = "closed", "Closed"
    FAILED = "failed", "Failed"


class RoundKind(models.TextChoices):
    TRAIN = "train", "Training"
    # After the last training round: every site evaluates the global model and each
    # site's last local model on its own validation split (cross-site evaluation).
    EVALUATE = "evaluate", "Cross-site evaluation"


class Round(models.Model):
    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="rounds")
    number = models.PositiveIntegerField()
    kind = models.CharField(max_length=10, choices=RoundKind.choices, default=RoundKind.TRAIN)
    status = models.CharField(
        max_length=12, choices=RoundStatus.choices, default=RoundStatus.OPEN, db_index=True
    )
    opened_at = models.DateTimeField(default=timezone.now)
    closed_at = models.DateTimeField(null=True, blank=True)
    deadline = models.DateTimeField(db_index=True)
    # Set when the round closes for aggregation. If it is still aggregating then, its task
    # was lost or ended without a trace, and the watchdog sends it again.
    aggregation_deadline = models.DateTimeField(null=True, blank=True)
    aggregation_task_id = models.CharField(max_length=255, blank=True)
    recoveries = models.PositiveSmallIntegerField(
        default=0,
        editable=False,
        help_text="Times a lost client task or aggregation of this round was sent again.",
    )
    metrics = models.JSONField(default=dict, blank=True, help_text="Aggregated round metrics.")
    epsilon = models.FloatField(
        null=True, blank=True, help_text="Privacy spent up to this round (ε for dp_delta)."
    )
    federated_evaluation = models.JSONField(
        default=dict,
        blank=True,
        help_text="This round's global model on each site's validation split: "
        '{"sites": {slug: metrics}, "weighted": metrics}.',
    )

    class Meta:
        ordering = ["experiment_id", "number"]
        constraints = [
            models.UniqueConstraint(fields=["experiment", "number"], name="round_number_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.experiment} round {self.number}"


class ClientUpdateStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    LATE = "late", "Late"


TERMINAL_CLIENT_UPDATE_STATUSES = frozenset(
    {ClientUpdateStatus.SUCCEEDED, ClientUpdateStatus.FAILED, ClientUpdateStatus.LATE}
)


class ClientUpdate(models.Model):
    """One site's local training in one round."""

    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="client_updates")
    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="client_updates")
    status = models.CharField(
        max_length=10,
        choices=ClientUpdateStatus.choices,
        default=ClientUpdateStatus.PENDING,
        db_index=True,
    )
    task_id = models.CharField(max_length=255, blank=True, db_index=True)
    worker = models.CharField(max_length=255, blank=True)
    attempts = models.PositiveSmallIntegerField(
        default=0, editable=False, help_text="Times this client's task was sent."
    )
    num_samples = models.PositiveIntegerField(null=True, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    update_file = models.FileField(storage=model_store, max_length=500, blank=True)
    update_sha256 = models.CharField(max_length=64, blank=True)
    evaluation = models.JSONField(
        default=dict,
        blank=True,
        help_text="The site's evaluation on its validation split: of the round's starting "
        "global model, or in a cross-site round of every model it was sent.",
    )

    class Meta:
        ordering = ["round_id", "site_id"]
        constraints = [
            models.UniqueConstraint(fields=["round", "site"], name="client_update_once_per_round"),
        ]

    def __str__(self) -> str:
        return f"{self.round} / {self.site}"


class Checkpoint(models.Model):
    """A global model: the initial weights (no round) or the result of one round."""

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="checkpoints")
    round = models.OneToOneField(
        Round, on_delete=models.CASCADE, null=True, blank=True, related_name="checkpoint"
    )
    file = models.FileField(storage=model_store, max_length=500)
    sha256 = models.CharField(max_length=64)
    size_bytes = models.BigIntegerField()
    num_parameters = models.BigIntegerField()
    metrics = models.JSONField(default=dict, blank=True)
    is_best = models.BooleanField(default=False, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["experiment_id", "created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["experiment"],
                condition=Q(round__isnull=True),
                name="checkpoint_one_initial_per_experiment",
            ),
            models.UniqueConstraint(
                fields=["experiment"],
                condition=Q(is_best=True),
                name="checkpoint_one_best_per_experiment",
            ),
        ]

    def __str__(self) -> str:
        where = f"round {self.round.number}" if self.round_id else "initial"
        return f"{self.experiment} {where}"
