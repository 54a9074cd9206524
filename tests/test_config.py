"""ModelConfig from real-looking HF config.json dicts (qwen-family.md §2, §4, §5) and GGUF metadata (§9.3): shapes,
exact parameter counts, tolerance of unknown keys, and one-line validation errors."""

from __future__ import annotations

import dataclasses

import pytest

from qwen_engine.config import ModelConfig
from qwen_engine.errors import QwenError

# config.json of the released checkpoints, keys as published (fields the engine does not use included on purpose).
QWEN15_05B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 2816,
    "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 16,
    "num_hidden_layers": 24, "num_key_value_heads": 16, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.37.0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
QWEN25_05B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.43.1",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
QWEN25_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.43.1",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}
QWQ_32B_PREVIEW = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 27648,
    "max_position_embeddings": 32768, "max_window_layers": 64, "model_type": "qwen2", "num_attention_heads": 40,
    "num_hidden_layers": 64, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}

# name: (config, heads, kv heads, head_dim, tied, eps, vocab, total params (B), non-embedding params (B)) —
# totals: §2 "Computed parameter counts", §4 table "computed", §5 (QwQ = Qwen2.5-32B shape).
CASES = {
    "Qwen1.5-0.5B": (QWEN15_05B, 16, 16, 64, True, 1e-6, 151936, 0.464, 0.308),
    "Qwen2.5-0.5B-Instruct": (QWEN25_05B_INSTRUCT, 14, 2, 64, True, 1e-6, 151936, 0.494, 0.358),
    "Qwen2.5-7B-Instruct": (QWEN25_7B_INSTRUCT, 28, 4, 128, False, 1e-6, 152064, 7.616, 6.526),
    "QwQ-32B-Preview": (QWQ_32B_PREVIEW, 40, 8, 128, False, 1e-5, 152064, 32.764, 31.207),
}


def _sig3(value: float) -> str:
    return f"{value:.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_from_hf_real_configs(name):
    raw, heads, kv_heads, head_dim, tied, eps, vocab, total_b, non_embedding_b = CASES[name]
    config = ModelConfig.from_hf(raw)
    assert config.architecture == "qwen2"
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (heads, kv_heads, head_dim)
    assert config.head_dim * config.num_heads == config.hidden_size
    assert config.tie_word_embeddings is tied
    assert config.rms_norm_eps == eps
    assert config.vocab_size == vocab
    assert (config.hidden_size, config.intermediate_size, config.num_layers) == (
        raw["hidden_size"], raw["intermediate_size"], raw["num_hidden_layers"])
    assert config.rope_theta == 1e6 and config.max_position_embeddings == config.context_length == 32768
    assert config.qkv_bias
    assert config.bos_token_id == 151643 and config.eos_token_ids == (raw["eos_token_id"],)

    total = config.parameter_count()
    assert _sig3(total / 1e9) == _sig3(total_b)
    assert abs(total / 1e9 - total_b) < 0.0005  # the reference prints the computed count to 3 decimals
    embeddings = config.vocab_size * config.hidden_size * (1 if tied else 2)
    assert abs((total - embeddings) / 1e9 - non_embedding_b) < 0.0005


def test_parameter_count_by_hand():
    """Qwen2.5-0.5B: per layer H·n_h·d + n_h·d + 2(H·n_kv·d + n_kv·d) + n_h·d·H + 3·H·F + 2H (§4 'Computation')."""
    h, q, kv, f, layers, vocab = 896, 14 * 64, 2 * 64, 4864, 24, 151936
    per_layer = h * q + q + 2 * (h * kv + kv) + q * h + 3 * h * f + 2 * h
    assert ModelConfig.from_hf(QWEN25_05B_INSTRUCT).parameter_count() == layers * per_layer + h + vocab * h == 494_032_768
    untied = dataclasses.replace(ModelConfig.from_hf(QWEN25_05B_INSTRUCT), tie_word_embeddings=False)
    assert untied.parameter_count() == 494_032_768 + vocab * h


def test_unknown_keys_are_tolerated():
    raw = dict(QWEN25_7B_INSTRUCT, quantization_config={"bits": 4, "quant_method": "awq"}, use_mrope=False,
               some_future_key=[1, 2, 3], rope_scaling=None, layer_types=["full_attention"] * 28)
    assert ModelConfig.from_hf(raw) == ModelConfig.from_hf(QWEN25_7B_INSTRUCT)


