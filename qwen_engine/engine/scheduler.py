"""Which sequences run in the next step: continuous batching over a paged KV cache (nano-vllm's scheduler, with
chunked prefill).

Every step admits waiting sequences while blocks and batch slots allow, gives prefills a budget of tokens (a
long prompt goes in chunks, so it never stalls the running decodes for long) and lets every decoding sequence
take one token. A prompt's chunks end at multiples of the prefill size counted from its first token, whatever
else runs beside it: chunk boundaries, and so the roundings of a sequence's arithmetic, never depend on the crowd,
and a sequence's output is the same alone or among others. When a decoding sequence needs a block and none is
free, the most recently admitted sequence is preempted: its blocks go back, and it waits at the front of the queue
to recompute what it had (its output so far, and its media items' encoder outputs, are kept)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .paged import BlockAllocator
from .sequence import Sequence, Status


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
        self.prefix_hit_tokens = 0  # tokens whose keys and values came from the prefix cache, since the start
        self.running: list[Sequence] = []  # in admission order

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def stats(self) -> dict[str, int]:
        """Queue and cache occupancy, for metrics."""
        free, total = self.allocator.num_free, self.allocator.num_blocks
        return {"waiting": len(self.waiting), "running": len(self.running), "kv_blocks_free": free,
                "kv_blocks_used": total - free, "kv_blocks_total": total,
                "capacity_tokens": total * self.allocator.block_size, "prefix_hit_tokens": self.prefix_hit_tokens}

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
            if pending > 1:
                chunk = min(pending, self.prefill_tokens - seq.computed % self.prefill_tokens)
                if chunk > budget:  # whole chunks only; a later step takes it
                    continue
                prefills.append((seq, chunk))
                budget -= chunk
        return Step(prefills, decodes, preempted)

    def _admit(self) -> None:
        size = self.allocator.block_size
        while self.waiting and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            cached, chain = self.allocator.cached_prefix(seq.tokens, lambda block: seq.block_salt(block, size), seq.root)
            fresh = -(-(len(seq) + 1) // self.allocator.block_size) - len(cached)  # room for the first new token too
            newly_free = sum(1 for block in cached if self.allocator.ref_counts[block] == 0)
            if self.allocator.num_free - newly_free < fresh:
                break
            self.waiting.popleft()
            for block in cached:
                self.allocator.take(block)
            seq.block_table = cached + [self.allocator.allocate() for _ in range(fresh)]
            seq.registered, seq.computed, seq.chain = len(cached), len(cached) * size, chain
            self.prefix_hit_tokens += seq.computed
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
        if (seq.registered + 1) * size > seq.computed:
            return
        tokens = seq.tokens
        while (seq.registered + 1) * size <= seq.computed:
            block = seq.block_table[seq.registered]
            seq.chain = self.allocator.register(block, seq.chain, tokens[seq.registered * size : (seq.registered + 1) * size],
                                                seq.block_salt(seq.registered, size))
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
        seq.block_table, seq.computed, seq.registered, seq.chain = [], 0, 0, seq.root
