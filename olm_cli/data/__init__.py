"""Shards in, token blocks out.

* :mod:`olm_cli.data.shards`: discovery, formats, domains, the cheap planning check.
* :mod:`olm_cli.data.reader`: record readers (local files without ``datasets``; exact positions).
* :mod:`olm_cli.data.packing`: EOS-joined packing across shard boundaries, per-shard spans.
* :mod:`olm_cli.data.stream`: :class:`BlockStream`, the resumable stream the engine takes from
  (its module docstring states the contract a prefetch worker or a shuffle buffer can wrap).
* :mod:`olm_cli.data.lanes`: :class:`~olm_cli.data.lanes.LaneStream`, the stream split into lanes
  that ranks read apart (imported from there; it is not needed by the torch-free planner).
"""

from olm_cli.data.packing import DOCUMENT_CHUNK_CHARS, Packer, chunk_end
from olm_cli.data.reader import BadRecord, load_streaming, open_reader
from olm_cli.data.shards import (
    DATASET_PREFIX,
    SHARD_SUFFIXES,
    check_shard,
    dataset_source,
    discover_shards,
    domain_of,
    is_dataset_source,
    shard_format,
    validate_shard,
)
from olm_cli.data.stream import (
    LONG_DOCUMENT_POLICIES,
    BlockStream,
    assign_lanes,
    is_lane_position,
    lane_positions,
    position_has_work,
    position_owned_shards,
    position_unread_shards,
    read_blocks,
    rebase_position,
)

# Older names, kept for callers outside this package.
_Packer = Packer
_load_streaming = load_streaming

__all__ = [
    "DATASET_PREFIX", "DOCUMENT_CHUNK_CHARS", "LONG_DOCUMENT_POLICIES", "SHARD_SUFFIXES", "BadRecord", "BlockStream",
    "Packer", "assign_lanes", "chunk_end", "check_shard", "dataset_source", "discover_shards", "domain_of", "is_dataset_source",
    "is_lane_position", "lane_positions", "load_streaming", "open_reader", "position_has_work", "position_owned_shards",
    "position_unread_shards", "read_blocks", "rebase_position",
    "shard_format", "validate_shard",
]
