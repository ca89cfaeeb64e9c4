"""The distillation arithmetic shared by every distiller.

Conventions (docs/forgetting.md has the formulas):

* Positions: logits at position t predict token t+1, so a position takes part exactly when its
  next-token label is not ``IGNORE_INDEX`` -- the same positions the cross-entropy averages over.
  That keeps ``alpha*ce + (1-alpha)*kd`` a mix of two per-token means of comparable size.
* KL direction: KL(teacher || student) = sum_v p_T(v) (log p_T(v) - log p_S(v)), the forward KL of
  Hinton et al., which makes the student cover every token the teacher finds plausible.
* Scale: multiplied by T^2 so the gradient magnitude does not shrink as T grows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from olm_cli.errors import RecipeError
from olm_cli.samples import IGNORE_INDEX


def next_token_mask(batch: dict[str, torch.Tensor], length: int) -> torch.Tensor:
    """Bool [B, length-1]: positions whose prediction is scored (next label is real)."""
    labels = batch.get("labels")
    if labels is not None:
        return labels[:, 1:length] != IGNORE_INDEX
    attention = batch["attention_mask"]
    return attention[:, 1:length].bool()


def kd_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """T^2 * mean over masked positions of KL(softmax(t/T) || softmax(s/T)).

    ``student_logits``/``teacher_logits`` are [B, P, V] (already shifted), ``mask`` is [B, P].
    Computed in float32 because half-precision log-softmax loses the small probabilities that
    carry the teacher's "dark knowledge".
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise RecipeError(
            f"teacher vocabulary ({teacher_logits.shape[-1]}) does not match the student's "
            f"({student_logits.shape[-1]}); distillation needs the same tokenizer"
        )
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (t.exp() * (t - s)).sum(dim=-1)
    return _masked_mean(per_position, mask) * temperature**2


def topk_kl(
    student_logits: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """T^2 * mean KL between stored top-k logits and the student restricted to the same k ids.

    Both distributions are softmaxes over the k stored vocabulary ids only: the stored values
    give p_T, the student's logits gathered at those ids give p_S (its log-softmax renormalised
    over the k ids). So the term is zero whenever the student's logits at those ids equal the
    stored ones up to a per-position constant, and the rest of the vocabulary is left free.
    """
    gathered = student_logits.float().gather(-1, indices.long())
    s = F.log_softmax(gathered / temperature, dim=-1)
    t = F.log_softmax(values.float() / temperature, dim=-1)
    per_position = (t.exp() * (t - s)).sum(dim=-1)
    return _masked_mean(per_position, mask) * temperature**2


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(per_position.dtype)
    # clamp: a batch with no scored position contributes 0, not NaN.
    return (per_position * weights).sum() / weights.sum().clamp(min=1.0)


def topk_logits(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k logits of one sequence, ready to store next to a replay sample.

    ``logits`` is [L, V] (one row of the model output, unshifted: position t predicts t+1).
    Returns (values float16 [L, k], indices int32 [L, k]), sorted by descending logit. float16
    and int32 halve the footprint; the values are raw (untempered) logits so the temperature
    can change between storing and replaying. ``k`` is clipped to the vocabulary size.
    """
    if logits.dim() != 2:
        raise ValueError(
            f"topk_logits expects one sequence [L, V], got shape {tuple(logits.shape)}"
        )
    k = min(int(k), int(logits.shape[-1]))
    values, indices = torch.topk(logits.detach().float(), k, dim=-1)
    return (
        values.cpu().numpy().astype(np.float16),
        indices.cpu().numpy().astype(np.int32),
    )


def capture_topk(logits: torch.Tensor, lengths: list[int], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Top-k logits to store with each row of a batch entering the replay buffer.

    The one place replay samples get their stored logits (warm-start seeding and every training
    step): ``logits`` [B, L, V] from the model current at insertion time, each row cut to its
    real length so the buffer never stores padding.
    """
    return [topk_logits(logits[row, :n].detach().float(), k) for row, n in enumerate(lengths)]


def collate_stored(
    entries: list[tuple[np.ndarray, np.ndarray] | None], width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-sample stored logits into the (values, indices, row_mask) the distiller takes.

    ``entries[i]`` is what :func:`topk_logits` returned for row i, or None when that row has no
    stored logits (fresh data, or a replay sample inserted before stored_logits was enabled).
    Rows are cut or zero-padded to ``width`` (the batch's padded length); padded positions are
    masked by the labels anyway. All stored rows must share one k.
    """
    ks = {int(entry[0].shape[1]) for entry in entries if entry is not None}
    if len(ks) > 1:
        raise ValueError(f"stored logits in one batch have different k: {sorted(ks)}")
    k = ks.pop() if ks else 1
    rows = len(entries)
    values = torch.zeros((rows, width, k), dtype=torch.float32)
    indices = torch.zeros((rows, width, k), dtype=torch.long)
    row_mask = torch.zeros(rows, dtype=torch.bool)
    for i, entry in enumerate(entries):
        if entry is None:
            continue
        v, idx = entry
        n = min(width, int(v.shape[0]))
        values[i, :n] = torch.from_numpy(np.asarray(v[:n], dtype=np.float32))
        indices[i, :n] = torch.from_numpy(np.asarray(idx[:n], dtype=np.int64))
        row_mask[i] = True
    return values, indices, row_mask


def vocab_size(model: torch.nn.Module) -> int:
    """The size of the model's output layer (what its logits span), not just config.vocab_size,
    which can lag behind a resized embedding."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if size is None:
        raise RecipeError(
            "cannot tell the model's vocabulary size (no output embeddings, no config)"
        )
    return int(size)


def check_same_vocab(teacher: torch.nn.Module, student: torch.nn.Module, teacher_name: str) -> None:
    """Distillation compares distributions token id by token id, so the vocabularies must agree."""
    t, s = vocab_size(teacher), vocab_size(student)
    if t != s:
        raise RecipeError(
            f"teacher {teacher_name!r} has a vocabulary of {t} tokens but the student has {s}; "
            "distillation needs the same tokenizer"
        )


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The frozen teacher's logits for the batch, on the teacher's own device, without a graph."""
    device = next(teacher.parameters()).device
    out = teacher(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
    )
    return out.logits


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (no dropout) and no gradients: a teacher is a fixed target, never trained."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model
