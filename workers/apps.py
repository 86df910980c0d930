from django.apps import AppConfig


class WorkersConfig(AppConfig):
    name = "workers"
    verbose_name = "Workers"

    def ready(self) -> None:
        # Imported here: the receivers read training's models.
        from workers import receivers

        receivers.connect_to_the_ledger()
