"""Recipe short name -> selector class; the only place that knows every selector."""

from __future__ import annotations

from collections.abc import Callable

from olm_cli.selectors.config import SelectorConfig
from olm_cli.selectors.contract import Selector
from olm_cli.selectors.coverage import CoverageSelector
from olm_cli.selectors.diversity import DiversitySelector
from olm_cli.selectors.entropy import EntropySelector
from olm_cli.selectors.gradnorm import GradNormSelector
from olm_cli.selectors.loss import LossSelector
from olm_cli.selectors.uniform import RandomSelector

SELECTORS: dict[str, Callable[[SelectorConfig, int], Selector]] = {
    "random": RandomSelector,
    "entropy": EntropySelector,
    "loss": LossSelector,
    "gradnorm": GradNormSelector,
    "diversity": DiversitySelector,
    "coverage": CoverageSelector,
}


def build_selector(cfg: SelectorConfig, seed: int) -> Selector:
    """Instantiate the selector the recipe names, seeded for reproducible resumes."""
    return SELECTORS[cfg.name](cfg, seed)
