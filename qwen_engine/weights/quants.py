"""Vectorized PyTorch dequantization of GGUF tensor data.

Every decoder reproduces the float32 operation order of `gguf.quants.dequantize` (same products, same
rounding points, no fused multiply-add), so results are bit-identical to the reference implementation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import prod

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from ..errors import UnsupportedTensorType

# Weights decoded per step: bounds the temporaries (a few float32 copies of one chunk) for huge tensors such
# as the 151936x896 embedding, while keeping the per-chunk Python overhead negligible.
_CHUNK_WEIGHTS = 1 << 20


# Block layouts (byte offsets, nibble and bit orders) used by the helpers and decoders below:
# qwen-family.md §9.4


def _f16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte `offset` of every block, as a float32 column (n, 1)."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).to(torch.float32)


def _unpack_bits(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Split every byte of `x` into its 8 // width fields of `width` bits, lowest bits first.

    The fields are stacked along a new axis inserted at `dim` (-1: fields of one byte are adjacent;
    -2: field k of all bytes forms row k), which are the two orders GGUF packs nibbles and high bits in.
    """
    shifts = torch.arange(0, 8, width, dtype=torch.uint8)
    if dim == -2:
        shifts = shifts[:, None]
    return (x.unsqueeze(dim) >> shifts) & ((1 << width) - 1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Legacy-quant 4-bit values (n, 32): low nibbles of qs[0..15] are weights 0..15, high nibbles 16..31."""
    return _unpack_bits(qs, 4, -2).flatten(-2)


def _legacy_5bit(blocks: torch.Tensor, qh_at: int) -> torch.Tensor:
    """Q5_0/Q5_1 5-bit values (n, 32) as uint8: nibble | (bit i of the little-endian uint32 qh) << 4."""
    high = _unpack_bits(blocks[:, qh_at : qh_at + 4], 1, -1).flatten(-2)
    return _nibbles(blocks[:, qh_at + 4 :]) | (high << 4)


def _kquant_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12 `scales` bytes of Q4_K/Q5_K into 8 six-bit scales and 8 six-bit mins, as float32 (n, 8)."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = torch.cat([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], dim=1)
    mins = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=1)
    return scales.to(torch.float32), mins.to(torch.float32)


def _kquant_affine(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K weights (n, 256) = (d*sc_j)*q - dmin*m_j per 32-weight sub-block j; q is uint8 (n, 8, 32)."""
    scales, mins = _kquant_scales_mins(blocks[:, 4:16])
    d_sub = (_f16_field(blocks, 0) * scales).unsqueeze(-1)
    m_sub = (_f16_field(blocks, 2) * mins).unsqueeze(-1)
    return (d_sub * q.to(torch.float32) - m_sub).flatten(1)


# Block decoders: uint8 blocks (n, type_size) -> float32 weights (n, block_size).
def _f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float32)


def _f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float16).to(torch.float32)


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    # Integer shift rather than a bfloat16 cast, so NaN payloads survive exactly as in gguf.
    return (blocks.view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return _f16_field(blocks, 0) * blocks[:, 2:].view(torch.int8).to(torch.float32)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 2:]).to(torch.int8) - 8
    return _f16_field(blocks, 0) * q.to(torch.float32)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    return _f16_field(blocks, 0) * _nibbles(blocks[:, 4:]).to(torch.float32) + _f16_field(blocks, 2)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _legacy_5bit(blocks, 2).to(torch.int8) - 16
    return _f16_field(blocks, 0) * q.to(torch.float32)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    return _f16_field(blocks, 0) * _legacy_5bit(blocks, 4).to(torch.float32) + _f16_field(blocks, 2)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # 4 chunks of 32 bytes; chunk g holds sub-block 2g in its low nibbles and 2g+1 in its high nibbles.
    q = _unpack_bits(blocks[:, 16:].unflatten(1, (4, 32)), 4, -2).flatten(1, 2)
    return _kquant_affine(blocks, q)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    low = _unpack_bits(blocks[:, 48:].unflatten(1, (4, 32)), 4, -2).flatten(1, 2)
    high = _unpack_bits(blocks[:, 16:48], 1, -2)  # [t, l] = bit t of qh[l]
    return _kquant_affine(blocks, low | (high << 4))


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # Two halves of 128 weights; within a half, ql's low nibbles are weights 0..63 and its high nibbles
    # 64..127, and the 2-bit fields of qh[l] (lowest first) are weights l, l+32, l+64, l+96.
    low = _unpack_bits(blocks[:, :128].unflatten(1, (2, 64)), 4, -2)
    high = _unpack_bits(blocks[:, 128:192].unflatten(1, (2, 32)), 2, -2)
    q = (low.flatten(-2) | (high.flatten(-2) << 4)).to(torch.int8) - 32
    d_sub = _f16_field(blocks, 208) * blocks[:, 192:208].view(torch.int8).to(torch.float32)
    return (d_sub.unsqueeze(-1) * q.view(-1, 16, 16).to(torch.float32)).flatten(1)


