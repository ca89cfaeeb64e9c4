"""Dark Experience Replay style distillation from logits stored with replay samples."""

from __future__ import annotations

from typing import Any

import torch

from olm_cli.distill.base import IncrementStart, StoredLogits
from olm_cli.distill.config import DistillConfig
from olm_cli.distill.kd import next_token_mask, topk_kl
from olm_cli.strategy import StrategyContext


class StoredLogitsDistiller:
    """Matches the student to the top-k logits recorded when a sample entered the replay buffer.

    We use a KL over the stored top-k support (not DER++'s MSE on raw logits): it is invariant
    to a per-position shift of the logits, shares alpha/temperature semantics with the other
    distillers, and keeps the cost at k values per position instead of the whole vocabulary.
    No teacher model is needed at training time.
    """

    name = "stored_logits"
    needs_stored_logits = True

    def __init__(self, config: DistillConfig, context: StrategyContext) -> None:
        self.temperature = config.temperature
        self.topk = config.topk

    def begin_increment(self, model: torch.nn.Module, start: IncrementStart) -> None:
        pass

    def loss(
        self,
        student_logits: torch.Tensor,
        batch: dict[str, torch.Tensor],
        stored: StoredLogits | None = None,
    ) -> torch.Tensor | None:
        if stored is None:
            return None
        values, indices, row_mask = stored
        device = student_logits.device
        row_mask = row_mask.to(device).bool()
        if not bool(row_mask.any()):
            return None
        length = min(student_logits.shape[1], values.shape[1])
        rows = row_mask.nonzero(as_tuple=True)[0]
        mask = next_token_mask(batch, length).to(device)[rows]
        return topk_kl(
            student_logits[rows, : length - 1],
            values.to(device)[rows, : length - 1],
            indices.to(device)[rows, : length - 1],
            mask,
            self.temperature,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.name, "topk": self.topk}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
