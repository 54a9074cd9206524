"""Perplexity the way llama.cpp's `llama-perplexity` computes it, so the two engines can be compared on one text.

The text is cut into chunks of `context` tokens; each chunk is scored on its second half only (every scored token
sees at least context/2 tokens before it), and the mean negative log-likelihood over all chunks is exponentiated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import QwenError


@dataclass(slots=True)
class PerplexityResult:
    perplexity: float
    tokens_scored: int
    chunks: int


def scored_from(length: int) -> int:
    """The first position whose logits are scored in a chunk of `length` tokens (its second half)."""
    return length // 2


def chunk_nll(logits: torch.Tensor, chunk: list[int]) -> tuple[float, int]:
    """Summed NLL of the chunk's second half, given float logits [len(chunk), V]."""
    first = scored_from(len(chunk))
    targets = torch.tensor(chunk[first + 1 :])
    log_probs = torch.log_softmax(logits[first:-1].to(torch.float32), dim=-1)
    return float(-log_probs.gather(1, targets[:, None]).sum()), len(targets)


def perplexity(
    logits_of: Callable[[list[int]], torch.Tensor], ids: list[int], context: int, max_chunks: int | None = None
) -> PerplexityResult:
    """`logits_of(chunk)` returns logits [len(chunk), V] (rows from the middle on are read); at most `max_chunks`."""
    if context < 4:
        raise QwenError(f"the perplexity context must be at least 4 tokens (got {context})")
    chunks = len(ids) // context if max_chunks is None else min(len(ids) // context, max_chunks)
    if chunks == 0:
        raise QwenError(f"the text has {len(ids)} tokens, fewer than one context of {context}; use a longer text or --context")
    total, count = 0.0, 0
    for i in range(chunks):
        chunk = ids[i * context : (i + 1) * context]
        nll, n = chunk_nll(logits_of(chunk), chunk)
        total, count = total + nll, count + n
    return PerplexityResult(math.exp(total / count), count, chunks)
