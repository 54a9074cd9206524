"""Block formats (GGUF's Q8_0/Q5_0 blocks kept as stored), the native kernels, the fused decode step and the
embedding read from the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

import qwen_engine
import qwen_engine.model.quantized as quantized
from qwen_engine.cpu import VARIANTS
from qwen_engine.kernels import cpu_flags, cpu_kernels, kernels_for
from qwen_engine.model.quantized import BlockLinear, pack_blocks, quant_plan, quantize_blocks, unpack_blocks
from qwen_engine.weights.quants import BlockCodes, block_codes

needs_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="the kernels need AVX2 and a C compiler")
# Every kernel variant this CPU can execute (cpu.py): the kernel tests run for each, against PyTorch's numbers.
VARIANTS_HERE = [name for name in VARIANTS if name != "none" and set(VARIANTS[name]) <= cpu_flags()]


@pytest.fixture(params=VARIANTS_HERE)
def kernels(request):
    loaded = kernels_for(request.param)
    assert loaded is not None and loaded.variant == request.param
    return loaded
BITS_TO_TYPE = {8: T.Q8_0, 5: T.Q5_0}


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).abs().max() / reference.float().abs().max())


def random_weights(rows: int, columns: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(rows, columns) * (torch.rand(rows, 1) * 3 + 0.1)


def real_blocks(checkpoint, name: str, rows: int = 512) -> BlockCodes:
    """The first rows of one of the default model's Q8_0/Q5_0 tensors, as stored."""
    blocks = checkpoint.stored_blocks(name)
    return BlockCodes(blocks.codes[:rows], blocks.scales[:rows], blocks.bits)


@pytest.mark.parametrize("bits", [8, 5])
def test_gguf_blocks_read_and_quantized_bit_for_bit(bits: int) -> None:
    weight = random_weights(64, 256, seed=bits)
    weight[0, :32] = 0  # an all-zero block has d = 0
    raw = gguf_quants.quantize(weight.numpy(), BITS_TO_TYPE[bits])
    stored = block_codes(raw, BITS_TO_TYPE[bits], (64, 256))
    assert stored.bits == bits
    assert torch.equal(stored.dequantized(), torch.from_numpy(gguf_quants.dequantize(raw, BITS_TO_TYPE[bits])))
    # The engine's own quantizer is llama.cpp's reference quantizer.
    ours = quantize_blocks(weight, bits)
    assert torch.equal(ours.codes, stored.codes) and torch.equal(ours.scales, stored.scales)
    # Widening 5-bit blocks to 8 bits keeps every weight.
    assert torch.equal(stored.widened().dequantized(), stored.dequantized())


@pytest.mark.parametrize("bits", [8, 5])
def test_kernel_layout_round_trips(bits: int) -> None:
    torch.manual_seed(3)
    codes = torch.randint(0, 256 if bits == 8 else 32, (16, 960), dtype=torch.uint8)  # superblocks of 8, 4, 2 and 1 steps
    blocks = BlockCodes(codes, torch.rand(16, 30).half(), bits)
    packed, high_bits = pack_blocks(blocks)
    assert (high_bits is None) == (bits == 8)
    assert packed.numel() == codes.numel() * (1 if bits == 8 else 0.5)
    assert torch.equal(unpack_blocks(packed, high_bits, blocks.scales).codes, codes)


@pytest.mark.parametrize("bits", [8, 5])
def test_kernel_dequantize_is_exact(bits: int, default_checkpoint, kernels) -> None:
    name = "lm_head.weight" if bits == 8 else "model.layers.0.mlp.gate_proj.weight"  # Q8_0, Q5_0
    for blocks in (quantize_blocks(random_weights(96, 448, seed=4), bits), real_blocks(default_checkpoint, name)):
        assert blocks.bits == bits
        packed, high_bits = pack_blocks(blocks)
        ours = kernels.dequantize(packed, high_bits, blocks.scales)
        assert torch.equal(ours, blocks.dequantized().to(torch.bfloat16))


