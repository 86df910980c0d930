"""What the ledger announces (training/services.py sends these, inside its transactions).

The ledger knows nothing of who listens: the browser's event stream (visualization), the
Prometheus metrics (flproject.observability) and the MLflow export (workers) connect their
receivers in their apps' ready(). A receiver runs inside the sender's transaction, so one
whose effect must not outlive a rollback defers it with transaction.on_commit. Receivers
must stay cheap and query nothing: a client's claim and report are the hot path of a round.

The sender is the model class of the row the announcement is about.
"""

from django.dispatch import Signal

# A round opened: `fl_round` (a Round whose checkpoint is known to be None) and
# `client_updates`, its pending ClientUpdate rows.
round_opened = Signal(use_caching=True)

# A client claimed its training: `client_update`, running, with its round and site.
client_started = Signal(use_caching=True)

# A client's report was recorded: `client_update`, succeeded or failed, with its round and
# site. A report that came too late to count is not announced.
client_reported = Signal(use_caching=True)

# The round's deadline passed before the client reported: `client_update`, late, with its
# round and site.
client_late = Signal(use_caching=True)

# A client's training task ended and reported, counted or not: `site_slug` and
# `duration_seconds`, from its claim to its report.
client_task_ended = Signal(use_caching=True)

# A round closed: `fl_round`, with its metrics and its checkpoint: a training round once
# aggregated, or the cross-site round (kind "evaluate"), which has no checkpoint.
round_closed = Signal(use_caching=True)

# The sites' evaluations of a round's global model on their validation splits were filed as
# its federated evaluation (when the next round, or the cross-site round, closed):
# `fl_round`, with its checkpoint.
round_evaluated = Signal(use_caching=True)

# An experiment completed, failed or was stopped: `experiment`, in its final status. Not on
# the hot path: training.sweeps starts the next queued experiment of its sweep from here,
# inside the transaction that ended this one (see that module for its locking).
experiment_ended = Signal(use_caching=True)
