"""The server keeps the broker's site users in step with the ledger: made at enrolment,
replaced at rotation, given back after a broker restart, removed at revocation.

Against a redis-server of the test's own, whose default user is the server's admin."""

from collections.abc import Iterator

import pytest
import redis

from tests.factories import SiteFactory, UserFactory
from tests.test_site_broker import OwnRedis
from training import sites
from training.models import SiteCredential
from training.site_broker import broker_username

pytestmark = [pytest.mark.django_db, pytest.mark.redis]


@pytest.fixture
def broker(settings) -> Iterator[OwnRedis]:
    server = OwnRedis()
    settings.REDIS_URL = server.url()
    settings.FEDLENS_SITE_BROKER_URL = server.url()
    yield server
    server.stop()


def enrolled(slug: str, capture) -> sites.IssuedCredential:
    site = SiteFactory(slug=slug)
    token = sites.issue_enrolment_token(site, created_by=UserFactory())
    with capture(execute=True):
        return sites.enrol(token, agent_version="0.1.0", devices=[])


def logs_in(url: str) -> bool:
    client = redis.Redis.from_url(url)
    try:
        return client.ping()
    except redis.exceptions.AuthenticationError:
        return False
    finally:
        client.close()


def test_enrolment_makes_a_broker_user_that_reaches_its_own_queue_only(
    broker, django_capture_on_commit_callbacks
):
    issued = enrolled("st-mary", django_capture_on_commit_callbacks)
    site_user = redis.Redis.from_url(issued.broker_url)

    site_user.lpush("site.st-mary", "message")

    assert site_user.rpop("site.st-mary") == b"message"
    with pytest.raises(redis.exceptions.NoPermissionError):
        site_user.rpop("site.other")
    site_user.close()


def test_a_rotation_replaces_the_broker_password_at_once(
    broker, django_capture_on_commit_callbacks
):
    old = enrolled("st-mary", django_capture_on_commit_callbacks)
    credential = SiteCredential.objects.active().get()

    with django_capture_on_commit_callbacks(execute=True):
        new = sites.rotate_credential(credential)

    assert logs_in(new.broker_url)
    assert not logs_in(old.broker_url)


def test_a_broker_that_lost_its_users_gets_them_back_and_revoked_sites_stay_out(
    broker, django_capture_on_commit_callbacks
):
    kept = enrolled("st-mary", django_capture_on_commit_callbacks)
    gone = enrolled("st-anne", django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=True):
        sites.revoke_site(gone.site)
    # A broker restarted without its ACL file.
    broker.admin.execute_command("ACL", "DELUSER", broker_username("st-mary"))
    broker.admin.execute_command("ACL", "SETUSER", broker_username("st-anne"), "on", ">x", "~*")
    assert not logs_in(kept.broker_url)

    applied = sites.sync_broker_users()

    assert applied == 1
    assert logs_in(kept.broker_url)
    assert broker_username("st-anne") not in broker.admin.acl_users()
