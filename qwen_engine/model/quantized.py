"""Weight-only quantized layers that replace `nn.Linear` and `nn.Embedding` in a loaded decoder (gpt-fast style).

Decoding one token streams every weight once, so fewer bytes per weight means more tokens per second. Two families:
- block formats (`q8_0`, `q5_0`): GGUF's own Q8_0/Q5_0 blocks, kept bit for bit from a GGUF checkpoint, read by
  the engine's own kernels (qwen_engine/kernels: AVX-512 or AVX2, VNNI where the CPU has it);
- `int8` per channel and `int4` in groups, read by the packed kernels PyTorch ships (`_weight_int8pack_mm`,
  `_weight_int4pack_mm_for_cpu`).
Packed kernels are slow for many rows at once, so prefill dequantizes each layer to bfloat16 on the fly and runs a
regular matmul instead.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import MAX_ROWS, cpu_kernels
from ..errors import QwenError
from ..sharding import ROW_PARALLEL
from ..weights.gguf import StoredRows
from ..weights.names import stored_as
from ..weights.quants import BlockCodes

# Rows of activations above which dequantize-then-matmul beats the packed kernels (measured on a 2-core AVX-512
# machine for the 0.5B model's shapes: the packed kernels are ~10x slower than bf16 matmul at 660 rows).
PACKED_MAX_ROWS = MAX_ROWS
# Identifies the converter (this module, the GGUF block reader and the kernels' layout): caches of converted weights
# are keyed by it.
CONVERTER_ID = hashlib.sha256(b"".join(
    (Path(__file__).parents[1] / part).read_bytes() for part in ("model/quantized.py", "weights/quants.py", "kernels/block_quant.h")
)).hexdigest()[:16]
INT4_GROUP = 32
_ROWS_PER_STEP = 4096  # bounds the float temporaries when quantizing large matrices (the 151936-row head)
_DENSE_PIECE_WEIGHTS = 1 << 24  # most weights prefill dequantizes at once (32 MiB of bfloat16; measured: smaller
# pieces, which make a transposed product, cost the default model 6% of its prefill at 2^23 and 40% at 2^20)


class _QuantizedLinear(nn.Module, ABC):
    """What the formats share: bfloat16 activations, a packed kernel for a few rows, a dense matmul for more."""

    in_features: int
    out_features: int
    bias: torch.Tensor | None
    # Up to this many rows go to the packed kernel, more to the dense product. The fused decode step sets it to 0 on
    # the layers it takes over: PyTorch then only runs their prefills, always on the bfloat16 product, so a
    # sequence's prefill computes the same whether it came alone or with others (each row of the product is
    # independent of the rest; the packed kernel's int8 activations are not the same numbers).
    packed_max_rows: int = PACKED_MAX_ROWS
    # Under tensor parallelism a row-parallel block matrix (o, down; `keep_partial_sums`) returns its products in
    # float32, unrounded: the ranks add them up and round once, where one process rounds the whole product.
    partial_sums: bool = False

    @abstractmethod
    def _packed_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """Few rows (decoding): a kernel that reads the packed low-bit weights directly."""

    @abstractmethod
    def _dense_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """Many rows (prefill): a bfloat16 matmul on the dequantized weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = self._packed_matmul(rows.contiguous()) if rows.shape[0] <= self.packed_max_rows else self._dense_matmul(rows)
        if self.bias is not None:
            out = out + self.bias
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.partial_sums else out.to(x.dtype)


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


@functools.lru_cache(maxsize=64)
def kernel_column_order(columns: int) -> torch.Tensor:
    """For each position of a row in the kernel's column order, the plain column it holds (block_quant.h: superblocks
    of S = 8, 4, 2 or 1 steps of 64, each the transpose of its 16 lanes × S dwords)."""
    parts, start = [], 0
    while start < columns:
        remaining = columns - start
        steps = 8 if remaining >= 512 else 4 if remaining >= 256 else 2 if remaining >= 128 else 1
        parts.append(start + torch.arange(64 * steps).view(16, steps, 4).transpose(0, 1).reshape(-1))
        start += 64 * steps
    return torch.cat(parts)


