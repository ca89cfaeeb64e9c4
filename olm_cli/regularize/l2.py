"""Plain L2 pull toward the weights the increment started from."""

from __future__ import annotations

from typing import Any

import torch

from olm_cli.regularize.anchor import local, on_device, snapshot, trainable_parameters
from olm_cli.regularize.base import ConsolidationData
from olm_cli.regularize.config import RegularizeConfig
from olm_cli.strategy import StrategyContext


class L2Regularizer:
    """penalty = strength/2 * sum_i (theta_i - theta*_i)^2 with theta* the previous increment's weights.

    EWC with F = 1: every weight is equally stiff. A cheap baseline that needs no Fisher pass,
    and the right choice when no data from earlier increments is available at their end.

    Under FSDP2 the anchor holds the rank's rows of each parameter and the penalty is this
    rank's part of the sum: its gradient is exactly the penalty's gradient on those rows, which
    is added to the averaged task gradient as with one process (docs/distributed.md).
    """

    name = "l2"

    def __init__(self, config: RegularizeConfig, context: StrategyContext | None = None) -> None:
        self.strength = config.strength
        self.anchor: dict[str, torch.Tensor] = {}

    def begin_increment(self, model: torch.nn.Module) -> None:
        self.anchor = snapshot(model)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        total: torch.Tensor | None = None
        if self.anchor:
            for name, parameter in trainable_parameters(model).items():
                if name not in self.anchor:
                    continue
                param = local(parameter)  # sharded: this rank's rows; the gradient reaches only them
                diff = (param - on_device(self.anchor, name, param)).float()
                term = (diff * diff).sum()
                total = term if total is None else total + term
        if total is None:
            return None  # no anchor before the first increment has ended
        return 0.5 * self.strength * total

    def end_increment(self, model: torch.nn.Module, data: ConsolidationData) -> None:
        # The weights at the end of this increment are what the next one is pulled toward.
        self.anchor = snapshot(model)

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.name, "anchor": dict(self.anchor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor = dict(state.get("anchor", {}))
