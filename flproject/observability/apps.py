from django.apps import AppConfig


class ObservabilityConfig(AppConfig):
    name = "flproject.observability"
    verbose_name = "Observability"

    def ready(self) -> None:
        # Imported here: the metrics module reads training's models.
        from flproject.observability import metrics

        metrics.connect_to_the_ledger()
