"""Forgetting countermeasures: distillation (teacher, LwF, stored logits) and weight-space
regularisers (EWC, L2). The recipe sections for them and for partial updates live in
:mod:`olm_cli.distill.config`; partial updates and LoRA themselves are in :mod:`olm_cli.partial`.
"""

from olm_cli.distill.base import Distiller, Regularizer, StoredLogits
from olm_cli.distill.config import DistillConfig, LoraConfig, RegularizeConfig, TrainConfig
from olm_cli.distill.ewc import EwcRegularizer, estimate_fisher
from olm_cli.distill.kd import collate_stored, kd_kl, topk_kl, topk_logits, vocab_size
from olm_cli.distill.l2 import L2Regularizer
from olm_cli.distill.lwf import LwfDistiller
from olm_cli.distill.registry import (
    DISTILLERS,
    REGULARIZERS,
    build_distiller,
    build_regularizer,
)
from olm_cli.distill.stored_logits import StoredLogitsDistiller
from olm_cli.distill.teacher import TeacherDistiller

__all__ = [
    "DISTILLERS",
    "REGULARIZERS",
    "DistillConfig",
    "Distiller",
    "EwcRegularizer",
    "L2Regularizer",
    "LoraConfig",
    "LwfDistiller",
    "RegularizeConfig",
    "Regularizer",
    "StoredLogits",
    "StoredLogitsDistiller",
    "TeacherDistiller",
    "TrainConfig",
    "build_distiller",
    "build_regularizer",
    "collate_stored",
    "estimate_fisher",
    "kd_kl",
    "topk_kl",
    "topk_logits",
    "vocab_size",
]
