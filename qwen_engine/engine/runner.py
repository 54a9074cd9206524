"""The model runner (nano-vllm's ModelRunner): the decoder, the paged KV tensors, input preparation and sampling.

The engine hands it sequences and how many of their tokens to compute; the runner turns them into one forward:
flat token ids (or input embeddings where media items fill positions), each token's position, the cache rows of
every sequence, each sequence's rotary frequencies. It is the seam where tensor-parallel ranks plug in (each rank
a runner over its shard), and where encoders plug in (`encoders`: media kind → encoder).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ContextManager, Protocol

import torch

from ..errors import QwenError
from ..model.decoder import QwenDecoder
from ..model.rope import RotaryChoice
from ..prompt import MediaItem, Prompt
from ..sampling_params import SamplingParams
from .paged import PagedBatch, PagedKVCache
from .sampling import Sampler
from .sequence import Sequence

Encoder = Callable[[MediaItem], torch.Tensor]  # an item → its embeddings [item.length, hidden]


class Ranks(Protocol):
    """The other tensor-parallel ranks, as rank 0's runners reach them (qwen_engine/distributed.py)."""

    def new_cache(self, num_blocks: int, lock: ContextManager) -> int:
        """Have every rank allocate a KV cache of `num_blocks` blocks for its shard; its id."""
        ...

    def send(self, cache_id: int | None, step: Step) -> None:
        """Have every rank run `step` (on that cache; None: a forward without one) in step with this one."""
        ...

    @property
    def alive(self) -> bool:
        """Every rank still there."""
        ...


@dataclass
class Step:
    """One forward as every tensor-parallel rank runs it: the tokens, where their keys and values go (no tables: a
    whole-sequence forward without a cache), which rows' logits are wanted, and the media rows (encoder outputs,
    computed on rank 0) written over the token embeddings."""

    tokens: list[int]
    tables: list[list[int]] | None = None
    starts: list[int] | None = None
    counts: list[int] | None = None
    rotary: list[RotaryChoice] | None = None
    last: list[int] | None = None  # None: every row
    media: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (first row, rows [n, hidden])


def execute(decoder: QwenDecoder, cache: PagedKVCache | None, step: Step) -> torch.Tensor:
    """Float32 logits of the step's wanted rows [n, V] (this rank's part of the collectives on the way)."""
    device = decoder.device
    ids = torch.tensor([step.tokens], device=device)
    batch = None if step.tables is None else PagedBatch(cache, step.tables, step.starts, step.counts, step.rotary)
    last = None if step.last is None else torch.tensor(step.last, dtype=torch.long, device=device)
    hidden = None
    if step.media:
        hidden = decoder.embed(ids)
        for first, rows in step.media:
            hidden[0, first : first + len(rows)] = rows.to(hidden.dtype)
    out = decoder(None if hidden is not None else ids, inputs_embeds=hidden, batch=batch, logits_at=last)
    return out[0].to(torch.float32)


def run_step(decoder: QwenDecoder, cache: PagedKVCache | None, step: Step, ranks: Ranks | None = None,
             cache_id: int | None = None) -> torch.Tensor:
    """`execute` here, and on every other rank where there are any (sent first, so all enter the same
    collectives); a rank that fails or vanishes mid-step is one clear error (the collectives time out rather than
    hang)."""
    if ranks is None:
        return execute(decoder, cache, step)
    ranks.send(cache_id, step)
    try:
        return execute(decoder, cache, step)
    except RuntimeError as err:  # the backend's own errors (a peer's connection closed, a timeout)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise QwenError(f"a tensor-parallel rank failed during a forward ({reason}); load the model again") from None


