"""Refuse a site's agent from now on: its credentials, its broker user, its place in rounds."""

from django.core.management.base import BaseCommand, CommandError

from training import sites
from training.models import Site


class Command(BaseCommand):
    help = "Revoke a site's credentials and broker user; it is no longer picked as a client."

    def add_arguments(self, parser):
        parser.add_argument("--slug", required=True)

    def handle(self, *args, slug, **options):
        site = Site.objects.filter(slug=slug).first()
        if site is None:
            raise CommandError(
                f"No site {slug!r}; `manage.py shell` lists them: Site.objects.all()"
            )
        revoked = sites.revoke_site(site)
        self.stdout.write(f"Revoked site {slug} ({revoked} active credential(s)).")
