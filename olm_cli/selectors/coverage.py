"""``coverage``: a batch that covers the stream's distribution, not just its hardest corner.

Score-ranked selection concentrates on one region (the noisiest domain, the newest shard)
and lets the rest of the distribution be forgotten. Here an online spherical k-means over
pooled hidden states, whose centroids and masses persist across steps, tracks which regions
the stream visits and how often; each batch then gives every region slots in proportion to
its (decayed) mass, so rare regions keep a voice and frequent ones do not crowd them out.

A candidate's score is its *importance*: its cluster's share of the stream mass divided by
how many candidates from that cluster are in the pool -- how much of the distribution that
one candidate stands for. ``sample`` mode draws with probability proportional to
importance^(1/temperature), which covers clusters by mass in expectation; weighting by the
score up-weights samples from clusters the pool under-represents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from olm_cli.samples import Block
from olm_cli.selectors.choice import ScoreChooser, gumbel_keys, rank_desc
from olm_cli.selectors.config import SelectorConfig
from olm_cli.selectors.contract import Selection
from olm_cli.selectors.diversity import unit_rows
from olm_cli.selectors.scoring import score_pool
from olm_cli.selectors.state import check_state_name
from olm_cli.strategy import StrategyContext

_DISTINCT = 1e-6  # cosine distance below which two embeddings count as the same point


def apportion(shares: np.ndarray, room: np.ndarray, k: int) -> np.ndarray:
    """Split ``k`` slots over clusters proportionally to ``shares``, never beyond ``room``.

    Sainte-Lague highest averages: each slot goes to the cluster with the largest
    share / (2 * slots_so_far + 1). Unlike rounding it always sums to ``k``, and unlike
    D'Hondt it does not favour the biggest clusters.
    """
    quota = np.zeros(len(shares), dtype=np.int64)
    for _ in range(int(min(k, room.sum()))):
        priority = np.where(quota < room, shares / (2.0 * quota + 1.0), -np.inf)
        quota[int(np.argmax(priority))] += 1
    return quota


class CoverageSelector:
    """Online k-means whose centroids and masses live in ``state_dict``."""

    name = "coverage"
    needs_model = True

    def __init__(self, config: SelectorConfig, context: StrategyContext) -> None:
        self.pool_factor = config.pool_factor
        self.score_micro_batch = config.score_micro_batch
        self.score_tokens = config.score_tokens
        self.num_clusters = config.num_clusters
        self.decay = config.cluster_decay
        self.chooser = ScoreChooser(config, context.seed)
        self.centroids = np.zeros((0, 0))
        self.mass = np.zeros(0)

    # -- clustering ---------------------------------------------------------------------------

    def _seed_centroids(self, x: np.ndarray) -> None:
        """k-means++ seeding from the pool until ``num_clusters`` distinct centroids exist.

        D^2 sampling spreads the seeds over the pool; it also runs on later pools while fewer
        centroids than asked exist (a first pool smaller than ``num_clusters``).
        """
        if self.centroids.shape[0] and self.centroids.shape[1] != x.shape[1]:
            # A different model (hidden size) makes old centroids meaningless: start over.
            self.centroids, self.mass = np.zeros((0, 0)), np.zeros(0)
        if self.centroids.shape[0] == 0:
            first = int(torch.randint(len(x), (1,), generator=self.chooser.generator))
            self.centroids = x[first : first + 1].copy()
            self.mass = np.zeros(1)
        while self.centroids.shape[0] < self.num_clusters:
            dist = np.clip(1.0 - x @ self.centroids.T, 0.0, 2.0).min(axis=1)
            dist[dist < _DISTINCT] = 0.0
            if dist.sum() <= 0.0:
                return
            probs = torch.from_numpy(dist**2 / (dist**2).sum())
            pick = int(torch.multinomial(probs, 1, generator=self.chooser.generator))
            self.centroids = np.vstack([self.centroids, x[pick]])
            self.mass = np.append(self.mass, 0.0)

    def _observe(self, x: np.ndarray) -> np.ndarray:
        """Assign the pool to centroids and move them (mini-batch online k-means step)."""
        self._seed_centroids(x)
        assign = np.argmax(x @ self.centroids.T, axis=1)
        self.mass *= self.decay
        for cluster in np.unique(assign):
            members = x[assign == cluster]
            merged = self.mass[cluster] * self.centroids[cluster] + members.sum(axis=0)
            norm = np.linalg.norm(merged)
            if norm > 0.0:
                self.centroids[cluster] = merged / norm
            self.mass[cluster] += len(members)
        return assign

    # -- selection ----------------------------------------------------------------------------

    def select(
        self, model: torch.nn.Module, blocks: Sequence[Block], k: int, pad_id: int
    ) -> Selection:
        pool = score_pool(model, blocks, pad_id, self.score_micro_batch, self.score_tokens)
        if len(pool) == 0:
            return self.chooser.package(np.zeros(0), [], pool)
        x = unit_rows(pool.embeddings)
        assign = self._observe(x)
        shares = self.mass / self.mass.sum()
        in_pool = np.bincount(assign, minlength=len(shares))
        scores = shares[assign] / in_pool[assign]
        closeness = np.einsum("ij,ij->i", x, self.centroids[assign])
        k = max(0, min(k, len(blocks)))
        if self.chooser.mode == "sample":
            keys = gumbel_keys(np.log(scores) / self.chooser.temperature, self.chooser.generator)
            picks = [int(i) for i in rank_desc(keys)[:k]]
        else:
            eligible = np.ones(len(scores), dtype=bool)
            if self.chooser.mode == "threshold" and self.chooser.threshold is not None:
                eligible = scores >= self.chooser.threshold
            room = np.bincount(assign[eligible], minlength=len(shares))
            quota = apportion(shares, room, k)
            picks = []
            for cluster in np.flatnonzero(quota):
                members = np.flatnonzero(eligible & (assign == cluster))
                nearest_first = members[rank_desc(closeness[members])]
                picks.extend(int(i) for i in nearest_first[: quota[cluster]])
        selection = self.chooser.package(scores, picks, pool)
        selection.stats["coverage_clusters_in_pool"] = float(np.count_nonzero(in_pool))
        selection.stats["coverage_clusters_selected"] = float(len(set(assign[picks].tolist())))
        return selection

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **self.chooser.state_dict(),
            "centroids": torch.from_numpy(self.centroids.copy()),
            "mass": [float(m) for m in self.mass],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_name(self.name, state)
        self.chooser.load_state_dict(state)
        self.centroids = torch.as_tensor(state["centroids"], dtype=torch.float64).numpy().copy()
        self.mass = np.asarray(state["mass"], dtype=np.float64)
