"""The engine's GGUF header parser against gguf-py's reader, and the GGUF → HF tensor-name map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qwen_engine.errors import QwenError
from qwen_engine.weights.gguf import hf_name, open_gguf


@pytest.fixture(scope="module")
def small_gguf(tiny_gguf_factory) -> Path:
    """F32 tensors as gguf-py writes them; the default model's file covers the long vocabulary arrays."""
    return tiny_gguf_factory("small.gguf", small_vocab=True)


@pytest.mark.parametrize("which", ["default", "tiny"])
def test_header_matches_gguf_py(which: str, default_gguf, small_gguf, gguf_reader) -> None:
    path = default_gguf if which == "default" else small_gguf
    ours = open_gguf(path)
    reader = gguf_reader(path)
    expected = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert ours.metadata == expected
    assert [e.name for e in ours.entries] == [t.name for t in reader.tensors]
    for entry, tensor in zip(ours.entries, reader.tensors):
        assert entry.qtype == tensor.tensor_type
        assert entry.shape == tuple(int(n) for n in reversed(tensor.shape))
        assert np.array_equal(ours.data[entry.offset : entry.offset + entry.nbytes], tensor.data.reshape(-1).view(np.uint8))


def test_name_map() -> None:
    # qwen-family.md §9.1
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("blk.17.attn_k.bias") == "model.layers.17.self_attn.k_proj.bias"
    assert hf_name("blk.3.ffn_gate.weight") == "model.layers.3.mlp.gate_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("blk.0.mystery.weight") == "blk.0.mystery.weight"  # reported later as unexpected


def test_every_default_tensor_maps_to_a_checkpoint_name(default_checkpoint) -> None:
    names = {hf_name(entry.name) for entry in default_checkpoint.gguf.entries}
    assert names == set(default_checkpoint.config.checkpoint_shapes())


@pytest.mark.parametrize("content", [b"", b"GGUF", b"GGUF\x03\x00\x00\x00" + b"\xff" * 16, b"GGML" + b"\x00" * 64])
def test_bad_headers_are_one_clear_error(tmp_path, content: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(QwenError, match="bad.gguf"):
        open_gguf(path)
