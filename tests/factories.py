"""Factories for the ledger (factory_boy)."""

from datetime import timedelta

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone
from knox.models import AuthToken

from training import services
from training.models import (
    Checkpoint,
    ClientUpdate,
    Dataset,
    Experiment,
    Modality,
    Round,
    Site,
    StorageFormat,
)


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ["username"]

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda user: f"{user.username}@example.org")
    password = factory.django.Password("correct horse battery staple")


class SiteFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Site

    name = factory.Sequence(lambda n: f"Hospital {n}")
    slug = factory.Sequence(lambda n: f"hospital-{n}")


class DatasetFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Dataset

    name = factory.Sequence(lambda n: f"dataset-{n}")
    owner = factory.SubFactory(UserFactory)
    modality = Modality.CT
    storage_format = StorageFormat.FOLDER
    num_classes = 2
    class_names = ["benign", "lesion"]
    image_shape = [64, 64]
    spacing = [1.0, 1.0]
    path = "/srv/datasets/synthetic"


class ExperimentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Experiment
        skip_postgeneration_save = True

    name = factory.Sequence(lambda n: f"experiment-{n}")
    owner = factory.SubFactory(UserFactory)
    dataset = factory.SubFactory(DatasetFactory, owner=factory.SelfAttribute("..owner"))
    num_rounds = 3
    clients_per_round = 2
    min_clients = 1

    @factory.post_generation
    def sites(self, create, extracted, **kwargs):
        if not create:
            return
        self.sites.set(extracted if extracted is not None else SiteFactory.create_batch(2))

    @factory.post_generation
    def members(self, create, extracted, **kwargs):
        if create and extracted:
            self.members.set(extracted)


class RoundFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Round

    experiment = factory.SubFactory(ExperimentFactory)
    number = factory.Sequence(lambda n: n + 1)
    deadline = factory.LazyFunction(lambda: timezone.now() + timedelta(hours=1))


class ClientUpdateFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ClientUpdate
        skip_postgeneration_save = True  # the hook below changes another table only

    round = factory.SubFactory(RoundFactory)
    site = factory.SubFactory(SiteFactory)

    @factory.post_generation
    def site_in_experiment(self, create, extracted, **kwargs):
        """A round's clients are among its experiment's sites, as open_round picks them."""
        if create:
            self.round.experiment.sites.add(self.site)


class CheckpointFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Checkpoint

    experiment = factory.SubFactory(ExperimentFactory)
    round = factory.SubFactory(RoundFactory, experiment=factory.SelfAttribute("..experiment"))
    file = factory.django.FileField(filename="weights.safetensors", data=b"weights")
    sha256 = "0" * 64
    size_bytes = 7
    num_parameters = 1


def api_token(user) -> str:
    """A new API token of the user, as POST /api/auth/token/ hands it out."""
    _, token = AuthToken.objects.create(user=user)
    return token


def claim(update: ClientUpdate, *, worker: str) -> ClientUpdate | None:
    """What a worker's train_client task does first, with the ids its message carries."""
    return services.claim_client_update(
        update.pk, update.round_id, update.site_id, worker=worker, task_id=update.task_id
    )
