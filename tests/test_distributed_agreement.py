"""Ranks agree on a stop signal and the time budget (olm_cli/distributed/agreement.py).

One process exchanges nothing; two (gloo, spawned here) take the most urgent rank's decision,
and a rank that saw no signal adopts the other's, so both report the same exit code.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from olm_cli.distributed.agreement import agree_max, agree_to_stop
from olm_cli.rundir import GracefulStop


def test_one_process_decides_alone() -> None:
    stop = GracefulStop()
    assert agree_to_stop(stop, over_budget=False) == (False, False)
    assert agree_to_stop(None, over_budget=True) == (False, True)
    stop.request(signal.SIGINT)
    assert agree_to_stop(stop) == (True, False)
    assert stop.exit_code == 130
    assert agree_max([3, 0]) == [3, 0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        stop = GracefulStop()
        results = [agree_to_stop(stop, over_budget=False)]  # nothing yet
        if rank == 1:
            stop.request(signal.SIGTERM)  # the signal reaches rank 1 only
        results.append(agree_to_stop(stop, over_budget=rank == 0))  # and only rank 0's clock ran out
        Path(out, f"{rank}.txt").write_text(f"{results} {stop.exit_code}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_take_the_same_branch_and_exit_code(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = "[(False, False), (True, True)] 143"
    assert (tmp_path / "0.txt").read_text() == expected
    assert (tmp_path / "1.txt").read_text() == expected