_DECODERS: dict[T, Callable[[torch.Tensor], torch.Tensor]] = {
    T.F32: _f32,
    T.F16: _f16,
    T.BF16: _bf16,
    T.Q8_0: _q8_0,
    T.Q4_0: _q4_0,
    T.Q4_1: _q4_1,
    T.Q5_0: _q5_0,
    T.Q5_1: _q5_1,
    T.Q4_K: _q4_k,
    T.Q5_K: _q5_k,
    T.Q6_K: _q6_k,
}

SUPPORTED_TYPES: frozenset[T] = frozenset(_DECODERS)


def _raw_bytes(data: np.ndarray) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 torch tensor, sharing memory with `data` when it is contiguous."""
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    # GGUF data arrives as read-only memmap views; torch warns because it cannot mark tensors read-only.
    # The bytes are only ever read here (decoders always write into fresh tensors), so the warning is moot.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(flat)


def dequantize(data: np.ndarray, qtype: T, shape: Sequence[int], *, name: str = "") -> torch.Tensor:
    """Decode GGUF tensor data (the tensor's bytes, or an array viewing them) into a new float32 tensor of `shape`.

    `shape` is the PyTorch shape (GGUF's ne order reversed). The result owns its memory, so it stays valid
    and writable after the GGUF file is closed. Raises UnsupportedTensorType for types without a decoder.
    """
    decode = _DECODERS.get(qtype)
    if decode is None:
        supported = ", ".join(t.name for t in sorted(SUPPORTED_TYPES))
        what = f"tensor {name!r} has" if name else "tensor has"
        type_name = getattr(qtype, "name", str(qtype))
        raise UnsupportedTensorType(f"{what} unsupported GGUF type {type_name}; supported types: {supported}")

    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_weights = prod(shape)
    if (shape[-1] if shape else 1) % block_size or n_weights // block_size * type_size != data.nbytes:
        raise ValueError(
            f"{qtype.name} data of {data.nbytes} bytes does not match shape {tuple(shape)} "
            f"(blocks of {block_size} weights in {type_size} bytes)"
        )

    blocks = _raw_bytes(data).view(-1, type_size)
    out = torch.empty(blocks.shape[0], block_size, dtype=torch.float32)
    step = max(1, _CHUNK_WEIGHTS // block_size)
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = decode(blocks[start : start + step])
    return out.view(tuple(shape))


@dataclass(slots=True)
class BlockCodes:
    """Weights [N, K] as d · (code − offset) in blocks of 32 along each row: the shape GGUF's Q8_0 (8 bits, offset
    128) and Q5_0 (5 bits, offset 16) share once unpacked (qwen-family.md §9.4). codes: uint8 [N, K]; scales:
    float16 [N, K/32]."""

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int

    OFFSETS = {8: 128, 5: 16}

    def widened(self) -> BlockCodes:
        """The same weights in the 8-bit layout (exact: 5-bit values fit in 8 bits with the same scales)."""
        if self.bits == 8:
            return self
        return BlockCodes(self.codes + (self.OFFSETS[8] - self.OFFSETS[5]), self.scales, 8)

    def dequantized(self) -> torch.Tensor:
        rows, columns = self.codes.shape
        q = self.codes.to(torch.float32) - self.OFFSETS[self.bits]
        return (q.view(rows, -1, 32) * self.scales.to(torch.float32)[..., None]).view(rows, columns)


def block_codes(data: np.ndarray, qtype: T, shape: Sequence[int]) -> BlockCodes | None:
    """A Q8_0 or Q5_0 matrix's blocks, unpacked bit for bit; None for other types."""
    if qtype not in (T.Q8_0, T.Q5_0) or len(shape) != 2:
        return None
    rows, columns = shape
    blocks = _raw_bytes(data).view(-1, GGML_QUANT_SIZES[qtype][1])
    scales = blocks[:, :2].contiguous().view(torch.float16).view(rows, columns // 32)
    if qtype == T.Q8_0:  # q + 128 of an int8 is its byte with the top bit flipped
        return BlockCodes((blocks[:, 2:] ^ 0x80).view(rows, columns), scales, 8)
    return BlockCodes(_legacy_5bit(blocks, 2).view(rows, columns), scales, 5)
