"""One gradient-free forward pass over a candidate pool, yielding every score a selector needs.

All selectors share this pass so that a pool is run through the model exactly once per step,
and the engine can reuse the numbers (e.g. as replay priorities) instead of recomputing them.

Why per-row maths: the model's logits for a micro-batch are ``B x T x V``; an fp32 copy of
that for a 32k vocabulary and 2k context is gigabytes, so the fp32 work is done one row at a
time (``T x V``) while the forward itself stays batched.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from olm_cli.distributed.sharding import is_sharded
from olm_cli.samples import Block, collate


@dataclass
class PoolScores:
    """Per-candidate measurements from the scoring pass, aligned with the pool's order.

    ``entropy``/``loss`` are in nats per predicted token, ``gradnorm`` is the closed-form
    LM-head gradient-norm bound, ``embeddings`` are mean-pooled last hidden states (not
    normalised), ``tokens`` the number of predicted tokens per candidate.
    """

    entropy: np.ndarray
    loss: np.ndarray
    gradnorm: np.ndarray
    embeddings: np.ndarray
    tokens: np.ndarray

    def __len__(self) -> int:
        return int(self.loss.shape[0])

    def stats(self) -> dict[str, float]:
        """Pool means, for logging and for the uncertainty batch policy."""
        if len(self) == 0:
            return {}
        return {
            "pool_mean_entropy": float(self.entropy.mean()),
            "pool_mean_loss": float(self.loss.mean()),
            "pool_mean_gradnorm": float(self.gradnorm.mean()),
        }


def mean_token_entropy(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the next-token distribution per row, over predicting positions.

    A position predicts when both it and the next position are real tokens -- the same
    positions :func:`olm_cli.samples.per_sample_loss` scores, so entropy and loss of a row
    average over the same tokens. Rows with no predicting position get 0.
    """
    mask = (attention_mask[:, :-1] != 0) & (attention_mask[:, 1:] != 0)
    logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    token_entropy = -(logp.exp() * logp).sum(dim=-1)
    counts = mask.sum(dim=1)
    return (token_entropy * mask).sum(dim=1) / counts.clamp(min=1)


