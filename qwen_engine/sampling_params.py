"""How to pick tokens: the sampling options of a request, checked once when they are made.

A leaf module (no torch): the checkpoint reader, the CLI and the server build these without loading the engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import QwenError

MAX_TOP_LOGPROBS = 20  # alternatives a request may ask for per token, as OpenAI's API allows


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy; top_k 0, top_p 1 and min_p 0 switch those filters off.

    The field defaults are Qwen2.5-Instruct's published settings (qwen-family.md §8.4), in force for a checkpoint with
    no generation config; `SamplingDefaults.of` gives a checkpoint's own, and explicit arguments override both.
    """

    max_tokens: int = 512
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.8
    min_p: float = 0.0
    repetition_penalty: float = 1.05
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # keep going past the model's end-of-turn tokens (benchmarks)

    def __post_init__(self) -> None:
        checks = (
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be an integer ≥ 1 (got {self.max_tokens})"),
            (self.temperature >= 0, f"temperature must be ≥ 0 (got {self.temperature})"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer ≥ 0, 0 = off (got {self.top_k})"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1] (got {self.min_p})"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (got {self.repetition_penalty})"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2] (got {self.presence_penalty})"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2] (got {self.frequency_penalty})"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        )
        for ok, message in checks:
            if not ok:
                raise QwenError(f"invalid sampling option: {message}")

    def updated(self, **changes: Any) -> SamplingParams:
        """A copy with the given fields changed; None values mean 'keep'."""
        changes = {key: value for key, value in changes.items() if value is not None}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise QwenError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        if isinstance(changes.get("stop"), str):
            changes["stop"] = (changes["stop"],)
        for key in ("stop", "stop_token_ids"):
            if key in changes:
                changes[key] = tuple(changes[key])
        return dataclasses.replace(self, **changes)

    def stop_ids(self, model_stop_ids: frozenset[int]) -> frozenset[int]:
        """The tokens that end the output: the request's own, and the model's end-of-turn ones unless ignore_eos."""
        return frozenset(self.stop_token_ids) | (frozenset() if self.ignore_eos else model_stop_ids)


# Where a default came from, as `qwen info` names it.
GENERATION_CONFIG = "generation_config.json"
TRANSFORMERS_DEFAULT = "transformers default"
QWEN25_DEFAULT = "Qwen2.5 default (no generation config)"
ENGINE_DEFAULT = "qwen-engine default"

# transformers' GenerationConfig defaults for the keys a generation_config.json may leave out (min_p None: off).
# Greedy unless do_sample: the temperature then is 0 whatever the file says, as transformers ignores it.
_TRANSFORMERS_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0,
                          "repetition_penalty": 1.0}
_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")  # the same names in both


@dataclass(slots=True, frozen=True)
class SamplingDefaults:
    """A checkpoint's sampling defaults and where each came from (`qwen info` shows both).

    A key its generation_config.json leaves out takes transformers' default, as transformers, the reference for these
    files, does: Qwen2.5-Instruct's values leaking into Qwen-VL-Chat's (repetition_penalty 1.05 where it has none)
    changed its greedy replies. Qwen2.5's values stand only where there is no generation config at all (a GGUF, or
    an HF directory without the file).
    """

    params: SamplingParams
    sources: Mapping[str, str]  # field of `params` → one of the four sources above

    @classmethod
    def of(cls, generation_config: Mapping[str, Any] | None) -> SamplingDefaults:
        """From a checkpoint's generation_config.json (None where it has none); a JSON null counts as left out."""
        params = SamplingParams()
        if generation_config is None:
            return cls(params, {**dict.fromkeys(_SAMPLING_KEYS, QWEN25_DEFAULT), "max_tokens": ENGINE_DEFAULT})

        def setting(key: str) -> tuple[Any, str]:
            value = generation_config.get(key)
            return (_TRANSFORMERS_DEFAULTS[key], TRANSFORMERS_DEFAULT) if value is None else (value, GENERATION_CONFIG)

        chosen = {key: setting(key) for key in _SAMPLING_KEYS}
        do_sample, do_sample_source = setting("do_sample")
        if not do_sample:
            chosen["temperature"] = (0.0, do_sample_source)
        # Left out, transformers stops at max_length 20, prompt included: no default for a reply; the engine's stands.
        max_new_tokens = generation_config.get("max_new_tokens")
        chosen["max_tokens"] = ((params.max_tokens, ENGINE_DEFAULT) if max_new_tokens is None
                                else (max_new_tokens, GENERATION_CONFIG))
        return cls(params.updated(**{key: value for key, (value, _) in chosen.items()}),
                   {key: source for key, (_, source) in chosen.items()})