def pack_blocks(blocks: BlockCodes) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes in the kernel's layout (kernels/block_quant.c): columns in `kernel_column_order`; 8-bit codes as they
    are, 5-bit as nibbles plus a 64-bit mask of fifth bits for every 64 weights."""
    rows, columns = blocks.codes.shape
    ordered = blocks.codes[:, kernel_column_order(columns)] if columns % 64 == 0 else blocks.codes
    if blocks.bits == 8:
        return ordered.contiguous(), None
    chunks = ordered.view(rows, columns // 64, 64)
    low = chunks & 15
    nibbles = (low[..., :32] | (low[..., 32:] << 4)).reshape(rows, columns // 2)
    fifth = ((chunks >> 4) & 1).view(rows, columns // 64, 8, 8) << torch.arange(8, dtype=torch.uint8)
    return nibbles, fifth.sum(-1, dtype=torch.uint8).reshape(rows, columns // 8)


def unpack_blocks(codes: torch.Tensor, high_bits: torch.Tensor | None, scales: torch.Tensor) -> BlockCodes:
    """The inverse of `pack_blocks`."""
    rows, columns = scales.shape[0], scales.shape[1] * 32
    if high_bits is None:
        ordered, bits = codes, 8
    else:
        nibbles = codes.view(rows, columns // 64, 32)
        low = torch.cat([nibbles & 15, nibbles >> 4], dim=-1)
        fifth = (high_bits.view(rows, columns // 64, 8, 1) >> torch.arange(8, dtype=torch.uint8)) & 1
        ordered, bits = (low | (fifth.view(rows, columns // 64, 64) << 4)).view(rows, columns), 5
    if columns % 64:
        return BlockCodes(ordered, scales, bits)
    plain = torch.empty_like(ordered)
    plain[:, kernel_column_order(columns)] = ordered
    return BlockCodes(plain, scales, bits)


def quantize_blocks(weight: torch.Tensor, bits: int = 8) -> BlockCodes:
    """Blocks of any float matrix exactly as llama.cpp's reference quantizer makes Q8_0 (d = max|w| / 127, q = w / d
    rounded half away from zero) or Q5_0 (d = −m / 16 for the weight m of largest magnitude, q = trunc(w / d + 16.5))."""
    rows, columns = weight.shape
    codes = torch.empty(rows, columns, dtype=torch.uint8)
    scales = torch.empty(rows, columns // 32, dtype=torch.float16)
    for start in range(0, rows, _ROWS_PER_STEP):
        groups = weight[start : start + _ROWS_PER_STEP].to(torch.float32).view(-1, columns // 32, 32)
        if bits == 8:
            d = groups.abs().amax(-1) / 127
        else:
            d = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))[..., 0] / -16
        scaled = groups * torch.where(d == 0, 0.0, 1 / d)[..., None]
        if bits == 8:
            magnitude = scaled.abs()
            q = torch.sign(scaled) * (magnitude.floor() + (2 * (magnitude - magnitude.floor())).floor()) + BlockCodes.OFFSETS[8]
        else:
            q = torch.trunc(scaled + 16.5).clamp(0, 31)
        codes[start : start + _ROWS_PER_STEP], scales[start : start + _ROWS_PER_STEP] = q.view(-1, columns), d
    return BlockCodes(codes, scales, bits)


def _block_dequantize(codes: torch.Tensor, high_bits: torch.Tensor | None, scales: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    kernels = cpu_kernels()
    if kernels is not None and scales.shape[1] % 2 == 0:  # the kernel takes rows of whole 64-weight steps
        return kernels.dequantize(codes, high_bits, scales, out)
    return unpack_blocks(codes, high_bits, scales).dequantized().to(torch.bfloat16)


class _Workspace(threading.local):
    """One bfloat16 buffer (per thread) that prefill dequantizes every layer's weights into, in turn: each is dead
    once its matmul returns, and reusing the memory spares the page faults of a fresh allocation of several MB per
    layer."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.bfloat16)

    def get(self, numel: int) -> torch.Tensor:
        if self.buffer.numel() < numel:
            self.buffer = torch.empty(numel, dtype=torch.bfloat16)
        return self.buffer


