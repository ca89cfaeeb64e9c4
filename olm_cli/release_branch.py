"""Which weights an increment releases: the trunk, the average of its last checkpoints, a cooldown.

With the default recipe the release is the model the increment trained (the trunk). Two
recipe keys make it something the trunk does not continue from:

* ``release.merge: sma``: the simple moving average of the newest ``release.merge_last``
  trunk checkpoints (this increment's final one included). Averaging checkpoints taken at a
  constant rate approximates annealing without training (arXiv 2505.12082).
* ``optim.schedule: wsd``: a cooldown branch (:mod:`olm_cli.cooldown`); with ``sma`` as well
  it starts from the average.

The trunk's checkpoint is written before either, so the next increment starts from the trunk.
When the release is not the trunk, its ``origin`` (which trunk checkpoint, the cooldown's steps,
the checkpoints averaged, and the trunk's own held-out losses when ``eval.sets`` are measured
after each increment) goes into ``release.json`` and ``releases/history.jsonl``, where ``olm
status`` and ``olm report`` read what a cooldown or an average did against the trunk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from olm_cli.cooldown import CooldownBranch, load_sharded_weights, require_unsharded
from olm_cli.distributed.sharding import full_state_dict as gathered_weights
from olm_cli.distributed.sharding import is_sharded
from olm_cli.errors import CheckpointError
from olm_cli.recipe import Recipe
from olm_cli.rundir import CheckpointManager
from olm_cli.rundir.checkpoint import loading_checkpoint, step_of


@dataclass(frozen=True)
class ReleaseOutcome:
    """A pending release finished by the engine: what ``olm train`` reports, as a ReleaseResult would."""

    released: bool
    message: str


@dataclass
class ReleaseModel:
    """The model to evaluate and release, and the branch to clean up once it is released."""

    model: torch.nn.Module
    state_dict: Mapping[str, torch.Tensor] | None = None  # the full weights when the model is sharded
    branch: CooldownBranch | None = None
    note: str = ""
    origin: dict[str, Any] | None = None  # where the weights came from, when not the trunk itself

    def released(self) -> None:
        """The release is written: the cooldown's checkpoints are no longer needed."""
        if self.branch is not None:
            self.branch.discard()


def sma_checkpoints(checkpoints: CheckpointManager, trunk: Path, count: int) -> list[Path]:
    """The newest ``count`` trunk checkpoints up to and including ``trunk``, oldest first."""
    return [p for p in checkpoints.list() if step_of(p) <= step_of(trunk)][-count:]


def load_average(model: torch.nn.Module, averaged: Mapping[str, torch.Tensor]) -> None:
    """Copy averaged weights into ``model``; a tied output layer (saved once) follows its embedding."""
    if is_sharded(model):  # FSDP2: every rank averaged the same checkpoints and keeps its shard
        load_sharded_weights(model, dict(averaged))
        return
    missing, unexpected = model.load_state_dict(dict(averaged), strict=False)
    loaded = {t.data_ptr() for name, t in model.state_dict().items() if name not in missing}
    untied = [name for name in missing if model.state_dict()[name].data_ptr() not in loaded]
    if unexpected or untied:
        raise CheckpointError(f"the averaged checkpoints do not fit the model (unexpected: {list(unexpected)[:3]}, "
                              f"missing: {untied[:3]})")


def average_trunk(recipe: Recipe, checkpoints: CheckpointManager, trunk: Path, model: torch.nn.Module,
                  say: Any) -> list[str]:
    """Load the SMA of the last ``release.merge_last`` trunk checkpoints into ``model``; return their names."""
    from olm_cli.merge import average_weights

    chosen = sma_checkpoints(checkpoints, trunk, recipe.release.merge_last)
    averaged = average_weights(chosen)
    load_average(model, averaged)
    names = ", ".join(p.name for p in chosen)
    note = f"average of {len(chosen)} trunk checkpoint(s) ({names})"
    if len(chosen) < recipe.release.merge_last:
        note += f"; release.merge_last is {recipe.release.merge_last}, the run has only these so far"
    say(f"release: {note}")
    return [p.name for p in chosen]


def trunk_eval(recipe: Recipe, model: torch.nn.Module, tokenizer: Any, say: Any) -> dict[str, float] | None:
    """The trunk's held-out loss per domain, to set a cooldown's or an average's release against.

    Measured only where the release itself is (``eval.after_increment`` with ``eval.sets``), on
    the same tokens, and only when a release will record it; nothing goes into the matrix,
    which holds the released models.
    """
    if not (recipe.release.enabled and recipe.eval.after_increment and recipe.eval.sets):
        return None
    from olm_cli.evaluation.domains import evaluate_domains

    results = evaluate_domains(model, tokenizer, recipe.eval.sets, block_size=recipe.data.block_size,
                               max_tokens=recipe.eval.max_tokens, batch_size=recipe.eval.batch_size,
                               text_field=recipe.data.text_field)
    losses = {name: float(r["loss"]) for name, r in results.items()}
    say("trunk before its release branch: " + "  ".join(f"{name} {loss:.4f}" for name, loss in losses.items()))
    return losses


