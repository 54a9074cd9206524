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

    def cached_prefix(self, tokens: Sequence[int], salts: Callable[[int], bytes] = NO_SALT) -> tuple[list[int], bytes]:
        """Registered blocks that hold the start of `tokens` (block i salted with `salts(i)`), in order (not yet
        taken), and the digest after the last of them. The block holding the last token is never reused: its logits
        must be computed."""
        blocks, chain = [], ROOT
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
    """Keys and values of every layer in [L, blocks · block_size, n_kv, d] tensors: token slot s of block b is row
    b · block_size + s.

    Left uninitialised: only rows a sequence has written are ever read, and memory the allocator maps for a large
    cache becomes resident only as blocks are first used (an idle server of a small model stays small)."""

    def __init__(self, config: ModelConfig, num_blocks: int, dtype: torch.dtype, device: torch.device,
                 block_size: int = BLOCK_SIZE) -> None:
        shape = (config.num_layers, num_blocks * block_size, config.num_kv_heads, config.head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.block_size = block_size


class PagedBatch:
    """One forward's sequences in the paged cache (the decoder's `SequenceBatch`): for each, its block table, the
    position of its first token in this batch, how many tokens it brings and its rotary frequencies."""

    def __init__(self, cache: PagedKVCache, tables: list[list[int]], starts: list[int], lengths: list[int],
                 rotary: list[RotaryChoice]) -> None:
        self.cache, self.starts, self.lengths = cache, starts, lengths
        self.rotary_segments = list(zip(rotary, lengths))
        self.positions = torch.cat([torch.arange(start, start + length) for start, length in zip(starts, lengths)])
        device, size = cache.keys.device, cache.block_size
        # rows of the cache holding each sequence's positions 0…end−1
        self.rows = [
            (torch.tensor(table, device=device)[:, None] * size + torch.arange(size, device=device)).flatten()[: start + length]
            for table, start, length in zip(tables, starts, lengths)
        ]
        self.token_slices, offset = [], 0
        for length in lengths:
            self.token_slices.append(slice(offset, offset + length))
            offset += length
        self.written_rows = torch.cat([rows[start:] for rows, start in zip(self.rows, starts)])

    def decode_layout(self) -> PagedLayout | None:
        if any(length != 1 for length in self.lengths):
            return None
        offsets = torch.tensor([0] + [len(rows) for rows in self.rows[:-1]]).cumsum(0)
        return PagedLayout(self.cache.keys, self.cache.values, torch.cat(self.rows), offsets, torch.tensor(self.starts))

    def each_sequence(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> Iterator[tuple[slice, int, torch.Tensor, torch.Tensor]]:
        layer_keys, layer_values = self.cache.keys[layer], self.cache.values[layer]
        # keys [1, n_kv, T, d] → rows [T, n_kv, d], written where each token's block slot is
        layer_keys.index_copy_(0, self.written_rows, keys[0].transpose(0, 1))
        layer_values.index_copy_(0, self.written_rows, values[0].transpose(0, 1))
        for tokens, start, rows in zip(self.token_slices, self.starts, self.rows):
            if start == 0:  # a first chunk holds nothing but its own keys and values (contiguous: SDPA is faster)
                yield tokens, start, keys[:, :, tokens].contiguous(), values[:, :, tokens].contiguous()
                continue
            held_keys = layer_keys.index_select(0, rows).transpose(0, 1)[None]
            held_values = layer_values.index_select(0, rows).transpose(0, 1)[None]
            yield tokens, start, held_keys, held_values
