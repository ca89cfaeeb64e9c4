"""Elastic Weight Consolidation with a diagonal empirical Fisher accumulated over increments."""

from __future__ import annotations

import itertools
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
from olm_cli.samples import per_sample_loss


class EwcRegularizer:
    """penalty = strength/2 * sum_i F_i (theta_i - theta*_i)^2.

    F is the empirical diagonal Fisher (squared gradients of the token-mean cross-entropy,
    averaged over ``fisher_batches`` batches) estimated at the end of every increment and
    combined as ``F <- decay * F_old + F_new``: weights that mattered for earlier text become
    stiff, the others stay free. The anchor theta* is the weights at the start of the increment
    (= where the last Fisher was measured).
    """

    name = "ewc"

    def __init__(self, strength: float, fisher_batches: int, fisher_decay: float) -> None:
        self.strength = strength
        self.fisher_batches = fisher_batches
        self.fisher_decay = fisher_decay
        self.anchor: dict[str, torch.Tensor] = {}
        self.fisher: dict[str, torch.Tensor] = {}
        self.estimates = 0

    def begin_increment(self, model: torch.nn.Module) -> None:
        self.anchor = snapshot(model)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
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
            return _zero(model)
        return 0.5 * self.strength * total

    def end_increment(
        self, model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]
    ) -> None:
        new = estimate_fisher(model, itertools.islice(batches, self.fisher_batches))
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

    def state_dict(self) -> dict:
        return {
            "method": self.name,
            "estimates": self.estimates,
            "anchor": dict(self.anchor),
            "fisher": dict(self.fisher),
        }

    def load_state_dict(self, state: dict) -> None:
        self.estimates = int(state.get("estimates", 0))
        self.anchor = dict(state.get("anchor", {}))
        self.fisher = dict(state.get("fisher", {}))

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_tensors(directory / "ewc_fisher.safetensors", self.fisher)
        write_tensors(directory / "ewc_anchor.safetensors", self.anchor)
        write_json(
            directory / "ewc.json",
            {
                "method": self.name,
                "estimates": self.estimates,
                "strength": self.strength,
                "fisher_decay": self.fisher_decay,
                "fisher_batches": self.fisher_batches,
            },
        )

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        meta = read_json(directory / "ewc.json")
        self.estimates = int(meta.get("estimates", 0))
        self.fisher = read_tensors(directory / "ewc_fisher.safetensors")
        self.anchor = read_tensors(directory / "ewc_anchor.safetensors")


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


def _zero(model: torch.nn.Module) -> torch.Tensor:
    param = next(model.parameters(), None)
    return torch.zeros((), device=param.device if param is not None else "cpu")
