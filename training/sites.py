"""Real sites as principals of their own: enrolment, credentials, their broker users, what
they declare about their data, and their operators' approvals.

An admin issues a one-time enrolment token; the site's agent exchanges it for a credential
(an API key for the Site API) and a Redis ACL user that can reach only the site's own queue
(training/site_broker.py). Only hashes of the secrets are stored. A site declares metadata
of its datasets, never a path; the sites that declared the same name make a federated
dataset.
"""

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.utils import timezone

from training import site_broker
from training.fl.data.formats import get_format
from training.log_events import log_event
from training.models import (
    Dataset,
    EnrolmentToken,
    Site,
    SiteCredential,
    SiteDataset,
)

logger = logging.getLogger(__name__)

# Heard from more often than this, a site's last contact is not written again.
LAST_SEEN_RESOLUTION = timedelta(seconds=10)


class SitesNotConfigured(Exception):
    """The server cannot take real sites (no broker for them); the message says what to set."""


class EnrolmentRefused(Exception):
    """An enrolment token that cannot be used; the message says why and what to do."""


class DeclarationConflict(Exception):
    """A site's dataset declaration disagrees with the federated dataset of that name."""


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_sites_configured() -> None:
    if not settings.FEDLENS_SITE_BROKER_URL or not settings.REDIS_URL:
        raise SitesNotConfigured(
            "This FedLens server cannot take real sites yet: set REDIS_URL (the server's "
            "broker) and FEDLENS_SITE_BROKER_URL (the broker's address as sites reach it)."
        )


# --- Enrolment ---------------------------------------------------------------------------


def issue_enrolment_token(site: Site, *, created_by=None, hours: int | None = None) -> str:
    """A new one-time token for `site`, returned once and stored as its hash."""
    check_sites_configured()
    token = secrets.token_urlsafe(32)
    lifetime = timedelta(hours=hours or settings.FEDLENS_ENROLMENT_TOKEN_HOURS)
    EnrolmentToken.objects.create(
        site=site,
        token_sha256=sha256_hex(token),
        expires_at=timezone.now() + lifetime,
        created_by=created_by,
    )
    log_event(logger, "site.enrolment_token_issued", site=site.slug)
    return token


@dataclass(frozen=True)
class IssuedCredential:
    """What a site's agent keeps: shown once, never stored in clear on the server."""

    site: Site
    key: str
    broker_url: str


def enrol(
    token: str, *, agent_version: str, devices: list[dict[str, Any]], hostname: str = ""
) -> IssuedCredential:
    """Exchange an enrolment token for the site's credential (single use, before it expires)."""
    check_sites_configured()
    with transaction.atomic():
        found = (
            EnrolmentToken.objects.select_for_update()
            .select_related("site")
            .filter(token_sha256=sha256_hex(token))
            .first()
        )
        if found is None:
            raise EnrolmentRefused(
                "This enrolment token is not valid: check that it was copied whole, or ask "
                "the FedLens administrators for a new one."
            )
        if found.used_at is not None:
            raise EnrolmentRefused(
                "This enrolment token has already been used; ask the FedLens administrators "
                "for a new one (a token enrols one node, once)."
            )
        now = timezone.now()
        if found.expires_at <= now:
            raise EnrolmentRefused(
                f"This enrolment token expired at {found.expires_at:%Y-%m-%d %H:%M} UTC; ask "
                "the FedLens administrators for a new one."
            )
        found.used_at = now
        found.save(update_fields=["used_at"])
        site = found.site
        issued = new_credential(site, issued_by=found.created_by)
        site.enrolled_at = site.enrolled_at or now
        site.last_seen = now
        site.agent_version = agent_version[:50]
        site.devices = devices
        site.is_active = True
        site.save(
            update_fields=["enrolled_at", "last_seen", "agent_version", "devices", "is_active"]
        )
    log_event(
        logger, "site.enrolled", site=site.slug, agent_version=agent_version, hostname=hostname
    )
    return issued


