"""Elastic Weight Consolidation with a diagonal empirical Fisher accumulated over increments."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from olm_cli.regularize.anchor import local, on_device, snapshot, trainable_parameters
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
    (= where the last Fisher was measured). Under FSDP2 the anchor and the Fisher hold the
    rank's rows of each parameter (2 x the rank's parameter shard) and the penalty is this
    rank's part of the sum; its gradient reaches exactly those rows (docs/distributed.md).
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
            for name, parameter in trainable_parameters(model).items():
                if name not in self.fisher or name not in self.anchor:
                    continue
                param = local(parameter)  # sharded: this rank's rows and its part of the sum
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
    are untouched, and eval mode so dropout does not inflate the estimate. A sharded model
    (FSDP2) goes through :func:`estimate_fisher_sharded`.
    """
    from olm_cli.distributed.sharding import is_sharded

    if is_sharded(model):
        return estimate_fisher_sharded(model, batches)
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


def estimate_fisher_sharded(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The same estimate on an FSDP2 model: this rank's rows of it, from its sharded gradients.

    FSDP2 gathers each layer for the forward and reduce-scatters the gradients into the
    sharded parameters' ``.grad`` (``autograd.grad`` cannot reach the sharded parameters).
    Every rank runs the same batch (the consolidation data is drawn identically on every rank),
    so the averaged gradient is that batch's gradient, and each rank squares its own rows. The
    ``.grad`` buffers are used and cleared: this runs after the increment's last optimiser step.
    """
    params = trainable_parameters(model)
    sums = {name: torch.zeros_like(local(p), dtype=torch.float32) for name, p in params.items()}
    device = local(next(iter(params.values()))).device if params else torch.device("cpu")
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    count = 0
    try:
        for batch in batches:
            labels = batch["labels"].to(device)
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            rows, counts = per_sample_loss(out.logits, labels)
            ((rows * counts).sum() / counts.sum().clamp(min=1)).backward()
            for name, param in params.items():
                if param.grad is not None:
                    sums[name] += local(param.grad).detach().float().pow(2)
            model.zero_grad(set_to_none=True)
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if count == 0:
        return {}
    return {name: s / count for name, s in sums.items()}
