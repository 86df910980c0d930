from django.apps import AppConfig


def forget_site_state(sender, instance, **kwargs) -> None:
    """A deleted experiment's simulated sites keep no state in the model store."""
    # Imported when an experiment is deleted: training.clients loads PyTorch, which a web
    # process would otherwise load at start-up for this receiver alone.
    from training import clients

    clients.forget_site_state(sender, instance, **kwargs)


class TrainingConfig(AppConfig):
    name = "training"
    verbose_name = "Federated training"

    def ready(self) -> None:
        from django.db.models.signals import post_delete

        from training import signals, sweeps
        from training.models import Experiment

        post_delete.connect(forget_site_state, sender=Experiment, dispatch_uid="site-state")

        # When an experiment of a sweep ends, the sweep's next queued one starts.
        signals.experiment_ended.connect(sweeps.start_next_in_sweep, dispatch_uid="sweeps")
