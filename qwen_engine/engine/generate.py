"""Autoregressive generation for one sequence: prefill, then one token per step through a static KV cache.

Text comes out as deltas that never split a UTF-8 character and never show any part of a stop string.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import QwenError
from ..model.decoder import QwenDecoder
from ..tokenizer import IncrementalDecoder, Tokenizer
from .kv_cache import StaticKVCache
from .sampling import Sampler, SamplingParams


@dataclass(slots=True)
class Timings:
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # from the call to the first generated token
    decode_s: float = 0.0  # after the first token
    decode_tokens: int = 0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass(slots=True)
class Delta:
    """One step of a stream: the token sampled and the text it released (possibly empty)."""

    token_id: int
    text: str


@dataclass(slots=True)
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (stop token or string) or "length"
    prompt_tokens: int = 0
    timings: Timings = field(default_factory=Timings)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def held_back(text: str, markers: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that begins one of `markers` (and may still grow into it)."""
    hold = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), hold, -1):
            if text.endswith(marker[:n]):
                hold = n
                break
    return hold


class StopStringFilter:
    """Holds back text that might still turn into a stop string; reports where one completes."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            released, self.pending = self.pending[: min(hits)], ""
            return released, True
        released = self.pending[: len(self.pending) - held_back(self.pending, self.stops)]
        self.pending = self.pending[len(released):]
        return released, False

    def flush(self) -> str:
        released, self.pending = self.pending, ""
        return released

    def close(self, text: str) -> tuple[str, bool]:
        """The end of the output: `text` pushed, then whatever was held back unless a stop string completed."""
        released, hit = self.push(text)
        return (released, True) if hit else (released + self.flush(), False)


class Generator:
    """Runs one sequence at a time on a decoder, reusing its KV cache between calls."""

    def __init__(self, model: QwenDecoder, tokenizer: Tokenizer, stop_token_ids: frozenset[int]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.stop_token_ids = stop_token_ids
        self.cache: StaticKVCache | None = None

    def _cache_for(self, length: int) -> StaticKVCache:
        if self.cache is None or self.cache.max_len < length:
            self.cache = StaticKVCache(self.model.config, length, self.model.dtype, self.model.device)
        return self.cache

    def stream(self, prompt_ids: list[int], params: SamplingParams, result: GenerationResult) -> Iterator[Delta]:
        """Yield deltas while filling `result` (text, ids, finish reason, timings)."""
        context = self.model.config.context_length
        if not prompt_ids:
            raise QwenError("the prompt is empty; give at least one token of text")
        if len(prompt_ids) >= context:
            raise QwenError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context holds {context}; shorten the prompt"
            )
        if max(prompt_ids) >= self.model.config.vocab_size or min(prompt_ids) < 0:
            raise QwenError(f"prompt token ids must lie in [0, {self.model.config.vocab_size})")
        budget = min(params.max_tokens, context - len(prompt_ids))
        device = self.model.device
        cache = self._cache_for(len(prompt_ids) + budget)
        sampler = Sampler(params, prompt_ids, self.model.config.vocab_size, device)
        detokenizer = IncrementalDecoder(self.tokenizer)
        stops = StopStringFilter(params.stop)
        stop_ids = params.stop_ids(self.stop_token_ids)
        timings = result.timings

        started = time.perf_counter()
        with torch.inference_mode():
            logits = self.model(torch.tensor([prompt_ids], device=device), cache=cache, last_only=True)
            position = len(prompt_ids)
            timings.prefill_s = time.perf_counter() - started
            result.finish_reason = "length"
            for step in range(budget):
                token = sampler(logits[0, -1])
                now = time.perf_counter()
                if step == 0:
                    timings.ttft_s = now - started
                    first_token_at = now
                else:
                    timings.decode_s, timings.decode_tokens = now - first_token_at, step
                result.token_ids.append(token)
                if token in stop_ids:
                    result.finish_reason = "stop"
                    break
                text, hit_stop = stops.push(detokenizer.push(token))
                if text:
                    result.text += text
                if hit_stop:
                    result.finish_reason = "stop"
                    yield Delta(token, text)
                    return
                yield Delta(token, text)
                if step + 1 < budget:
                    logits = self.model(torch.tensor([[token]], device=device), start=position, cache=cache)
                    position += 1
        tail, hit_stop = stops.close(detokenizer.flush())
        if hit_stop:
            result.finish_reason = "stop"
        if tail:
            result.text += tail
            yield Delta(result.token_ids[-1] if result.token_ids else -1, tail)
