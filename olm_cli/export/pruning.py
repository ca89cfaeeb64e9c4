"""Magnitude pruning for ``olm export --prune``: zero the smallest weights of every linear layer.

The oldest compression there is (Han et al., arXiv 1506.02626): within a group of weights, the
ones of smallest absolute value contribute least, so they are set to zero. Two groupings:

* ``unstructured``: each matrix loses its ``amount`` smallest-magnitude entries, wherever they are;
* ``row``: each output row (one neuron's input weights) loses its ``amount`` smallest entries, so
  every neuron keeps the same number of inputs. Comparing weights within a row rather than
  across the matrix is what Wanda (arXiv 2306.11695) found to matter for LLMs.

Only the 2-D weights inside the transformer blocks are pruned (attention and MLP projections):
embeddings, the output head and norm gains are few parameters and very sensitive. The file
written stays dense (zeros take as many bytes as any other value); the point is a model a
sparse runtime can exploit, measured first on held-out loss, which ``olm export`` reports
before and after. Deterministic: ties are broken by position, so the same input gives the
same zeros, in the exporter and in the model whose loss is measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

PRUNE_SCOPES = ("unstructured", "row")


def is_prunable(name: str, tensor: torch.Tensor) -> bool:
    """A linear layer's weight matrix inside a decoder block (``model.layers.N....weight``)."""
    return tensor.ndim == 2 and tensor.is_floating_point() and ".layers." in name and name.endswith(".weight")


def magnitude_prune(weight: torch.Tensor, amount: float, scope: str) -> torch.Tensor:
    """A copy of ``weight`` with the fraction ``amount`` of smallest-|w| entries set to zero.

    ``amount`` is rounded to a whole number of entries per matrix (``unstructured``) or per row
    (``row``); exactly that many are zeroed, ties broken by position.
    """
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"prune scope must be one of {PRUNE_SCOPES}, got {scope!r}")
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"prune amount must be in [0, 1), got {amount}")
    magnitude = weight.detach().float().abs()
    keep = torch.ones_like(magnitude, dtype=torch.bool)
    if scope == "unstructured":
        count = round(amount * magnitude.numel())
        if count:
            order = torch.argsort(magnitude.flatten(), stable=True)
            keep.view(-1)[order[:count]] = False
    else:
        count = round(amount * magnitude.shape[1])
        if count:
            order = torch.argsort(magnitude, dim=1, stable=True)
            keep.scatter_(1, order[:, :count], False)
    return weight.detach().masked_fill(~keep, 0)


@dataclass
class PruneReport:
    """What pruning did: how many weights it zeroed, of how many it could have touched."""

    amount: float
    scope: str
    tensors: int = 0
    zeroed: int = 0
    prunable: int = 0
    parameters: int = 0
    names: list[str] = field(default_factory=list)

    def add(self, name: str, before: torch.Tensor, after: torch.Tensor | None) -> None:
        self.parameters += before.numel()
        if after is None:
            return
        self.tensors += 1
        self.prunable += before.numel()
        self.zeroed += int((after == 0).sum()) - int((before == 0).sum())
        self.names.append(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "amount": self.amount,
            "scope": self.scope,
            "tensors": self.tensors,
            "zeroed": self.zeroed,
            "sparsity_of_pruned_tensors": self.zeroed / self.prunable if self.prunable else 0.0,
            "sparsity_of_model": self.zeroed / self.parameters if self.parameters else 0.0,
        }


class Pruner:
    """Applies one pruning setting to tensors by name, and counts what it did."""

    def __init__(self, amount: float, scope: str) -> None:
        if scope not in PRUNE_SCOPES:
            raise ValueError(f"prune scope must be one of {PRUNE_SCOPES}, got {scope!r}")
        self.amount = amount
        self.scope = scope
        self.report = PruneReport(amount, scope)

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        pruned = magnitude_prune(tensor, self.amount, self.scope) if is_prunable(name, tensor) else None
        self.report.add(name, tensor, pruned)
        return pruned if pruned is not None else tensor

    def prune_model(self, model: torch.nn.Module) -> None:
        """Prune ``model``'s parameters in place (for measuring the loss the pruning costs)."""
        with torch.no_grad():
            for name, param in model.named_parameters():
                pruned = self(name, param)
                if pruned is not param:
                    param.copy_(pruned)
