"""Distillation: pull the student toward a teacher's output distribution (teacher, LwF, stored logits).

One file per distiller, a Protocol stating the contract (:mod:`olm_cli.distill.base`) and a
registry (:data:`DISTILLERS`) from the recipe's ``distill.method`` to the class. Weight-space
regularisers are :mod:`olm_cli.regularize`; partial updates and LoRA are :mod:`olm_cli.partial`.
"""

from __future__ import annotations

from olm_cli.distill.config import DistillConfig
from olm_cli.distill.registry import DISTILLERS
from olm_cli.lazy import lazy_getattr

# Everything else is imported on first use, so that reading a recipe (which only needs the
# config classes) does not import torch: `olm train` with nothing to do must return at once.
_LAZY = {
    "Distiller": "olm_cli.distill.base",
    "IncrementStart": "olm_cli.distill.base",
    "LwfDistiller": "olm_cli.distill.lwf",
    "NoDistiller": "olm_cli.distill.base",
    "StoredLogits": "olm_cli.distill.base",
    "StoredLogitsDistiller": "olm_cli.distill.stored_logits",
    "TeacherDistiller": "olm_cli.distill.teacher",
    "capture_topk": "olm_cli.distill.kd",
    "collate_stored": "olm_cli.distill.kd",
    "kd_kl": "olm_cli.distill.kd",
    "topk_kl": "olm_cli.distill.kd",
    "topk_logits": "olm_cli.distill.kd",
    "vocab_size": "olm_cli.distill.kd",
}
__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = [
    "DISTILLERS",
    "DistillConfig",
    "Distiller",
    "IncrementStart",
    "LwfDistiller",
    "NoDistiller",
    "StoredLogits",
    "StoredLogitsDistiller",
    "TeacherDistiller",
    "capture_topk",
    "collate_stored",
    "kd_kl",
    "topk_kl",
    "topk_logits",
    "vocab_size",
]
