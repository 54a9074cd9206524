"""HF checkpoint directories: `config.json` plus one `model.safetensors` or shards listed in its index, or the same
in PyTorch's pickles (`pytorch_model.bin`, `pytorch_model-0000N-of-0000M.bin`, as Qwen-VL-Chat ships).

Safetensors headers are read through safetensors' NumPy binding, so `qwen info` never imports torch for them;
tensors through PyTorch's. Pickles are read with `weights_only` (tensors only: a file cannot run code) and
memory-mapped.
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
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_DTYPES = {"torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32"}  # as safetensors names them


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QwenError(f"{path} not found; an HF checkpoint directory needs it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise QwenError(f"{path} is not valid JSON ({err}); the checkpoint is damaged") from None


def shard_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint, in index order: safetensors where there are any, else pickles."""
    for single, index in ((SINGLE_FILE, SHARD_INDEX), (PICKLE_FILE, PICKLE_INDEX)):
        if (directory / index).exists():
            weight_map = read_json(directory / index).get("weight_map", {})
            files = [directory / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise QwenError(f"{directory} lacks the shard(s) {', '.join(missing)} named in {index}; download them again")
            return files
        if (directory / single).exists():
            return [directory / single]
    raise QwenError(f"{directory} holds no weights ({SINGLE_FILE}, {PICKLE_FILE} or a shard index of either); point "
                    "--model at an HF checkpoint directory")


def _read_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A PyTorch weights file, memory-mapped; tensors only (weights_only: unpickling runs no code from the file)."""
    import pickle
    import zipfile

    import torch

    try:  # (files older than torch 1.6's zip layout cannot be mapped: those are read)
        state = torch.load(file, map_location="cpu", mmap=zipfile.is_zipfile(file), weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise QwenError(f"cannot read {file} ({str(err).splitlines()[0][:200]}); the file is truncated, corrupt or not "
                        "a PyTorch weights file — download it again") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise QwenError(f"{file} holds no state dict of tensors; it is not a checkpoint's weights file")
    return state


@contextmanager
def _open_shard(file: Path, framework: str) -> Iterator[Any]:
    try:
        with safe_open(file, framework=framework, device="cpu") as shard:
            yield shard
    except (SafetensorError, OSError) as err:
        raise QwenError(f"cannot read {file} ({err}); the file is truncated or corrupt — download it again") from None


def load_weights(
    directory: Path, dtype: torch.dtype, device: torch.device, progress: Callable[[Iterator], Iterator] = iter,
    keep: Callable[[str], bool] = lambda name: True,
    each: Callable[[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors whose names `keep` takes (memory-mapped, copied only where dtype or device change:
    the others are never converted); `each` turns a tensor into the ones kept of it (renamed, a rank's slice)
    before the cast, one at a time, so only what is kept is ever converted."""
    tensors: dict[str, torch.Tensor] = {}

    def add(name: str, tensor: torch.Tensor) -> None:
        for kept, part in (each(name, tensor) if each is not None else {name: tensor}).items():
            tensors[kept] = part.to(device=device, dtype=dtype)

    for file in progress(shard_files(directory)):
        if file.suffix == ".bin":
            for name, tensor in _read_pickle(file).items():
                if keep(name):
                    add(name, tensor)
            continue
        with _open_shard(file, "pt") as shard:
            for name in shard.keys():
                if keep(name):
                    add(name, shard.get_tensor(name))
    return tensors


def stored_dtypes(directory: Path) -> dict[str, str]:
    """The stored dtype of every tensor (safetensors: from the headers only)."""
    dtypes: dict[str, str] = {}
    for file in shard_files(directory):
        if file.suffix == ".bin":
            dtypes |= {name: PICKLE_DTYPES.get(str(t.dtype), str(t.dtype)) for name, t in _read_pickle(file).items()}
            continue
        with _open_shard(file, "numpy") as shard:
            for name in shard.keys():
                dtypes[name] = shard.get_slice(name).get_dtype()
    return dtypes
