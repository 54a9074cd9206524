"""What a generation gives back to the library and the CLI (a leaf module: no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .grounding import Box


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this step and their log-probabilities


@dataclass(slots=True)
class Timings:
    prefill_s: float = 0.0  # from the first step to the first generated token
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
class Completion:
    """One choice of a generation."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (stop token or string, a finished JSON object) or "length"
    logprobs: list[TokenLogprob] | None = None  # with logprobs=…: one entry per generated token
    boxes: list[Box] = field(default_factory=list)  # Qwen-VL's grounding boxes, in the last image's pixels


@dataclass(slots=True)
class GenerationResult:
    """A generation's choices (one unless n > 1); `text`, `token_ids`, `finish_reason` and `logprobs` are the first's."""

    choices: list[Completion] = field(default_factory=lambda: [Completion()])
    prompt_tokens: int = 0
    timings: Timings = field(default_factory=Timings)

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return self.choices[0].logprobs

    @property
    def boxes(self) -> list[Box]:
        return self.choices[0].boxes

    @property
    def completion_tokens(self) -> int:
        return sum(len(choice.token_ids) for choice in self.choices)
