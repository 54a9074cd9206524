"""HF safetensors checkpoints: tiny random models written by transformers load into the engine with the same logits,
greedy continuations, tied heads, low-precision storage, generation defaults and one-line errors for damaged files."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

import qwen_engine
from qwen_engine.checkpoint import open_checkpoint
from qwen_engine.errors import QwenError
from qwen_engine.tokenizer import Tokenizer
from tiny import SHAPES, hf_config, random_model, write_hf_checkpoint

SHARDED = "qwq"  # the shape saved as several shards with an index
REL_TOL = 1e-4  # float32 vs float32: max |Δ| ≤ REL_TOL · max |logit|

PROMPTS = [
    "Hello",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    # About 100 tokens: mixed prose, numbers, code and non-ASCII text.
    "The Qwen model family spans Qwen1.5, Qwen2, Qwen2.5 and QwQ. Each generation uses the same decoder: RMSNorm, "
    "rotary position embeddings with θ = 1,000,000, grouped-query attention with biases on q/k/v, and a SwiGLU MLP. "
    "Tokens per second matter on CPUs — 模型在 CPU 上也能运行. Numbers like 3.14159, 2718 and 1e-6 appear in configs; "
    "for i in range(10): print(i * i)",
]


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_files):
    """shape → (directory, transformers model) for the three tiny shapes; `SHARDED` is written in shards."""
    root = tmp_path_factory.mktemp("safetensors")
    made = {}
    for seed, shape in enumerate(SHAPES):
        model = random_model(hf_config(shape), seed=seed)
        made[shape] = (write_hf_checkpoint(root / shape, model, tokenizer_files, shard=shape == SHARDED), model)
    return made


@pytest.fixture(scope="module")
def engine_models(checkpoints):
    """shape → the engine's float32 model, each loaded once."""
    return {shape: qwen_engine.load(directory, dtype="float32", device="cpu") for shape, (directory, _) in checkpoints.items()}


@pytest.fixture(scope="module")
def prompt_ids(tokenizer_files):
    tokenizer = Tokenizer.from_hf_dir(tokenizer_files)
    ids = [tokenizer.encode(text) for text in PROMPTS]
    assert 90 <= len(ids[-1]) <= 130, len(ids[-1])
    return ids


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer_files):
    """A small valid single-file checkpoint (qwen1.5 layout: MHA, H 32, 4 heads of 8, 2 layers, F 64, untied) that
    error cases copy and damage."""
    config = hf_config("qwen1.5", hidden_size=32, intermediate_size=64)
    return write_hf_checkpoint(tmp_path_factory.mktemp("base") / "qwen1.5-small", random_model(config), tokenizer_files)


def _copy(source: Path, tmp_path: Path) -> Path:
    """A copy of a checkpoint directory whose weight files are symlinks (damage them with `_rewrite`)."""
    target = tmp_path / "ckpt"
    target.mkdir()
    for file in source.iterdir():
        if file.suffix == ".safetensors":
            (target / file.name).symlink_to(file)
        else:
            shutil.copyfile(file, target / file.name)
    return target


