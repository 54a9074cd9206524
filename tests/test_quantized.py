"""Runtime weight formats: numerics against the float reference, the per-tensor plan, the converted-weights cache
and the perplexity tool."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

import qwen_engine
from qwen_engine.engine.perplexity import chunk_nll, perplexity
from qwen_engine.errors import QwenError
from qwen_engine.model.quantized import Int4Linear, Int8Linear, quant_plan

# Output error bounds, relative to the largest reference output. Rounding to a step of `range / levels` leaves
# per-weight errors of ~step/√12 that add up over the input: per-channel int8 (255 levels of a row's range) stays
# near 1%, int4 in groups of 32 (16 levels of a group's range) near 10% on Gaussian weights.
BOUNDS = {Int8Linear: 0.02, Int4Linear: 0.15}


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("rows", [1, 4, 64])  # the packed kernel (≤ 8 rows) and the dequantize-then-matmul path
def test_random_weights_within_bounds(cls, rows: int) -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(256, 512), torch.randn(256)
    x = torch.randn(rows, 512).to(torch.bfloat16)
    reference = torch.nn.functional.linear(x.float(), weight, bias)
    layer = cls.quantize(weight, bias)
    assert relative_error(layer(x), reference) <= BOUNDS[cls]
    # Both paths compute the same function of the quantized weights.
    dequantized = torch.nn.functional.linear(x.float(), layer.dequantized().float(), bias)
    assert relative_error(layer(x), dequantized) <= 0.01


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_real_weights_within_bounds(cls, engine_model) -> None:
    """The default model's own layer-0 MLP and head (dequantized from Q5_0 / Q8_0)."""
    torch.manual_seed(1)
    for linear in (engine_model.decoder.model.layers[0].mlp.gate_up_proj, engine_model.decoder.lm_head):
        x = torch.randn(2, linear.in_features).to(torch.bfloat16)
        reference = torch.nn.functional.linear(x.float(), linear.weight)
        assert relative_error(cls.quantize(linear.weight, None)(x), reference) <= BOUNDS[cls]


def test_int4_is_exact_on_4_bit_grids() -> None:
    # Weights already on a 16-level grid per group (like Q4_0/Q4_K tensors) survive up to bf16 rounding.
    torch.manual_seed(2)
    levels = torch.randint(0, 16, (64, 128)).float()
    levels[:, 0::32], levels[:, 1::32] = 0, 15  # every group spans the whole grid, as a quantizer's output does
    scale = torch.rand(64, 4).repeat_interleave(32, dim=1) + 0.5
    weight = (levels - 8) * scale
    layer = Int4Linear.quantize(weight, None)
    assert relative_error(layer.dequantized(), weight) <= 2**-6  # bfloat16 scales and zeros


@pytest.fixture(scope="module")
def small_gguf(tiny_gguf_factory) -> Path:
    """A tiny GGUF of its own (a test below touches its time stamp), with a small vocabulary: the weight formats, not
    the tokenizer, are tested here."""
    return tiny_gguf_factory("quantized.gguf", small_vocab=True, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tiny_int8(small_gguf):
    return qwen_engine.load(small_gguf, quant="int8")


def test_quantized_model_tracks_float32(small_gguf, tiny_int8) -> None:
    reference = qwen_engine.load(small_gguf, dtype="float32", quant="none")
    ids = list(range(100, 140))
    assert tiny_int8.quant == "int8" and reference.quant == "none"
    assert relative_error(tiny_int8.logits(ids), reference.logits(ids)) <= 0.05


def test_converted_cache_is_used_and_keyed_by_the_source(small_gguf, tiny_int8, isolated_cache, monkeypatch) -> None:
    cached = list((isolated_cache / "converted").glob("*.pt"))
    assert cached, "the first int8 load writes the converted weights"
    from qwen_engine.checkpoint import GGUFSource

    def no_conversion(*args, **kwargs):
        raise AssertionError("a warm start must not dequantize again")

    monkeypatch.setattr(GGUFSource, "tensors", no_conversion)
    warm = qwen_engine.load(small_gguf, quant="int8")
    ids = list(range(200, 230))
    torch.testing.assert_close(warm.logits(ids), tiny_int8.logits(ids), rtol=0, atol=0)
    monkeypatch.undo()
    # A modified source file is a different key: converted again, never served stale, and the old file is replaced.
    stat = small_gguf.stat()
    os.utime(small_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    qwen_engine.load(small_gguf, quant="int8")
    now = set((isolated_cache / "converted").glob("*.pt"))
    assert len(now) == len(cached) and now != set(cached)


def test_corrupt_cache_is_rebuilt(small_gguf, isolated_cache) -> None:
    first = qwen_engine.load(small_gguf, quant="int4")
    newest = max((isolated_cache / "converted").glob("*.pt"), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(b"not a cache")
    again = qwen_engine.load(small_gguf, quant="int4")
    ids = list(range(300, 320))
    torch.testing.assert_close(again.logits(ids), first.logits(ids), rtol=0, atol=0)
    assert newest.stat().st_size > 1000


def test_quant_on_a_gpu_device_is_refused() -> None:
    from qwen_engine.llm import pick_quant

    with pytest.raises(QwenError, match="CPU only"):
        pick_quant("int8", torch.bfloat16, torch.device("cuda"))
    assert pick_quant(None, torch.float32, torch.device("cpu")) == "none"
    with pytest.raises(QwenError, match="unknown quant"):
        pick_quant("int3", torch.bfloat16, torch.device("cpu"))


def test_perplexity_matches_a_hand_computation(tiny_int8) -> None:
    ids = list(range(1000, 1100))
    result = perplexity(tiny_int8.logits, ids, context=40)
    assert result.chunks == 2 and result.tokens_scored == 2 * 19
    total = 0.0
    for chunk in (ids[:40], ids[40:80]):
        logits = tiny_int8.logits(chunk).float()
        for position in range(20, 39):
            total -= torch.log_softmax(logits[position], -1)[chunk[position + 1]].item()
    assert math.isclose(result.perplexity, math.exp(total / 38), rel_tol=1e-5)
    nll, n = chunk_nll(tiny_int8.logits(ids[:40]), ids[:40])
    assert n == 19 and nll > 0


def test_perplexity_needs_one_full_chunk(tiny_int8) -> None:
    with pytest.raises(QwenError, match="fewer than one context"):
        perplexity(tiny_int8.logits, list(range(10)), context=40)
