from django.apps import AppConfig


class VisualizationConfig(AppConfig):
    name = "visualization"
    verbose_name = "Dashboard"

    def ready(self) -> None:
        # Imported here: the events module reads training's models and serializers.
        from visualization import events

        events.connect_to_the_ledger()
