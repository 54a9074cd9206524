"""Bit-exactness of qwen_engine.weights.quants against the reference decoder, gguf.quants.dequantize."""

from __future__ import annotations

import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import quant_shape_to_byte_shape

from qwen_engine.errors import UnsupportedTensorType
from qwen_engine.weights.quants import SUPPORTED_TYPES, dequantize

# Byte offsets of the fp16 scale/min fields inside one block; random bytes there could be NaN/inf, which
# would make the comparison meaningless, so they are overwritten with finite fp16 values.
FP16_FIELDS: dict[T, tuple[int, ...]] = {
    T.Q8_0: (0,),
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)

# PyTorch shapes; the last dimension is a multiple of 256 so every block size fits. Includes 1-D, multi-row
# 2-D and 3-D tensors.
SHAPES = [(256,), (7, 512), (3, 2, 768)]


def finite_bits(rng: np.random.Generator, n: int, exp_mask: int, dtype: type) -> np.ndarray:
    """Random bit patterns of an IEEE format whose exponent is not all ones (so no NaN/inf)."""
    bits = rng.integers(0, np.iinfo(dtype).max, size=n, dtype=dtype, endpoint=True)
    special = (bits & exp_mask) == exp_mask
    bits[special] &= dtype(~exp_mask & np.iinfo(dtype).max)
    return bits


def random_tensor_data(qtype: T, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random data laid out as GGUFReader returns it: float arrays for F32/F16, uint8 block rows otherwise."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if qtype == T.F32:
        return finite_bits(rng, n, 0x7F800000, np.uint32).view(np.float32).reshape(shape)
    if qtype == T.F16:
        return finite_bits(rng, n, 0x7C00, np.uint16).view(np.float16).reshape(shape)
    if qtype == T.BF16:
        return finite_bits(rng, n, 0x7F80, np.uint16).view(np.uint8).reshape(quant_shape_to_byte_shape(shape, qtype))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n // block_size, type_size), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        blocks[:, offset : offset + 2] = finite_bits(rng, len(blocks), 0x7C00, np.uint16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(quant_shape_to_byte_shape(shape, qtype))


def assert_bit_exact(ours: torch.Tensor, data: np.ndarray, qtype: T, shape: tuple[int, ...]) -> None:
    expected = torch.from_numpy(np.array(gguf.quants.dequantize(data, qtype), dtype=np.float32))
    assert ours.dtype == torch.float32 and ours.is_contiguous()
    assert tuple(ours.shape) == shape == tuple(expected.shape)
    assert torch.equal(ours, expected)
    assert torch.equal(ours.view(torch.int32), expected.view(torch.int32))  # also tells -0.0 from 0.0


def test_supported_types() -> None:
    assert SUPPORTED_TYPES == frozenset(FLOAT_TYPES) | frozenset(FP16_FIELDS)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES), ids=lambda t: t.name)
def test_random_blocks_bit_exact(qtype: T, shape: tuple[int, ...]) -> None:
    data = random_tensor_data(qtype, shape, seed=int(qtype) * 1000 + len(shape))
    assert_bit_exact(dequantize(data, qtype, shape), data, qtype, shape)


def test_many_chunks_bit_exact() -> None:
    """A tensor larger than one decoding chunk, so chunk boundaries are exercised."""
    shape = (1100, 896)
    data = random_tensor_data(T.Q5_0, shape, seed=7)
    assert_bit_exact(dequantize(data, T.Q5_0, shape), data, T.Q5_0, shape)


def _gguf_can_quantize(qtype: T) -> bool:
    try:
        gguf.quants.quantize(np.zeros((1, 256), dtype=np.float32), qtype)
    except NotImplementedError:
        return False
    return True


QUANTIZABLE = [t for t in sorted(SUPPORTED_TYPES) if _gguf_can_quantize(t)]


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_real_data_round_trip(qtype: T) -> None:
    shape = (6, 1024)
    rng = np.random.default_rng(int(qtype))
    weights = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    weights[0, :32] = 0.0  # an all-zero block (d == 0)
    data = gguf.quants.quantize(weights, qtype)
    assert_bit_exact(dequantize(data, qtype, shape), data, qtype, shape)


def test_unsupported_type_names_type_and_tensor() -> None:
    data = np.zeros(GGML_QUANT_SIZES[T.Q2_K][1], dtype=np.uint8)
    with pytest.raises(UnsupportedTensorType) as excinfo:
        dequantize(data, T.Q2_K, (256,), name="blk.0.ffn_down.weight")
    message = str(excinfo.value)
    assert "Q2_K" in message and "blk.0.ffn_down.weight" in message and "Q8_0" in message
    assert "\n" not in message


def test_wrong_byte_count_is_rejected() -> None:
    data = random_tensor_data(T.Q8_0, (2, 64), seed=0)
    with pytest.raises(ValueError, match="Q8_0"):
        dequantize(data, T.Q8_0, (3, 64))


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_gguf_reader_memmap(tmp_path: Path, qtype: T) -> None:
    """Data straight from GGUFReader (read-only memmap, reversed ne order) decodes without warnings and the
    result owns its memory."""
    shape = (3, 512)
    data = random_tensor_data(qtype, shape, seed=11)
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_tensor("w", data, raw_dtype=None if qtype in (T.F32, T.F16) else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    tensor = gguf.GGUFReader(path).tensors[0]
    assert tensor.tensor_type == qtype and tuple(reversed(tensor.shape.tolist())) == shape
    assert not tensor.data.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = dequantize(tensor.data, qtype, shape)
    assert_bit_exact(ours, data, qtype, shape)
    ours += 1.0  # would crash if it aliased the read-only mapping
