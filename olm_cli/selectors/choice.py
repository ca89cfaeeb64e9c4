"""How a scored pool becomes a batch: the three modes, loss weights and seeded randomness.

Shared by every score-based selector so that ``topk``/``sample``/``threshold`` and weighting
mean the same thing whichever score is being ranked.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from olm_cli.selectors.config import SelectorConfig
from olm_cli.selectors.contract import Selection
from olm_cli.selectors.scoring import PoolScores


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator: its state is a byte tensor, so checkpoints stay pickle-free."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def gumbel_keys(logits: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """``logits`` + Gumbel noise: the top-k of these keys is an exact draw of k items without
    replacement from softmax(logits) (the Gumbel-top-k trick), in one vectorised step."""
    uniform = torch.rand(len(logits), generator=generator, dtype=torch.float64).numpy()
    uniform = np.clip(uniform, 1e-300, 1.0 - 1e-16)
    return logits - np.log(-np.log(uniform))


def rank_desc(values: np.ndarray) -> np.ndarray:
    """Indices by descending value, ties broken by position, so selection is deterministic."""
    return np.lexsort((np.arange(len(values)), -values))


def choose_indices(
    scores: np.ndarray,
    k: int,
    mode: str,
    temperature: float,
    threshold: float | None,
    generator: torch.Generator,
) -> list[int]:
    """Pick at most ``k`` candidate indices from ``scores`` according to ``mode``."""
    k = max(0, min(k, len(scores)))
    if k == 0:
        return []
    scores = np.asarray(scores, dtype=np.float64)
    if mode == "topk":
        return [int(i) for i in rank_desc(scores)[:k]]
    if mode == "sample":
        keys = gumbel_keys(scores / temperature, generator)
        return [int(i) for i in rank_desc(keys)[:k]]
    if mode == "threshold":
        if threshold is None:
            raise ValueError("threshold mode needs a threshold")
        order = [int(i) for i in rank_desc(scores) if scores[i] >= threshold]
        return order[:k]
    raise ValueError(f"unknown selection mode {mode!r}")


def normalised_weights(scores: np.ndarray, indices: list[int]) -> np.ndarray:
    """Loss weights proportional to the selected scores, mean exactly 1.

    Scores are clamped at 0 (a weight cannot be negative); an all-zero batch gets uniform
    weights rather than a division by zero.
    """
    chosen = np.clip(np.asarray(scores, dtype=np.float64)[indices], 0.0, None)
    total = chosen.sum()
    if len(chosen) == 0:
        return np.zeros(0, dtype=np.float32)
    if total <= 0.0 or not np.isfinite(total):
        return np.ones(len(chosen), dtype=np.float32)
    return (chosen * (len(chosen) / total)).astype(np.float32)


class ScoreChooser:
    """Mode, temperature, threshold, weighting and the generator, bundled for a selector."""

    def __init__(self, cfg: SelectorConfig, seed: int) -> None:
        self.mode = cfg.mode
        self.temperature = cfg.temperature
        self.threshold = cfg.threshold
        self.weighting = cfg.weighting
        self.generator = seeded_generator(seed)

    def selection(self, scores: np.ndarray, k: int, pool: PoolScores | None) -> Selection:
        """Rank ``scores`` and package the outcome for the engine."""
        indices = choose_indices(
            scores, k, self.mode, self.temperature, self.threshold, self.generator
        )
        return self.package(scores, indices, pool)

    def package(self, scores: np.ndarray, indices: list[int], pool: PoolScores | None) -> Selection:
        """Build a :class:`Selection` for already-chosen ``indices``."""
        weights = normalised_weights(scores, indices) if self.weighting else None
        stats = pool.stats() if pool is not None else {}
        if indices:
            stats["selected_mean_score"] = float(np.asarray(scores)[indices].mean())
        return Selection(
            indices=indices,
            scores=np.asarray(scores, dtype=np.float32),
            weights=weights,
            unselected=len(scores) - len(indices),
            stats=stats,
            pool=pool,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
