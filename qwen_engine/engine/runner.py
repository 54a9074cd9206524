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
from typing import ContextManager

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


class ModelRunner:
    def __init__(self, decoder: QwenDecoder, num_blocks: int, *, encoders: Mapping[str, Encoder] | None = None,
                 lock: ContextManager | None = None) -> None:
        """`lock` is held around every forward: runners that share a decoder (the library's calls on several threads,
        a server beside them) take turns instead of splitting the cores between them."""
        self.decoder = decoder
        self.config = decoder.config
        self.num_blocks = num_blocks
        self.cache = PagedKVCache(decoder.config, num_blocks, decoder.dtype, decoder.device)
        self.encoders = dict(encoders or {})
        self._lock = lock if lock is not None else contextlib.nullcontext()

    def rotary_choice(self, prompt: Prompt) -> RotaryChoice:
        """The rotary frequencies of a sequence with this prompt, for all of its life."""
        return self.decoder.rotary.choose(len(prompt))

    def sampler(self, params: SamplingParams, prompt: Prompt) -> Sampler:
        return Sampler(params, prompt.token_ids, self.config.vocab_size, self.decoder.device)

    def run(self, seqs: list[Sequence], counts: list[int], wanted: list[bool]) -> torch.Tensor:
        """Compute `counts[i]` more tokens of each sequence in one forward (their keys and values go to the cache);
        float32 logits [n, V] at the last token of each sequence whose `wanted` is set, in order."""
        device = self.decoder.device
        tokens = [t for seq, count in zip(seqs, counts) for t in seq.tokens[seq.computed : seq.computed + count]]
        batch = PagedBatch(self.cache, [seq.block_table for seq in seqs], [seq.computed for seq in seqs], counts,
                           [seq.rotary for seq in seqs])
        ends = list(itertools.accumulate(counts))
        last = None if all(wanted) and len(tokens) == len(seqs) else torch.tensor(  # None: every row (decoding)
            [end - 1 for end, want in zip(ends, wanted) if want], dtype=torch.long, device=device)
        ids = torch.tensor([tokens], device=device)
        with self._lock, torch.inference_mode():
            embeddings = self._embeddings(seqs, counts, ids)
            out = self.decoder(None if embeddings is not None else ids, inputs_embeds=embeddings, batch=batch,
                               logits_at=last)
        return out[0].to(torch.float32)

    def _embeddings(self, seqs: list[Sequence], counts: list[int], ids: torch.Tensor) -> torch.Tensor | None:
        """Token embeddings [1, T, H] with every media item's encoder output written over the positions it fills in
        this forward (a chunk may hold part of an item), or None when no item falls in it (the decoder embeds)."""
        spans, offset = [], 0
        for seq, count in zip(seqs, counts):
            start = seq.computed
            spans += [(offset, start, start + count, item) for item in seq.prompt.items_in(start, start + count)]
            offset += count
        if not spans:
            return None
        hidden = self.decoder.embed(ids)
        for offset, start, end, item in spans:
            first, last = max(item.offset, start), min(item.end, end)
            hidden[0, offset + first - start : offset + last - start] = self._encoded(item)[first - item.offset : last - item.offset]
        return hidden

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
