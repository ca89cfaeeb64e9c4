"""The unit of training data that flows between the stream, selectors, replay and the engine.

A :class:`Block` is one packed sequence of at most ``block_size`` token ids plus where it came
from. A block may hold the tail of one shard and the head of the next (of the same domain: a
block never mixes domains); ``spans`` says how many of its tokens came from which shard.
Blocks are shorter than ``block_size`` only at the end of an increment's data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: planning an increment must not load it
    import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Block:
    """One training sample: token ids (int32) and their provenance.

    ``shard`` is the shard of the first token (what replay and selectors report); ``spans``,
    when set, is ``((shard, n_tokens), ...)`` in token order, for the ledger's per-shard counts.
    """

    tokens: np.ndarray
    shard: str
    domain: str
    spans: tuple[tuple[str, int], ...] | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def token_spans(self) -> tuple[tuple[str, int], ...]:
        """Where the tokens came from: ``spans``, or every token from ``shard``."""
        return self.spans if self.spans is not None else ((self.shard, len(self)),)


def collate(token_lists: Sequence[np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token arrays into a batch; padded positions are masked out of the loss."""
    import torch

    if not token_lists:
        raise ValueError("cannot collate an empty batch")
    width = max(int(t.shape[0]) for t in token_lists)
    input_ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        n = int(tokens.shape[0])
        input_ids[row, :n] = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        attention_mask[row, :n] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts (the next token's), ``IGNORE_INDEX`` at the last one.

    Shift the labels, not the logits: slicing logits[:, :-1] and flattening it copies the whole
    [B, T, V] tensor (and its gradient) every step; padded labels keep the logits a view.
    """
    import torch

    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]


def row_means(row_sums: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
    """Each row's summed token loss over its number of predicted tokens (a row with none: 0)."""
    return row_sums / (shift_labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy per row, and the number of predicted tokens per row.

    Shifts internally (logits at position t predict labels at t+1), ignores ``IGNORE_INDEX``.
    """
    import torch

    shift = shifted_labels(labels)
    token_loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        shift.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift.shape)
    return row_means(token_loss.sum(dim=1), shift), (shift != IGNORE_INDEX).sum(dim=1)
