"""HF checkpoint directories: `config.json` plus one `model.safetensors` or shards listed in its index.

Headers are read through safetensors' NumPy binding, so `qwen info` never imports torch; tensors through PyTorch's.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from ..errors import QwenError

if TYPE_CHECKING:
    import torch

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QwenError(f"{path} not found; an HF checkpoint directory needs it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise QwenError(f"{path} is not valid JSON ({err}); the checkpoint is damaged") from None


def shard_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in index order."""
    index = directory / SHARD_INDEX
    if index.exists():
        weight_map = read_json(index).get("weight_map", {})
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
    elif (directory / SINGLE_FILE).exists():
        files = [directory / SINGLE_FILE]
    else:
        raise QwenError(f"{directory} holds neither {SINGLE_FILE} nor {SHARD_INDEX}; point --model at an HF checkpoint directory")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise QwenError(f"{directory} lacks the shard(s) {', '.join(missing)} named in {SHARD_INDEX}; download them again")
    return files


@contextmanager
def _open_shard(file: Path, framework: str) -> Iterator[Any]:
    try:
        with safe_open(file, framework=framework, device="cpu") as shard:
            yield shard
    except (SafetensorError, OSError) as err:
        raise QwenError(f"cannot read {file} ({err}); the file is truncated or corrupt — download it again") from None


def load_safetensors(
    directory: Path, dtype: torch.dtype, device: torch.device, progress: Callable[[Iterator], Iterator] = iter
) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint (memory-mapped, copied only where dtype or device change)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in progress(shard_files(directory)):
        with _open_shard(file, "pt") as shard:
            for name in shard.keys():
                tensors[name] = shard.get_tensor(name).to(device=device, dtype=dtype)
    return tensors


def stored_dtypes(directory: Path) -> dict[str, str]:
    """The stored dtype of every tensor (read from the headers only)."""
    dtypes: dict[str, str] = {}
    for file in shard_files(directory):
        with _open_shard(file, "numpy") as shard:
            for name in shard.keys():
                dtypes[name] = shard.get_slice(name).get_dtype()
    return dtypes
