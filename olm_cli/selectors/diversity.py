"""``diversity``: a batch that spreads over embedding space (k-center greedy, cosine distance).

Near-duplicate text is common in streams (boilerplate, mirrored pages); training on two copies
in one step wastes half the compute. Farthest-point selection on mean-pooled last hidden
states picks each next sample as far as possible from everything already chosen, so
duplicates are only taken once every distinct region is represented.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from olm_cli.samples import Block
from olm_cli.selectors.choice import gumbel_keys, rank_desc
from olm_cli.selectors.contract import Selection
from olm_cli.selectors.pool_score import PoolScoreSelector
from olm_cli.selectors.scoring import score_pool


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), so dot products are cosines."""
    x = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0.0, norms, 1.0)


def k_center_greedy(
    embeddings: np.ndarray,
    k: int,
    mode: str,
    temperature: float,
    threshold: float | None,
    generator: torch.Generator,
) -> tuple[list[int], np.ndarray]:
    """Farthest-point selection; returns the picks and a novelty score per candidate.

    The first pick is the candidate farthest from the pool's mean direction (the most
    atypical); each later pick maximises its cosine distance to the nearest chosen one.
    ``sample`` draws each pick from softmax(distance / temperature) instead of the argmax;
    ``threshold`` stops once no candidate is at least ``threshold`` away from the batch (the
    first pick has no batch to be compared with, so a non-empty pool always yields one).
    A candidate's score is its distance to the batch when it was picked, or, if never
    picked, its distance to the final batch -- "how much new ground it covers".
    """
    x = unit_rows(embeddings)
    n = x.shape[0]
    k = max(0, min(k, n))
    mean = x.mean(axis=0)
    mean_norm = np.linalg.norm(mean)
    if mean_norm > 0.0:
        min_dist = np.clip(1.0 - x @ (mean / mean_norm), 0.0, 2.0)
    else:
        min_dist = np.ones(n)
    scores = np.zeros(n)
    chosen = np.zeros(n, dtype=bool)
    picks: list[int] = []
    for _ in range(k):
        candidates = np.flatnonzero(~chosen)
        values = min_dist[candidates]
        if mode == "threshold" and picks and threshold is not None and values.max() < threshold:
            break
        if mode == "sample":
            keys = gumbel_keys(values / temperature, generator)
        else:
            keys = values
        pick = int(candidates[rank_desc(keys)[0]])
        scores[pick] = min_dist[pick]
        chosen[pick] = True
        picks.append(pick)
        to_pick = np.clip(1.0 - x @ x[pick], 0.0, 2.0)
        # The distance to the mean only seeded the first pick; from then on it is the batch.
        min_dist = to_pick if len(picks) == 1 else np.minimum(min_dist, to_pick)
    scores[~chosen] = min_dist[~chosen]
    return picks, scores


class DiversitySelector(PoolScoreSelector):
    """k-center greedy over the scoring pass's pooled hidden states."""

    name = "diversity"
    score_field = "embeddings"

    def select(
        self, model: torch.nn.Module, blocks: Sequence[Block], k: int, pad_id: int
    ) -> Selection:
        pool = score_pool(model, blocks, pad_id, self.score_micro_batch, self.score_tokens)
        if len(pool) == 0:
            return self.chooser.package(np.zeros(0), [], pool)
        picks, scores = k_center_greedy(
            pool.embeddings,
            k,
            self.chooser.mode,
            self.chooser.temperature,
            self.chooser.threshold,
            self.chooser.generator,
        )
        return self.chooser.package(scores, picks, pool)
