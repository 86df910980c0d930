from django.apps import AppConfig


class TrainingConfig(AppConfig):
    name = "training"
    verbose_name = "Federated training"

    def ready(self) -> None:
        from training import signals, sweeps

        # When an experiment of a sweep ends, the sweep's next queued one starts.
        signals.experiment_ended.connect(sweeps.start_next_in_sweep, dispatch_uid="sweeps")
