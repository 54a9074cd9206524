"""A paged KV cache: fixed-size blocks, per-sequence block tables, a free list and prefix reuse (as vLLM and
nano-vllm keep theirs).

Every full block is registered under a hash of its tokens, the digests of the media items that fill any of its
positions, and everything before them. A new sequence whose
prompt starts with registered blocks takes them (reference-counted) instead of computing them again: a shared
system prompt or the earlier turns of a conversation. A freed block keeps its contents and its hash until the
free list hands it out again, so a prefix stays reusable after the request that made it has finished.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import torch

from ..config import ModelConfig
from ..model.decoder import PagedLayout
from ..model.rope import RotaryChoice
from .sequence import ROOT

BLOCK_SIZE = 16  # tokens a block holds
NO_SALT: Callable[[int], bytes] = lambda block: b""  # noqa: E731  (a text-only prompt's blocks)


def block_bytes(config: ModelConfig, dtype: torch.dtype, block_size: int = BLOCK_SIZE) -> int:
    """Memory of one block: keys and values of every layer."""
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * dtype.itemsize


class BlockAllocator:
    """Which blocks are free, who holds each, and which registered prefix each one stores."""

    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))  # least recently freed first
        self.key_of: list[bytes | None] = [None] * num_blocks
        self.block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    @staticmethod
    def prefix_hash(previous: bytes, tokens: Sequence[int], salt: bytes = b"") -> bytes:
        """A digest of a block's tokens, its items' digests (`salt`) and everything before them (a cryptographic
        hash, as vLLM's: a collision would hand one request another's keys and values)."""
        data = previous + array("q", tokens).tobytes() + len(salt).to_bytes(8, "little") + salt
        return hashlib.blake2b(data, digest_size=16).digest()

    def cached_prefix(self, tokens: Sequence[int], salts: Callable[[int], bytes] = NO_SALT,
                      root: bytes = ROOT) -> tuple[list[int], bytes]:
        """Registered blocks that hold the start of `tokens` (block i salted with `salts(i)`, the chain starting from
        `root`), in order (not yet taken), and the digest after the last of them. The block holding the last token is
        never reused: its logits must be computed."""
        blocks, chain = [], root
        for start in range(0, len(tokens) - self.block_size, self.block_size):
            salt = salts(start // self.block_size)
            digest = self.prefix_hash(chain, tokens[start : start + self.block_size], salt)
            block = self.block_of.get(digest)
            if block is None:
                break
            blocks.append(block)
            chain = digest
        return blocks, chain

    def take(self, block: int) -> None:
        """Hold a registered block (a prefix hit)."""
        if self.ref_counts[block] == 0:
            self.free.remove(block)
        self.ref_counts[block] += 1

    def allocate(self) -> int:
        block = self.free.popleft()
        if self.key_of[block] is not None:  # its old contents are about to be overwritten
            del self.block_of[self.key_of[block]]
            self.key_of[block] = None
        self.ref_counts[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):  # a sequence's last blocks are the least likely to be shared: reuse them first
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free.append(block)

    def register(self, block: int, previous: bytes, tokens: Sequence[int], salt: bytes = b"") -> bytes:
        """Record a full block's tokens; returns its digest, which the next block chains from."""
        key = self.prefix_hash(previous, tokens, salt)
        if key not in self.block_of and self.key_of[block] is None:
            self.block_of[key] = block
            self.key_of[block] = key
        return key


class PagedKVCache:
    """Keys and values of every layer in [L, n_kv, blocks · block_size, d] tensors: token slot s of block b is row
    b · block_size + s of every kv head. Head-major, so a kv head's keys lie together, 16 rows a block: attention
    reads one head's rows, and with slot-major rows its reads were interleaved with the other heads' (a decoding
    step of the default model was 2–3% slower that way, measured against a dense cache).

    Left uninitialised: only rows a sequence has written are ever read, and memory the allocator maps for a large
    cache becomes resident only as blocks are first used (an idle server of a small model stays small)."""

    def __init__(self, config: ModelConfig, num_blocks: int, dtype: torch.dtype, device: torch.device,
                 block_size: int = BLOCK_SIZE) -> None:
        shape = (config.num_layers, config.num_kv_heads, num_blocks * block_size, config.head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.block_offsets = torch.arange(block_size, device=device)


class PagedBatch:
    """One forward's sequences in the paged cache (the decoder's `SequenceBatch`): for each, its block table, the
    position of its first token in this batch, how many tokens it brings and its rotary frequencies.

    Built once a step, so its index tensors come from Python lists in one call each rather than from chains of small
    tensor operations (a decoding step of the default model spent 0.2 ms here before)."""

    def __init__(self, cache: PagedKVCache, tables: list[list[int]], starts: list[int], lengths: list[int],
                 rotary: list[RotaryChoice]) -> None:
        self.cache, self.tables, self.starts, self.lengths = cache, tables, starts, lengths
        self.rotary_segments = list(zip(rotary, lengths))
        size = cache.block_size
        new_positions = [range(start, start + length) for start, length in zip(starts, lengths)]
        self.positions = torch.tensor([p for positions in new_positions for p in positions])
        written = [table[p // size] * size + p % size for table, positions in zip(tables, new_positions) for p in positions]
        # Consecutive rows (one sequence in consecutive blocks: a library call's) are written as a slice, 4× faster.
        consecutive = written[-1] - written[0] == len(written) - 1 and all(b - a == 1 for a, b in zip(written, written[1:]))
        self.written_slice = slice(written[0], written[-1] + 1) if consecutive else None
        self.written_rows = None if consecutive else torch.tensor(written, device=cache.keys.device)
        self.token_slices, offset = [], 0
        for length in lengths:
            self.token_slices.append(slice(offset, offset + length))
            offset += length

    def _rows(self, table: list[int], end: int) -> torch.Tensor:
        """Rows of the cache holding a sequence's positions 0…end−1."""
        blocks = torch.tensor(table[: -(-end // self.cache.block_size)], device=self.cache.keys.device)
        return (blocks[:, None] * self.cache.block_size + self.cache.block_offsets).flatten()[:end]

    def decode_layout(self) -> PagedLayout | None:
        if any(length != 1 for length in self.lengths):
            return None
        ends = [start + 1 for start in self.starts]
        slots = torch.cat([self._rows(table, end) for table, end in zip(self.tables, ends)])
        offsets = torch.tensor([sum(ends[:i]) for i in range(len(ends))])
        return PagedLayout(self.cache.keys, self.cache.values, slots, offsets, self.positions)

    def each_sequence(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> Iterator[tuple[slice, int, torch.Tensor, torch.Tensor]]:
        layer_keys, layer_values = self.cache.keys[layer], self.cache.values[layer]
        # keys [1, n_kv, T, d]: each kv head's rows written where each token's block slot is
        if self.written_slice is not None:
            layer_keys[:, self.written_slice] = keys[0]
            layer_values[:, self.written_slice] = values[0]
        else:
            layer_keys.index_copy_(1, self.written_rows, keys[0])
            layer_values.index_copy_(1, self.written_rows, values[0])
        for tokens, start, table, length in zip(self.token_slices, self.starts, self.tables, self.lengths):
            if start == 0:  # a first chunk holds nothing but its own keys and values (contiguous: SDPA is faster)
                yield tokens, start, keys[:, :, tokens].contiguous(), values[:, :, tokens].contiguous()
                continue
            rows = self._rows(table, start + length)
            held_keys = layer_keys.index_select(1, rows)[None]
            held_values = layer_values.index_select(1, rows)[None]
            yield tokens, start, held_keys, held_values