def int8_activation_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the decode kernel computes: x in int8 blocks of 32 (scale max|x|/127, round half to even) times W."""
    groups = x.float().view(x.shape[0], -1, 32)
    scale = groups.abs().amax(-1, keepdim=True) / 127
    q = torch.round(groups / torch.where(scale > 0, scale, 1.0))
    return (q * scale).view(x.shape) @ weight.t()


@pytest.mark.parametrize("bits", [8, 5])
@pytest.mark.parametrize("rows", [1, 3, 8, 21, 32, 70])
def test_kernel_matmul_on_random_and_real_weights(bits: int, rows: int, default_checkpoint, kernels) -> None:
    name = "lm_head.weight" if bits == 8 else "model.layers.0.mlp.gate_proj.weight"
    torch.manual_seed(rows)
    # Rows of 704 and 896 columns take superblocks of every size (512 + 128 + 64; 512 + 256 + 128).
    odd = quantize_blocks(random_weights(255, 704, seed=9), bits)  # weight rows go in pairs: the last one alone
    for blocks in (quantize_blocks(random_weights(256, 704, seed=5), bits), odd, real_blocks(default_checkpoint, name)):
        weight = blocks.dequantized()
        x = torch.randn(rows, weight.shape[1]).to(torch.bfloat16)
        ours = kernels.matmul(x, *pack_blocks(blocks), blocks.scales)
        # Exactly the int8-activation product, up to the bfloat16 rounding of the output (2⁻⁸) …
        assert relative_error(ours, int8_activation_reference(x, weight)) <= 2**-7
        # … which stays within 1% of the exact product with the same weights.
        assert relative_error(ours, x.float() @ weight.t()) <= 0.01


@pytest.mark.parametrize("bits", [8, 5])
def test_kernel_row_results_do_not_depend_on_the_batch(bits: int, default_checkpoint, kernels) -> None:
    """Bit for bit, a row's product is the same alone as among 31 others (the serving engine's alone-or-batched
    identity rests on it)."""
    name = "lm_head.weight" if bits == 8 else "model.layers.0.mlp.gate_proj.weight"
    torch.manual_seed(bits)
    for blocks in (quantize_blocks(random_weights(64, 704, seed=6), bits), real_blocks(default_checkpoint, name)):
        packed, high_bits = pack_blocks(blocks)
        x = torch.randn(32, blocks.scales.shape[1] * 32).to(torch.bfloat16)
        together = kernels.matmul(x, packed, high_bits, blocks.scales)
        for row in (0, 7, 8, 19, 31):
            alone = kernels.matmul(x[row : row + 1].contiguous(), packed, high_bits, blocks.scales)
            assert torch.equal(alone[0], together[row])


@pytest.mark.skipif("amx_bf16" not in cpu_flags(), reason="the AMX product needs a CPU with AMX-BF16")
@needs_kernels
@pytest.mark.parametrize("bits", [8, 5])
def test_amx_matmul_is_the_bf16_product_of_the_blocks(bits: int, default_checkpoint) -> None:
    """The AMX product equals PyTorch's bfloat16 matmul of the dequantized weights up to summation order (one
    bfloat16 step of the output), on random and real weights, for row counts off the 32-row blocks."""
    name = "lm_head.weight" if bits == 8 else "model.layers.0.mlp.gate_proj.weight"
    kernels = cpu_kernels()
    for blocks in (quantize_blocks(random_weights(320, 640, seed=7), bits), real_blocks(default_checkpoint, name)):
        packed, high_bits = pack_blocks(blocks)
        weight = kernels.dequantize(packed, high_bits, blocks.scales)
        for rows in (9, 32, 47, 100):
            x = torch.randn(rows, weight.shape[1]).to(torch.bfloat16)
            ours = kernels.matmul_amx(x, packed, high_bits, blocks.scales)
            assert ours.shape == (rows, weight.shape[0])
            assert relative_error(ours, torch.nn.functional.linear(x, weight)) <= 2**-7
        spaced = torch.randn(40, 2 * weight.shape[1]).to(torch.bfloat16)[:, : weight.shape[1]]  # rows 2K apart
        ours = kernels.matmul_amx(spaced, packed, high_bits, blocks.scales)
        assert relative_error(ours, torch.nn.functional.linear(spaced.contiguous(), weight)) <= 2**-7
        # Fused SwiGLU: W is [gate; up]; the result is silu(gate product) · up product with the unfused roundings.
        x = torch.randn(45, weight.shape[1]).to(torch.bfloat16)
        product = torch.nn.functional.linear(x, weight)
        gate, up = product.chunk(2, dim=-1)
        expected = torch.nn.functional.silu(gate) * up
        fused = kernels.matmul_amx(x, packed, high_bits, blocks.scales, swiglu=True)
        assert fused.shape == expected.shape and relative_error(fused, expected) <= 2**-6
    odd = quantize_blocks(random_weights(48, 640, seed=8), bits)  # 48 rows: not whole 32-row panels
    assert kernels.matmul_amx(torch.zeros(9, 640, dtype=torch.bfloat16), *pack_blocks(odd), odd.scales) is None


@pytest.mark.parametrize("bits", [8, 5])
def test_block_linear_within_bounds_on_every_path(bits: int, monkeypatch) -> None:
    """Against the float weights it was quantized from: 8-bit blocks within 1%, 5-bit within 5% (a step of a
    block's range / 31); the decode path (few rows), the prefill path and the PyTorch fallback agree."""
    weight, bias = random_weights(192, 384, seed=6), torch.randn(192)
    layer = BlockLinear.from_blocks(quantize_blocks(weight, bits), bias)
    x = torch.randn(16, 384).to(torch.bfloat16)
    reference = torch.nn.functional.linear(x.float(), weight, bias)
    prefill, decode = layer(x), layer(x[:4])
    assert relative_error(prefill, reference) <= (0.01 if bits == 8 else 0.05)
    assert relative_error(decode, prefill[:4]) <= 0.01
    monkeypatch.setattr(quantized, "cpu_kernels", lambda: None)
    assert relative_error(layer(x[:4]), prefill[:4]) <= 2**-7


def test_auto_plan_keeps_the_stored_blocks(default_checkpoint, engine_model, monkeypatch) -> None:
    types = default_checkpoint.stored_types()
    decoder = engine_model.decoder
    if cpu_kernels() is not None:
        plan = quant_plan(decoder, "auto", types)
        assert plan["lm_head"] == "q8_0" and plan["model.embed_tokens"] == "q5_0"  # Q8_0 and Q5_0 in the file
        for layer in range(engine_model.config.num_layers):
            prefix = f"model.layers.{layer}."
            parts = [types[f"{prefix}self_attn.{p}_proj.weight"] for p in "qkv"]
            assert plan[f"{prefix}self_attn.qkv_proj"] == ("q5_0" if set(parts) == {"Q5_0"} else "q8_0")
            assert plan[f"{prefix}mlp.down_proj"] == ("q5_0" if types[f"{prefix}mlp.down_proj.weight"] == "Q5_0" else "q8_0")
        assert {"q5_0", "q8_0"} == set(plan.values())
        assert set(quant_plan(decoder, "q8_0", types).values()) == {"q8_0"}
    # Without the kernel, "auto" falls back to PyTorch's packed formats: int4 where 4 bits are stored.
    monkeypatch.setattr(quantized, "cpu_kernels", lambda: None)
    plan = quant_plan(decoder, "auto", types)
    for layer in range(engine_model.config.num_layers):
        down = types[f"model.layers.{layer}.mlp.down_proj.weight"]
        assert plan[f"model.layers.{layer}.mlp.down_proj"] == ("int4" if down == "Q4_K" else "int8")
    assert "model.embed_tokens" not in plan and set(plan.values()) == {"int4", "int8"}


def test_stored_embedding_reads_rows_from_the_file(default_checkpoint, engine_model) -> None:
    rows = default_checkpoint.stored_rows("model.embed_tokens.weight")
    ids = [0, 151643, 77, 77, 1234, 151935]
    expected = engine_model.decoder.model.embed_tokens.weight[ids]  # float32, dequantized from Q5_0 at load
    assert torch.equal(rows(ids), expected)


@pytest.fixture(scope="module")
def tiny_blocks_gguf(tiny_gguf_factory):
    """A tiny GGUF whose projections are stored Q5_0 (q, k, o, gate, up) and Q8_0 (v, down), like a real file."""
    from tiny import SMALL_VOCAB_CONFIG, hf_config, random_model

    # Every row a multiple of 64, as the kernel needs; a small vocabulary: the kernels, not the tokenizer, are tested.
    config = hf_config("qwen2.5-0.5b", **SMALL_VOCAB_CONFIG, intermediate_size=192)
    state = random_model(config).state_dict()  # the factory's model: same config, same seed
    raw = {}
    stored = {"attn_q": ("self_attn.q_proj", T.Q5_0), "attn_k": ("self_attn.k_proj", T.Q5_0),
              "attn_v": ("self_attn.v_proj", T.Q8_0), "attn_output": ("self_attn.o_proj", T.Q5_0),
              "ffn_gate": ("mlp.gate_proj", T.Q5_0), "ffn_up": ("mlp.up_proj", T.Q5_0), "ffn_down": ("mlp.down_proj", T.Q8_0)}
    for layer in range(config.num_hidden_layers):
        for gguf_name, (hf_name, qtype) in stored.items():
            weight = state[f"model.layers.{layer}.{hf_name}.weight"].numpy()
            raw[f"blk.{layer}.{gguf_name}.weight"] = (gguf_quants.quantize(weight, qtype), qtype)
    return tiny_gguf_factory("blocks.gguf", raw_tensors=raw, small_vocab=True, intermediate_size=192)


def decode_logits(model, prompt: list[int], steps: list[int]) -> torch.Tensor:
    """Logits of each decoding step after `prompt`, through the model's own engine (fused where it applies)."""
    return model.stepwise_logits(prompt + steps, len(prompt))[len(prompt) :]


@needs_kernels
def test_tiny_gguf_keeps_its_blocks_and_decodes_fused(tiny_blocks_gguf) -> None:
    model = qwen_engine.load(tiny_blocks_gguf)  # the CPU default: auto
    layer = model.decoder.model.layers[0]
    assert model.quant == "auto" and model.decoder.fused_decode is not None
    assert layer.self_attn.qkv_proj.high_bits is None  # v is Q8_0, so the packed q/k/v go 8-bit (exactly)
    assert layer.mlp.gate_up_proj.high_bits is not None and layer.mlp.down_proj.high_bits is None
    reference = qwen_engine.load(tiny_blocks_gguf, dtype="float32", quant="none")
    ids = list(range(500, 540))
    # Prefill computes with the stored weights exactly: only bfloat16 activations separate it from float32.
    assert relative_error(model.logits(ids), reference.logits(ids)) <= 0.03
    steps = list(range(900, 916))
    fused = decode_logits(model, ids, steps)
    # Activations off the CPU (a decoder moved after loading) are declined: the step holds host addresses.
    off_cpu = torch.zeros(1, 1, model.config.hidden_size, dtype=torch.bfloat16, device="meta")
    assert model.decoder.fused_decode(off_cpu, None, None) is None
    model.decoder.fused_decode = None
    unfused = decode_logits(model, ids, steps)
    assert relative_error(fused, unfused) <= 0.02
    assert relative_error(fused, decode_logits(reference, ids, steps)) <= 0.05


@needs_kernels
def test_fused_decode_honours_the_sliding_window(tmp_path, small_tokenizer_files) -> None:
    from tiny import SMALL_VOCAB_CONFIG, hf_config, random_model, write_hf_checkpoint

    config = hf_config("qwen2.5-0.5b", **SMALL_VOCAB_CONFIG, intermediate_size=192, use_sliding_window=True,
                       sliding_window=8, max_window_layers=1, num_hidden_layers=2)
    directory = write_hf_checkpoint(tmp_path / "windowed", random_model(config), small_tokenizer_files)
    model = qwen_engine.load(directory, quant="q8_0")
    assert model.decoder.fused_decode is not None and model.decoder.model.layers[1].self_attn.window == 8
    prompt, steps = list(range(100, 120)), list(range(300, 312))  # decoding well past the window
    fused = decode_logits(model, prompt, steps)
    model.decoder.fused_decode = None
    assert relative_error(fused, decode_logits(model, prompt, steps)) <= 0.02


@needs_kernels
@pytest.mark.parametrize(("heads", "kv_heads"), [(12, 1), (4, 4)])
def test_fused_decode_attends_any_grouping_of_heads(tmp_path, small_tokenizer_files, heads: int, kv_heads: int) -> None:
    """The native step attends the query heads of a kv head together, in chunks of up to 8: a group of 12 takes two
    chunks, plain multi-head attention one head each. Both agree with the PyTorch path."""
    from tiny import SMALL_VOCAB_CONFIG, hf_config, random_model, write_hf_checkpoint

    config = hf_config("qwen2.5-0.5b", **SMALL_VOCAB_CONFIG, hidden_size=32 * heads, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, head_dim=32, intermediate_size=192, num_hidden_layers=2)
    directory = write_hf_checkpoint(tmp_path / f"heads{heads}", random_model(config), small_tokenizer_files)
    model = qwen_engine.load(directory, quant="q8_0")
    assert model.decoder.fused_decode is not None and model.config.head_dim == 32
    prompt, steps = list(range(100, 140)), list(range(300, 310))
    fused = decode_logits(model, prompt, steps)
    model.decoder.fused_decode = None
    assert relative_error(fused, decode_logits(model, prompt, steps)) <= 0.02


@needs_kernels
def test_default_model_greedy_text_is_the_same_fused_or_not(default_model, monkeypatch) -> None:
    model = default_model
    assert model.quant == "auto" and model.decoder.fused_decode is not None
    prompt = model.chat_prompt([{"role": "user", "content": "Write a Python function that reverses a string."}])
    greedy = dict(max_tokens=48, temperature=0, repetition_penalty=1.0)  # argmax: no penalty to amplify bf16 noise
    fused = model.generate(prompt, **greedy)
    monkeypatch.setattr(model.decoder, "fused_decode", None)  # the shared model gets its fused step back afterwards
    assert model.generate(prompt, **greedy).token_ids == fused.token_ids
    assert "def " in fused.text


def test_without_kernels_auto_runs_on_pytorch_formats(tiny_blocks_gguf, monkeypatch) -> None:
    monkeypatch.setenv("QWEN_ENGINE_NO_KERNELS", "1")
    cpu_kernels.cache_clear()
    try:
        model = qwen_engine.load(tiny_blocks_gguf, quant="auto")
        assert model.decoder.fused_decode is None
        assert {type(m).__name__ for m in model.decoder.modules()} & {"Int8Linear", "BlockLinear"} == {"Int8Linear"}
        reference = qwen_engine.load(tiny_blocks_gguf, dtype="float32", quant="none")
        ids = list(range(500, 540))
        assert relative_error(model.logits(ids), reference.logits(ids)) <= 0.05
    finally:
        monkeypatch.delenv("QWEN_ENGINE_NO_KERNELS")
        cpu_kernels.cache_clear()


@needs_kernels
def test_tied_gguf_head_shares_the_stored_embedding_blocks(tiny_gguf_factory) -> None:
    """A tied file (no output.weight) with a Q8_0 embedding: the head is the embedding's blocks, never a float copy."""
    from tiny import SMALL_VOCAB_CONFIG, hf_config, random_model

    config = hf_config("qwen2.5-0.5b", **SMALL_VOCAB_CONFIG, intermediate_size=192)
    embedding = random_model(config).state_dict()["model.embed_tokens.weight"].numpy()
    raw = {"token_embd.weight": (gguf_quants.quantize(embedding, T.Q8_0), T.Q8_0)}
    path = tiny_gguf_factory("tied.gguf", raw_tensors=raw, small_vocab=True, intermediate_size=192)
    model = qwen_engine.load(path)
    decoder = model.decoder
    assert decoder.config.tie_word_embeddings
    assert decoder.lm_head.codes.data_ptr() == decoder.model.embed_tokens.codes.data_ptr()
    reference = qwen_engine.load(path, dtype="float32", quant="none")
    ids = list(range(500, 530))
    assert relative_error(model.logits(ids), reference.logits(ids)) <= 0.03


def bf16_ulps(ours: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Distance in bfloat16 steps (same-sign values: the bit patterns are ordered)."""
    return (ours.view(torch.int16).int() - reference.view(torch.int16).int()).abs()


def test_row_kernels_round_as_the_pytorch_ops(monkeypatch, kernels) -> None:
    """RMSNorm and the rotary embedding are bit for bit PyTorch's bfloat16 arithmetic; silu·up may differ by one
    bfloat16 step where the two exponentials round apart."""
    from qwen_engine.model import decoder as decoder_module
    from qwen_engine.model.rope import apply_rotary

    torch.manual_seed(0)
    x = (torch.randn(37, 896) * 3).to(torch.bfloat16)
    norm = decoder_module.RMSNorm(896, 1e-6).to(torch.bfloat16)
    norm.weight.data = (torch.rand(896) * 2).to(torch.bfloat16)
    residual = (torch.randn(37, 896) * 3).to(torch.bfloat16)
    monkeypatch.setattr(decoder_module, "native_kernels", lambda x: kernels)
    native, (native_summed_norm, native_sum) = norm(x)[0], norm(x.clone(), residual)
    monkeypatch.setattr(decoder_module, "native_kernels", lambda x: None)
    torch_norm, (torch_summed_norm, torch_sum) = norm(x)[0], norm(x.clone(), residual)
    assert torch.equal(native_sum, torch_sum) and torch.equal(torch_sum, x + residual)
    for ours, reference in ((native, torch_norm), (native_summed_norm, torch_summed_norm)):
        assert (bf16_ulps(ours, reference) > 0).float().mean() < 1e-3 and bf16_ulps(ours, reference).max() <= 1

    heads, kv_heads, d, tokens = 3, 1, 64, 19
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d).to(torch.bfloat16)
    cos, sin = torch.randn(tokens, d).to(torch.bfloat16), torch.randn(tokens, d).to(torch.bfloat16)
    expected = apply_rotary(qkv[:, : heads * d].view(tokens, heads, d).transpose(0, 1), cos, sin).transpose(0, 1)
    rotated = qkv.clone()
    assert kernels.rotate_(rotated, heads, d, cos, sin)
    assert torch.equal(rotated[:, : heads * d], expected.reshape(tokens, -1))
    assert torch.equal(rotated[:, heads * d :], qkv[:, heads * d :])  # the other heads untouched
    assert not kernels.rotate_(rotated, heads, 48, cos[:, :48], sin[:, :48])  # d not a multiple of 32

    gate_up = (torch.randn(tokens, 2 * 100) * 4).to(torch.bfloat16)  # 100: rows end in a partial vector
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    for layout in (gate_up.clone(), gate_up.t().contiguous().t()):  # the piecewise prefill product comes transposed
        assert kernels.silu_mul_(layout) and torch.equal(layout[:, 100:], up)  # written over gate, up kept
        mixed = layout[:, :100]
        assert bf16_ulps(mixed, expected).max() <= 1 and (bf16_ulps(mixed, expected) > 0).float().mean() < 0.01
    assert not kernels.silu_mul_(gate_up[:, :-1])  # odd width: no [gate | up] split
    assert kernels.rms_norm(x[:, :100].contiguous(), norm.weight[:100], 1e-6) is None  # rows not a multiple of 16


@needs_kernels
def test_prefill_with_row_kernels_matches_the_pytorch_ops(tiny_blocks_gguf, monkeypatch) -> None:
    from qwen_engine.model import decoder as decoder_module

    model = qwen_engine.load(tiny_blocks_gguf)
    ids = list(range(500, 560))
    native = model.logits(ids)
    monkeypatch.setattr(decoder_module, "native_kernels", lambda x: None)
    assert relative_error(native, model.logits(ids)) <= 0.02


@pytest.mark.parametrize("bits", [8, 5])
def test_partial_sums_are_the_products_before_their_rounding(bits: int, kernels) -> None:
    """What a tensor-parallel rank sums over the ranks (`sums=True`: float32, unrounded, for decoding and on AMX
    for prefill) rounds to exactly the bfloat16 product of one process, and is that product in float32."""
    blocks = quantize_blocks(random_weights(96, 640, seed=8), bits)
    packed, high_bits = pack_blocks(blocks)
    weight = kernels.dequantize(packed, high_bits, blocks.scales).float()
    for count in (5, 40):  # (40: the products leave a tile 16 at a time, 5 one by one)
        x = torch.randn(count, 640).to(torch.bfloat16)
        sums = kernels.matmul(x, packed, high_bits, blocks.scales, sums=True)
        assert sums.dtype == torch.float32
        assert torch.equal(sums.to(torch.bfloat16), kernels.matmul(x, packed, high_bits, blocks.scales))
    rows = torch.randn(40, 640).to(torch.bfloat16)
    amx = kernels.matmul_amx(rows, packed, high_bits, blocks.scales, sums=True)
    if amx is not None:  # (the "amx" variant)
        assert amx.dtype == torch.float32
        assert torch.equal(amx.to(torch.bfloat16), kernels.matmul_amx(rows, packed, high_bits, blocks.scales))
        assert relative_error(amx, rows.float() @ weight.T) <= 1e-5



@needs_kernels
@pytest.mark.parametrize("variant", VARIANTS_HERE)
def test_every_kernel_variant_this_cpu_runs_gives_the_reference_numbers(variant: str, tiny_blocks_gguf,
                                                                       monkeypatch) -> None:
    """QWEN_ENGINE_CPU caps the variant (cpu.py): each one this machine can execute loads, reports itself, and gives
    the float32 reference's logits in prefill and through the fused decoding steps (the variants below "amx" prefill
    on the integer block products, as a CPU without AMX does)."""
    monkeypatch.setenv("QWEN_ENGINE_CPU", variant)
    cpu_kernels.cache_clear()
    try:
        kernels = cpu_kernels()
        assert kernels.variant == variant
        blocks = quantize_blocks(random_weights(64, 640, seed=9), 8)
        on_amx = kernels.matmul_amx(torch.randn(40, 640).to(torch.bfloat16), *pack_blocks(blocks), blocks.scales)
        assert (on_amx is not None) == (variant == "amx")
        model = qwen_engine.load(tiny_blocks_gguf)
        reference = qwen_engine.load(tiny_blocks_gguf, dtype="float32", quant="none")
        assert model.decoder.fused_decode is not None
        ids, steps = list(range(500, 540)), list(range(900, 910))
        assert relative_error(model.logits(ids), reference.logits(ids)) <= 0.03
        assert relative_error(decode_logits(model, ids, steps), decode_logits(reference, ids, steps)) <= 0.05
    finally:
        monkeypatch.delenv("QWEN_ENGINE_CPU")
        cpu_kernels.cache_clear()


def test_an_unknown_variant_is_one_clear_error(monkeypatch) -> None:
    from qwen_engine.cpu import kernel_variant
    from qwen_engine.errors import QwenError

    monkeypatch.setenv("QWEN_ENGINE_CPU", "avx10")
    with pytest.raises(QwenError, match="QWEN_ENGINE_CPU=avx10 is not a kernel variant: use amx, avx512, avx2_vnni, avx2, none"):
        kernel_variant()
    monkeypatch.setenv("QWEN_ENGINE_CPU", "none")
    assert kernel_variant() == "none"


@pytest.mark.skipif(len(VARIANTS_HERE) < 2, reason="one kernel variant runs on this CPU: nothing to compare it with")
def test_the_variants_compute_the_same_numbers_bit_for_bit(default_checkpoint, tiny_blocks_gguf, monkeypatch) -> None:
    """AVX2 (with or without VNNI) and AVX-512 builds give the same integer products, conversions, norms and
    rotations, lane for lane in the same order (simd.h): equal bits, not only equal within a tolerance. So do
    prefill and whole decoding steps through the fused kernel on every variant without AMX (whose silu divides on
    AVX2 where AVX-512 refines an estimate: equal after the bfloat16 rounding here)."""
    every = {name: kernels_for(name) for name in VARIANTS_HERE}
    torch.manual_seed(11)
    weights = (quantize_blocks(random_weights(255, 960, seed=12), 5), real_blocks(default_checkpoint, "lm_head.weight"))
    for blocks in weights:
        packed, high_bits = pack_blocks(blocks)
        x = (torch.randn(45, blocks.scales.shape[1] * 32) * 5).to(torch.bfloat16)
        results = {name: (k.matmul(x, packed, high_bits, blocks.scales, sums=True),
                          k.matmul(x[:3].contiguous(), packed, high_bits, blocks.scales),
                          k.dequantize(packed, high_bits, blocks.scales)) for name, k in every.items()}
        first = next(iter(results.values()))
        for name, result in results.items():
            assert all(torch.equal(ours, theirs) for ours, theirs in zip(result, first)), name
    rows, weight = (torch.randn(19, 896) * 3).to(torch.bfloat16), torch.rand(896).to(torch.bfloat16)
    cos, sin = torch.randn(19, 64).to(torch.bfloat16), torch.randn(19, 64).to(torch.bfloat16)
    normed, rotated = {}, {}
    for name, k in every.items():
        normed[name], rotated[name] = k.rms_norm(rows, weight, 1e-6), rows.clone()
        assert k.rotate_(rotated[name], 14, 64, cos, sin)
    assert all(torch.equal(normed[name], normed[VARIANTS_HERE[0]]) for name in every)
    assert all(torch.equal(rotated[name], rotated[VARIANTS_HERE[0]]) for name in every)
    without_amx = [name for name in every if name != "amx"]  # (AMX prefills on its tiles: other roundings)
    ids, steps, logits = list(range(500, 540)), list(range(900, 910)), {}
    for name in without_amx:
        monkeypatch.setenv("QWEN_ENGINE_CPU", name)
        cpu_kernels.cache_clear()
        model = qwen_engine.load(tiny_blocks_gguf)
        logits[name] = torch.cat([model.logits(ids), decode_logits(model, ids, steps)])
    cpu_kernels.cache_clear()
    assert all(torch.equal(logits[name], logits[without_amx[0]]) for name in without_amx)