def _rewrite(path: Path, data: bytes) -> None:
    path.unlink()  # never write through the symlink into the shared checkpoint
    path.write_bytes(data)


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def _edit_tensors(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    _rewrite(path, save(tensors, metadata={"format": "pt"}))


# ---------------------------------------------------------------------------------------------------------- layout


def test_sharded_checkpoint_has_index_and_shards(checkpoints):
    directory, _ = checkpoints[SHARDED]
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert all((directory / name).is_file() for name in shards)
    assert sorted(p.name for p in directory.glob("*.safetensors")) == shards
    assert not (directory / "model.safetensors").exists()
    for shape in SHAPES:
        if shape != SHARDED:
            assert (checkpoints[shape][0] / "model.safetensors").is_file()
            assert not (checkpoints[shape][0] / "model.safetensors.index.json").exists()


def test_tied_checkpoint_stores_no_head_and_shares_embedding(checkpoints, engine_models):
    directory, ref = checkpoints["qwen2.5-0.5b"]
    assert ref.config.tie_word_embeddings
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    decoder = engine_models["qwen2.5-0.5b"].decoder
    assert decoder.config.tie_word_embeddings
    assert decoder.lm_head.weight is decoder.model.embed_tokens.weight
    assert decoder.lm_head.weight.data_ptr() == decoder.model.embed_tokens.weight.data_ptr()
    # Untied checkpoints keep their own head.
    for shape in ("qwen1.5", "qwq"):
        untied = engine_models[shape].decoder
        assert not untied.config.tie_word_embeddings
        assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
        assert torch.equal(untied.lm_head.weight, checkpoints[shape][1].lm_head.weight)


# ---------------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_match_transformers(shape, checkpoints, engine_models, prompt_ids):
    _, ref = checkpoints[shape]
    model = engine_models[shape]
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.config.rms_norm_eps == SHAPES[shape]["rms_norm_eps"]
    assert model.config.rope_theta == 1e6
    for ids in prompt_ids:
        got = model.logits(ids)
        with torch.inference_mode():
            want = ref(torch.tensor([ids])).logits[0].to(torch.float32)
        assert got.shape == want.shape == (len(ids), 151936)
        assert _rel_err(got, want) <= REL_TOL, f"{shape}, {len(ids)} tokens: relative error {_rel_err(got, want):.2e}"
        assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_generation_matches_transformers(shape, checkpoints, engine_models, prompt_ids):
    _, ref = checkpoints[shape]
    model = engine_models[shape]
    ids = prompt_ids[1]
    result = model.generate(ids, max_tokens=16, temperature=0.0, repetition_penalty=1.0)
    with torch.inference_mode():
        out = ref.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=16,
            do_sample=False, eos_token_id=sorted(model.stop_token_ids), pad_token_id=151643,
        )
    want = out[0, len(ids):].tolist()
    assert result.token_ids == want
    assert len(want) == 16 or want[-1] in model.stop_token_ids


# ---------------------------------------------------------------------------------------------------------- bf16 / fp16


# Stored-dtype checkpoints (`model.to(dtype).save_pretrained`). Loaded in float32 they hold exactly the rounded weights,
# so they must match transformers' float32 run of the same rounded weights, upcast, to float32 precision (REL_TOL; in
# practice bit-identical). Loaded in their own dtype, activations are rounded too: they are compared with that float32
# reference and with transformers' own run in the stored dtype, within 2e-2 (bf16, 8-bit mantissa) and 3e-3 (fp16,
# 11-bit mantissa) of max |logit| — about 3–4× the errors observed (≈6e-3 and ≈8e-4). Argmax is not required to agree
# there: random tiny models have near-ties that bf16 rounding flips.
# (The reference gets the rounded weights copied in rather than `.to(float32)`: `.to(dtype)` also rounds transformers'
# rotary inv_freq buffer, which would make the reference, not the engine, inexact.)
LOW_PRECISION = {"bfloat16": (torch.bfloat16, "BF16", 2e-2), "float16": (torch.float16, "F16", 3e-3)}


@pytest.mark.parametrize("dtype_name", list(LOW_PRECISION))
def test_low_precision_checkpoint(dtype_name, tmp_path, tokenizer_files, prompt_ids):
    dtype, stored, native_tol = LOW_PRECISION[dtype_name]
    ref = random_model(hf_config("qwen2.5-0.5b"), seed=7)
    low = copy.deepcopy(ref).to(dtype)
    directory = write_hf_checkpoint(tmp_path / dtype_name, low, tokenizer_files)
    with torch.no_grad():  # the reference: float32 model holding the rounded weights
        for ref_param, low_param in zip(ref.parameters(), low.parameters(), strict=True):
            ref_param.copy_(low_param)
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {stored}
        assert open_checkpoint(directory).info().tensor_types == {stored: len(list(f.keys()))}

    upcast = qwen_engine.load(directory, dtype="float32", device="cpu")
    native = qwen_engine.load(directory, dtype=dtype_name, device="cpu")
    assert upcast.dtype == torch.float32 and native.dtype == dtype
    for ids in (prompt_ids[0], prompt_ids[-1]):
        with torch.inference_mode():
            want = ref(torch.tensor([ids])).logits[0]
            want_native = low(torch.tensor([ids])).logits[0].to(torch.float32)
        got = upcast.logits(ids)
        assert _rel_err(got, want) <= REL_TOL
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        got_native = native.logits(ids)
        assert got_native.dtype == torch.float32
        assert _rel_err(got_native, want) <= native_tol, f"{dtype_name} vs float32: {_rel_err(got_native, want):.2e}"
        assert _rel_err(got_native, want_native) <= native_tol, f"{dtype_name} vs transformers {dtype_name}: {_rel_err(got_native, want_native):.2e}"