def test_optional_keys_take_defaults():
    raw = {k: v for k, v in QWEN15_05B.items() if k not in ("num_key_value_heads", "rms_norm_eps", "tie_word_embeddings")}
    config = ModelConfig.from_hf(raw)
    assert config.num_kv_heads == config.num_heads == 16  # MHA when n_kv is absent
    assert config.head_dim == 1024 // 16
    assert config.rms_norm_eps == 1e-6 and config.tie_word_embeddings is False


def test_explicit_head_dim_and_eos_list():
    config = ModelConfig.from_hf(dict(QWEN25_05B_INSTRUCT, head_dim=64, eos_token_id=[151645, 151643]))
    assert config.head_dim == 64 and config.eos_token_ids == (151645, 151643)


def test_transformers5_rope_parameters():
    """transformers ≥ 5 writes θ inside `rope_parameters` instead of the top-level `rope_theta`."""
    raw = {k: v for k, v in QWEN15_05B.items() if k != "rope_theta"}
    raw["rope_parameters"] = {"rope_theta": 5000000.0, "rope_type": "default"}
    assert ModelConfig.from_hf(raw).rope_theta == 5e6
    del raw["rope_parameters"]
    assert ModelConfig.from_hf(raw).rope_theta == 10000.0  # transformers' default when absent


# ---------------------------------------------------------------------------------------------------------- GGUF

# Metadata of Ollama's qwen2:0.5b-instruct-q4_0 (qwen-family.md §9.3), plus the tokenizer keys.
GGUF_QWEN2_05B = {
    "general.architecture": "qwen2", "general.file_type": 2, "general.quantization_version": 2,
    "qwen2.attention.head_count": 14, "qwen2.attention.head_count_kv": 2, "qwen2.attention.layer_norm_rms_epsilon": 1e-6,
    "qwen2.block_count": 24, "qwen2.context_length": 32768, "qwen2.embedding_length": 896,
    "qwen2.feed_forward_length": 4864, "qwen2.rope.freq_base": 1000000.0,
    "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.bos_token_id": 151643,
    "tokenizer.ggml.eos_token_id": 151645, "tokenizer.ggml.padding_token_id": 151643,
    "tokenizer.ggml.tokens": [f"t{i}" for i in range(151936)],
}


def test_from_gguf_metadata():
    config = ModelConfig.from_gguf(GGUF_QWEN2_05B)
    assert (config.hidden_size, config.intermediate_size, config.num_layers) == (896, 4864, 24)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (14, 2, 64)
    assert config.vocab_size == 151936  # from the token list when qwen2.vocab_size is absent
    assert (config.rope_theta, config.rms_norm_eps, config.context_length) == (1e6, 1e-6, 32768)
    assert config.bos_token_id == 151643 and config.eos_token_ids == (151645,)
    assert config.tie_word_embeddings is False  # decided by the loader from output.weight
    # The same shape as the HF config of Qwen2.5-0.5B (tying aside).
    hf = ModelConfig.from_hf(QWEN25_05B_INSTRUCT)
    assert config.parameter_count() == dataclasses.replace(hf, tie_word_embeddings=False).parameter_count()


def test_from_gguf_explicit_vocab_and_key_length():
    meta = dict(GGUF_QWEN2_05B, **{"qwen2.vocab_size": 152064, "qwen2.attention.key_length": 64})
    del meta["tokenizer.ggml.tokens"]
    config = ModelConfig.from_gguf(meta)
    assert config.vocab_size == 152064 and config.head_dim == 64


def test_from_gguf_optional_keys_take_defaults():
    meta = {k: v for k, v in GGUF_QWEN2_05B.items()
            if k not in ("qwen2.attention.head_count_kv", "qwen2.rope.freq_base", "qwen2.attention.layer_norm_rms_epsilon")}
    config = ModelConfig.from_gguf(meta)
    assert config.num_kv_heads == 14 and config.rope_theta == 10000.0 and config.rms_norm_eps == 1e-6


