"""Shared, expensive fixtures: the default model (assembled once), the engine's loaded model and the
transformers reference loaded from the same GGUF. Each is built once per test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from qwen_engine.checkpoint import GGUFSource
from qwen_engine.default_model import CACHE_ENV, default_model_path


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Assembled and converted models go to a fresh directory, never the user's cache."""
    directory = tmp_path_factory.mktemp("qwen-cache")
    os.environ[CACHE_ENV] = str(directory)
    return directory


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The real default model; `make test` installs its parts through the default-model extra."""
    return default_model_path(progress=False)


@pytest.fixture(scope="session")
def default_checkpoint(default_gguf: Path) -> GGUFSource:
    return GGUFSource(default_gguf)


@pytest.fixture(scope="session")
def gguf_arrays(default_checkpoint: GGUFSource) -> tuple[list[str], list[int], list[str]]:
    """`tokenizer.ggml.{tokens,token_type,merges}` of the default model."""
    meta = default_checkpoint.gguf.metadata
    return tuple(meta[f"tokenizer.ggml.{key}"] for key in ("tokens", "token_type", "merges"))


@pytest.fixture(scope="session")
def engine_model(default_gguf: Path):
    """The default model loaded by this engine in float32 (the exact reference path)."""
    from qwen_engine import load

    return load(default_gguf, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def ref_tokenizer(default_gguf: Path):
    """transformers' tokenizer for the same file."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


@pytest.fixture(scope="session")
def ref_model(default_gguf: Path):
    """transformers' float32 model for the same file (the slowest fixture: about half a minute)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer_files(tmp_path_factory: pytest.TempPathFactory, default_checkpoint: GGUFSource) -> Path:
    """The default model's tokenizer in the official HF layout (tokenizer.json with NFC, tokenizer_config.json
    with its chat template), for tiny HF checkpoints."""
    directory = tmp_path_factory.mktemp("tokenizer")
    default_checkpoint.tokenizer()._backend.save(str(directory / "tokenizer.json"))
    config = {
        "chat_template": default_checkpoint.chat_template_source,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "model_max_length": 32768,
        "tokenizer_class": "Qwen2Tokenizer",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


@pytest.fixture(scope="session")
def tiny_gguf_factory(tmp_path_factory: pytest.TempPathFactory, gguf_arrays, default_checkpoint: GGUFSource):
    """Writes tiny random qwen2 GGUF files with the default model's real tokenizer and chat template."""
    from tiny import hf_config, hf_config_dict, random_model, write_gguf

    tokens, token_types, merges = gguf_arrays
    tokenizer = {"tokens": tokens, "token_types": token_types, "merges": merges,
                 "chat_template": default_checkpoint.chat_template_source}

    def make(name: str, raw_tensors=None, **overrides) -> Path:
        config = hf_config("qwen2.5-0.5b", **overrides)
        model = random_model(config)
        path = tmp_path_factory.mktemp("gguf") / name
        state = {k: v for k, v in model.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
        write_gguf(path, state, hf_config_dict(config), tokenizer, raw_tensors)
        return path

    return make


@pytest.fixture(scope="session")
def tiny_gguf(tiny_gguf_factory) -> Path:
    """A valid tiny GGUF with a 64-token context."""
    return tiny_gguf_factory("tiny.gguf", max_position_embeddings=64)


@pytest.fixture(scope="session")
def default_model(default_gguf: Path):
    """The default model in this engine's default CPU format (bfloat16 activations, quant=auto)."""
    from qwen_engine import load

    return load(default_gguf)
