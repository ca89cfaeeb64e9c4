"""Selectors: choose which incoming samples the next optimizer step trains on.

One file per strategy; :data:`SELECTORS` maps the recipe's ``selector.name`` to its class and
builds it: ``SELECTORS.build(recipe.selector, StrategyContext(seed=...))``.
"""

from __future__ import annotations

from olm_cli.lazy import lazy_getattr
from olm_cli.selectors.config import SelectorConfig
from olm_cli.selectors.registry import SELECTORS

# Everything else is imported on first use, so that reading a recipe (which only needs the
# config classes) does not import torch: `olm train` with nothing to do must return at once.
_LAZY = {
    "CoverageSelector": "olm_cli.selectors.coverage",
    "DiversitySelector": "olm_cli.selectors.diversity",
    "EntropySelector": "olm_cli.selectors.entropy",
    "GradNormSelector": "olm_cli.selectors.gradnorm",
    "LossSelector": "olm_cli.selectors.loss",
    "PoolScores": "olm_cli.selectors.scoring",
    "RandomSelector": "olm_cli.selectors.uniform",
    "Selection": "olm_cli.selectors.contract",
    "Selector": "olm_cli.selectors.contract",
    "mean_token_entropy": "olm_cli.selectors.scoring",
    "score_pool": "olm_cli.selectors.scoring",
}


__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = [
    "SELECTORS",
    "CoverageSelector",
    "DiversitySelector",
    "EntropySelector",
    "GradNormSelector",
    "LossSelector",
    "PoolScores",
    "RandomSelector",
    "Selection",
    "Selector",
    "SelectorConfig",
    "mean_token_entropy",
    "score_pool",
]
