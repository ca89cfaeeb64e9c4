"""``PartialUpdates``: the ``train`` section as a strategy part, built from ``(config, context)``."""

from __future__ import annotations

import logging
from typing import Any

import torch

from olm_cli.partial.config import TrainConfig
from olm_cli.partial.lora import lora_parameters, model_for_save, wrap_lora
from olm_cli.partial.trainable import apply_trainable
from olm_cli.strategy import StrategyContext

logger = logging.getLogger(__name__)


class PartialUpdates:
    """Decides which parameters an increment trains, and what a checkpoint of them holds.

    ``prepare`` wraps LoRA adapters (if configured) and freezes everything the trainable
    patterns leave out, unless the increment is a full update; ``for_save`` merges the adapters
    so checkpoints and releases are plain models.

    Only a LoRA run has state: a checkpoint holds the merged weights ``W + BA``, from which
    neither the adapters nor ``W`` can be recovered exactly, so a resumed increment would
    otherwise restart with fresh adapters (and optimiser moments that no longer fit them).
    Which parameters train is a pure function of the recipe and the increment number, which
    the trainer state already records, so nothing else is kept.
    """

    def __init__(self, config: TrainConfig, context: StrategyContext | None = None) -> None:
        self.config = config
        self.context = context or StrategyContext()
        self.increment = 0
        self.trainable: list[str] = []  # parameter names prepare() left trainable
        self._model: torch.nn.Module | None = None

    def prepare(self, model: torch.nn.Module, increment: int) -> torch.nn.Module:
        """The model to train in ``increment``: LoRA-wrapped if configured, the rest frozen.

        Call it before building the optimiser (frozen parameters should not be in it) and
        before the regulariser's ``begin_increment`` (its anchor covers trainable parameters).
        """
        if self.config.lora is not None:
            model = wrap_lora(model, self.config.lora)
        self.trainable = apply_trainable(model, self.config, increment)
        self.increment = increment
        self._model = model
        return model

    def for_save(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` as a plain transformers model for ``save_pretrained`` (adapters merged in)."""
        return model_for_save(model)

    def state_dict(self) -> dict[str, Any]:
        """The LoRA adapters and the un-merged base weights they sit on, with their increment."""
        parameters = lora_parameters(self._model) if self._model is not None else {}
        if not parameters:
            return {}
        return {"increment": self.increment, "lora": {name: p.detach() for name, p in parameters.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back the adapters of the increment being resumed.

        A new increment starts fresh adapters on the merged weights, so state from an earlier
        increment is ignored. When the adapters no longer fit (``train.lora`` changed while an
        increment was interrupted) the resumed increment starts fresh adapters too, with a
        warning, like the optimiser does when the trainable parameters change.
        """
        saved = state.get("lora") if state else None
        if not saved or self._model is None or int(state["increment"]) != self.increment:
            return
        own = lora_parameters(self._model)
        mismatched = sorted(set(own) ^ set(saved)) + sorted(
            name for name in set(own) & set(saved) if own[name].shape != saved[name].shape
        )
        if mismatched:
            logger.warning("LoRA adapters not restored (train.lora changed: %s differs); the resumed "
                           "increment starts fresh adapters", mismatched[0])
            return
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(saved[name])
