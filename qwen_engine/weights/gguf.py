"""GGUF checkpoints: metadata, tensor names mapped to the HF layout, and dequantized tensors (qwen-family.md §9)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gguf import GGUFReader

from ..errors import QwenError
from .quants import dequantize

# qwen-family.md §9.1 (arch qwen2): GGUF name → HF name; `{}` is the layer index.
_QWEN2_NAMES = {
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
}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def hf_name(gguf_name: str) -> str:
    """The HF name of a GGUF tensor; names without a mapping pass through (and are reported as unexpected)."""
    layer = _LAYER.match(gguf_name)
    if layer is None:
        return _QWEN2_NAMES.get(gguf_name, gguf_name)
    template = _QWEN2_NAMES.get(_LAYER.sub("blk.{}.", gguf_name))
    return template.format(layer.group(1)) if template else gguf_name


@dataclass(slots=True)
class GGUFCheckpoint:
    path: Path
    reader: GGUFReader
    metadata: dict[str, Any]

    def tensor_types(self) -> Counter[str]:
        return Counter(t.tensor_type.name for t in self.reader.tensors)

    def has_tensor(self, gguf_name: str) -> bool:
        return any(t.name == gguf_name for t in self.reader.tensors)

    def tensors(
        self, dtype: torch.dtype, device: torch.device, progress: Callable[[Iterator], Iterator] = iter
    ) -> dict[str, torch.Tensor]:
        """Every tensor dequantized, cast to `dtype` on `device`, under its HF name."""
        loaded = {}
        for tensor in progress(self.reader.tensors):
            shape = tuple(int(n) for n in reversed(tensor.shape))
            weights = dequantize(tensor.data, tensor.tensor_type, shape, name=tensor.name)
            loaded[hf_name(tensor.name)] = weights.to(device=device, dtype=dtype)
        return loaded


def open_gguf(path: Path) -> GGUFCheckpoint:
    """Parse the header, metadata and tensor index (the data stays memory-mapped)."""
    try:
        reader = GGUFReader(path)
    except FileNotFoundError:
        raise QwenError(f"model file not found: {path}") from None
    except (ValueError, IndexError, KeyError, TypeError, OSError) as err:
        raise QwenError(f"{path} is not a valid GGUF file ({err}); it may be truncated or corrupt — download it again") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise QwenError(f"{path} is truncated: tensor {tensor.name} ends past the end of the file — download it again")
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            metadata[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as err:
            raise QwenError(f"{path} has an unreadable metadata value {key!r} ({err}); the file is corrupt") from None
    return GGUFCheckpoint(path=path, reader=reader, metadata=metadata)
