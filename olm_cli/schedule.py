"""Learning-rate multipliers: the per-increment schedules, WSD's trunk and its cooldown.

``cosine``/``linear``/``constant`` re-warm and re-decay inside every increment. ``wsd``
(warm-up, stable, decay) warms up once per run directory and then holds the peak rate through
every increment: the trunk never decays, so no increment re-warms a model that had cooled (the
re-warming that continual pre-training finds harmful, arXiv 2503.02844). Each increment's
release comes from a short branch off the trunk, the cooldown, whose rate falls from the peak
to ``lr * min_lr_ratio`` (arXiv 2405.18392 for the shapes); the trunk continues from before it.
Pure functions of their step counters, so a resumed run computes the very same rates.
"""

from __future__ import annotations

import math

COOLDOWN_SHAPES = ("linear", "cosine", "sqrt")


def wsd_multiplier(global_step: int, *, warmup: int) -> float:
    """The trunk's rate under ``wsd``: a linear warm-up over the run's first ``warmup`` steps, then 1.

    ``global_step`` counts optimizer steps since the run directory began, so the warm-up
    happens once, in the first increment, and never again.
    """
    if warmup > 0 and global_step < warmup:
        return (global_step + 1) / warmup
    return 1.0


def cooldown_steps(increment_steps: int, fraction: float) -> int:
    """Steps of an increment's cooldown branch: ``fraction`` of the increment's trunk steps, at least 1."""
    return max(1, round(increment_steps * fraction))


def cooldown_multiplier(step: int, steps: int, *, shape: str, min_ratio: float) -> float:
    """The rate of cooldown step ``step`` (0-based) of ``steps``: from the peak down to ``min_ratio``.

    With progress ``p = (step + 1) / steps`` (so the last step trains at the floor):
    ``linear``: ``1 - p``; ``cosine``: ``(1 + cos(pi p)) / 2``; ``sqrt``: ``1 - sqrt(p)``
    (the "1-sqrt" shape, arXiv 2405.18392), each scaled into ``[min_ratio, 1]``.
    """
    if shape not in COOLDOWN_SHAPES:
        raise ValueError(f"unknown cooldown shape {shape!r}; expected one of {', '.join(COOLDOWN_SHAPES)}")
    progress = min(1.0, (step + 1) / max(1, steps))
    if shape == "linear":
        fall = 1.0 - progress
    elif shape == "cosine":
        fall = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        fall = 1.0 - math.sqrt(progress)
    return min_ratio + (1.0 - min_ratio) * fall