_workspace = _Workspace()


class BlockLinear(_QuantizedLinear):
    """GGUF-style blocks of 32 weights with an fp16 scale: 8 bits (Q8_0) or 5 bits (Q5_0), in the kernel's layout."""

    BUFFERS = ("codes", "high_bits", "scales", "bias")

    def __init__(self, codes: torch.Tensor, high_bits: torch.Tensor | None, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = scales.shape[0], scales.shape[1] * 32
        self.register_buffer("codes", codes)
        self.register_buffer("high_bits", high_bits)  # 5-bit layout only
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_blocks(cls, blocks: BlockCodes, bias: torch.Tensor | None) -> BlockLinear:
        return cls(*pack_blocks(blocks), blocks.scales.contiguous(), None if bias is None else bias.to(torch.bfloat16))

    def _packed_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        kernels = cpu_kernels()
        if kernels is None or self.in_features % 64:
            return self._dense_matmul(rows)
        return kernels.matmul(rows.contiguous(), self.codes, self.high_bits, self.scales, sums=self.partial_sums)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) · up for this packed [gate; up] projection in one AMX pass, without the [T, 2I] product, or
        None where that path does not apply (few rows, a bias, no AMX): the caller then multiplies and applies it."""
        rows = x.reshape(-1, self.in_features)
        kernels = cpu_kernels()
        if kernels is None or self.bias is not None or rows.shape[0] <= self.packed_max_rows or rows.dtype != torch.bfloat16:
            return None
        mixed = kernels.matmul_amx(rows, self.codes, self.high_bits, self.scales, swiglu=True)
        return None if mixed is None else mixed.view(*x.shape[:-1], -1)

    def _dense_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        kernels = cpu_kernels()
        product = kernels.matmul_amx(rows, self.codes, self.high_bits, self.scales, sums=self.partial_sums) if kernels else None
        if product is not None:  # AMX straight from the blocks: no bfloat16 copy of the matrix at all
            return product
        if kernels is not None and kernels.variant != "amx" and self.in_features % 64 == 0:
            # Without AMX, the integer products of the decoding kernel (int8 activations, VNNI or AVX2's sign
            # trick) straight from the blocks beat dequantizing for PyTorch's matmul: 1.7x with AVX-512 BF16, 4.8x
            # without (660 rows of the default model's matrices, oneDNN capped to each class;
            # benchmarks/prefill_kernels.py). With AMX, oneDNN is 4.8x faster than they are, and the "amx" variant
            # has its own product anyway.
            return kernels.matmul(rows.contiguous(), self.codes, self.high_bits, self.scales, sums=self.partial_sums)
        # A large matrix (the packed gate/up, a head scoring every position) goes in pieces of output rows, each
        # dequantized into the workspace in turn; the product is built transposed, so every piece writes a
        # contiguous block. The peak memory of prefill is then the workspace, not the whole matrix in bfloat16.
        pieces = -(-self.out_features * self.in_features // _DENSE_PIECE_WEIGHTS)
        step = -(-self.out_features // pieces)
        workspace = _workspace.get(step * self.in_features)
        dtype = torch.float32 if self.partial_sums else torch.bfloat16  # (a float32 product of bfloat16 values)
        if pieces == 1:
            return F.linear(rows.to(dtype), _block_dequantize(self.codes, self.high_bits, self.scales, workspace).to(dtype))
        transposed = torch.empty(self.out_features, rows.shape[0], dtype=dtype)
        for start in range(0, self.out_features, step):
            piece = slice(start, start + step)
            high_bits = None if self.high_bits is None else self.high_bits[piece]
            weights = _block_dequantize(self.codes[piece], high_bits, self.scales[piece], workspace)
            torch.mm(weights.to(dtype), rows.t().to(dtype), out=transposed[piece])
        return transposed.t()


class BlockEmbedding(nn.Module):
    """An embedding table in blocks: a lookup dequantizes only the rows it reads, and a memory-mapped table
    (the converted-weights cache) keeps the rest of it on disk."""

    BUFFERS = ("codes", "high_bits", "scales")

    def __init__(self, codes: torch.Tensor, high_bits: torch.Tensor | None, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("high_bits", high_bits)
        self.register_buffer("scales", scales)

    @classmethod
    def from_blocks(cls, blocks: BlockCodes, bias: None = None) -> BlockEmbedding:
        return cls(*pack_blocks(blocks), blocks.scales.contiguous())

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        flat = token_ids.reshape(-1)
        high_bits = None if self.high_bits is None else self.high_bits[flat]
        rows = _block_dequantize(self.codes[flat], high_bits, self.scales[flat])
        return rows.view(*token_ids.shape, -1)


class StoredEmbedding(nn.Module):
    """An embedding table left in the checkpoint file: a lookup reads and dequantizes the rows it needs (as
    llama.cpp's memory-mapped get_rows does), so an untied table costs no resident memory."""

    def __init__(self, rows: StoredRows, dtype: torch.dtype) -> None:
        super().__init__()
        self.rows = rows
        self.dtype = dtype

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        ids = token_ids.reshape(-1).tolist()
        if ids and not 0 <= min(ids) <= max(ids) < self.rows.shape[0]:
            raise QwenError(f"token ids must lie in [0, {self.rows.shape[0]})")
        rows = self.rows(ids).to(self.dtype)
        return rows.view(*token_ids.shape, -1)


FORMATS: dict[str, type[_QuantizedLinear]] = {"int8": Int8Linear, "int4": Int4Linear, "q8_0": BlockLinear, "q5_0": BlockLinear}
BLOCK_FORMATS = {"q8_0": 8, "q5_0": 5}


StoredBlocks = Callable[[str], BlockCodes | None]


def quantize_modules(model: nn.Module, plan: dict[str, str], stored_blocks: StoredBlocks = lambda name: None) -> None:
    """Replace the modules named in `plan` by the format it names. Block formats take the checkpoint's own blocks
    where `stored_blocks` has them (bit for bit) and quantize the float weights otherwise; a tied head shares the
    embedding's blocks."""
    # By parameter (the object a tied head shares; `.data` is a new tensor each time): the head reuses the blocks.
    done: dict[int, tuple[nn.Parameter, BlockEmbedding]] = {}
    for name, fmt in plan.items():
        module = model.get_submodule(name)
        parameter, bias = module.weight, getattr(module, "bias", None)
        weight, bias = parameter.data, None if bias is None else bias.data
        if fmt not in BLOCK_FORMATS:
            _replace(model, name, FORMATS[fmt].quantize(weight, bias))
            continue
        module_class = BlockEmbedding if isinstance(module, nn.Embedding) else BlockLinear
        if id(parameter) in done and done[id(parameter)][0] is parameter:
            twin = done[id(parameter)][1]
            buffers = (twin.codes, twin.high_bits, twin.scales)
            quantized = module_class(*buffers) if module_class is BlockEmbedding else module_class(*buffers, bias)
        else:
            quantized = module_class.from_blocks(_blocks_of(name, weight, BLOCK_FORMATS[fmt], stored_blocks), bias)
        if isinstance(module, nn.Embedding):  # only a head can share an embedding's weight
            done[id(parameter)] = parameter, quantized
        _replace(model, name, quantized)


def keep_partial_sums(model: nn.Module) -> None:
    """A tensor-parallel rank's row-parallel block matrices (o, down) give float32 partial products (`partial_sums`)."""
    for name, module in model.named_modules():
        if isinstance(module, BlockLinear) and any(part in f"{name}." for part in ROW_PARALLEL):
            module.partial_sums = True


def _blocks_of(name: str, weight: torch.Tensor, bits: int, stored_blocks: StoredBlocks) -> BlockCodes:
    parts = [stored_blocks(part) for part in stored_as(name)]
    if all(part is not None for part in parts) and (bits == 8 or all(part.bits == 5 for part in parts)):
        parts = [part if bits == 5 else part.widened() for part in parts]
        return BlockCodes(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), bits)
    return quantize_blocks(weight, bits)


