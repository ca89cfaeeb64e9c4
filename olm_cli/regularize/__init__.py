"""Weight-space regularisers (EWC, L2): keep parameters near the previous increment's solution.

One file per regulariser, a Protocol stating the contract (:mod:`olm_cli.regularize.base`) and
a registry (:data:`REGULARIZERS`) from the recipe's ``regularize.method`` to the class.
"""

from __future__ import annotations

from olm_cli.lazy import lazy_getattr
from olm_cli.regularize.config import RegularizeConfig
from olm_cli.regularize.registry import REGULARIZERS

# The rest imports torch: loaded on first use, so reading a recipe stays torch-free.
_LAZY = {
    "EwcRegularizer": "olm_cli.regularize.ewc",
    "L2Regularizer": "olm_cli.regularize.l2",
    "NoRegularizer": "olm_cli.regularize.base",
    "Regularizer": "olm_cli.regularize.base",
    "estimate_fisher": "olm_cli.regularize.ewc",
}
__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = [
    "REGULARIZERS",
    "EwcRegularizer",
    "L2Regularizer",
    "NoRegularizer",
    "RegularizeConfig",
    "Regularizer",
    "estimate_fisher",
]