def _row_scores(logits: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Entropy, loss and gradnorm bound of one row's ``n`` predicting positions.

    For position t with hidden state h_t, LM-head weight W and p_t = softmax(W h_t), the
    gradient of CE(p_t, y_t) w.r.t. W is (p_t - e_{y_t}) h_t^T, whose Frobenius norm is
    ||p_t - e_{y_t}|| * ||h_t||. The sample's loss is the mean over its T positions, so by
    the triangle inequality ||dL/dW|| <= (1/T) sum_t ||p_t - e_{y_t}|| ||h_t|| (equality when
    T == 1). No one-hot vector and no backward pass are needed.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    probs = logp.exp()
    entropy = -(probs * logp).sum(dim=-1)
    logp_target = logp.gather(-1, targets[:, None]).squeeze(-1)
    # ||p - e_y||^2 = sum_{j != y} p_j^2 + (1 - p_y)^2, written so that a confident model
    # (p_y close to 1) does not lose the residual to fp32 cancellation.
    others = probs.scatter(-1, targets[:, None], 0.0)
    residual = ((others * others).sum(dim=-1) + torch.expm1(logp_target) ** 2).sqrt()
    gradnorm = residual * hidden.float().norm(dim=-1)
    return torch.stack([entropy.mean(), -logp_target.mean(), gradnorm.mean()])


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def score_pool(
    model: torch.nn.Module,
    blocks: Sequence[Block],
    pad_id: int,
    micro_batch: int,
    max_tokens: int | None = None,
) -> PoolScores:
    """Run the pool through ``model`` once, without gradients, and measure every candidate.

    With ``max_tokens`` each candidate is scored on its first ``max_tokens`` tokens only: the
    forward costs about ``max_tokens / block_size`` of a full one, and a prefix's loss, entropy
    and embedding estimate the block's (documents are packed, so a prefix is ordinary text).

    The model's train/eval mode is restored afterwards, so dropout-free scoring does not leak
    into training. On CUDA the forward runs under bf16 autocast; the maths on its outputs is
    fp32 either way.

    Under several processes the pool's micro-batches are dealt out round-robin (rank ``r``
    scores micro-batches ``r, r+N, ...``) and the scores are all-gathered, so every rank holds
    the whole pool's scores and makes the same selection at 1/N of the scoring work. Each
    micro-batch holds the same candidates as with one process, so the scores are the same.
    """
    n = len(blocks)
    chunks = [list(range(start, min(start + micro_batch, n))) for start in range(0, n, micro_batch)]
    rank, world = rank_and_world()
    mine = chunks[rank::world]
    # A sharded forward is a collective: every rank runs as many forwards (a spare one repeats chunk 0).
    spare = len(chunks[0::world]) - len(mine) if chunks and world > 1 and is_sharded(model) else 0
    device = model_device(model)
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else nullcontext()
    )
    was_training = model.training
    model.eval()
    try:
        # FSDP2 reuses its all-gather buffers in the training step, which inference tensors would poison.
        no_grad = torch.no_grad() if is_sharded(model) else torch.inference_mode()
        with no_grad, autocast:
            scored = [(chunk, _score_chunk(model, [blocks[i] for i in chunk], pad_id, max_tokens, device))
                      for chunk in mine]
            for _ in range(spare):
                _score_chunk(model, [blocks[i] for i in chunks[0]], pad_id, max_tokens, device)
    finally:
        model.train(was_training)
    if world > 1:
        scored = gather_scores(scored)
    entropy = np.zeros(n, dtype=np.float32)
    loss = np.zeros(n, dtype=np.float32)
    gradnorm = np.zeros(n, dtype=np.float32)
    tokens = np.zeros(n, dtype=np.int64)
    embeddings: np.ndarray | None = None
    for chunk, (c_entropy, c_loss, c_gradnorm, c_embeddings, c_tokens) in scored:
        if embeddings is None:
            embeddings = np.zeros((n, c_embeddings.shape[-1]), dtype=np.float32)
        entropy[chunk], loss[chunk], gradnorm[chunk] = c_entropy, c_loss, c_gradnorm
        embeddings[chunk], tokens[chunk] = c_embeddings, c_tokens
    if embeddings is None:
        embeddings = np.zeros((0, 0), dtype=np.float32)
    return PoolScores(entropy, loss, gradnorm, embeddings, tokens)


ChunkScores = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _score_chunk(model: torch.nn.Module, blocks: Sequence[Block], pad_id: int, max_tokens: int | None,
                 device: torch.device) -> ChunkScores:
    """Entropy, loss, gradnorm bound, pooled embedding and predicted tokens of one micro-batch."""
    n = len(blocks)
    entropy = np.zeros(n, dtype=np.float32)
    loss = np.zeros(n, dtype=np.float32)
    gradnorm = np.zeros(n, dtype=np.float32)
    tokens = np.zeros(n, dtype=np.int64)
    chunk = [b.tokens[:max_tokens] for b in blocks]
    batch = collate(chunk, pad_id)
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        use_cache=False,
    )
    last_hidden = out.hidden_states[-1]
    mask = attention_mask[..., None].to(last_hidden.dtype)
    pooled = (last_hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    embeddings = pooled.float().cpu().numpy()
    rows, measured = [], []
    for row, row_tokens in enumerate(chunk):
        length = int(row_tokens.shape[0])
        tokens[row] = max(length - 1, 0)
        if length < 2:
            continue  # nothing to predict: all scores stay 0
        rows.append(row)
        measured.append(
            _row_scores(
                out.logits[row, : length - 1],
                last_hidden[row, : length - 1],
                input_ids[row, 1:length],
            )
        )
    if rows:  # one device-to-host copy per micro-batch, not one per number
        values = torch.stack(measured).cpu().numpy()
        entropy[rows], loss[rows], gradnorm[rows] = values.T
    return entropy, loss, gradnorm, embeddings, tokens


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 without a process group)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_scores(scored: list[tuple[list[int], ChunkScores]]) -> list[tuple[list[int], ChunkScores]]:
    """Every rank's scored micro-batches, on every rank (an object all-gather: small arrays, in memory)."""
    import torch.distributed as dist

    everyone: list[list[tuple[list[int], ChunkScores]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, scored)
    return [item for part in everyone if part for item in part]
