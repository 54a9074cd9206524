"""Native CPU kernels, loaded with ctypes: the variant cpu.py picks, from the libraries a wheel carries prebuilt
(build.py, setup.py), or compiled once per machine into the cache directory from a source checkout.

A plain C shared library (no Python or PyTorch headers) builds in about a second with the system compiler. It uses
OpenMP from the same libgomp PyTorch has loaded, so its threads are PyTorch's pool and follow
`torch.set_num_threads`. Where the CPU lacks the instructions, or neither a prebuilt library nor a compiler is at
hand, `cpu_kernels()` is None and callers use their PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import warnings
from pathlib import Path

import torch

from ..cache_dir import cache_dir
from ..cpu import cpu_flags, kernel_variant
from .build import BUILDS, PREBUILT, build_for, compile_library, compiler, flags, sources_digest

MAX_ROWS = 32  # rows the fused decoding step takes a call (a serving batch's decode steps); block products take any number


class BlockMatrix(ctypes.Structure):
    """block_quant.h's BlockMatrix: pointers into a quantized layer's buffers."""

    _fields_ = [("codes", ctypes.c_void_p), ("high_bits", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("rows", ctypes.c_int64), ("columns", ctypes.c_int64)]


class DecodeLayer(ctypes.Structure):
    """decode_layer.c's DecodeLayer: one decoder layer's projections, norm weights and sliding window."""

    _fields_ = [("qkv", BlockMatrix), ("o", BlockMatrix), ("gate_up", BlockMatrix), ("down", BlockMatrix),
                ("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("window", ctypes.c_int64)]


class DecodeShape(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_int64), ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("intermediate", ctypes.c_int64), ("eps", ctypes.c_float)]


# decode_layer.c's ReduceRows: (address of `count` float32 values, count) → 0, or non-zero on failure.
ReduceRows = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int64)


class CpuKernels:
    """ctypes bindings of block_quant.c, decode_layer.c and layer_ops.c (see their headers for the layouts)."""

    def __init__(self, path: Path, variant: str) -> None:
        self.variant, self.path = variant, path  # cpu.py's name of what they run on; the library loaded
        lib = ctypes.CDLL(str(path))
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        lib.qe_block_matmul.argtypes = [pointer, size, size, pointer, pointer, pointer, size, ctypes.c_int, pointer]
        lib.qe_block_matmul_amx.argtypes = [pointer, size, size, size, pointer, pointer, pointer, size, ctypes.c_int, pointer]
        lib.qe_block_dequantize.argtypes = [pointer, pointer, pointer, size, size, pointer]
        lib.qe_decode_batch.argtypes = [ctypes.POINTER(DecodeLayer), size, ctypes.POINTER(DecodeShape), pointer, size,
                                         pointer, pointer, size, size, size, pointer, pointer, pointer,
                                         pointer, pointer, pointer, pointer, pointer]
        lib.qe_rms_norm.argtypes = [pointer, pointer, size, size, ctypes.c_float, pointer]
        lib.qe_add_rms_norm.argtypes = [pointer, pointer, pointer, size, size, ctypes.c_float, pointer]
        lib.qe_rotate.argtypes = [pointer, size, size, size, size, pointer, pointer]
        lib.qe_silu_mul.argtypes = [pointer, pointer, size, size, size]
        self._lib = lib

    def matmul(self, x: torch.Tensor, codes: torch.Tensor, high_bits: torch.Tensor | None, scales: torch.Tensor,
               sums: bool = False) -> torch.Tensor:
        """x [M, K] bfloat16, contiguous → x · Wᵀ [M, N] bfloat16, or with `sums` float32 unrounded (int8 activations
        in blocks of 32 and VNNI, any M)."""
        rows, columns = x.shape
        if x.dtype != torch.bfloat16 or not x.is_contiguous() or columns != scales.shape[1] * 32:
            raise ValueError(f"block matmul needs contiguous bfloat16 rows of {scales.shape[1] * 32} (got {x.dtype} {tuple(x.shape)})")
        out = torch.empty(rows, scales.shape[0], dtype=torch.float32 if sums else torch.bfloat16)
        status = self._lib.qe_block_matmul(
            x.data_ptr(), rows, columns, codes.data_ptr(), _address(high_bits), scales.data_ptr(), scales.shape[0],
            int(sums), out.data_ptr(),
        )
        if status:
            raise ValueError(f"block matmul cannot take x of shape {tuple(x.shape)}")
        return out

    def matmul_amx(self, x: torch.Tensor, codes: torch.Tensor, high_bits: torch.Tensor | None, scales: torch.Tensor,
                   swiglu: bool = False, sums: bool = False) -> torch.Tensor | None:
        """x [M, K] bfloat16 (rows contiguous, possibly spaced apart) → x · Wᵀ [M, N] on AMX tiles straight from the
        blocks (amx_matmul.c), in bfloat16 or with `sums` float32 unrounded; or with `swiglu` (W the packed
        [gate; up]) silu(x·gateᵀ)·(x·upᵀ) [M, N/2]; None where this CPU or these shapes have no AMX path (N a
        multiple of 32, K of 64)."""
        rows, columns = x.shape
        if x.dtype != torch.bfloat16 or x.stride(1) != 1 or columns != scales.shape[1] * 32:
            return None
        out = torch.empty(rows, scales.shape[0] // (2 if swiglu else 1), dtype=torch.float32 if sums else torch.bfloat16)
        mode = 1 if swiglu else 2 if sums else 0  # amx_matmul.c's AMX_SWIGLU, AMX_SUMS, AMX_BF16
        status = self._lib.qe_block_matmul_amx(
            x.data_ptr(), rows, columns, max(x.stride(0), columns), codes.data_ptr(), _address(high_bits),
            scales.data_ptr(), scales.shape[0], mode, out.data_ptr(),
        )
        return None if status else out

    def dequantize(self, codes: torch.Tensor, high_bits: torch.Tensor | None, scales: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """The weights as bfloat16 [N, K], into `out` (contiguous, that many elements at least) when given."""
        rows, columns = scales.shape[0], scales.shape[1] * 32
        if out is None:
            out = torch.empty(rows, columns, dtype=torch.bfloat16)
        out = out.view(-1)[: rows * columns].view(rows, columns)
        if self._lib.qe_block_dequantize(codes.data_ptr(), _address(high_bits), scales.data_ptr(), rows, columns, out.data_ptr()):
            raise ValueError(f"block dequantize cannot take {columns} columns")
        return out

    def decode_batch(self, layers: ctypes.Array, shape: DecodeShape, hidden: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, strides: tuple[int, int, int], positions: torch.Tensor,
                     rope: tuple[torch.Tensor, ...], slots: torch.Tensor, slot_starts: torch.Tensor,
                     reduce: ReduceRows | None = None) -> None:
        """One token of each of B sequences through every layer (decode_layer.c): hidden [B, H] bfloat16 in place;
        keys/values: layer 0's cache, written at each sequence's position; strides: (layer, token, kv head) in
        elements; positions [B] int64; rope: (cos, sin, q_cos, q_sin) rows [B, d]; slots/slot_starts: a paged cache's
        slot of every position of every sequence (concatenated, int64) and where each sequence's start; reduce: under
        tensor parallelism, the ranks' sum of the o and down outputs (a `ReduceRows` callback)."""
        status = self._lib.qe_decode_batch(
            layers, len(layers), ctypes.byref(shape), hidden.data_ptr(), hidden.shape[0], keys.data_ptr(),
            values.data_ptr(), *strides, slots.data_ptr(), slot_starts.data_ptr(), positions.data_ptr(),
            *(table.data_ptr() for table in rope), None if reduce is None else ctypes.cast(reduce, ctypes.c_void_p),
        )
        if status:
            raise ValueError(f"the fused decode step cannot take {hidden.shape[0]} rows at positions {positions.tolist()}")

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
        """RMSNorm(x) · weight over the last dimension, or None where these kernels do not take the tensors."""
        if not plain_bf16(x, weight) or weight.shape != x.shape[-1:]:
            return None
        out = torch.empty_like(x)
        failed = self._lib.qe_rms_norm(x.data_ptr(), weight.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps, out.data_ptr())
        return None if failed else out

    def add_rms_norm_(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
        """x += residual in place (rounded to bfloat16), then RMSNorm(x) · weight; None (nothing changed) where these
        kernels do not take the tensors."""
        if not plain_bf16(x, residual, weight) or x.shape != residual.shape or weight.shape != x.shape[-1:]:
            return None
        out = torch.empty_like(x)
        failed = self._lib.qe_add_rms_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), x.numel() // x.shape[-1],
                                           x.shape[-1], eps, out.data_ptr())
        return None if failed else out

    def rotate_(self, x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        """Rotary embedding in place on the first `heads` heads of each row of x [T, ≥ heads·d] (rows may be
        strided, values within a row contiguous), with tables [T, d]; False where these kernels do not apply."""
        if not plain_bf16(cos, sin) or x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.dim() != 2:
            return False
        if x.stride(1) != 1 or cos.shape != (x.shape[0], head_dim) or sin.shape != cos.shape:
            return False
        return not self._lib.qe_rotate(x.data_ptr(), x.shape[0], x.stride(0), heads, head_dim, cos.data_ptr(), sin.data_ptr())

    def silu_mul_(self, gate_up: torch.Tensor) -> bool:
        """silu(gate) · up written over gate, for gate_up [T, 2n] = [gate | up] contiguous or the transpose of a
        contiguous [2n, T] (as a piecewise prefill product comes); False (nothing changed) where these kernels do
        not take it."""
        if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.dtype != torch.bfloat16 or gate_up.device.type != "cpu":
            return False
        tokens, n = gate_up.shape[0], gate_up.shape[1] // 2
        gate, up = gate_up[:, :n], gate_up[:, n:]
        if gate_up.is_contiguous():
            status = self._lib.qe_silu_mul(gate.data_ptr(), up.data_ptr(), tokens, n, 2 * n)
        elif gate_up.t().is_contiguous():
            status = self._lib.qe_silu_mul(gate.data_ptr(), up.data_ptr(), n, tokens, tokens)
        else:
            return False
        return not status


def plain_bf16(*tensors: torch.Tensor) -> bool:
    """Contiguous bfloat16 CPU tensors: what the native kernels read."""
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def matrix(codes: torch.Tensor, high_bits: torch.Tensor | None, scales: torch.Tensor, bias: torch.Tensor | None) -> BlockMatrix:
    """The C view of a block-quantized layer's buffers (which must outlive it)."""
    return BlockMatrix(codes.data_ptr(), _address(high_bits), scales.data_ptr(), _address(bias), scales.shape[0], scales.shape[1] * 32)


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _build(cc: str, variant: str) -> Path:
    """Compile into the cache under a name that changes with the sources, flags and compiler. Without the AMX flags
    amx_matmul.c compiles to its stub, and prefill takes the integer block products instead."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    features = BUILDS[build_for(variant, cpu_flags())]  # the build a wheel would carry for this CPU
    key = hashlib.sha256("\n".join([sources_digest(), " ".join(flags(features)), version]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"qwen_kernels-{key}.so"
    if not target.exists():
        compile_library(cc, features, target)
    return target


def _prebuilt(variant: str) -> Path | None:
    """The library a wheel carries for this CPU's `variant` (setup.py builds them), where it was built from these
    sources."""
    path = PREBUILT / f"qwen_kernels-{build_for(variant, cpu_flags())}.so"
    digest = PREBUILT / "sources.sha256"
    if not path.is_file() or not digest.is_file() or digest.read_text().strip() != sources_digest():
        return None
    return path


@functools.cache
def cpu_kernels() -> CpuKernels | None:
    """The compiled block kernels of the variant cpu.py picks, or None where none can run here."""
    return kernels_for(kernel_variant())


@functools.cache
def kernels_for(variant: str) -> CpuKernels | None:
    """The kernels of one of cpu.py's variants ("none" gives None), which this CPU must be able to run:
    several load side by side in one process (the tests compare them)."""
    if variant == "none":
        return None
    prebuilt = _prebuilt(variant)
    if prebuilt is not None:
        try:
            return CpuKernels(prebuilt, variant)
        except (OSError, AttributeError):  # (a library it cannot load here: compile one instead)
            pass
    cc = compiler()
    if cc is None:
        warnings.warn("qwen-engine: no C compiler found (set CC) and no prebuilt kernels for this CPU, so the native "
                      "kernels are off and decoding and prefill run on PyTorch's slower paths", RuntimeWarning,
                      stacklevel=2)
        return None
    try:
        return CpuKernels(_build(cc, variant), variant)
    except (OSError, AttributeError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", b"") or b""
        warnings.warn(f"qwen-engine: building the native kernels failed ({err}; {detail.decode(errors='replace')[-300:]}), "
                      "so decoding and prefill run on PyTorch's slower paths", RuntimeWarning, stacklevel=2)
        return None
