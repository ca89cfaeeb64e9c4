"""Dark Experience Replay style distillation from logits stored with replay samples."""

from __future__ import annotations

import numpy as np
import torch

from olm_cli.distill.base import StoredLogits
from olm_cli.distill.kd import next_token_mask, topk_kl, topk_logits


class StoredLogitsDistiller:
    """Matches the student to the top-k logits recorded when a sample entered the replay buffer.

    We use a KL over the stored top-k support (not DER++'s MSE on raw logits): it is invariant
    to a per-position shift of the logits, shares alpha/temperature semantics with the other
    distillers, and keeps the cost at k values per position instead of the whole vocabulary.
    No teacher model is needed at training time.
    """

    name = "stored_logits"

    def __init__(self, temperature: float, topk: int) -> None:
        self.temperature = temperature
        self.topk = topk

    def begin_increment(self, model: torch.nn.Module) -> None:
        pass

    def capture(
        self, logits: torch.Tensor, attention_mask: torch.Tensor
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-k entries to store with each row of a batch about to enter the replay buffer.

        ``logits`` [B, L, V] from the model that is current at insertion time; each row is cut
        to its real length (``attention_mask``) so the buffer never stores padding.
        """
        lengths = attention_mask.sum(dim=1).tolist()
        return [topk_logits(logits[row, : int(n)], self.topk) for row, n in enumerate(lengths)]

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

    def state_dict(self) -> dict:
        return {"method": self.name, "topk": self.topk}

    def load_state_dict(self, state: dict) -> None:
        pass
