"""GGUF checkpoints: metadata, tensor names mapped to the HF layout, and dequantized tensors (qwen-family.md §9).

Reading the header needs no torch (`qwen info`); torch and the dequantizers are imported where tensors are made.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import QwenError
from .names import LayerNameMap
from .v1 import FUSED_QKV

if TYPE_CHECKING:
    import torch

# qwen-family.md §9.1: GGUF name → HF (qwen2) name; `{}` is the layer index. Arch qwen (v1) uses the same names
# except its fused attn_qkv, mapped to the name that split_fused_qkv divides into q/k/v.
_QWEN2_NAMES = {
    "blk.{}.attn_qkv.weight": FUSED_QKV + ".weight",
    "blk.{}.attn_qkv.bias": FUSED_QKV + ".bias",
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
    # Qwen2-MoE (arch qwen2moe): the router, the shared expert and its gate; the experts come stacked (_EXPERTS).
    "blk.{}.ffn_gate_inp.weight": "model.layers.{}.mlp.gate.weight",
    "blk.{}.ffn_gate_shexp.weight": "model.layers.{}.mlp.shared_expert.gate_proj.weight",
    "blk.{}.ffn_up_shexp.weight": "model.layers.{}.mlp.shared_expert.up_proj.weight",
    "blk.{}.ffn_down_shexp.weight": "model.layers.{}.mlp.shared_expert.down_proj.weight",
    "blk.{}.ffn_gate_inp_shexp.weight": "model.layers.{}.mlp.shared_expert_gate.weight",
}
_layer_names = LayerNameMap(_QWEN2_NAMES, "blk.")
# A layer's experts stacked in one tensor [experts, rows, columns] (llama.cpp's qwen2moe), and the name open_gguf
# gives each expert's part of it.
_STACKED = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight")
_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.(\d+)\.weight")


def hf_name(name: str) -> str:
    """The HF name of a GGUF tensor; an expert's part of a stacked one is that expert's own tensor."""
    expert = _EXPERT.fullmatch(name)
    if expert:
        layer, part, index = expert.groups()
        return f"model.layers.{layer}.mlp.experts.{index}.{part}_proj.weight"
    return _layer_names(name)


# GGUF value types (qwen-family.md §9.4, file layout): id → struct format of one scalar.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


class _Cursor:
    """Reads little-endian GGUF header fields from a memory-mapped file."""

    def __init__(self, buffer: np.ndarray) -> None:
        self.buffer = buffer
        self.view = memoryview(buffer)
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.view, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        if self.pos + length > len(self.buffer):
            raise ValueError("string runs past the end of the file")
        text = bytes(self.view[self.pos : self.pos + length]).decode("utf-8", errors="replace")
        self.pos += length
        return text

    def strings(self, count: int) -> list[str]:
        view, pos, end, items = self.view, self.pos, len(self.buffer), []
        length_at = struct.Struct("<Q").unpack_from
        for _ in range(count):
            (length,) = length_at(view, pos)
            pos += 8
            if pos + length > end:
                raise ValueError("string runs past the end of the file")
            items.append(str(view[pos : pos + length], "utf-8", "replace"))
            pos += length
        self.pos = pos
        return items

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.scalar("<I"), self.scalar("<Q")
            if item_kind in _NUMPY:  # numeric arrays in one go
                dtype = np.dtype(_NUMPY[item_kind])
                items = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return items.tolist()
            if item_kind == _STRING:  # the vocabulary and merges: 150k+ strings each, read in one tight loop
                return self.strings(count)
            return [self.value(item_kind) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        return self.scalar(_SCALARS[kind])


@dataclass(slots=True, frozen=True)
class TensorEntry:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # PyTorch order: GGUF's ne order reversed (qwen-family.md §9.3)
    offset: int  # absolute, in the file
    nbytes: int


@dataclass(slots=True)
class GGUFCheckpoint:
    path: Path
    metadata: dict[str, Any]
    entries: list[TensorEntry]
    data: np.ndarray  # the whole file, memory-mapped read-only

    def has_tensor(self, gguf_name: str) -> bool:
        return any(entry.name == gguf_name for entry in self.entries)

    def tensors(
        self, dtype: torch.dtype, device: torch.device, progress: Callable[[Iterator], Iterator] = iter,
        placeholders: frozenset[str] = frozenset(), each: Each | None = None,
        rows: Callable[[str, int], tuple[int, int] | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every tensor dequantized, cast to `dtype` on `device`, under its HF name; those named in `placeholders`
        (HF names) become meta tensors of the right shape instead, for a caller that reads them another way. `each`
        turns a tensor into the ones kept (a rank's slice, say) before the cast, one tensor at a time; where
        `rows(name, total)` names a block of rows, only those rows are read and dequantized (a GGUF row is whole
        blocks), and they are kept as they are. Every tensor is read with os.pread rather than through the mapping,
        so the file's pages do not count against this process's memory."""
        import torch

        from .quants import dequantize

        loaded = {}
        with open(self.path, "rb") as file:
            for entry in progress(self.entries):
                name = hf_name(entry.name)
                span = None if rows is None or name in placeholders else rows(name, entry.shape[0])
                if span is not None:
                    loaded[name] = self._read_rows(file, entry, *span, dtype, device)
                    continue
                if name in placeholders:
                    weights = torch.empty(entry.shape, dtype=dtype, device="meta")
                else:
                    raw = _pread(file, entry.offset, entry.nbytes)
                    weights = dequantize(raw, entry.qtype, entry.shape, name=entry.name)
                for kept, tensor in (each(name, weights) if each is not None else {name: weights}).items():
                    loaded[kept] = tensor if tensor.is_meta else tensor.to(device=device, dtype=dtype)
        return loaded

    def _read_rows(self, file: BinaryIO, entry: TensorEntry, start: int, count: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
        """Rows start…start+count−1 of a tensor, read from the file (os.pread: through the page cache, not mapped
        into this process) and dequantized a piece at a time into `dtype`, so no float32 copy of the whole slice
        exists at once."""
        import torch

        from .quants import dequantize

        out = torch.empty((count, *entry.shape[1:]), dtype=dtype, device=device)
        for first in range(0, count, ROWS_PER_READ):
            n = min(ROWS_PER_READ, count - first)
            raw = _pread_rows(file, entry, start + first, n)
            out[first : first + n] = dequantize(raw, entry.qtype, (n, *entry.shape[1:]), name=entry.name)
        return out

    def read_rows(self, entry: TensorEntry, start: int, count: int) -> np.ndarray:
        """The stored bytes of rows start…start+count−1 (os.pread, as `_read_rows`), not dequantized."""
        with open(self.path, "rb") as file:
            return _pread_rows(file, entry, start, count)


ROWS_PER_READ = 4096  # rows dequantized at once when a rank reads its rows of a tensor


def _pread(file: BinaryIO, offset: int, size: int) -> np.ndarray:
    """`size` bytes at `offset`, in as many reads as it takes (Linux reads at most ~2 GiB at once, less than a large
    model's embedding table in 16 bits)."""
    out = np.empty(size, dtype=np.uint8)
    view, done = memoryview(out), 0
    while done < size:
        got = os.preadv(file.fileno(), [view[done:]], offset + done)
        if got == 0:
            raise QwenError(f"{file.name} ends {size - done:,} bytes short of a tensor; the file is truncated — "
                            "download it again")
        done += got
    return out


def _pread_rows(file: BinaryIO, entry: TensorEntry, start: int, count: int) -> np.ndarray:
    row_bytes = entry.nbytes // entry.shape[0]  # a row is whole blocks
    return _pread(file, entry.offset + start * row_bytes, count * row_bytes)


Each = Callable[["str", "torch.Tensor"], "dict[str, torch.Tensor]"]  # a loaded tensor → the tensors kept of it


@dataclass(slots=True, frozen=True)
class StoredRows:
    """Rows of one GGUF matrix read from the file when asked for (os.pread), so a lookup table such as the token
    embedding costs no resident memory: only the page cache, shared and reclaimable, holds it."""

    path: Path
    entry: TensorEntry

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape

    def __call__(self, ids: list[int]) -> torch.Tensor:
        """float32 [len(ids), columns]."""
        from .quants import dequantize

        columns = self.entry.shape[-1]
        block_size, type_size = GGML_QUANT_SIZES[self.entry.qtype]
        row_bytes = columns // block_size * type_size
        with open(self.path, "rb") as file:
            raw = b"".join(os.pread(file.fileno(), row_bytes, self.entry.offset + i * row_bytes) for i in ids)
        return dequantize(np.frombuffer(raw, dtype=np.uint8), self.entry.qtype, (len(ids), columns))


def open_gguf(path: Path) -> GGUFCheckpoint:
    """Parse the header, metadata and tensor index; the tensor data stays memory-mapped until dequantized."""
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except FileNotFoundError:
        raise QwenError(f"model file not found: {path}") from None
    except (OSError, ValueError) as err:
        raise QwenError(f"cannot read {path} ({err})") from None
    try:
        cursor = _Cursor(data)
        if bytes(cursor.view[:4]) != b"GGUF":
            raise ValueError("the file does not start with the GGUF magic")
        cursor.pos = 4
        version = cursor.scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        tensor_count, kv_count = cursor.scalar("<Q"), cursor.scalar("<Q")
        metadata = {}
        for _ in range(kv_count):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.scalar("<I"))
        infos = []
        for _ in range(tensor_count):
            name = cursor.string()
            dims = [cursor.scalar("<Q") for _ in range(cursor.scalar("<I"))]
            infos.append((name, dims, cursor.scalar("<I"), cursor.scalar("<Q")))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise QwenError(f"{path} is not a valid GGUF file ({err}); it may be truncated or corrupt — download it again") from None
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-cursor.pos // alignment) * alignment
    entries = []
    for name, dims, type_id, offset in infos:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise QwenError(f"tensor {name!r} in {path} has unknown GGUF type id {type_id}; the file is corrupt or too new") from None
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        nbytes = math.prod(dims) // block_size * type_size
        start = data_start + offset
        if start + nbytes > len(data):
            raise QwenError(f"{path} is truncated: tensor {name} ends past the end of the file — download it again")
        entries.extend(_as_loaded(TensorEntry(name, qtype, tuple(int(d) for d in reversed(dims)), start, nbytes)))
    return GGUFCheckpoint(path=path, metadata=metadata, entries=entries, data=data)


def _as_loaded(entry: TensorEntry) -> list[TensorEntry]:
    """The tensors an entry holds, as the HF layout has them: a stacked experts tensor is one contiguous block of
    rows per expert (read, converted and kept bit for bit like any matrix); the shared expert's gate, stored as a
    vector, is its one-row matrix."""
    if _STACKED.fullmatch(entry.name) and len(entry.shape) == 3:
        count, size = entry.shape[0], entry.nbytes // entry.shape[0]
        return [TensorEntry(entry.name.replace("_exps.", f"_exps.{e}."), entry.qtype, entry.shape[1:], entry.offset + e * size, size)
                for e in range(count)]
    if entry.name.endswith("ffn_gate_inp_shexp.weight") and len(entry.shape) == 1:
        return [dataclasses.replace(entry, shape=(1, entry.shape[0]))]
    return [entry]
