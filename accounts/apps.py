from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "People and audit"

    def ready(self) -> None:
        # Registers the roles' permissions with django-rules, the audited models with
        # django-auditlog, and the receivers of logins and password changes.
        from accounts import audit, rules  # noqa: F401

        audit.register_audited_models()