def test_from_gguf_errors():
    with pytest.raises(QwenError, match=r"unsupported GGUF architecture 'llama'"):
        ModelConfig.from_gguf(dict(GGUF_QWEN2_05B, **{"general.architecture": "llama"}))
    meta = {k: v for k, v in GGUF_QWEN2_05B.items() if k != "qwen2.block_count"}
    with pytest.raises(QwenError, match=r"GGUF metadata lacks qwen2\.block_count"):
        ModelConfig.from_gguf(meta)
    no_vocab = {k: v for k, v in GGUF_QWEN2_05B.items() if k != "tokenizer.ggml.tokens"}
    with pytest.raises(QwenError, match=r"vocab_size=0 \(sizes must be positive integers\)"):
        ModelConfig.from_gguf(no_vocab)
    with pytest.raises(QwenError, match=r"num_heads=0"):
        ModelConfig.from_gguf(dict(GGUF_QWEN2_05B, **{"qwen2.attention.head_count": 0}))


# ---------------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("changes", "message"), [
    ({"model_type": "llama"}, r"unsupported model_type 'llama' in config\.json"),
    ({"model_type": "qwen2_vl"}, r"unsupported model_type 'qwen2_vl' in config\.json"),
    ({"model_type": "qwen2_moe"}, r"config\.json lacks the required key 'num_experts'"),
    ({"num_attention_heads": 5, "num_key_value_heads": 2, "hidden_size": 640},
     r"num_attention_heads=5 is not a multiple of num_key_value_heads=2"),
    ({"hidden_size": 0}, r"invalid model config: hidden_size=0, head_dim=0 \(sizes must be positive integers\)"),
    ({"intermediate_size": -1}, r"invalid model config: intermediate_size=-1 \(sizes must be positive integers\)"),
    ({"num_hidden_layers": 0}, r"invalid model config: num_layers=0 "),
    ({"num_attention_heads": 0}, r"invalid model config: num_heads=0, head_dim=0 "),
    ({"num_key_value_heads": 0}, r"invalid model config: num_kv_heads=0 "),
    ({"num_key_value_heads": -2}, r"invalid model config: num_kv_heads=-2 "),
    ({"head_dim": 0}, r"invalid model config: head_dim=0 "),
    ({"vocab_size": -151936}, r"invalid model config: vocab_size=-151936 "),
    ({"head_dim": 63}, r"head_dim=63 must be even for rotary embeddings"),
    ({"rope_theta": 0}, r"rope_theta=0\.0, rms_norm_eps=1e-06, max_position_embeddings=32768 must all be positive"),
    ({"rms_norm_eps": -1e-6}, r"rms_norm_eps=-1e-06, .* must all be positive"),
    ({"max_position_embeddings": 0}, r"max_position_embeddings=0 must all be positive"),
    ({"hidden_size": "big"}, r"config\.json has a value of the wrong type"),
    ({"num_hidden_layers": None}, r"config\.json has a value of the wrong type"),
])
def test_validation_errors(changes, message):
    with pytest.raises(QwenError, match=message) as caught:
        ModelConfig.from_hf(dict(QWEN25_05B_INSTRUCT, **changes))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "vocab_size", "intermediate_size", "num_hidden_layers"])
def test_missing_required_key(key):
    raw = {k: v for k, v in QWEN25_05B_INSTRUCT.items() if k != key}
    with pytest.raises(QwenError, match=rf"config\.json lacks the required key '{key}'; the checkpoint is incomplete"):
        ModelConfig.from_hf(raw)


def test_missing_model_type_is_unsupported():
    raw = {k: v for k, v in QWEN25_05B_INSTRUCT.items() if k != "model_type"}
    with pytest.raises(QwenError, match=r"unsupported model_type '' in config\.json"):
        ModelConfig.from_hf(raw)


def test_direct_construction_validates():
    base = ModelConfig.from_hf(QWEN25_05B_INSTRUCT)
    with pytest.raises(QwenError, match=r"unsupported architecture 'llama'"):
        dataclasses.replace(base, architecture="llama")
    with pytest.raises(QwenError, match=r"num_attention_heads=14 is not a multiple of num_key_value_heads=4"):
        dataclasses.replace(base, num_kv_heads=4)
    with pytest.raises(QwenError, match=r"num_layers=0"):
        dataclasses.replace(base, num_layers=0)
