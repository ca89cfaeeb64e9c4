"""Recipe ``regularize.method`` -> regulariser; the only place that knows every regulariser.

Factories are ``"module:Class"`` strings so that validating a recipe does not import torch.
"""

from __future__ import annotations

from olm_cli.strategy import Registry

REGULARIZERS: Registry = Registry("regularize", "method")
REGULARIZERS.register("none", "olm_cli.regularize.base:NoRegularizer")
REGULARIZERS.register("ewc", "olm_cli.regularize.ewc:EwcRegularizer")
REGULARIZERS.register("l2", "olm_cli.regularize.l2:L2Regularizer")
