"""SCAFFOLD, server side: Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", arXiv:1910.06378 (Algorithm 1, option II).

The server keeps a control variate ``c`` (one tensor per floating-point weight, zeros at
first) and sends it to every client of a round as the strategy's payload; each client
corrects its gradients by ``c - c_i`` with its own ``c_i``, kept at the site. After
training, the client's new control variate is
``c_i+ = c_i - c + (x - y_i) / (K_i * lr_i)`` (x: the round's global weights, y_i: its
trained weights, K_i: its local optimizer steps, lr_i: its learning rate), and it reports
``extras={"local_steps": K_i, "learning_rate": lr_i}``. The server computes the same
``delta c_i = c_i+ - c_i = -c + (x - y_i) / (K_i * lr_i)`` from the uploaded weights and
those extras, so control variates never leave the sites. Then::

    x <- x + server_learning_rate * (mean of y_i - x)
    c <- c + (|S| / N) * (1/|S|) * sum of delta c_i      (N: the sites in the pool)

The mean of the weights follows the strategy's weighting; the control-variate update is
the paper's plain mean, which keeps ``c`` the mean of all N sites' ``c_i``. ``c`` and the
number of rounds aggregated are the strategy's state. Streaming: the sums over clients are
running sums, so memory stays at a few models whatever the number of clients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from training.fl.strategies.base import (
    Parameter,
    Strategy,
    StrategyContext,
    check_state_matches,
    round_counter,
)
from training.fl.strategies.fedavg import FedAvg
from training.fl.strategies.kernels import add_weighted_

__all__ = ["Scaffold"]

_CONTROL = "control."
_ROUNDS = "rounds"


class Scaffold(FedAvg):
    name: ClassVar[str] = "scaffold"
    title: ClassVar[str] = "SCAFFOLD"
    paper: ClassVar[str] = "Karimireddy et al. 2020, arXiv:1910.06378"
    description: ClassVar[str] = (
        "Control variates correct each client's drift: the server's c and each site's own "
        "c_i (kept at the site) adjust local gradients by c - c_i."
    )
    parameters: ClassVar[tuple[Parameter, ...]] = (
        Parameter(
            name="server_learning_rate",
            type="float",
            default=1.0,
            minimum=0.0,
            exclusive_minimum=True,
            maximum=10.0,
            description="Global step size (eta_g) towards the clients' mean.",
        ),
    )

    def __init__(
        self, *, num_sites: int, server_learning_rate: float = 1.0, weighting: str = "samples"
    ) -> None:
        params = Scaffold.validate_params({"server_learning_rate": server_learning_rate})
        super().__init__(server_learning_rate=params["server_learning_rate"], weighting=weighting)
        if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 1:
            raise ValueError(f"scaffold needs the number of sites in the pool, got {num_sites!r}")
        self.num_sites = num_sites
        self._control: dict[str, torch.Tensor] = {}
        self._rounds = 0
        self._client_scale = 0.0
        # Sum over clients of y_i / (K_i * lr_i), and of 1 / (K_i * lr_i).
        self._scaled_sum: dict[str, torch.Tensor] = {}
        self._scale_total = 0.0
        self._num_clients = 0

    @classmethod
    def build(
        cls, params: Mapping[str, Any], *, weighting: str, context: StrategyContext
    ) -> Strategy:
        if context.num_sites is None:
            raise ValueError("scaffold needs the number of sites in the experiment's pool")
        return cls(num_sites=context.num_sites, weighting=weighting, **cls.validate_params(params))

    def configure_client(self, *, round_number: int, site: str) -> dict[str, Any]:
        return {"scaffold": True}

    def _server_step_needs_global(self) -> bool:
        return True

    def _start(self, global_weights: Mapping[str, torch.Tensor]) -> None:
        check_state_matches(self.name, self._control, global_weights)
        super()._start(global_weights)
        self._scaled_sum = {}
        self._scale_total = 0.0
        self._num_clients = 0

    def _receive_extras(self, extras: Mapping[str, Any], num_samples: int) -> None:
        steps = extras.get("local_steps")
        learning_rate = extras.get("learning_rate")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(
                f"scaffold needs the client's local_steps (a positive integer) in its extras, "
                f"got {steps!r}; is the client running SCAFFOLD?"
            )
        if (
            isinstance(learning_rate, bool)
            or not isinstance(learning_rate, int | float)
            or not (learning_rate > 0 and math.isfinite(learning_rate))
        ):
            raise ValueError(
                "scaffold needs the client's learning_rate (a positive number) in its "
                f"extras, got {learning_rate!r}"
            )
        self._client_scale = 1.0 / (steps * float(learning_rate))

    def _add(self, update: Mapping[str, torch.Tensor], num_samples: int) -> None:
        super()._add(update, num_samples)
        floating = {name: t for name, t in update.items() if t.dtype.is_floating_point}
        add_weighted_(self._scaled_sum, floating, self._client_scale)
        self._scale_total += self._client_scale
        self._num_clients += 1

    def _server_step(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, scaled_sum in self._scaled_sum.items():
            start = self._global[name]
            control = self._control.get(name)
            if control is None:
                control = torch.zeros_like(scaled_sum)
            # sum of delta c_i = -|S| c + (sum 1/(K_i lr_i)) x - sum y_i/(K_i lr_i)
            delta_sum = scaled_sum.neg_().add_(start, alpha=self._scale_total)
            delta_sum.sub_(control, alpha=self._num_clients)
            self._control[name] = control.add_(delta_sum, alpha=1.0 / self.num_sites)
        self._scaled_sum = {}
        self._rounds += 1
        return super()._server_step(means)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {_CONTROL + name: c.clone() for name, c in self._control.items()}
        state[_ROUNDS] = round_counter(self._rounds)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        unexpected = sorted(k for k in state if not k.startswith(_CONTROL) and k != _ROUNDS)
        if unexpected:
            raise ValueError(f"strategy {self.name!r} does not keep state {unexpected}")
        self._control = {
            key.removeprefix(_CONTROL): tensor.detach().to("cpu", copy=True)
            for key, tensor in state.items()
            if key.startswith(_CONTROL)
        }
        self._rounds = int(state[_ROUNDS]) if _ROUNDS in state else 0

    def client_payload(self) -> dict[str, torch.Tensor]:
        """The server control variate c under the weight names (empty before round 1's
        aggregation: clients then take c = 0)."""
        return {name: c.clone() for name, c in self._control.items()}