def new_credential(site: Site, *, issued_by=None) -> IssuedCredential:
    """Revoke the site's credentials and issue a new one, with a new broker password.
    The caller's transaction applies the broker user once it commits."""
    SiteCredential.objects.filter(site=site, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    )
    prefix = secrets.token_hex(6)
    key = f"{prefix}.{secrets.token_urlsafe(32)}"
    broker_password = secrets.token_urlsafe(32)
    SiteCredential.objects.create(
        site=site,
        key_prefix=prefix,
        key_sha256=sha256_hex(key),
        broker_password_sha256=sha256_hex(broker_password),
        issued_by=issued_by,
    )
    transaction.on_commit(lambda: apply_broker_user(site.slug, sha256_hex(broker_password)))
    return IssuedCredential(site=site, key=key, broker_url=site_broker_url(site, broker_password))


def rotate_credential(credential: SiteCredential) -> IssuedCredential:
    with transaction.atomic():
        issued = new_credential(credential.site, issued_by=credential.issued_by)
    log_event(logger, "site.credential_rotated", site=credential.site.slug)
    return issued


def revoke_site(site: Site) -> int:
    """Refuse the site from now on: its credentials, its broker user, and its place in new
    rounds. Returns the number of credentials revoked."""
    with transaction.atomic():
        revoked = SiteCredential.objects.filter(site=site, revoked_at__isnull=True).update(
            revoked_at=timezone.now()
        )
        EnrolmentToken.objects.filter(site=site, used_at__isnull=True).delete()
        site.is_active = False
        site.save(update_fields=["is_active"])
        transaction.on_commit(lambda: remove_broker_user(site.slug))
    log_event(logger, "site.revoked", level=logging.WARNING, site=site.slug)
    return revoked


def authenticate(key: str) -> SiteCredential | None:
    """The active credential whose key this is, or None."""
    prefix, _, _ = key.partition(".")
    credential = (
        SiteCredential.objects.active()
        .select_related("site")
        .filter(key_prefix=prefix, site__is_active=True)
        .first()
    )
    if credential is None or not hmac.compare_digest(credential.key_sha256, sha256_hex(key)):
        return None
    now = timezone.now()
    if credential.last_used_at is None or now - credential.last_used_at > LAST_SEEN_RESOLUTION:
        SiteCredential.objects.filter(pk=credential.pk).update(last_used_at=now)
        Site.objects.filter(pk=credential.site_id).update(last_seen=now)
        credential.last_used_at = credential.site.last_seen = now
    return credential


def record_heartbeat(
    site: Site, *, agent_version: str, devices: list[dict[str, Any]], requires_approval: bool
) -> None:
    site.last_seen = timezone.now()
    site.agent_version = agent_version[:50]
    site.devices = devices
    site.requires_approval = requires_approval
    site.save(update_fields=["last_seen", "agent_version", "devices", "requires_approval"])


# --- The broker ----------------------------------------------------------------------------


def site_broker_url(site: Site, password: str) -> str:
    """FEDLENS_SITE_BROKER_URL with the site's own user and password in it."""
    parts = urlsplit(settings.FEDLENS_SITE_BROKER_URL)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address goes back in brackets
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    user = quote(site_broker.broker_username(site.slug), safe="")
    netloc = f"{user}:{quote(password, safe='')}@{host}{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def broker_admin() -> redis.Redis:
    """The server's own broker connection, whose user may manage ACL users."""
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=10)


def apply_broker_user(slug: str, password_sha256: str) -> None:
    """Create or replace the site's Redis ACL user (Redis takes the password's hash)."""
    rules = site_broker.acl_user_rules(slug, password_sha256=password_sha256)
    with broker_admin() as admin:
        admin.execute_command("ACL", "SETUSER", site_broker.broker_username(slug), *rules)


def remove_broker_user(slug: str) -> None:
    """Delete the site's broker user and close its connections."""
    with broker_admin() as admin:
        admin.execute_command("ACL", "DELUSER", site_broker.broker_username(slug))


