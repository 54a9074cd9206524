"""qwen-engine: run the Qwen model family from its official checkpoints.

`load` and `Model` need torch and are imported on first use (PEP 562), so `import qwen_engine` and the commands that
never run a model (`qwen --help`, `qwen models`, `qwen memory`) start without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import QwenError
from .results import GenerationResult
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .llm import Model, load

__all__ = ["GenerationResult", "Model", "QwenError", "SamplingParams", "load"]
__version__ = "0.1.0"
_FROM_LLM = ("Model", "load")


def __getattr__(name: str) -> Any:
    if name not in _FROM_LLM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import llm

    value = getattr(llm, name)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_FROM_LLM})
