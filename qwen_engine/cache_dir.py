"""Where the engine keeps what it builds once: the assembled default model, compiled kernels, converted weights.

A leaf module, so the kernels and the weights cache find the directory without importing the default model.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "QWEN_ENGINE_CACHE"


def cache_dir() -> Path:
    """$QWEN_ENGINE_CACHE, else $XDG_CACHE_HOME/qwen-engine or ~/.cache/qwen-engine."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen-engine"
