"""Meta-learned updates (Reptile): an outer step around the optimiser's inner steps.

One file per method, a Protocol stating the contract (:mod:`olm_cli.meta.base`) and a registry
(:data:`META_UPDATES`) from the recipe's ``optim.meta.method`` to the class.
"""

from __future__ import annotations

from olm_cli.lazy import lazy_getattr
from olm_cli.meta.config import MetaConfig
from olm_cli.meta.registry import META_UPDATES

# The rest imports torch: loaded on first use, so reading a recipe stays torch-free.
_LAZY = {
    "MetaUpdate": "olm_cli.meta.base",
    "NoMetaUpdate": "olm_cli.meta.base",
    "ReptileUpdate": "olm_cli.meta.reptile",
}
__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = ["META_UPDATES", "MetaConfig", "MetaUpdate", "NoMetaUpdate", "ReptileUpdate"]
