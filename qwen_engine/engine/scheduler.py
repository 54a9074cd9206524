"""Which sequences run in the next step: continuous batching over a paged KV cache (nano-vllm's scheduler, with
chunked prefill).

Every step admits waiting sequences while blocks and batch slots allow, gives prefills a budget of tokens (a
long prompt goes in chunks, so it never stalls the running decodes for long) and lets every decoding sequence
take one token. When a decoding sequence needs a block and none is free, the most recently admitted sequence is
preempted: its blocks go back, and it waits at the front of the queue to recompute what it had (its output so
far is kept).
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .paged import ROOT, BlockAllocator
from .sampling import Sampler, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One generated continuation: prompt and output tokens, where its KV lives and how far it is computed."""

    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    request_id: str = ""
    index: int = 0  # which of a request's n choices
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the cache
    registered: int = 0  # full blocks recorded for prefix reuse
    chain: bytes = ROOT  # prefix digest after the registered blocks
    finish_reason: str | None = None
    state: Any = None  # what the engine keeps per sequence (detokenizer, stop filter, logprobs, constraint)
    seq_id: int = field(default_factory=lambda: next(_ids))

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass(slots=True)
class Step:
    """What one step computes: prefill chunks (sequence, number of tokens) and the decoding sequences."""

    prefills: list[tuple[Sequence, int]]
    decodes: list[Sequence]
    preempted: list[Sequence]


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_seqs: int = 32, prefill_tokens: int = 256) -> None:
        self.allocator = allocator
        self.max_seqs, self.prefill_tokens = max_seqs, prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Step:
        # Decoding sequences take their blocks first: a sequence admitted now would otherwise be preempted at once.
        preempted: list[Sequence] = []
        decodes = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or len(seq) - seq.computed != 1:
                continue
            while seq.status is Status.RUNNING and not self._reserve(seq, len(seq)):
                victim = self.running[-1]
                self.preempt(victim)
                preempted.append(victim)
            if seq.status is Status.RUNNING:
                decodes.append(seq)
        if not preempted:
            self._admit()
        budget, prefills = self.prefill_tokens, []
        for seq in self.running:
            pending = len(seq) - seq.computed
            if pending > 1 and budget > 0:
                chunk = min(pending, budget)
                prefills.append((seq, chunk))
                budget -= chunk
        return Step(prefills, decodes, preempted)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            cached, chain = self.allocator.cached_prefix(seq.tokens)
            fresh = -(-(len(seq) + 1) // self.allocator.block_size) - len(cached)  # room for the first new token too
            newly_free = sum(1 for block in cached if self.allocator.ref_counts[block] == 0)
            if self.allocator.num_free - newly_free < fresh:
                break
            self.waiting.popleft()
            for block in cached:
                self.allocator.take(block)
            seq.block_table = cached + [self.allocator.allocate() for _ in range(fresh)]
            size = self.allocator.block_size
            seq.registered, seq.computed, seq.chain = len(cached), len(cached) * size, chain
            seq.status = Status.RUNNING
            self.running.append(seq)

    def _reserve(self, seq: Sequence, length: int) -> bool:
        """Blocks for `length` tokens in the sequence's table; False when none is free."""
        while len(seq.block_table) * self.allocator.block_size < length:
            if not self.allocator.num_free:
                return False
            seq.block_table.append(self.allocator.allocate())
        return True

    def computed(self, seq: Sequence, count: int) -> None:
        """Record `count` more tokens of `seq` as cached, registering the blocks that became full."""
        seq.computed += count
        size = self.allocator.block_size
        tokens = seq.tokens
        while (seq.registered + 1) * size <= seq.computed:
            block = seq.block_table[seq.registered]
            seq.chain = self.allocator.register(block, seq.chain, tokens[seq.registered * size : (seq.registered + 1) * size])
            seq.registered += 1

    def preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        self._release(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def abort(self, seq: Sequence, reason: str = "abort") -> None:
        """End a sequence wherever it is (waiting or running)."""
        if seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.finish(seq, reason)

    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self.allocator.release(seq.block_table)
        seq.block_table, seq.computed, seq.registered, seq.chain = [], 0, 0, ROOT
