"""Elastic Weight Consolidation with a diagonal empirical Fisher accumulated over increments."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from olm_cli.regularize.anchor import on_device, snapshot, trainable_parameters
from olm_cli.regularize.base import ConsolidationData
from olm_cli.regularize.config import RegularizeConfig
from olm_cli.samples import per_sample_loss
from olm_cli.strategy import StrategyContext


class EwcRegularizer:
    """penalty = strength/2 * sum_i F_i (theta_i - theta*_i)^2.

    F is the empirical diagonal Fisher (squared gradients of the token-mean cross-entropy,
    averaged over ``fisher_batches`` batches) estimated at the end of every increment and
    combined as ``F <- decay * F_old + F_new``: weights that mattered for earlier text become
    stiff, the others stay free. The anchor theta* is the weights at the start of the increment
    (= where the last Fisher was measured).
    """

    name = "ewc"

    def __init__(self, config: RegularizeConfig, context: StrategyContext | None = None) -> None:
        self.strength = config.strength
        self.fisher_batches = config.fisher_batches
        self.fisher_decay = config.fisher_decay
        self.anchor: dict[str, torch.Tensor] = {}
        self.fisher: dict[str, torch.Tensor] = {}
        self.estimates = 0

    def begin_increment(self, model: torch.nn.Module) -> None:
        self.anchor = snapshot(model)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        total: torch.Tensor | None = None
        if self.fisher and self.anchor:
            for name, param in trainable_parameters(model).items():
                if name not in self.fisher or name not in self.anchor:
                    continue
                anchor = on_device(self.anchor, name, param)
                fisher = on_device(self.fisher, name, param)
                diff = (param - anchor).float()
                term = (fisher * diff * diff).sum()
                total = term if total is None else total + term
        if total is None:
            return None  # no Fisher before the first increment has ended
        return 0.5 * self.strength * total

    def end_increment(self, model: torch.nn.Module, data: ConsolidationData) -> None:
        new = estimate_fisher(model, data(self.fisher_batches))
        if not new:
            return
        combined = {name: self.fisher_decay * f for name, f in self.fisher.items()}
        for name, f in new.items():
            old = combined.get(name)
            combined[name] = f if old is None else old.to(f.device) + f
        self.fisher = combined
        self.estimates += 1
        # The Fisher was measured here, so this is the point the next increment is pulled back to.
        self.anchor = snapshot(model)

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "estimates": self.estimates,
            "anchor": dict(self.anchor),
            "fisher": dict(self.fisher),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.estimates = int(state.get("estimates", 0))
        self.anchor = dict(state.get("anchor", {}))
        self.fisher = dict(state.get("fisher", {}))


def estimate_fisher(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Mean over batches of squared CE gradients for every trainable parameter (float32).

    Uses ``torch.autograd.grad`` rather than ``backward`` so the optimiser's ``.grad`` buffers
    are untouched, and eval mode so dropout does not inflate the estimate.
    """
    params = trainable_parameters(model)
    names = list(params)
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    device = next(iter(params.values())).device if params else torch.device("cpu")
    was_training = model.training
    model.eval()
    count = 0
    try:
        for batch in batches:
            labels = batch["labels"].to(device)
            out = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            )
            rows, counts = per_sample_loss(out.logits, labels)
            loss = (rows * counts).sum() / counts.sum().clamp(min=1)
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            for name, grad in zip(names, grads, strict=True):
                if grad is not None:
                    sums[name] += grad.detach().float().pow(2)
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        return {}
    return {name: s / count for name, s in sums.items()}
