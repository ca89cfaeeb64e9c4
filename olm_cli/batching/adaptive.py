"""``adaptive``: change the effective batch as training progresses.

Small batches make more updates per sample, which pays while the loss falls steadily; once
the loss plateaus or its step-to-step noise hides the trend, the gradient estimate is the
bottleneck and a larger batch is worth its cost (Smith et al. 2018, "Don't decay the learning
rate, increase the batch size"). In continual training a *rising* loss means the stream
shifted, so the batch shrinks again to adapt with more, smaller steps.

The ``noise_scale`` signal instead targets the simple gradient noise scale
B_noise = tr(Sigma) / |G|^2 (McCandlish et al. 2018), the batch size beyond which larger
batches stop paying. Because E|G_B|^2 = |G|^2 + tr(Sigma) / B, regressing the observed
squared grad norms on 1/B across the sizes this policy has used gives |G|^2 (intercept) and
tr(Sigma) (slope) without any extra backward pass.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from olm_cli.batching.config import BatchConfig
from olm_cli.batching.contract import BatchPlan, StepStats
from olm_cli.batching.micro import MicroBatchLimit, check_policy_name, clamp
from olm_cli.strategy import StrategyContext


def loss_trend_direction(
    losses: list[float], plateau_tolerance: float, rise_tolerance: float
) -> int:
    """+1 to grow (plateau or noise hides progress), -1 to shrink (loss rising), 0 to keep.

    The trend is a least-squares line through the window. Its total change counts only when
    it exceeds two standard errors (from the residual noise) and a tolerance relative to the
    mean loss; a window whose improvement is not significant means the steps are too noisy
    or too late in a plateau to be worth taking at this size.
    """
    y = np.asarray(losses, dtype=np.float64)
    t = np.arange(len(y), dtype=np.float64)
    slope, intercept = np.polyfit(t, y, 1)
    change = slope * (len(y) - 1)
    residual = y - (slope * t + intercept)
    dof = max(len(y) - 2, 1)
    sigma = math.sqrt(float(residual @ residual) / dof)
    standard_error = (len(y) - 1) * sigma / math.sqrt(float(((t - t.mean()) ** 2).sum()))
    noise = 2.0 * standard_error
    scale = max(abs(float(y.mean())), 1e-8)
    if change > rise_tolerance * scale and change > noise:
        return -1
    if -change < max(plateau_tolerance * scale, noise):
        return 1
    return 0


def noise_scale_estimate(history: list[tuple[int, float]]) -> float | None:
    """B_noise from (batch size, grad norm) pairs; None until two distinct sizes are seen.

    Returns ``inf`` when the fitted |G|^2 is not positive (noise dominates at every size seen)
    and 0 when larger batches did not reduce the grad norm (no measurable noise).
    """
    sizes = np.array([b for b, _ in history], dtype=np.float64)
    if len(np.unique(sizes)) < 2:
        return None
    x = 1.0 / sizes
    y = np.array([g * g for _, g in history], dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    if slope <= 0.0:
        return 0.0
    if intercept <= 0.0:
        return math.inf
    return float(slope / intercept)


class AdaptiveBatch:
    """Decides every ``window`` steps; moves by at most ``grow_factor`` per decision."""

    name = "adaptive"

    def __init__(self, config: BatchConfig, context: StrategyContext) -> None:
        self.cfg = config
        self.size = config.size
        self.limit = MicroBatchLimit(config.micro_batch)
        self.losses: list[float] = []  # since the last size change
        self.history: list[tuple[int, float]] = []  # (samples, grad norm), across sizes

    def plan(self) -> BatchPlan:
        return BatchPlan(self.size, self.limit.fit(self.size))

    def observe(self, stats: StepStats) -> None:
        if not (math.isfinite(stats.loss) and math.isfinite(stats.grad_norm)):
            return  # a diverged step says nothing about the right batch size
        self.losses.append(stats.loss)
        if stats.grad_norm > 0.0 and stats.samples > 0:
            self.history.append((stats.samples, stats.grad_norm))
            del self.history[: -4 * self.cfg.window]
        if len(self.losses) >= self.cfg.window:
            self._decide()
            self.losses = []

    def _decide(self) -> None:
        cfg = self.cfg
        low = max(cfg.min_size, self.size / cfg.grow_factor)
        high = min(cfg.max_size, self.size * cfg.grow_factor)
        target = None
        if cfg.signal == "noise_scale":
            target = noise_scale_estimate(self.history)
        if target is None:
            direction = loss_trend_direction(self.losses, cfg.plateau_tolerance, cfg.rise_tolerance)
            target = {1: high, -1: low, 0: float(self.size)}[direction]
        self.size = clamp(min(high, max(low, target)), cfg.min_size, cfg.max_size)

    def on_oom(self) -> bool:
        return self.limit.halve(self.plan().micro_batch)

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **self.limit.state_dict(),
            "size": self.size,
            "losses": list(self.losses),
            "history": [[b, g] for b, g in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_policy_name(self.name, state)
        self.limit.load_state_dict(state)
        self.size = int(state["size"])
        self.losses = [float(v) for v in state["losses"]]
        self.history = [(int(b), float(g)) for b, g in state["history"]]
