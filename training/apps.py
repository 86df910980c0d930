from django.apps import AppConfig


class TrainingConfig(AppConfig):
    name = "training"
    verbose_name = "Federated training"

    def ready(self) -> None:
        from django.db.models.signals import post_delete

        from training import clients, signals, sweeps
        from training.models import Experiment

        # A deleted experiment's simulated sites keep no state in the model store.
        post_delete.connect(clients.forget_site_state, sender=Experiment, dispatch_uid="site-state")

        # When an experiment of a sweep ends, the sweep's next queued one starts.
        signals.experiment_ended.connect(sweeps.start_next_in_sweep, dispatch_uid="sweeps")
