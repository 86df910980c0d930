import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

pytestmark = pytest.mark.django_db


def test_bootstrap_admin_creates_a_superuser_with_a_generated_password(capsys):
    call_command("bootstrap_admin", "--username", "chief")

    output = capsys.readouterr().out
    password = output.split("with password ")[1].split()[0]
    chief = get_user_model().objects.get(username="chief")
    assert chief.is_superuser and chief.is_staff
    assert chief.check_password(password)
    assert len(password) >= 16


def test_bootstrap_admin_leaves_an_existing_admin_alone(capsys):
    call_command("bootstrap_admin", "--username", "chief")
    chief = get_user_model().objects.get(username="chief")

    call_command("bootstrap_admin", "--username", "chief")

    assert "already exists" in capsys.readouterr().out
    assert get_user_model().objects.get(username="chief").password == chief.password
