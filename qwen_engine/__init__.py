"""qwen-engine: run the Qwen model family from its official checkpoints."""

from .engine.generate import GenerationResult
from .engine.sampling import SamplingParams
from .errors import QwenError
from .llm import Model, load

__all__ = ["GenerationResult", "Model", "QwenError", "SamplingParams", "load"]
__version__ = "0.1.0"
