"""Documents in, fixed-length blocks out: EOS-joined packing that may cross shard boundaries.

The packer keeps one carry buffer per domain, so a block never mixes domains, but the tail of one
shard and the head of the next shard of the same domain share a block instead of the tail
becoming a short padded block. Every block records its *spans* (``[(shard, n_tokens), ...]``),
so the ledger can attribute each token to the shard it came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from olm_cli.samples import Block

# Texts longer than this are tokenised a chunk at a time: one tokenizer call on a 50 MB string
# takes tens of seconds, holds every token in a Python list, and cannot be interrupted.
DOCUMENT_CHUNK_CHARS = 256 * 1024


def chunk_end(text: str, start: int, size: int = DOCUMENT_CHUNK_CHARS) -> int:
    """Where the chunk of ``text`` that begins at ``start`` should end (at most ``size`` chars).

    The cut goes just before a space or newline, so the next chunk starts with the whitespace
    that a byte-level BPE attaches to the following word: tokenising the chunks one by one
    gives the same tokens as tokenising the whole text. A text with no whitespace in the
    window is cut at ``size``.
    """
    limit = start + size
    if limit >= len(text):
        return len(text)
    cut = max(text.rfind(" ", start + 1, limit + 1), text.rfind("\n", start + 1, limit + 1))
    return cut if cut > start else limit


@dataclass
class Carry:
    """Tokens of one domain not yet cut into a block, and the shards they came from, in order."""

    tokens: list[int] = field(default_factory=list)
    spans: list[list[Any]] = field(default_factory=list)  # [[shard, n], ...], adjacent shards merged

    def take_spans(self, n: int) -> tuple[tuple[str, int], ...]:
        """Remove the first ``n`` tokens' spans (the block being cut) and return them."""
        taken: list[tuple[str, int]] = []
        while n:
            shard, count = self.spans[0]
            used = min(n, count)
            taken.append((shard, used))
            n -= used
            if used == count:
                self.spans.pop(0)
            else:
                self.spans[0][1] = count - used
        return tuple(taken)


@dataclass
class Packer:
    """Joins tokenized documents with EOS and cuts fixed-length blocks, one carry buffer per domain.

    Blocks are cut from one array and the carry is trimmed once per push, so packing is linear
    in the tokens pushed (deleting one block at a time from the front of a list was quadratic:
    a 2M-token document took 38 s). A document may arrive in several pushes; only the push with
    ``end_of_document`` appends the EOS, so the blocks are the same however it was cut.
    """

    block_size: int
    eos_id: int
    carry: dict[str, Carry] = field(default_factory=dict)

    def push(self, domain: str, ids: Sequence[int], *, shard: str = "", end_of_document: bool = True) -> list[Block]:
        n = len(ids) + int(end_of_document)
        if not n:
            return []
        buffer = self.carry.setdefault(domain, Carry())
        buffer.tokens.extend(ids)
        if end_of_document:
            buffer.tokens.append(self.eos_id)
        if buffer.spans and buffer.spans[-1][0] == shard:
            buffer.spans[-1][1] += n
        else:
            buffer.spans.append([shard, n])
        full = len(buffer.tokens) - len(buffer.tokens) % self.block_size
        if not full:
            return []
        rows = np.asarray(buffer.tokens[:full], dtype=np.int32).reshape(-1, self.block_size)
        del buffer.tokens[:full]
        blocks = []
        for row in rows:
            spans = buffer.take_spans(self.block_size)
            blocks.append(Block(row.copy(), spans[0][0], domain, spans))
        return blocks

    def flush(self, min_tokens: int) -> list[Block]:
        """The carries as final (short) blocks; a carry under ``min_tokens`` is dropped."""
        blocks = []
        for domain in sorted(self.carry):
            buffer = self.carry[domain]
            if len(buffer.tokens) >= min_tokens:
                spans = tuple((str(s), int(n)) for s, n in buffer.spans)
                blocks.append(Block(np.asarray(buffer.tokens, dtype=np.int32), spans[0][0], domain, spans))
        self.carry.clear()
        return blocks

    def shards_held(self) -> set[str]:
        return {shard for buffer in self.carry.values() for shard, _ in buffer.spans}

    def tokens_held(self) -> int:
        return sum(len(buffer.tokens) for buffer in self.carry.values())

    def state_dict(self) -> dict[str, Any]:
        return {domain: {"tokens": list(c.tokens), "spans": [list(s) for s in c.spans]}
                for domain, c in self.carry.items() if c.tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.carry = {domain: Carry(list(c["tokens"]), [list(s) for s in c["spans"]]) for domain, c in state.items()}
