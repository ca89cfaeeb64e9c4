"""Forgetting countermeasures: distillation (teacher, LwF, stored logits) and weight-space
regularisers (EWC, L2). The recipe sections for them live in
:mod:`olm_cli.distill.config`; partial updates and LoRA themselves are in :mod:`olm_cli.partial`.
"""

from __future__ import annotations

from olm_cli.distill.config import DistillConfig, RegularizeConfig
from olm_cli.lazy import lazy_getattr

# Everything else is imported on first use, so that reading a recipe (which only needs the
# config classes) does not import torch: `olm train` with nothing to do must return at once.
_LAZY = {
    "DISTILLERS": "olm_cli.distill.registry",
    "Distiller": "olm_cli.distill.base",
    "EwcRegularizer": "olm_cli.distill.ewc",
    "L2Regularizer": "olm_cli.distill.l2",
    "LwfDistiller": "olm_cli.distill.lwf",
    "REGULARIZERS": "olm_cli.distill.registry",
    "Regularizer": "olm_cli.distill.base",
    "StoredLogits": "olm_cli.distill.base",
    "StoredLogitsDistiller": "olm_cli.distill.stored_logits",
    "TeacherDistiller": "olm_cli.distill.teacher",
    "build_distiller": "olm_cli.distill.registry",
    "build_regularizer": "olm_cli.distill.registry",
    "collate_stored": "olm_cli.distill.kd",
    "estimate_fisher": "olm_cli.distill.ewc",
    "kd_kl": "olm_cli.distill.kd",
    "topk_kl": "olm_cli.distill.kd",
    "topk_logits": "olm_cli.distill.kd",
    "vocab_size": "olm_cli.distill.kd",
}


__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = [
    "DISTILLERS",
    "REGULARIZERS",
    "DistillConfig",
    "Distiller",
    "EwcRegularizer",
    "L2Regularizer",
    "LwfDistiller",
    "RegularizeConfig",
    "Regularizer",
    "StoredLogits",
    "StoredLogitsDistiller",
    "TeacherDistiller",
    "build_distiller",
    "build_regularizer",
    "collate_stored",
    "estimate_fisher",
    "kd_kl",
    "topk_kl",
    "topk_logits",
    "vocab_size",
]
