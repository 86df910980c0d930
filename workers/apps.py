from django.apps import AppConfig


class WorkersConfig(AppConfig):
    name = "workers"
    verbose_name = "Workers"

    def ready(self) -> None:
        # Imported here: the receivers read training's models.
        from django.conf import settings

        from workers import receivers

        receivers.connect_to_the_ledger()
        if settings.FEDLENS_EMBEDDED:
            from workers import embedded

            embedded.track_driven_experiments()
