"""The role groups of accounts/rules.py. Removing this migration's work keeps the groups:
users may have been put in them."""

from django.db import migrations

ROLE_GROUPS = ("admin", "researcher", "viewer", "site operator")


def create_role_groups(apps, schema_editor):
    Group = apps.get_model("auth", "Group")
    for name in ROLE_GROUPS:
        Group.objects.get_or_create(name=name)


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]

    operations = [migrations.RunPython(create_role_groups, migrations.RunPython.noop)]
