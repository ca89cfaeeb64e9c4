"""Selectors: choose which incoming samples the next optimizer step trains on.

One file per strategy; :data:`SELECTORS` maps the recipe's ``selector.name`` to its class.
"""

from olm_cli.selectors.config import SelectorConfig
from olm_cli.selectors.contract import Selection, Selector
from olm_cli.selectors.coverage import CoverageSelector
from olm_cli.selectors.diversity import DiversitySelector
from olm_cli.selectors.entropy import EntropySelector
from olm_cli.selectors.gradnorm import GradNormSelector
from olm_cli.selectors.loss import LossSelector
from olm_cli.selectors.registry import SELECTORS, build_selector
from olm_cli.selectors.scoring import PoolScores, mean_token_entropy, score_pool
from olm_cli.selectors.uniform import RandomSelector

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
    "build_selector",
    "mean_token_entropy",
    "score_pool",
]
