"""Create a real site (or take an existing one) and print a one-time enrolment token."""

from django.core.management.base import BaseCommand, CommandError

from training import sites
from training.models import Site


class Command(BaseCommand):
    help = (
        "Create a site (or reuse one by slug) and print a one-time enrolment token for its "
        "node: `python -m workers.site enroll --server URL --token TOKEN` on that node."
    )

    def add_arguments(self, parser):
        parser.add_argument("--slug", required=True, help="e.g. st-mary; names its queue")
        parser.add_argument("--name", help="the site's display name (new sites)")
        parser.add_argument("--description", default="")
        parser.add_argument(
            "--expires-hours", type=int, help="token lifetime (FEDLENS_ENROLMENT_TOKEN_HOURS)"
        )

    def handle(self, *args, slug, name, description, expires_hours, **options):
        if expires_hours is not None and not 1 <= expires_hours <= 24 * 30:
            raise CommandError("--expires-hours must be between 1 and 720.")
        site, created = Site.objects.get_or_create(
            slug=slug, defaults={"name": name or slug, "description": description}
        )
        try:
            token = sites.issue_enrolment_token(site, hours=expires_hours)
        except sites.SitesNotConfigured as missing:
            raise CommandError(str(missing)) from None
        self.stderr.write(
            f"{'Created' if created else 'Using'} site {site.slug}. Give this token to its IT "
            "staff over a separate channel; it works once and expires:"
        )
        self.stdout.write(token)
