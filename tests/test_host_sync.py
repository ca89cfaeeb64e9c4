"""One device-to-host transfer per optimizer step (issue 11, item 5), counted on a CPU.

On CUDA ``scripts/check_sync_free.py`` runs the same steps under
``torch.cuda.set_sync_debug_mode("error")``; here :class:`HostSyncCounter` counts the Python
calls that would wait for the device.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import add_shard, tiny_recipe

from olm_cli import engine
from olm_cli.host_sync import AccumulatedBatch, HostSyncCounter, fetch_step, sync_allowed
from olm_cli.increment import run_increment
from olm_cli.recipe import recipe_from_dict


def test_the_counter_sees_every_kind_of_transfer_and_tells_the_allowed_one_apart() -> None:
    value = torch.tensor([1.5])
    with HostSyncCounter() as counter:
        float(value)
        value.item()
        value.tolist()
        value.numpy()
        if value:
            pass
        with sync_allowed():
            value.cpu()
    assert (counter.count, counter.allowed) == (6, 1)
    assert len(counter.where) == 5 and "test_host_sync.py" in counter.where[0]
    assert float(value) == 1.5  # the methods are restored


def test_fetch_step_brings_everything_over_in_one_transfer() -> None:
    batch = AccumulatedBatch(samples=5, rows=[0, 2, 4])
    batch.add(torch.tensor(0.5), torch.tensor([1.0, 2.0]))
    batch.add(torch.tensor(0.25), torch.tensor([3.0]))
    with HostSyncCounter() as counter:
        measured = fetch_step(batch, torch.tensor(7.0))
    assert (counter.count, counter.allowed) == (1, 1)
    assert measured.loss == 0.75 and measured.bad_loss is None and measured.grad_norm == 7.0
    np.testing.assert_array_equal(measured.per_sample, [1.0, 0.0, 2.0, 0.0, 3.0])  # other ranks' rows: 0


def test_fetch_step_names_the_first_non_finite_micro_batch() -> None:
    batch = AccumulatedBatch(samples=3, rows=[0, 1, 2])
    for loss in (0.5, math.inf, math.nan):
        batch.add(torch.tensor(loss), torch.tensor([loss]))
    measured = fetch_step(batch, 2.0)  # DeepSpeed reports the norm as a host float
    assert measured.bad_loss == math.inf and measured.grad_norm == 2.0


def count_syncs_per_step(recipe: Any, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The unexpected transfers of every optimizer step, from its forward to its ``optimizer.step()``.

    Counting starts when ``_forward_backward`` is entered and ends at ``_bookkeep`` (after the
    optimizer step and the schedule); selection and replay before it handle host-side tensors
    (a CPU random generator), which a CPU run cannot tell from device tensors.
    """
    counter = HostSyncCounter()
    counter.counting = False
    steps: list[list[str]] = []
    real_forward_backward, real_bookkeep, real_train = (
        engine.Trainer._forward_backward, engine.Trainer._bookkeep, engine.Trainer.train)

    def forward_backward(self: engine.Trainer, *args: Any, **kwargs: Any) -> Any:
        counter.count = counter.allowed = 0
        counter.where.clear()
        counter.counting = True
        return real_forward_backward(self, *args, **kwargs)

    def bookkeep(self: engine.Trainer, *args: Any, **kwargs: Any) -> Any:
        counter.counting = False
        assert counter.allowed == 1, counter.where  # fetch_step ran exactly once
        steps.append(list(counter.where))
        return real_bookkeep(self, *args, **kwargs)

    def train(self: engine.Trainer) -> Any:
        with counter:
            return real_train(self)

    monkeypatch.setattr(engine.Trainer, "_forward_backward", forward_backward)
    monkeypatch.setattr(engine.Trainer, "_bookkeep", bookkeep)
    monkeypatch.setattr(engine.Trainer, "train", train)
    outcome = run_increment(recipe)
    assert outcome.status == "increment_complete"
    return steps


@pytest.mark.parametrize("options", [
    {},
    {"replay": {"policy": "reservoir", "ratio": 0.25, "capacity": 64},
     "run": {"loss_implementation": "chunked", "loss_chunk_tokens": 16}, "batch": {"micro_batch": 2}},
], ids=["standard", "chunked-replay-micro-batches"])
def test_a_step_transfers_to_the_host_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           options: dict[str, dict[str, Any]]) -> None:
    add_shard(tmp_path / "stream", "alpha", 0, docs=12)
    run = {"max_steps": 4, "checkpoint_every": 1000, **options.pop("run", {})}
    recipe = recipe_from_dict(tiny_recipe(tmp_path, run=run, **options))

    steps = count_syncs_per_step(recipe, monkeypatch)

    assert len(steps) == 4
    assert steps == [[]] * 4, steps  # nothing but fetch_step's one transfer
