"""Plain L2 pull toward the weights the increment started from."""

from __future__ import annotations

from typing import Any

import torch

from olm_cli.regularize.anchor import on_device, snapshot, trainable_parameters
from olm_cli.regularize.base import ConsolidationData
from olm_cli.regularize.config import RegularizeConfig
from olm_cli.strategy import StrategyContext


class L2Regularizer:
    """penalty = strength/2 * sum_i (theta_i - theta*_i)^2 with theta* the previous increment's weights.

    EWC with F = 1: every weight is equally stiff. A cheap baseline that needs no Fisher pass,
    and the right choice when no data from earlier increments is available at their end.
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
            for name, param in trainable_parameters(model).items():
                if name not in self.anchor:
                    continue
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
