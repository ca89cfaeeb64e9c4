"""Plain L2 pull toward the weights the increment started from."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from olm_cli.distill.anchor import (
    on_device,
    read_json,
    read_tensors,
    snapshot,
    trainable_parameters,
    write_json,
    write_tensors,
)


class L2Regularizer:
    """penalty = strength/2 * sum_i (theta_i - theta*_i)^2 with theta* the previous increment's weights.

    EWC with F = 1: every weight is equally stiff. A cheap baseline that needs no Fisher pass,
    and the right choice when no data from earlier increments is available at their end.
    """

    name = "l2"

    def __init__(self, strength: float) -> None:
        self.strength = strength
        self.anchor: dict[str, torch.Tensor] = {}

    def begin_increment(self, model: torch.nn.Module) -> None:
        self.anchor = snapshot(model)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        total: torch.Tensor | None = None
        if self.anchor:
            for name, param in trainable_parameters(model).items():
                if name not in self.anchor:
                    continue
                diff = (param - on_device(self.anchor, name, param)).float()
                term = (diff * diff).sum()
                total = term if total is None else total + term
        if total is None:
            param = next(model.parameters(), None)
            return torch.zeros((), device=param.device if param is not None else "cpu")
        return 0.5 * self.strength * total

    def end_increment(
        self, model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]
    ) -> None:
        # The weights at the end of this increment are what the next one is pulled toward.
        self.anchor = snapshot(model)

    def state_dict(self) -> dict:
        return {"method": self.name, "anchor": dict(self.anchor)}

    def load_state_dict(self, state: dict) -> None:
        self.anchor = dict(state.get("anchor", {}))

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_tensors(directory / "l2_anchor.safetensors", self.anchor)
        write_json(directory / "l2.json", {"method": self.name, "strength": self.strength})

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        read_json(directory / "l2.json")
        self.anchor = read_tensors(directory / "l2_anchor.safetensors")
