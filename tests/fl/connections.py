"""The server's side of the client protocol as the engine's tests see it: a connection that
records what the client fetched and sent, with a site state in memory."""

from collections.abc import Mapping

import torch

from training.fl.client import ClientReport, ClientTask


class MemorySiteState:
    def __init__(self, entries: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        self.entries = entries if entries is not None else {}
        self.saved: list[str] = []

    def load(self, name: str) -> dict[str, torch.Tensor] | None:
        kept = self.entries.get(name)
        return {key: tensor.clone() for key, tensor in kept.items()} if kept else None

    def save(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        self.entries[name] = {key: tensor.clone() for key, tensor in tensors.items()}
        self.saved.append(name)


class RecordingConnection:
    """What the client fetched and sent; ``counted`` is the server's answer to an update."""

    def __init__(
        self,
        weights: Mapping[str, torch.Tensor],
        *,
        payload: Mapping[str, torch.Tensor] | None = None,
        state: MemorySiteState | None = None,
        models: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        counted: bool = True,
    ) -> None:
        self.weights = weights
        self.payload = payload or {}
        self.state = state or MemorySiteState()
        self.models = models or {}
        self.counted = counted
        self.fetched = 0
        self.payloads_fetched = 0
        self.models_fetched: list[str] = []
        self.updates: list[tuple[dict[str, torch.Tensor], ClientReport]] = []
        self.evaluations: list[ClientReport] = []
        self.failures: list[str] = []

    def starting_weights(self, task: ClientTask) -> Mapping[str, torch.Tensor]:
        self.fetched += 1
        return self.weights

    def strategy_payload(self, task: ClientTask) -> Mapping[str, torch.Tensor]:
        self.payloads_fetched += 1
        return self.payload

    def site_state(self, task: ClientTask) -> MemorySiteState:
        return self.state

    def evaluation_weights(self, task: ClientTask, label: str) -> Mapping[str, torch.Tensor]:
        self.models_fetched.append(label)
        return self.models[label]

    def send_update(self, task, weights, report) -> bool:
        self.updates.append(({k: v.clone() for k, v in weights.items()}, report))
        return self.counted

    def send_evaluation(self, task, report) -> bool:
        self.evaluations.append(report)
        return True

    def send_failure(self, task, error: str) -> bool:
        self.failures.append(error)
        return True
