"""Recipe ``distill.method`` -> distiller; the only place that knows every distiller.

Factories are ``"module:Class"`` strings so that validating a recipe does not import torch.
"""

from __future__ import annotations

from olm_cli.strategy import Registry

DISTILLERS: Registry = Registry("distill", "method")
DISTILLERS.register("none", "olm_cli.distill.base:NoDistiller")
DISTILLERS.register("teacher", "olm_cli.distill.teacher:TeacherDistiller")
DISTILLERS.register("lwf", "olm_cli.distill.lwf:LwfDistiller")
DISTILLERS.register("stored_logits", "olm_cli.distill.stored_logits:StoredLogitsDistiller")
