"""Run-directory infrastructure for cron-grade incremental training.

The run directory is the source of truth (docs/run-directory.md): the shard ledger says
what has been trained, the lock keeps two runs apart, checkpoints are complete or
invisible, and a signal stops training at a step boundary.
"""

from olm_cli.rundir.checkpoint import CheckpointManager, LatestChoice, RejectedCheckpoint
from olm_cli.rundir.ledger import ScanResult, ShardEntry, ShardLedger, ShardStatus
from olm_cli.rundir.lock import LockHolder, RunLock, read_holder
from olm_cli.rundir.signals import GracefulStop
from olm_cli.rundir.status import collect_status, render_status

__all__ = [
    "CheckpointManager",
    "GracefulStop",
    "LatestChoice",
    "LockHolder",
    "RejectedCheckpoint",
    "RunLock",
    "ScanResult",
    "ShardEntry",
    "ShardLedger",
    "ShardStatus",
    "collect_status",
    "read_holder",
    "render_status",
]