class ModelRunner:
    def __init__(self, decoder: QwenDecoder, num_blocks: int, *, encoders: Mapping[str, Encoder] | None = None,
                 lock: ContextManager | None = None, ranks: Ranks | None = None) -> None:
        """`lock` is held around every forward: runners that share a decoder (the library's calls on several threads,
        a server beside them) take turns instead of splitting the cores between them. Under tensor parallelism
        `ranks` sends every step to the other ranks, each running it on its own shard and KV cache."""
        self.decoder = decoder
        self.config = decoder.config
        self.num_blocks = num_blocks
        self.cache = PagedKVCache(decoder.shard, num_blocks, decoder.dtype, decoder.device)
        self.encoders = dict(encoders or {})
        self._lock = lock if lock is not None else contextlib.nullcontext()
        self._ranks = ranks
        self.cache_id = None if ranks is None else ranks.new_cache(num_blocks, self._lock)

    @property
    def alive(self) -> bool:
        """Whether forwards can run: always on one process; under tensor parallelism while every rank is there."""
        return self._ranks is None or self._ranks.alive

    def rotary_choice(self, prompt: Prompt) -> RotaryChoice:
        """The rotary frequencies of a sequence with this prompt, for all of its life."""
        return self.decoder.rotary.choose(len(prompt))

    def sampler(self, params: SamplingParams, prompt: Prompt) -> Sampler:
        return Sampler(params, prompt.token_ids, self.config.vocab_size, self.decoder.device)

    def run(self, seqs: list[Sequence], counts: list[int], wanted: list[bool]) -> torch.Tensor:
        """Compute `counts[i]` more tokens of each sequence in one forward (their keys and values go to the cache);
        float32 logits [n, V] at the last token of each sequence whose `wanted` is set, in order."""
        tokens = [t for seq, count in zip(seqs, counts) for t in seq.tokens[seq.computed : seq.computed + count]]
        ends = list(itertools.accumulate(counts))
        last = None if all(wanted) and len(tokens) == len(seqs) else [end - 1 for end, want in zip(ends, wanted) if want]
        step = Step(tokens, [seq.block_table for seq in seqs], [seq.computed for seq in seqs], counts,
                    [seq.rotary for seq in seqs], last)
        with self._lock, torch.inference_mode():
            step.media = self._media_rows(seqs, counts)
            return run_step(self.decoder, self.cache, step, self._ranks, self.cache_id)

    def _media_rows(self, seqs: list[Sequence], counts: list[int]) -> list[tuple[int, torch.Tensor]]:
        """Every media item's encoder output rows over the positions it fills in this forward (a chunk may hold part
        of an item), as (first row of the forward, rows)."""
        rows, offset = [], 0
        for seq, count in zip(seqs, counts):
            start = seq.computed
            for item in seq.prompt.items_in(start, start + count):
                first, last = max(item.offset, start), min(item.end, start + count)
                rows.append((offset + first - start, self._encoded(item)[first - item.offset : last - item.offset]))
            offset += count
        return rows

    def _encoded(self, item: MediaItem) -> torch.Tensor:
        """The item's encoder output, computed on first use and kept on the item (a preempted sequence keeps it)."""
        if item.embedding is None:
            embedding = self.encoders[item.kind](item)  # the engine admits only items whose kind has an encoder
            if tuple(embedding.shape) != (item.length, self.config.hidden_size):
                raise QwenError(f"the {item.kind} encoder gave {tuple(embedding.shape)} for an item of {item.length} "
                                f"positions; expected ({item.length}, {self.config.hidden_size})")
            item.embedding = embedding.to(self.decoder.dtype).to(self.decoder.device)
        return item.embedding

    def sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        """The sequence's next token from its float32 logits [V]: a forced one, or logit bias, then the constraint's
        mask, then its sampler."""
        if seq.forced is not None and len(seq.output_ids) < len(seq.forced):
            return seq.forced[len(seq.output_ids)]
        steered = logits
        if seq.logit_bias is not None:
            steered = logits.clone()
            steered[seq.logit_bias[0]] += seq.logit_bias[1]
        if seq.constraint is not None:
            steered = steered.masked_fill(~seq.constraint.allowed(steered), float("-inf"))
        token = seq.sampler(steered)
        if seq.constraint is not None:
            seq.constraint.advance(token)
        return token
