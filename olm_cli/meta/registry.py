"""Recipe ``optim.meta.method`` -> meta-update; the only place that knows every meta-update.

Factories are ``"module:Class"`` strings so that validating a recipe does not import torch.
"""

from __future__ import annotations

from olm_cli.strategy import Registry

META_UPDATES: Registry = Registry("optim.meta", "method")
META_UPDATES.register("none", "olm_cli.meta.base:NoMetaUpdate")
META_UPDATES.register("reptile", "olm_cli.meta.reptile:ReptileUpdate")
