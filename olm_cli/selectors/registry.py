"""Recipe short name (``selector.name``) -> selector; the only place that knows every selector.

Factories are ``"module:Class"`` strings, resolved on first build, so that the recipe (which
validates ``selector.name`` against this registry) can be read without importing torch. Every
selector is built as ``SELECTORS.build(recipe.selector, context)`` and seeds its generator
from ``context.seed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from olm_cli.strategy import Registry

if TYPE_CHECKING:  # the contract imports torch
    from olm_cli.selectors.contract import Selector

SELECTORS: Registry[Selector] = Registry("selector", "name")
SELECTORS.register("random", "olm_cli.selectors.uniform:RandomSelector")
SELECTORS.register("entropy", "olm_cli.selectors.entropy:EntropySelector")
SELECTORS.register("loss", "olm_cli.selectors.loss:LossSelector")
SELECTORS.register("gradnorm", "olm_cli.selectors.gradnorm:GradNormSelector")
SELECTORS.register("diversity", "olm_cli.selectors.diversity:DiversitySelector")
SELECTORS.register("coverage", "olm_cli.selectors.coverage:CoverageSelector")