def read_as_stored(plan: dict[str, str], source_types: dict[str, str]) -> frozenset[str]:
    """Checkpoint tensors that `quantize_modules` takes from the file's own blocks, so a loader need not dequantize
    them at all (a block format whose every part is stored Q8_0/Q5_0)."""
    names = set()
    for module, fmt in plan.items():
        parts = stored_as(module)
        if fmt in BLOCK_FORMATS and all(source_types.get(part) in STORED_BLOCK_TYPES for part in parts):
            names.update(parts)
    return frozenset(names)


def place_quantized(model: nn.Module, plan: dict[str, str], state: dict[str, torch.Tensor]) -> None:
    """Put quantized modules built from saved buffers (a converted-weights cache) where `plan` says."""
    for name, fmt in plan.items():
        cls = BlockEmbedding if isinstance(model.get_submodule(name), nn.Embedding) else FORMATS[fmt]
        _replace(model, name, cls(*(state.get(f"{name}.{buffer}") for buffer in cls.BUFFERS)))


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def input_groups(quant: str) -> tuple[int, str]:
    """How many consecutive weights of a row `quant` stores together (a block, an int4 group) and the format's name:
    a tensor-parallel split of a matrix's inputs must fall between groups (sharding.check_split)."""
    if quant in ("none", "int8"):
        return 1, ""
    return (INT4_GROUP if quant == "int4" else 32), quant


