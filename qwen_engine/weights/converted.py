"""A cache of converted weights (dequantized, requantized, packed), so a second start maps them from disk
instead of redoing the conversion. The key changes whenever the source file, the format or the engine does."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import torch

from ..cache_dir import cache_dir

# Bump when the layout of the cache file itself changes.
FORMAT_VERSION = 1


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def converted_path(source: Path, fingerprint: str, dtype: torch.dtype, quant: str, converter: str) -> Path:
    """`<slot>-<version>.pt`: the slot names the source path and format, the version everything that makes the
    content (file sizes and times, the converter's code, torch), so an outdated file is never served and is
    replaced rather than left behind. `converter` identifies the code that converts."""
    slot = _digest(f"{source.resolve()}|{dtype}|{quant}")
    version = _digest(f"{FORMAT_VERSION}|{fingerprint}|{converter}|torch {torch.__version__}")
    return cache_dir() / "converted" / f"{slot}-{version}.pt"


def save_converted(path: Path, state: dict[str, torch.Tensor], plan: dict[str, str]) -> None:
    """Write to a temporary name, check it reads back, then rename: a half-written cache never looks valid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        # torch.save keeps shared storage shared, so a tied head is stored once.
        torch.save({"plan": plan, "state": state}, partial)
        if load_converted(partial) is None:
            return
        os.replace(partial, path)
        slot = path.name.split("-")[0]
        for outdated in path.parent.glob(f"{slot}-*.pt"):
            if outdated != path:
                outdated.unlink(missing_ok=True)
    except OSError:
        pass  # a cache that cannot be written only costs the next start its conversion time
    finally:
        partial.unlink(missing_ok=True)


def load_converted(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The cached state (memory-mapped: pages load as they are used) and its plan, or None without a usable cache."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        return saved["state"], saved["plan"]
    except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError):
        return None
