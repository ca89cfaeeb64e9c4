"""Trainable patterns and full-update increments: which parameters an increment may change.

Freezing most of the network is the cheapest forgetting countermeasure (frozen weights cannot
forget) and also cuts optimiser memory; ``full_update_every`` lets the whole model catch up
now and then.
"""

from __future__ import annotations

import fnmatch
import re

import torch

from olm_cli.errors import RecipeError
from olm_cli.partial.config import TrainConfig
from olm_cli.partial.lora import is_peft

REGEX_PREFIX = "re:"
_PEFT_PREFIX = "base_model.model."


def plain_name(name: str) -> str:
    """A parameter name as the un-wrapped model spells it, so one pattern works with and
    without LoRA (peft adds ``base_model.model.`` in front and ``.base_layer`` inside)."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return name.replace(".base_layer.", ".")


def _matcher(pattern: str) -> re.Pattern[str]:
    if pattern.startswith(REGEX_PREFIX):
        source = pattern[len(REGEX_PREFIX) :]
        try:
            return re.compile(source)
        except re.error as exc:
            raise RecipeError(
                f"train.trainable: invalid regular expression {source!r}: {exc}"
            ) from exc
    return re.compile(fnmatch.translate(pattern))


def is_full_update(cfg: TrainConfig, increment: int) -> bool:
    """True on increments N, 2N, ... (counted from 1) when ``full_update_every`` is N > 0."""
    every = cfg.full_update_every
    return every > 0 and increment > 0 and increment % every == 0


def apply_trainable(model: torch.nn.Module, cfg: TrainConfig, increment: int) -> list[str]:
    """Set ``requires_grad`` per ``cfg.trainable`` and return the trainable parameter names.

    Patterns are fnmatch globs, or regular expressions (full match) when prefixed with ``re:``;
    they are matched against the plain parameter name (see :func:`plain_name`). With an empty
    list, or on a full-update increment, everything trains. On a LoRA-wrapped model the adapter
    weights always stay trainable and the patterns may additionally unfreeze base weights
    (e.g. ``lm_head.*``). A pattern matching nothing is a recipe error, since it is almost
    always a typo that would silently freeze the layer meant to train.

    Call it before building the optimiser (frozen parameters should not be in it) and before
    ``Regularizer.begin_increment`` (the anchor covers trainable parameters only).
    """
    named = list(model.named_parameters())
    lora = is_peft(model)
    full = is_full_update(cfg, increment)
    matchers = [(p, _matcher(p)) for p in cfg.trainable]
    hits = {p: 0 for p in cfg.trainable}
    trainable: list[str] = []
    for name, param in named:
        plain = plain_name(name)
        matched = False
        for pattern, rx in matchers:
            if rx.fullmatch(plain) or rx.fullmatch(name):
                hits[pattern] += 1
                matched = True
        if lora:
            # Adapters always train; patterns may unfreeze base weights on top of them.
            keep = full or matched or "lora_" in name
        else:
            keep = full or not cfg.trainable or matched
        param.requires_grad_(keep)
        if keep:
            trainable.append(name)
    missing = [p for p, n in hits.items() if n == 0]
    if missing:
        examples = ", ".join(plain_name(n) for n, _ in named[:4])
        raise RecipeError(
            f"train.trainable pattern(s) {missing} match no parameter; names look like: {examples}"
        )
    return trainable
