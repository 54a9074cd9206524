"""Qwen (v1) checkpoints: HF safetensors with v1 names and config keys, and GGUF arch `qwen`, run on the same
decoder as Qwen2 and give the logits of their conversion to the Qwen2 layout (qwen-family.md §1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import hf_config, hf_config_dict, random_model, to_v1_state, v1_config, write_gguf, write_hf_checkpoint, write_qwen_tiktoken

import qwen_engine
from qwen_engine import cli
from qwen_engine.checkpoint import open_checkpoint

IDS = [9707, 1879, 11, 419, 374, 264, 1273, 315, 279, 6233, 13, 1084, 5711, 1661, 2038, 30, 220, 16, 17, 18]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer_files):
    """A tiny MHA Qwen2 model (the v1 shape family: qwen-family.md §2 note) written by transformers."""
    config = hf_config("qwen1.5", max_position_embeddings=128)
    model = random_model(config, seed=7)
    directory = write_hf_checkpoint(tmp_path_factory.mktemp("qwen2"), model, tokenizer_files)
    return config, model, directory


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory, reference, gguf_arrays) -> Path:
    config, model, _ = reference
    directory = tmp_path_factory.mktemp("qwen-v1")
    save_file(to_v1_state(model.state_dict()), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(v1_config(config)), encoding="utf-8")
    write_qwen_tiktoken(directory / "qwen.tiktoken", gguf_arrays[0])
    (directory / "generation_config.json").write_text(json.dumps(
        {"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 6144,
         "do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1}), encoding="utf-8")
    return directory


def test_v1_config_is_read_as_the_qwen2_shape(v1_dir, reference) -> None:
    config = open_checkpoint(v1_dir).config
    hf = reference[0]
    assert config.architecture == "qwen"
    assert config.intermediate_size == hf.intermediate_size  # config.json holds twice the real width
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (hf.num_attention_heads,) * 2 + (hf.hidden_size // hf.num_attention_heads,)
    assert config.qkv_bias and not config.tie_word_embeddings
    assert config.seq_length == 64 and not config.use_dynamic_ntk


def test_v1_safetensors_equal_their_qwen2_conversion(v1_dir, reference) -> None:
    _, model, qwen2_dir = reference
    v1 = qwen_engine.load(v1_dir, dtype="float32", quant="none")
    qwen2 = qwen_engine.load(qwen2_dir, dtype="float32", quant="none")
    torch.testing.assert_close(v1.logits(IDS), qwen2.logits(IDS), rtol=0, atol=0)
    with torch.inference_mode():
        theirs = model(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(v1.logits(IDS), theirs, rtol=1e-4, atol=1e-4)


def test_v1_gguf_equals_the_qwen2_gguf(tmp_path, reference, gguf_arrays) -> None:
    config, model, _ = reference
    tokens, types, merges = gguf_arrays
    tokenizer = {"tokens": tokens, "token_types": types, "merges": merges}
    raw = hf_config_dict(config)
    state = {k: v for k, v in model.state_dict().items()}
    v1 = write_gguf(tmp_path / "v1.gguf", state, raw, tokenizer, arch="qwen")
    qwen2 = write_gguf(tmp_path / "qwen2.gguf", state, raw, tokenizer)
    a = qwen_engine.load(v1, dtype="float32", quant="none")
    b = qwen_engine.load(qwen2, dtype="float32", quant="none")
    assert a.config.architecture == "qwen" and a.config.intermediate_size == config.intermediate_size
    torch.testing.assert_close(a.logits(IDS), b.logits(IDS), rtol=0, atol=0)


def test_v1_generation_defaults_and_stop_words(v1_dir) -> None:
    model = qwen_engine.load(v1_dir, dtype="float32", quant="none")
    assert (model.defaults.top_k, model.defaults.top_p, model.defaults.repetition_penalty) == (0, 0.8, 1.1)
    # qwen-family.md §1.7: <|endoftext|> ends generation; chat stops at <|im_end|> and <|im_start|>.
    assert {151643, 151644, 151645} <= model.stop_token_ids


def test_info_on_a_v1_directory(capsys, v1_dir) -> None:
    assert cli.main(["info", "--json", "--model", str(v1_dir)]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["architecture"] == "qwen" and facts["chat_template"] is False
    assert facts["context_length"] == 128


def test_chat_once_on_a_v1_directory(capsys, v1_dir) -> None:
    code = cli.main(["chat", "--model", str(v1_dir), "--dtype", "float32", "--once", "Hello", "-n", "4", "-t", "0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.endswith("\n")