# ---------------------------------------------------------------------------------------------------------- info


@pytest.mark.parametrize("shape", list(SHAPES))
def test_info_reports_config_tensor_types_and_template(shape, checkpoints):
    directory, ref = checkpoints[shape]
    info = open_checkpoint(directory).info()
    config = info.config
    raw = SHAPES[shape]
    assert info.format == "hf" and info.source == str(directory)
    assert (config.hidden_size, config.intermediate_size, config.num_layers) == (
        raw["hidden_size"], raw["intermediate_size"], raw["num_hidden_layers"])
    assert (config.num_heads, config.num_kv_heads) == (raw["num_attention_heads"], raw["num_key_value_heads"])
    assert config.head_dim == raw.get("head_dim", raw["hidden_size"] // raw["num_attention_heads"])
    assert config.tie_word_embeddings == raw["tie_word_embeddings"]
    assert config.rms_norm_eps == raw["rms_norm_eps"]
    assert config.vocab_size == 151936 and config.rope_theta == 1e6 and config.max_position_embeddings == 256
    assert config.parameter_count() == sum(p.numel() for p in ref.parameters())  # parameters() yields tied ones once
    stored = len(ref.state_dict()) - (1 if raw["tie_word_embeddings"] else 0)
    assert info.tensor_types == {"F32": stored}
    assert info.has_chat_template


def test_info_without_chat_template(base_dir, tmp_path):
    directory = _copy(base_dir, tmp_path)
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    del tokenizer_config["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    assert not open_checkpoint(directory).info().has_chat_template


# ---------------------------------------------------------------------------------------------------------- generation_config


def test_generation_config_sets_sampling_defaults_and_stop_ids(base_dir, tmp_path):
    directory = _copy(base_dir, tmp_path)
    generation = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                  "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    (directory / "generation_config.json").write_text(json.dumps(generation))
    model = qwen_engine.load(directory, dtype="float32", device="cpu")
    defaults = model.defaults
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    assert model.config.eos_token_ids == (151645, 151643)
    assert model.stop_token_ids == {151645, 151643, 151644}  # plus <|im_start|>, a turn boundary in every Qwen chat format
    # Explicit arguments still override the checkpoint's defaults.
    assert model.generate("Hi", max_tokens=2, temperature=0.0).completion_tokens <= 2


def test_generation_config_without_repetition_penalty_has_none(base_dir, tmp_path):
    """Keys the file leaves out take transformers' defaults (repetition_penalty 1.0), not Qwen2.5-Instruct's 1.05."""
    directory = _copy(base_dir, tmp_path)
    (directory / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_p": 0.3, "top_k": 0}))
    defaults = open_checkpoint(directory).sampling_defaults()
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.repetition_penalty) == (1.0, 0.3, 0, 1.0)


def test_directory_without_generation_config_gets_qwen25s_defaults(base_dir, tmp_path):
    directory = _copy(base_dir, tmp_path)
    (directory / "generation_config.json").unlink()
    defaults = open_checkpoint(directory).sampling_defaults()
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.repetition_penalty) == (0.7, 0.8, 20, 1.05)


def test_generation_config_without_sampling_means_greedy(checkpoints, engine_models):
    directory, _ = checkpoints["qwen1.5"]
    generation = json.loads((directory / "generation_config.json").read_text())
    assert not generation.get("do_sample", False)
    assert engine_models["qwen1.5"].defaults.temperature == 0.0


# ---------------------------------------------------------------------------------------------------------- errors


def _load_fails(directory: Path, pattern: str) -> str:
    """Loading raises a one-line QwenError matching `pattern`; returns the message."""
    with pytest.raises(QwenError, match=pattern) as caught:
        qwen_engine.load(directory, dtype="float32", device="cpu")
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_tensor(base_dir, tmp_path):
    directory = _copy(base_dir, tmp_path)
    _edit_tensors(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _load_fails(directory, r"does not match the model config — missing: model\.layers\.1\.mlp\.up_proj\.weight$")


def test_unexpected_tensor(base_dir, tmp_path):
    directory = _copy(base_dir, tmp_path)
    _edit_tensors(directory, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    _load_fails(directory, r"unexpected: model\.layers\.0\.self_attn\.rotary_emb\.inv_freq$")


def test_wrongly_shaped_tensor(base_dir, tmp_path):
    directory = _copy(base_dir, tmp_path)
    _edit_tensors(directory, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 48)}))
    message = "wrong shape: model.layers.0.self_attn.k_proj.weight (32, 48) (expected (32, 32))"
    _load_fails(directory, re.escape(message))


