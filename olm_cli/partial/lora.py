"""LoRA as the model-extension option: adapters train, the base weights stay frozen.

Checkpoints and releases hold plain transformers models with the adapters merged in, so
anything that reads them (``from_pretrained``, ``olm merge``, serving) never needs peft.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from olm_cli.errors import RecipeError
from olm_cli.partial.config import LoraConfig

ADAPTER_MARKER = "lora_"
"""Substring of every adapter parameter's name (``lora_A``, ``lora_B``, ``lora_embedding_A`` ...)."""
BASE_MARKER = ".base_layer."
"""Substring of the parameters of a layer that carries adapters (its frozen base weights)."""


def is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def wrap_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """Wrap ``model`` with peft LoRA adapters; only the adapters are trainable afterwards."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as exc:
        raise RecipeError(
            f"train.lora.target_modules {cfg.target_modules} cannot be wrapped: {exc}"
        ) from exc


def model_for_save(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model with the adapters merged in, for ``save_pretrained``.

    Merges a deep copy, so the training model keeps its separate adapters (and its optimiser
    state stays valid); costs one extra model in memory while saving. Without LoRA the model
    itself is returned.
    """
    if not is_peft(model):
        return model
    peft_model: Any = copy.deepcopy(model)  # a PeftModel: merge_and_unload is its own method
    merged: torch.nn.Module = peft_model.merge_and_unload()
    for param in merged.parameters():
        param.requires_grad_(False)
    return merged


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters a merged checkpoint cannot give back: the adapters and the base weights
    of the layers that carry them (the checkpoint only holds their sum). Empty without LoRA."""
    if not is_peft(model):
        return {}
    return {name: param for name, param in model.named_parameters()
            if ADAPTER_MARKER in name or BASE_MARKER in name}
