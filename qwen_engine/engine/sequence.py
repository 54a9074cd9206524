"""One generated continuation as the scheduler and the model runner see it (nano-vllm's Sequence)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model.rope import RotaryChoice
from ..prompt import Prompt
from ..sampling_params import SamplingParams
from .sampling import Sampler

ROOT = b""  # the prefix digest before the first block, for the allocator's own use


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """Prompt and output tokens, where its keys and values live, how far they are computed, and how its next token
    is picked."""

    prompt: Prompt
    params: SamplingParams
    sampler: Sampler
    rotary: RotaryChoice  # chosen from the prompt's length once, used for every chunk and step after
    request_id: str = ""
    index: int = 0  # which of a request's n choices
    logit_bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (token ids, values) added before sampling
    constraint: Any = None  # a token filter with allowed(logits) → mask, advance(token), done (engine/constrained.py)
    forced: list[int] | None = None  # outputs to take instead of sampling (scoring a given text through decode steps)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the cache
    registered: int = 0  # full blocks recorded for prefix reuse
    chain: bytes = b""  # prefix digest after the registered blocks (starts at `root`)
    finish_reason: str | None = None
    state: Any = None  # what the engine keeps per sequence (detokenizer, stop filter, its request)
    seq_id: int = field(default_factory=lambda: next(_ids))

    def __post_init__(self) -> None:
        self.chain = self.root

    @property
    def root(self) -> bytes:
        """The prefix digest before the first block: cached keys are stored rotated, so sequences with different
        rotary frequencies never share blocks."""
        return repr(self.rotary).encode()

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompt.token_ids

    @property
    def tokens(self) -> list[int]:
        return self.prompt.token_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt.token_ids) + len(self.output_ids)

    def block_salt(self, block: int, size: int) -> bytes:
        """The item digests mixed into block `block`'s prefix hash (empty for text)."""
        return self.prompt.digests_in(block * size, (block + 1) * size)
