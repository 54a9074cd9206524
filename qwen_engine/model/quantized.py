"""Weight-only quantized linear layers that replace `nn.Linear` in a loaded decoder (gpt-fast style).

Decoding one token streams every weight once, so fewer bytes per weight means more tokens per second; the
packed kernels PyTorch ships (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) read 8- and 4-bit weights
directly. Those kernels are slow for many rows at once, so prefill dequantizes each layer to bfloat16 on the fly
and runs a regular matmul instead.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import PACKED

# Rows of activations above which dequantize-then-matmul beats the packed kernels (measured on a 2-core AVX-512
# machine for the 0.5B model's shapes: the packed kernels are ~10x slower than bf16 matmul at 660 rows).
PACKED_MAX_ROWS = 8
# Identifies this converter: caches of converted weights are keyed by it.
CONVERTER_ID = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
INT4_GROUP = 32
_ROWS_PER_STEP = 4096  # bounds the float temporaries when quantizing large matrices (the 151936-row head)


class _QuantizedLinear(nn.Module, ABC):
    """What the formats share: bfloat16 activations, a packed kernel for a few rows, a dense matmul for more."""

    in_features: int
    out_features: int
    bias: torch.Tensor | None

    @abstractmethod
    def _packed_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """Few rows (decoding): PyTorch's packed low-bit kernel."""

    @abstractmethod
    def _dense_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """Many rows (prefill): a bfloat16 matmul on the dequantized weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = self._packed_matmul(rows) if rows.shape[0] <= PACKED_MAX_ROWS else self._dense_matmul(rows)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)


class Int8Linear(_QuantizedLinear):
    """Per-output-channel symmetric int8: w ≈ q · scale[row]."""

    BUFFERS = ("qweight", "scale", "bias")

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        w = weight.to(torch.float32)
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(qweight, scale.to(torch.bfloat16), None if bias is None else bias.to(torch.bfloat16))

    def dequantized(self) -> torch.Tensor:
        return self.qweight.to(torch.bfloat16) * self.scale[:, None]

    def _packed_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(rows, self.qweight, self.scale)

    def _dense_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        # x·(q·s)ᵀ = (x·qᵀ)·s: scaling the output spares a pass over the weight matrix
        return F.linear(rows, self.qweight.to(torch.bfloat16)) * self.scale


class Int4Linear(_QuantizedLinear):
    """Asymmetric int4 in groups of 32 along the input: w ≈ (q − 8) · scale[g] + zero[g], q ∈ 0…15."""

    BUFFERS = ("packed", "scales_zeros", "nibbles", "bias")

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, nibbles: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = nibbles.shape[0], nibbles.shape[1] * 2
        self.register_buffer("packed", packed)  # the kernel's tiled layout
        self.register_buffer("scales_zeros", scales_zeros)  # [groups, out, 2]
        self.register_buffer("nibbles", nibbles)  # two values a byte, row-major: for the prefill path
        self.register_buffer("bias", bias)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int4Linear:
        out_features, in_features = weight.shape
        q = torch.empty(out_features, in_features, dtype=torch.uint8)
        scale = torch.empty(out_features, in_features // INT4_GROUP)
        zero = torch.empty_like(scale)
        for start in range(0, out_features, _ROWS_PER_STEP):
            rows = slice(start, start + _ROWS_PER_STEP)
            q[rows], scale[rows], zero[rows] = _int4_groups(weight[rows].to(torch.float32))
        return cls(
            torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2),
            torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous(),
            q[:, 0::2] | (q[:, 1::2] << 4),
            None if bias is None else bias.to(torch.bfloat16),
        )

    def dequantized(self) -> torch.Tensor:
        q = torch.stack([self.nibbles & 15, self.nibbles >> 4], dim=-1).view(self.out_features, -1, INT4_GROUP)
        scale, zero = self.scales_zeros[..., 0].t(), self.scales_zeros[..., 1].t()
        w = (q.to(torch.bfloat16) - 8) * scale[..., None] + zero[..., None]
        return w.view(self.out_features, self.in_features)

    def _packed_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP, self.scales_zeros)

    def _dense_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return F.linear(rows, self.dequantized())


def _int4_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (uint8, 0…15), scale and zero for each group of 32 weights, spanning the group's min…max.

    (Searching narrower ranges for the least squared error changed the default model's perplexity by < 0.1%.)
    """
    rows, columns = weight.shape
    groups = weight.view(rows, columns // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15.0).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.view(rows, columns), scale, low + 8.0 * scale


FORMATS: dict[str, type[Int8Linear] | type[Int4Linear]] = {"int8": Int8Linear, "int4": Int4Linear}


def quantize_linears(model: nn.Module, plan: dict[str, str]) -> None:
    """Replace the `nn.Linear` modules named in `plan` by the format it names."""
    for name, fmt in plan.items():
        linear = model.get_submodule(name)
        quantized = FORMATS[fmt].quantize(linear.weight.data, None if linear.bias is None else linear.bias.data)
        _replace(model, name, quantized)


def place_quantized(model: nn.Module, plan: dict[str, str], state: dict[str, torch.Tensor]) -> None:
    """Put quantized modules built from saved buffers (a converted-weights cache) where `plan` says."""
    for name, fmt in plan.items():
        cls = FORMATS[fmt]
        _replace(model, name, cls(*(state.get(f"{name}.{buffer}") for buffer in cls.BUFFERS)))


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


QUANT_CHOICES = ("none", "int8", "int4", "auto")
FOUR_BIT_SOURCES = frozenset({"Q4_0", "Q4_1", "Q4_K"})


def _stored_as(name: str) -> list[str]:
    """Checkpoint weight names behind a decoder projection (packed ones have several)."""
    for packed, parts in PACKED.items():
        if name.endswith("." + packed):
            layer = name[: -len(packed)]
            return [f"{layer}{part}.weight" for part in parts]
    return [f"{name}.weight"]


def quant_plan(model: nn.Module, quant: str, source_types: dict[str, str]) -> dict[str, str]:
    """The format of every projection: one format for all, or with "auto" int4 where the checkpoint already stores
    4 bits (requantizing those loses almost nothing) and int8 elsewhere.

    `source_types` maps checkpoint tensor names (`model.layers.0.self_attn.q_proj.weight`) to their stored type
    (GGUF types such as "Q5_0", or dtypes such as "BF16"); a tied head is stored as the embedding.
    """
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if quant == "none":
        return {}
    if quant in FORMATS:
        return dict.fromkeys(linears, quant)
    types = {"lm_head.weight": source_types.get("model.embed_tokens.weight", "")} | source_types
    return {name: "int4" if all(types.get(n) in FOUR_BIT_SOURCES for n in _stored_as(name)) else "int8" for name in linears}
