"""Create the first administrator with a generated password, printed once."""

import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the superuser if it does not exist, with a random password shown once."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")
        parser.add_argument("--email", default="admin@localhost")

    def handle(self, *args, username: str, email: str, **options):
        users = get_user_model().objects
        if users.filter(username=username).exists():
            self.stdout.write(
                f"Administrator '{username}' already exists "
                f"(new password: python manage.py changepassword {username})."
            )
            return
        password = secrets.token_urlsafe(12)
        users.create_superuser(username=username, email=email, password=password)
        self.stdout.write(
            self.style.SUCCESS(
                f"Created administrator '{username}' with password {password} "
                "(shown only now: keep it or change it)."
            )
        )