FOUR_BIT_SOURCES = frozenset({"Q4_0", "Q4_1", "Q4_K"})
STORED_BLOCK_TYPES = frozenset({"Q8_0", "Q5_0"})  # what weights/quants.block_codes reads bit for bit


def quant_plan(model: nn.Module, quant: str, source_types: dict[str, str]) -> dict[str, str]:
    """The format of every projection (and, for block formats, of the embedding table).

    - "int8", "int4": that format for every projection;
    - "q8_0": 8-bit blocks everywhere (int8 where a row's length is not a multiple of 64, which the kernel needs);
    - "auto": with the block kernel, 5-bit blocks where the checkpoint stores Q5_0 (kept bit for bit) and 8-bit
      blocks elsewhere (Q8_0 bit for bit, other types requantized); without it, int4 where the checkpoint already
      stores 4 bits (requantizing those loses almost nothing) and int8 elsewhere.

    `source_types` maps checkpoint tensor names (`model.layers.0.self_attn.q_proj.weight`) to their stored type
    (GGUF types such as "Q5_0", or dtypes such as "BF16"); a tied head is stored as the embedding.
    """
    if quant == "none":
        return {}
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if quant in ("int8", "int4"):
        return dict.fromkeys(linears, quant)
    types = {"lm_head.weight": source_types.get("model.embed_tokens.weight", "")} | source_types

    def stored_in(name: str, kinds: frozenset[str]) -> bool:
        return all(types.get(part) in kinds for part in stored_as(name))

    if quant == "auto" and cpu_kernels() is None:
        return {name: "int4" if stored_in(name, FOUR_BIT_SOURCES) else "int8" for name in linears}
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            columns = module.weight.shape[1]
            if columns % 64:
                plan[name] = "int8" if isinstance(module, nn.Linear) else None
            else:
                plan[name] = "q5_0" if quant == "auto" and stored_in(name, frozenset({"Q5_0"})) else "q8_0"
    return {name: fmt for name, fmt in plan.items() if fmt is not None}