def sync_broker_users() -> int:
    """Make the broker's site users match the ledger: one per active credential, none for
    revoked sites. A broker restarted without its ACL file gets them back this way (the
    watchdog runs it). Returns the number of users applied."""
    if not settings.FEDLENS_SITE_BROKER_URL or not settings.REDIS_URL:
        return 0
    active = SiteCredential.objects.active().filter(site__is_active=True).select_related("site")
    applied = 0
    for credential in active:
        apply_broker_user(credential.site.slug, credential.broker_password_sha256)
        applied += 1
    for slug in Site.objects.filter(is_active=False, enrolled_at__isnull=False).values_list(
        "slug", flat=True
    ):
        remove_broker_user(slug)
    return applied


# --- Datasets ------------------------------------------------------------------------------


def federated_dataset_owner(site: Site):
    """Who owns a federated dataset a site declares first: the admin who enrolled the site,
    else the first superuser."""
    credential = SiteCredential.objects.filter(site=site, issued_by__isnull=False).first()
    if credential is not None:
        return credential.issued_by
    return get_user_model().objects.filter(is_superuser=True).order_by("pk").first()


def declare_dataset(site: Site, name: str, metadata: dict[str, Any]) -> tuple[SiteDataset, bool]:
    """Record what `site` holds of the federated dataset `name`; create that dataset when
    this is its first site. Its classes and channels must be those of the dataset (raises
    DeclarationConflict, storing nothing). Returns the declaration and whether it is new."""
    with transaction.atomic():
        dataset = Dataset.objects.select_for_update().filter(name=name).first()
        if dataset is None:
            owner = federated_dataset_owner(site)
            if owner is None:
                raise DeclarationConflict(
                    "No administrator exists to own this federated dataset; create one first."
                )
            try:
                with transaction.atomic():
                    dataset = Dataset.objects.create(
                        name=name,
                        owner=owner,
                        is_federated=True,
                        storage_format=metadata["storage_format"],
                        task=get_format(metadata["storage_format"]).task,
                        num_classes=metadata["num_classes"],
                        class_names=metadata["class_names"],
                        channels=metadata["channels"],
                        image_shape=metadata["image_shape"],
                        spacing=metadata["spacing"],
                        description=f"Federated dataset, first declared by {site.slug}.",
                    )
            except IntegrityError:  # declared by another site at the same moment
                dataset = Dataset.objects.select_for_update().get(name=name)
        check_declaration(dataset, name, metadata)
        declaration, created = SiteDataset.objects.update_or_create(
            site=site,
            dataset=dataset,
            defaults={
                "storage_format": metadata["storage_format"],
                "num_samples": metadata["num_samples"],
                "counts_per_class": metadata["counts_per_class"],
                "image_shape": metadata["image_shape"],
                "spacing": metadata["spacing"],
                "statistics": metadata.get("statistics") or {},
            },
        )
    log_event(logger, "site.dataset_declared", site=site.slug, dataset=name)
    return declaration, created


def check_declaration(dataset: Dataset, name: str, metadata: dict[str, Any]) -> None:
    if not dataset.is_federated:
        raise DeclarationConflict(
            f"A dataset named {name!r} already exists on the server and is not federated; "
            "declare your data under another name."
        )
    task = get_format(metadata["storage_format"]).task
    if task != dataset.task:
        raise DeclarationConflict(
            f"Dataset {name!r} is for {dataset.task}; this site's {metadata['storage_format']} "
            f"data is for {task}. Declare it under another name."
        )
    theirs = list(dataset.class_names) or [str(index) for index in range(dataset.num_classes)]
    ours = list(metadata["class_names"])
    if metadata["num_classes"] != dataset.num_classes or (dataset.class_names and ours != theirs):
        raise DeclarationConflict(
            f"Dataset {name!r} has {dataset.num_classes} classes {theirs}; this site declared "
            f"{metadata['num_classes']} classes {ours}. Give the same classes in the same "
            "order (datasets add --class-names), or declare the data under another name."
        )
    if metadata["channels"] != dataset.channels:
        raise DeclarationConflict(
            f"Dataset {name!r} has {dataset.channels}-channel images; this site's have "
            f"{metadata['channels']}."
        )


def withdraw_dataset(site: Site, name: str) -> bool:
    deleted, _ = SiteDataset.objects.filter(site=site, dataset__name=name).delete()
    return bool(deleted)
