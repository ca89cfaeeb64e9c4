"""Partial updates: which parameters an increment may change, and LoRA as the extension option.

The recipe section (``train``, :mod:`olm_cli.partial.config`) is imported eagerly; the rest
needs torch and is imported on first use, so that validating a recipe stays instant.
"""

from __future__ import annotations

from olm_cli.lazy import lazy_getattr
from olm_cli.partial.config import LoraConfig, TrainConfig

_LAZY = {
    "PartialUpdates": "olm_cli.partial.updates",
    "apply_trainable": "olm_cli.partial.trainable",
    "is_full_update": "olm_cli.partial.trainable",
    "plain_name": "olm_cli.partial.trainable",
    "is_peft": "olm_cli.partial.lora",
    "lora_parameters": "olm_cli.partial.lora",
    "model_for_save": "olm_cli.partial.lora",
    "wrap_lora": "olm_cli.partial.lora",
}
__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = [
    "LoraConfig",
    "PartialUpdates",
    "TrainConfig",
    "apply_trainable",
    "is_full_update",
    "is_peft",
    "lora_parameters",
    "model_for_save",
    "plain_name",
    "wrap_lora",
]