def test_shard_named_in_index_is_absent(checkpoints, tmp_path):
    directory = _copy(checkpoints[SHARDED][0], tmp_path)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (directory / gone).unlink()
    _load_fails(directory, rf"lacks the shard\(s\) {re.escape(gone)} named in model\.safetensors\.index\.json")


def test_truncated_safetensors(base_dir, tmp_path):
    directory = _copy(base_dir, tmp_path)
    path = directory / "model.safetensors"
    data = path.read_bytes()
    _rewrite(path, data[: len(data) // 2])
    _load_fails(directory, r"cannot read .*model\.safetensors .*truncated or corrupt")


def test_corrupt_safetensors_header(base_dir, tmp_path):
    directory = _copy(base_dir, tmp_path)
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header is now garbage
    _rewrite(path, bytes(data))
    _load_fails(directory, r"cannot read .*model\.safetensors .*truncated or corrupt")


def test_info_on_corrupt_safetensors_is_a_qwen_error(base_dir, tmp_path):
    directory = _copy(base_dir, tmp_path)
    path = directory / "model.safetensors"
    _rewrite(path, path.read_bytes()[:100])
    with pytest.raises(QwenError, match="truncated or corrupt"):
        open_checkpoint(directory).info()


def test_no_weights_at_all(base_dir, tmp_path):
    directory = _copy(base_dir, tmp_path)
    (directory / "model.safetensors").unlink()
    _load_fails(directory, r"holds no weights \(model.safetensors, pytorch_model.bin or a shard index of either\)")


def test_directory_without_config(base_dir, tmp_path):
    directory = _copy(base_dir, tmp_path)
    (directory / "config.json").unlink()
    _load_fails(directory, "is a directory without config.json")


def test_llama_model_type_is_unsupported(base_dir, tmp_path):
    directory = _copy(base_dir, tmp_path)
    _edit_config(directory, model_type="llama", architectures=["LlamaForCausalLM"])
    _load_fails(directory, r"unsupported model_type 'llama' in config\.json")


def test_heads_not_dividing(base_dir, tmp_path):
    directory = _copy(base_dir, tmp_path)
    _edit_config(directory, num_attention_heads=5, num_key_value_heads=2)
    _load_fails(directory, "num_attention_heads=5 is not a multiple of num_key_value_heads=2")


@pytest.mark.parametrize(("key", "value", "shown"), [
    ("num_hidden_layers", 0, "num_layers=0"),
    ("intermediate_size", -64, "intermediate_size=-64"),
    ("vocab_size", 0, "vocab_size=0"),
    ("num_attention_heads", 0, "num_heads=0, head_dim=0"),
    ("num_key_value_heads", 0, "num_kv_heads=0"),
])
def test_non_positive_sizes(base_dir, tmp_path, key, value, shown):
    directory = _copy(base_dir, tmp_path)
    _edit_config(directory, **{key: value})
    _load_fails(directory, rf"invalid model config: {shown} \(sizes must be positive integers\)")


def test_error_messages_are_one_line(base_dir, tmp_path):
    directory = _copy(base_dir, tmp_path)
    _edit_tensors(directory, lambda t: [t.pop(name) for name in list(t) if name.startswith("model.layers.1.")])
    message = _load_fails(directory, "missing: ")
    assert "missing: model.layers.1." in message and "(12 in all)" in message
