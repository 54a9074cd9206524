"""Long-context attention: YaRN (qwen-family.md §3.3), Qwen v1 dynamic NTK and LogN (§1.4, §1.5), sliding-window
attention (§3.2).

Most checks run on small decoders built straight from a `ModelConfig` with random weights and compare them with
an explicit float64 reference forward written here (eager attention, explicit masks, explicit rotary tables), or
with a twin decoder whose plain RoPE base is the value the formulas predict. YaRN and the sliding window are also
compared with transformers' Qwen2 on tiny HF checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import qwen_engine
from qwen_engine.config import ModelConfig, RopeScaling
from qwen_engine.engine.paged import BLOCK_SIZE, PagedBatch, PagedKVCache
from qwen_engine.model.decoder import QwenDecoder
from qwen_engine.model.rope import (
    inverse_frequencies,
    logn_factors,
    ntk_alpha,
    ntk_base,
    yarn_correction_range,
    yarn_frequencies,
)

SMALL = dict(architecture="qwen2", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=128)


def make_decoder(seed: int = 0, **fields) -> QwenDecoder:
    """A small float32 decoder with random weights (norm weights around 1, biases random)."""
    config = ModelConfig(**{**SMALL, **fields})
    torch.manual_seed(seed)
    decoder = QwenDecoder(config).eval()
    with torch.no_grad():
        for name, param in decoder.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.3)
            elif "embed_tokens" in name:  # the decoder leaves its table uninitialised: checkpoints fill it
                param.normal_()
    return decoder


def twin(decoder: QwenDecoder, **changes) -> QwenDecoder:
    """The same weights under a changed config."""
    other = QwenDecoder(dataclasses.replace(decoder.config, **changes)).eval()
    other.load_state_dict(decoder.state_dict())
    return other


def ids(length: int, seed: int = 1, vocab: int = 97) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def run(decoder: QwenDecoder, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return decoder(tokens, **kwargs)[0]


def cached(decoder: QwenDecoder, tokens: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of every position from a prompt of chunks[0] tokens (which chooses the rotary frequencies), further
    chunks through the engine's paged cache, then one token at a time."""
    blocks = -(-tokens.shape[1] // BLOCK_SIZE)
    cache = PagedKVCache(decoder.config, blocks, torch.float32, torch.device("cpu"))
    choice = decoder.rotary.choose(chunks[0])
    outputs, start = [], 0
    with torch.inference_mode():
        for size in chunks + [1] * (tokens.shape[1] - sum(chunks)):
            batch = PagedBatch(cache, [list(range(blocks))], [start], [size], [choice])
            outputs.append(decoder(tokens[:, start : start + size], batch=batch)[0])
            start += size
    return torch.cat(outputs)


def reference_logits(decoder: QwenDecoder, tokens: torch.Tensor, *, base: float | None = None,
                     inv_freq: torch.Tensor | None = None, rope_factor: float = 1.0, logn_seq_length: int | None = None,
                     windows: list[int | None] | None = None) -> torch.Tensor:
    """A from-scratch float64 forward (qwen-family.md §1.3, §3.2): explicit rotary table, LogN scale multiplied onto
    the rotated queries, eager softmax attention with an explicit causal (and window) mask."""
    config = decoder.config
    weights = {name: p.detach().to(torch.float64) for name, p in decoder.state_dict().items()}
    n_h, n_kv, d = config.num_heads, config.num_kv_heads, config.head_dim
    length = tokens.shape[1]
    if inv_freq is None:
        base = config.rope_theta if base is None else base
        inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    positions = torch.arange(length, dtype=torch.float64)
    angles = positions[:, None] * inv_freq.to(torch.float64)[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos() * rope_factor, angles.sin() * rope_factor

    def rotate(x: torch.Tensor) -> torch.Tensor:
        return x * cos + torch.cat((-x[..., d // 2 :], x[..., : d // 2]), dim=-1) * sin

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)

    h = weights["model.embed_tokens.weight"][tokens[0]]
    query_pos, key_pos = positions[:, None], positions[None, :]
    for i in range(config.num_layers):
        w = {name[len(f"model.layers.{i}.") :]: t for name, t in weights.items() if name.startswith(f"model.layers.{i}.")}
        a = rms(h, w["input_layernorm.weight"])
        q, k, v = (a @ w["self_attn.qkv_proj.weight"].T + w["self_attn.qkv_proj.bias"]).split((n_h * d, n_kv * d, n_kv * d), -1)
        q = rotate(q.view(length, n_h, d).transpose(0, 1))
        k = rotate(k.view(length, n_kv, d).transpose(0, 1)).repeat_interleave(n_h // n_kv, 0)
        v = v.view(length, n_kv, d).transpose(0, 1).repeat_interleave(n_h // n_kv, 0)
        if logn_seq_length is not None:  # §1.5: ln(p+1)/ln(S) for p+1 > S, after RoPE
            count = positions + 1
            q = q * torch.where(count > logn_seq_length, count.log() / math.log(logn_seq_length), 1.0)[:, None]
        allowed = key_pos <= query_pos
        window = windows[i] if windows else None
        if window is not None:
            allowed = allowed & (key_pos > query_pos - window)  # §3.2: i − w < j ≤ i
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(length, n_h * d)
        h = h + out @ w["self_attn.o_proj.weight"].T
        gate, up = (rms(h, w["post_attention_layernorm.weight"]) @ w["mlp.gate_up_proj.weight"].T).chunk(2, -1)
        h = h + (F.silu(gate) * up) @ w["mlp.down_proj.weight"].T
    return rms(h, weights["model.norm.weight"]) @ weights["lm_head.weight"].T


def assert_matches(ours: torch.Tensor, reference: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(ours.to(torch.float64), reference, rtol=tol, atol=tol * reference.abs().max().item())


# ---------------------------------------------------------------------------------------------------------- YaRN


def test_yarn_numbers_for_qwen2_at_128k() -> None:
    """qwen-family.md §3.3: d = 128, θ = 1e6, s = 4, L0 = 32768 → low 23, high 40, m = 1.138629 (m² = 1.2965)."""
    scaling = RopeScaling(factor=4.0, original_max_position_embeddings=32768)
    config = ModelConfig(**{**SMALL, "head_dim": 128, "rope_theta": 1e6, "rope_scaling": scaling})
    assert yarn_correction_range(128, 1e6, scaling) == (23, 40)
    scaled, m = yarn_frequencies(config, scaling)
    ratio = (scaled / inverse_frequencies(config)).double()
    assert ratio.shape == (64,)
    torch.testing.assert_close(ratio[:24], torch.ones(24, dtype=torch.float64), rtol=1e-6, atol=0)  # dims 0…23 kept
    torch.testing.assert_close(ratio[40:], torch.full((24,), 0.25, dtype=torch.float64), rtol=1e-6, atol=0)  # ÷ s
    ramp = (torch.arange(24, 40, dtype=torch.float64) - 23) / (40 - 23)
    torch.testing.assert_close(ratio[24:40], (1 - ramp) + ramp / 4, rtol=1e-6, atol=0)  # blended in between
    assert m == pytest.approx(1.138629, abs=1e-6) and m**2 == pytest.approx(1.2965, abs=1e-4)
    assert yarn_frequencies(config, dataclasses.replace(scaling, attention_factor=1.5))[1] == 1.5


def test_static_yarn_rotates_with_the_scaled_frequencies_and_m() -> None:
    scaling = RopeScaling(factor=4.0, original_max_position_embeddings=16)
    decoder = make_decoder(rope_scaling=scaling)
    inv_freq, m = yarn_frequencies(decoder.config, scaling)
    tokens = ids(40)
    assert_matches(run(decoder, tokens), reference_logits(decoder, tokens, inv_freq=inv_freq, rope_factor=m))
    # Static: a short sequence uses the same frequencies.
    assert_matches(run(decoder, tokens[:, :10]), reference_logits(decoder, tokens[:, :10], inv_freq=inv_freq, rope_factor=m))
    torch.testing.assert_close(cached(decoder, tokens, [7, 9]), run(decoder, tokens), rtol=1e-5, atol=1e-5)


def test_only_long_yarn_applies_to_long_prefills_and_keeps_its_choice_while_decoding() -> None:
    scaling = RopeScaling(factor=4.0, original_max_position_embeddings=16, only_long=True)
    decoder = make_decoder(rope_scaling=scaling)
    static = twin(decoder, rope_scaling=dataclasses.replace(scaling, only_long=False))
    plain = twin(decoder, rope_scaling=None)
    tokens = ids(40)
    torch.testing.assert_close(run(decoder, tokens[:, :16]), run(plain, tokens[:, :16]), rtol=0, atol=0)
    torch.testing.assert_close(run(decoder, tokens[:, :17]), run(static, tokens[:, :17]), rtol=0, atol=0)
    torch.testing.assert_close(run(decoder, tokens), run(static, tokens), rtol=0, atol=0)
    assert not torch.allclose(run(plain, tokens), run(static, tokens))
    # A short prompt decoded past L0 stays on plain RoPE; a long one stays on YaRN.
    torch.testing.assert_close(cached(decoder, tokens, [12]), run(plain, tokens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached(decoder, tokens, [20]), run(static, tokens), rtol=1e-5, atol=1e-5)
    # After a long sequence, a new short one is back on plain RoPE (the tables are rebuilt).
    torch.testing.assert_close(cached(decoder, tokens, [12]), run(plain, tokens), rtol=1e-5, atol=1e-5)


def test_yarn_matches_transformers_past_the_original_context(tmp_path, tokenizer_files) -> None:
    """A tiny Qwen2 with rope_scaling yarn ×4 from L0 = 64. transformers 5.x takes s from `factor` and L0 from
    `original_max_position_embeddings` (s = max_position_embeddings / L0 only when factor is missing); with
    max_position_embeddings = s·L0 = 256 every version's reading agrees (qwen-family.md §3.3 caveats)."""
    from tiny import hf_config, random_model, write_hf_checkpoint

    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    config = hf_config("qwen2.5-0.5b", max_position_embeddings=256, rope_scaling=dict(rope))
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 4.0
    model = random_model(config)
    directory = write_hf_checkpoint(tmp_path / "yarn", model, tokenizer_files)
    # transformers ≥ 5 writes the block as `rope_parameters`; released Qwen configs spell it `rope_scaling`.
    raw = json.loads((directory / "config.json").read_text())
    raw["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    (directory / "config.json").write_text(json.dumps(raw))

    ours = qwen_engine.load(directory, dtype="float32", quant="none", device="cpu")
    assert ours.config.rope_scaling == RopeScaling(factor=4.0, original_max_position_embeddings=64)
    tokens = ids(200, vocab=151_000)
    with torch.inference_mode():
        reference = model(tokens).logits[0]
        plain = random_model(hf_config("qwen2.5-0.5b", max_position_embeddings=256))(tokens).logits[0]
    logits = ours.logits(tokens[0].tolist())
    scale = reference.abs().max()
    assert (logits - reference).abs().max() <= 1e-4 * scale
    assert (logits[64:] - reference[64:]).abs().max() <= 1e-4 * scale  # past L0 in particular
    assert (plain[64:] - reference[64:]).abs().max() > 1e-3 * scale  # and YaRN does change them (tiny model: a little)


# --------------------------------------------------------------------------------------------- dynamic NTK (v1)


def test_ntk_alpha_values() -> None:
    """qwen-family.md §1.4 examples."""
    assert [ntk_alpha(n, 8192) for n in (1, 8192, 8193, 16384, 16385, 32768, 32769, 65536)] == [1, 1, 3, 3, 7, 7, 15, 15]
    assert [ntk_alpha(n, 2048) for n in (2048, 2049, 4096, 4097, 8192, 8193, 16384)] == [1, 3, 3, 7, 7, 15, 15]
    assert ntk_base(10000.0, 3, 128) == pytest.approx(10000.0 * 3 ** (128 / 126))


def v1_decoder(**fields) -> QwenDecoder:
    return make_decoder(architecture="qwen", num_kv_heads=4, seq_length=16, **fields)


def test_dynamic_ntk_prefill_uses_the_enlarged_base() -> None:
    decoder = v1_decoder(use_dynamic_ntk=True)
    plain = twin(decoder, use_dynamic_ntk=False)
    tokens = ids(40)
    d, theta = decoder.config.head_dim, decoder.config.rope_theta
    # Up to S: plain RoPE, bit for bit.
    torch.testing.assert_close(run(decoder, tokens[:, :16]), run(plain, tokens[:, :16]), rtol=0, atol=0)
    for length, alpha in ((17, 3), (32, 3), (33, 7), (40, 7)):
        base = theta * alpha ** (d / (d - 2))
        logits = run(decoder, tokens[:, :length])
        assert decoder.rotary.choose(length) == (alpha, False)
        torch.testing.assert_close(decoder.rotary.frequencies(decoder.rotary.choose(length))[0],
                                   1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        # The same as a model whose θ is base' — and as the float64 reference with base'.
        torch.testing.assert_close(logits, run(twin(decoder, use_dynamic_ntk=False, rope_theta=base), tokens[:, :length]),
                                   rtol=1e-5, atol=1e-5)
        assert_matches(logits, reference_logits(decoder, tokens[:, :length], base=base))
        assert not torch.allclose(logits[16:], run(plain, tokens[:, :length])[16:], atol=1e-3)
    # A new short sequence is on α = 1 again: nothing of the long ones stays behind.
    torch.testing.assert_close(run(decoder, tokens[:, :10]), run(plain, tokens[:, :10]), rtol=0, atol=0)
    assert decoder.rotary.choose(10) == (1, False)


def test_dynamic_ntk_keeps_the_prefill_alpha_while_decoding() -> None:
    decoder = v1_decoder(use_dynamic_ntk=True)
    d, theta = decoder.config.head_dim, decoder.config.rope_theta
    tokens = ids(40)
    # Prefill 20 tokens (α = 3), then decode to 40, where a fresh prefill would pick α = 7.
    stepped = cached(decoder, tokens, [20])
    with_alpha3 = twin(decoder, use_dynamic_ntk=False, rope_theta=theta * 3 ** (d / (d - 2)))
    torch.testing.assert_close(stepped, run(with_alpha3, tokens), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(stepped[20:], run(decoder, tokens)[20:], atol=1e-3)  # α = 7 for the full forward
    # A short prefill (α = 1) decoded past S stays on plain RoPE.
    torch.testing.assert_close(cached(decoder, tokens, [10]), run(twin(decoder, use_dynamic_ntk=False), tokens),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ LogN (v1)


def test_logn_factors() -> None:
    """qwen-family.md §1.5: f(p+1) = ln(p+1)/ln(S) for p+1 > S, else 1."""
    factors = logn_factors(torch.tensor([0, 100, 8190, 8191, 8192, 16383, 32767]), 8192)
    expected = [1.0, 1.0, 1.0, 1.0, math.log(8193) / math.log(8192), math.log(16384) / math.log(8192),
                math.log(32768) / math.log(8192)]
    assert factors.tolist() == pytest.approx(expected, rel=1e-7)
    assert factors[5].item() == pytest.approx(14 / 13, rel=1e-7)


def test_logn_scales_queries_past_seq_length() -> None:
    decoder = v1_decoder(use_logn_attn=True)
    plain = twin(decoder, use_logn_attn=False)
    tokens = ids(40)
    logits = run(decoder, tokens)
    assert_matches(logits, reference_logits(decoder, tokens, logn_seq_length=16))
    # Positions ≤ S are unaffected (and causal attention keeps them so); later ones change.
    torch.testing.assert_close(logits[:16], run(plain, tokens)[:16], rtol=0, atol=0)
    assert not torch.allclose(logits[16:], run(plain, tokens)[16:], atol=1e-4)
    torch.testing.assert_close(cached(decoder, tokens, [5, 14]), logits, rtol=1e-5, atol=1e-5)


def test_ntk_and_logn_together_as_in_qwen_7b() -> None:
    decoder = v1_decoder(use_dynamic_ntk=True, use_logn_attn=True)
    d, theta = decoder.config.head_dim, decoder.config.rope_theta
    tokens = ids(40)
    logits = run(decoder, tokens)
    assert_matches(logits, reference_logits(decoder, tokens, base=theta * 7 ** (d / (d - 2)), logn_seq_length=16))


# -------------------------------------------------------------------------------------------------- sliding window


def windowed_decoder(**fields) -> QwenDecoder:
    return make_decoder(num_layers=3, sliding_window=4, max_window_layers=1, **fields)


def test_sliding_window_full_forward_matches_the_reference() -> None:
    decoder = windowed_decoder()
    assert [layer.self_attn.window for layer in decoder.model.layers] == [None, 4, 4]
    tokens = ids(24)
    logits = run(decoder, tokens)
    assert_matches(logits, reference_logits(decoder, tokens, windows=[None, 4, 4]))
    full = twin(decoder, sliding_window=None)
    assert not torch.allclose(logits[4:], run(full, tokens)[4:], atol=1e-3)
    torch.testing.assert_close(logits[:4], run(full, tokens)[:4], rtol=1e-5, atol=1e-5)  # windows not yet full
    # A window as long as the sequence is no window at all.
    torch.testing.assert_close(run(twin(decoder, sliding_window=24), tokens), run(full, tokens), rtol=1e-5, atol=1e-5)


def test_layers_below_max_window_layers_attend_to_everything() -> None:
    decoder = windowed_decoder()
    full = twin(decoder, sliding_window=None)
    tokens = ids(24)
    outputs = {}
    for name, model in (("windowed", decoder), ("full", full)):
        # A layer returns (its MLP output, the residual stream before it): the layer's output is their sum.
        hooks = [layer.register_forward_hook(lambda m, a, out, i=i, n=name: outputs.__setitem__((n, i), out[0] + out[1]))
                 for i, layer in enumerate(model.model.layers)]
        run(model, tokens)
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(outputs["windowed", 0], outputs["full", 0], rtol=0, atol=0)
    assert not torch.allclose(outputs["windowed", 1], outputs["full", 1], atol=1e-3)
    no_windowed_layer = twin(decoder, max_window_layers=3)
    torch.testing.assert_close(run(no_windowed_layer, tokens), run(full, tokens), rtol=0, atol=0)


@pytest.mark.parametrize("chunks", [[1], [3], [6, 5, 2], [10, 9]])
def test_sliding_window_through_the_cache(chunks) -> None:
    """Chunked prefill (chunks longer and shorter than the window) and decode steps equal the full forward."""
    decoder = windowed_decoder()
    tokens = ids(24)
    torch.testing.assert_close(cached(decoder, tokens, chunks), run(decoder, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_sliding_window_matches_transformers(tmp_path, tokenizer_files, attention) -> None:
    """transformers' Qwen2 (use_sliding_window=True) windows layers ≥ max_window_layers with kv > q − w."""
    from tiny import hf_config, random_model, write_hf_checkpoint

    config = hf_config("qwq", use_sliding_window=True, sliding_window=4, max_window_layers=1, max_position_embeddings=64)
    assert config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    model = random_model(config)
    model.set_attn_implementation(attention)
    ours = qwen_engine.load(write_hf_checkpoint(tmp_path / "swa", model, tokenizer_files), dtype="float32",
                            quant="none", device="cpu")
    assert ours.config.sliding_window == 4 and ours.config.max_window_layers == 1
    tokens = ids(24, vocab=151_000)
    with torch.inference_mode():
        reference = model(tokens).logits[0]
    scale = reference.abs().max()
    assert (ours.logits(tokens[0].tolist()) - reference).abs().max() <= 1e-4 * scale
    stepped = cached(ours.decoder, tokens, [7])
    assert (stepped - reference).abs().max() <= 1e-4 * scale
    # The window does act in transformers too: without it the logits move far more than the tolerance.
    unwindowed = run(twin(ours.decoder, sliding_window=None), tokens)
    assert (unwindowed - reference).abs().max() > 1e-2 * scale
