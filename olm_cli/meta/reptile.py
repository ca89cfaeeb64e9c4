"""Reptile (Nichol, Achiam & Schulman, arXiv:1803.02999): first-order meta-learning on a stream.

Every ``inner_steps`` optimiser steps the trainable weights are pulled back part of the way to
where the window started::

    theta <- theta_0 + outer_lr * (theta_k - theta_0)

and ``theta`` becomes the next window's ``theta_0``. On a stream whose distribution drifts, each
window of k steps is one "task": the outer step keeps the direction the window agreed on and
damps what it overfitted to, which is what makes Reptile's solution adapt quickly to the next
window (the "learn to learn" of the paper). With ``outer_lr`` 1 it is plain training.
"""

from __future__ import annotations

from typing import Any

import torch

from olm_cli.meta.config import MetaConfig
from olm_cli.regularize.anchor import local, on_device, snapshot, trainable_parameters
from olm_cli.strategy import StrategyContext


class ReptileUpdate:
    """The outer step every k optimiser steps, counted per increment (docs/meta.md says why).

    The window restarts with every increment, so an increment's outer steps depend on its own
    data only, and the increment's last, shorter window is interpolated too: what the increment
    checkpoints and releases is always an outer iterate. AdamW's moments are left alone (they
    estimate the stream's gradient scale, which the outer step does not change); one extra copy
    of the trainable weights (the anchor) lives on their device and in every checkpoint, so a
    run killed mid-window resumes bit-identically.
    """

    name = "reptile"

    def __init__(self, config: MetaConfig, context: StrategyContext | None = None) -> None:
        self.inner_steps = config.inner_steps
        self.outer_lr = config.outer_lr
        self.anchor: dict[str, torch.Tensor] = {}
        self.steps_in_window = 0
        self.outer_steps = 0  # over the whole run, for the metrics and tests

    def begin_increment(self, model: torch.nn.Module) -> None:
        self._reanchor(model)

    def after_step(self, model: torch.nn.Module) -> bool:
        self.steps_in_window += 1
        if self.steps_in_window < self.inner_steps:
            return False
        self._outer_step(model)
        return True

    def end_increment(self, model: torch.nn.Module) -> None:
        if self.steps_in_window:
            self._outer_step(model)

    @torch.no_grad()
    def _outer_step(self, model: torch.nn.Module) -> None:
        for name, parameter in trainable_parameters(model).items():
            if name not in self.anchor:
                continue  # made trainable after the window began: nothing to interpolate from
            param = local(parameter)  # sharded (FSDP2): this rank's rows, the anchor holds the same rows
            anchor = on_device(self.anchor, name, param)
            # In float32, so low-precision weights lose nothing to the interpolation itself.
            param.copy_(anchor.float().lerp(param.float(), self.outer_lr))
        self.outer_steps += 1
        self._reanchor(model)

    @torch.no_grad()
    def _reanchor(self, model: torch.nn.Module) -> None:
        # New tensors, never an in-place copy: a checkpoint may still hold the previous anchor.
        self.anchor = snapshot(model)
        self.steps_in_window = 0

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.name, "steps_in_window": self.steps_in_window, "outer_steps": self.outer_steps,
                "anchor": dict(self.anchor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state or state.get("method") != self.name:
            return  # the run had no Reptile until now: begin_increment anchors (or the window starts here)
        self.steps_in_window = int(state.get("steps_in_window", 0))
        self.outer_steps = int(state.get("outer_steps", 0))
        self.anchor = dict(state.get("anchor", {}))
