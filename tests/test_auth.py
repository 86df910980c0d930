"""Token and session authentication."""

import pytest

from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def test_password_is_exchanged_for_a_token_that_authenticates(api_client):
    UserFactory(username="ana")

    response = api_client.post(
        "/api/auth/token/", {"username": "ana", "password": "correct horse battery staple"}
    )

    assert response.status_code == 200
    api_client.credentials(HTTP_AUTHORIZATION=f"Token {response.json()['token']}")
    assert api_client.get("/api/experiments/").status_code == 200


def test_a_wrong_password_gets_no_token(api_client):
    UserFactory(username="ana")

    response = api_client.post("/api/auth/token/", {"username": "ana", "password": "guess"})

    assert response.status_code == 400
    assert "Unable to log in" in response.json()["non_field_errors"][0]


def test_an_invalid_token_is_refused(api_client):
    api_client.credentials(HTTP_AUTHORIZATION="Token not-a-token")

    response = api_client.get("/api/experiments/")

    assert response.status_code == 401


def test_anonymous_requests_are_told_how_to_authenticate(api_client):
    response = api_client.get("/api/sites/")

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"


def test_a_browser_session_authenticates_the_api(client):
    UserFactory(username="ana")
    client.login(username="ana", password="correct horse battery staple")

    assert client.get("/api/experiments/").status_code == 200


def test_the_home_page_needs_a_login_and_lists_visible_experiments(client):
    from tests.factories import ExperimentFactory

    ana = UserFactory(username="ana")
    ExperimentFactory(owner=ana, name="ana-lesions")
    ExperimentFactory(name="someone-elses")
    assert client.get("/").status_code == 302

    client.force_login(ana)
    page = client.get("/").content.decode()

    assert "ana-lesions" in page
    assert "someone-elses" not in page
