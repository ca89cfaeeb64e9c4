"""Anchors and Fisher sharded like the weights (olm_cli/distributed/sharded_state.py), on two gloo ranks.

Spawned here without torchrun: every rank shards the same seeded model with FSDP2 and checks
that its slices gather to the whole tensors one process holds, that whole tensors cut back to
its own rows, and that EWC's Fisher and EWC's and L2's penalty gradients on the shards are the
whole model's.
The vocabulary (65 rows) does not split evenly, as real ones often do not.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_llama

from olm_cli.regularize.config import RegularizeConfig

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 65, (2, 4, 10), generator=generator)
    return [{"input_ids": b, "labels": b, "attention_mask": torch.ones_like(b)} for b in ids]


def _penalty_gradients_agree(regularizer: Any, reference: Any, sharded: torch.nn.Module,
                             whole: torch.nn.Module) -> list[bool]:
    """Whether the sharded penalty's gradient on this rank's rows is the whole penalty's gradient there."""
    from olm_cli.distributed.sharded_state import local_parameter_state

    regularizer.penalty(sharded).backward()
    reference.penalty(whole).backward()
    grads = {n: p.grad for n, p in whole.named_parameters()}
    agree = []
    for name, param in sharded.named_parameters():
        mine = local_parameter_state({"g": {name: grads[name]}}, sharded)["g"][name]
        agree.append(torch.allclose(param.grad.to_local(), mine, rtol=1e-5, atol=1e-8))
    return agree


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from olm_cli.distributed.sharded_state import gather_parameter_state, local_parameter_state
        from olm_cli.distributed.sharding import shard_model
        from olm_cli.regularize.ewc import EwcRegularizer, estimate_fisher
        from olm_cli.regularize.l2 import L2Regularizer

        whole = tiny_llama(seed=1, vocab=65, tie_word_embeddings=False)
        sharded = shard_model(tiny_llama(seed=1, vocab=65, tie_word_embeddings=False), device=torch.device("cpu"),
                              mixed_precision="no")
        ewc = EwcRegularizer(RegularizeConfig(method="ewc", strength=5.0))
        ewc.end_increment(sharded, lambda n: _batches())  # Fisher and anchor: this rank's rows
        reference = EwcRegularizer(RegularizeConfig(method="ewc", strength=5.0))
        reference.end_increment(whole, lambda n: _batches())
        checks = []
        embed = "model.embed_tokens.weight"
        checks.append(tuple(ewc.anchor[embed].shape) == ((33, 32) if rank == 0 else (32, 32)))
        gathered = gather_parameter_state({"regularizer": ewc.state_dict()}, sharded, on_every_rank=True)["regularizer"]
        to_rank_0 = gather_parameter_state({"r": ewc.state_dict()}, sharded)["r"]["anchor"][embed]
        checks.append(tuple(to_rank_0.shape) == ((65, 32) if rank == 0 else (32, 32)))
        for key in ("anchor", "fisher"):
            for name, tensor in getattr(reference, key).items():
                checks.append(torch.allclose(gathered[key][name], tensor, rtol=1e-4, atol=1e-7))
        cut = local_parameter_state({"regularizer": gathered}, sharded)["regularizer"]
        checks.append(all(torch.equal(cut["anchor"][n], t) for n, t in ewc.anchor.items()))
        # The penalty's gradient on this rank's rows is the whole penalty's gradient there.
        with torch.no_grad():
            for model in (whole, sharded):
                for p in model.parameters():
                    p.add_(0.01)
        checks.extend(_penalty_gradients_agree(ewc, reference, sharded, whole))
        checks.append(estimate_fisher(sharded, []) == {})
        # L2: the same pull with F = 1, from an anchor taken now.
        l2, l2_reference = L2Regularizer(RegularizeConfig(method="l2")), L2Regularizer(RegularizeConfig(method="l2"))
        l2.begin_increment(sharded)
        l2_reference.begin_increment(whole)
        with torch.no_grad():
            for model in (whole, sharded):
                for p in model.parameters():
                    p.mul_(1.5)
        for model in (whole, sharded):
            model.zero_grad(set_to_none=True)
        checks.extend(_penalty_gradients_agree(l2, l2_reference, sharded, whole))
        Path(out, f"{rank}.txt").write_text(str(checks))
    finally:
        dist.destroy_process_group()


def test_sharded_anchor_and_fisher_are_the_whole_models_rows(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        checks = (tmp_path / f"{rank}.txt").read_text()
        assert "False" not in checks and checks.count("True") > 40, (rank, checks)