def release_origin(kind: str, trunk: Path, *, averaged: list[str] | None = None,
                   cooldown: dict[str, Any] | None = None, trunk_losses: dict[str, float] | None = None
                   ) -> dict[str, Any]:
    """What ``release.json`` and ``releases/history.jsonl`` say about a release that is not the trunk."""
    found: dict[str, Any] = {"kind": kind, "trunk": trunk.name, "trunk_step": step_of(trunk)}
    if averaged is not None:
        found["averaged"] = averaged
    if cooldown is not None:
        found["cooldown"] = {key: cooldown[key] for key in ("steps", "step", "tokens", "seconds", "first_loss",
                                                            "last_loss")}
    if trunk_losses is not None:
        found["trunk_eval"] = trunk_losses
    return found


def sma_model(recipe: Recipe, checkpoints: CheckpointManager, trunk: Path, device: Any, say: Any
              ) -> tuple[torch.nn.Module, list[str]]:
    """A fresh model holding the SMA of the trunk (the trunk's own model stays as trained), and what it averaged."""
    from olm_cli.modeling import load_pretrained

    with loading_checkpoint(trunk, "the model"):
        model = load_pretrained(str(trunk), dtype=recipe.model.dtype,
                                attn_implementation=recipe.model.attn_implementation)
    averaged = average_trunk(recipe, checkpoints, trunk, model, say)
    return model.to(device), averaged


def build_release_model(trainer: Any, trunk: Path, full_state_dict: Mapping[str, torch.Tensor] | None
                        ) -> ReleaseModel | None:
    """The increment's release from ``trainer`` after its trunk checkpoint ``trunk``; None: stopped mid-cooldown."""
    recipe: Recipe = trainer.recipe
    accelerator = trainer.accelerator
    unwrapped = accelerator.unwrap_model(trainer.model)
    sma = recipe.release.merge == "sma"
    if not recipe.release.enabled and not (recipe.eval.after_increment and recipe.eval.sets):
        return ReleaseModel(unwrapped, full_state_dict)  # nothing would evaluate or release a branch
    wsd = recipe.optim.schedule == "wsd"
    if not wsd and not sma:
        return ReleaseModel(unwrapped, full_state_dict)
    if wsd:
        require_unsharded(accelerator)
    trunk_losses = None
    # Before the trunk's weights are averaged or cooled; rank 0 alone, so sharded weights are first
    # gathered into a plain copy there (a collective, only when the trunk is evaluated at all).
    evaluated: torch.nn.Module | None = unwrapped
    if is_sharded(trainer.model) and recipe.release.enabled and recipe.eval.after_increment and recipe.eval.sets:
        evaluated = trainer._unsharded()
    if accelerator.is_main_process and evaluated is not None and not is_sharded(evaluated):
        trunk_losses = trunk_eval(recipe, evaluated, trainer.tokenizer, trainer._say)
    accelerator.wait_for_everyone()
    if not wsd:
        model, names = sma_model(recipe, trainer.checkpoints, trunk, accelerator.device, trainer._say)
        return ReleaseModel(model, origin=release_origin("sma", trunk, averaged=names, trunk_losses=trunk_losses))
    branch = CooldownBranch(trainer, trunk)
    averaged: list[str] | None = None
    if sma:  # the cooldown starts from the average (a resumed branch then loads its own weights)
        averaged = average_trunk(recipe, trainer.checkpoints, trunk, unwrapped, trainer._say)
    if not branch.run(trainer.stop):
        return None
    row = branch.record()
    note = f"cooldown: {row['steps']} step(s), {row['tokens']:,} tokens, {row['seconds']:.1f}s"
    trainer._say(f"{note} (the next increment continues from trunk {trunk.name})")
    # Sharded (FSDP2): the cooled weights gathered to rank 0, which evaluates and writes the release.
    cooled = gathered_weights(trainer.model) if trainer.distributed.sharded else None
    return ReleaseModel(unwrapped, cooled, branch, note,
                        release_origin("sma+cooldown" if sma else "cooldown", trunk, averaged=averaged, cooldown=row,
                                       trunk_losses=trunk_losses))
