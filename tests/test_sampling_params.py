"""A checkpoint's sampling defaults: its generation_config.json, transformers' defaults for the keys it leaves out,
Qwen2.5-Instruct's only where there is no generation config at all (qwen-family.md §1.7, §8.4)."""

from __future__ import annotations

import json

import pytest

from qwen_engine.checkpoint import open_checkpoint
from qwen_engine.errors import QwenError
from qwen_engine.sampling_params import (ENGINE_DEFAULT, GENERATION_CONFIG, QWEN25_DEFAULT, TRANSFORMERS_DEFAULT,
                                         SamplingDefaults)

SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def values(defaults: SamplingDefaults, names=SAMPLING) -> tuple:
    return tuple(getattr(defaults.params, name) for name in names)


def test_keys_left_out_take_transformers_defaults_not_qwen25s() -> None:
    """Qwen-VL-Chat's generation config (§1.7) sets no repetition_penalty and no temperature: transformers samples it
    at 1.0 with no penalty, so the engine must too (Qwen2.5's 1.05 leaking in changed its greedy replies)."""
    vl_chat = {"chat_format": "chatml", "do_sample": True, "top_k": 0, "top_p": 0.3, "max_window_size": 6144,
               "max_new_tokens": 512, "eos_token_id": 151643, "pad_token_id": 151643}
    defaults = SamplingDefaults.of(vl_chat)
    assert values(defaults) == (1.0, 0, 0.3, 0.0, 1.0)
    assert dict(defaults.sources) == {"temperature": TRANSFORMERS_DEFAULT, "top_k": GENERATION_CONFIG,
                                      "top_p": GENERATION_CONFIG, "min_p": TRANSFORMERS_DEFAULT,
                                      "repetition_penalty": TRANSFORMERS_DEFAULT, "max_tokens": GENERATION_CONFIG}


def test_qwen25_instruct_config_is_taken_whole() -> None:
    qwen25 = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
              "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    defaults = SamplingDefaults.of(qwen25)
    assert values(defaults) == (0.7, 20, 0.8, 0.0, 1.05)
    assert defaults.params.max_tokens == 512 and defaults.sources["max_tokens"] == ENGINE_DEFAULT
    assert {name for name, source in defaults.sources.items() if source == GENERATION_CONFIG} == set(SAMPLING) - {"min_p"}


@pytest.mark.parametrize(("config", "temperature_source"), [
    ({"do_sample": False, "temperature": 0.9, "top_k": 5}, GENERATION_CONFIG),  # transformers ignores the temperature
    ({"temperature": 0.9, "repetition_penalty": 1.1}, TRANSFORMERS_DEFAULT),  # do_sample left out: False
    ({}, TRANSFORMERS_DEFAULT),  # a base model's config: ids only
])
def test_without_do_sample_decoding_is_greedy(config: dict, temperature_source: str) -> None:
    defaults = SamplingDefaults.of(config)
    assert defaults.params.temperature == 0.0 and defaults.sources["temperature"] == temperature_source
    assert defaults.params.top_k == config.get("top_k", 50)  # in force once a request asks for a temperature
    assert defaults.params.repetition_penalty == config.get("repetition_penalty", 1.0)


def test_a_null_counts_as_left_out() -> None:
    defaults = SamplingDefaults.of({"do_sample": True, "temperature": None, "top_p": None, "max_new_tokens": None})
    assert values(defaults, ("temperature", "top_p", "max_tokens")) == (1.0, 1.0, 512)
    assert defaults.sources["top_p"] == TRANSFORMERS_DEFAULT


def test_no_generation_config_means_qwen25s_settings() -> None:
    defaults = SamplingDefaults.of(None)
    assert values(defaults) == (0.7, 20, 0.8, 0.0, 1.05)
    assert dict(defaults.sources) == {**dict.fromkeys(SAMPLING, QWEN25_DEFAULT), "max_tokens": ENGINE_DEFAULT}


def test_a_bad_value_in_the_file_is_named() -> None:
    with pytest.raises(QwenError, match="top_p"):
        SamplingDefaults.of({"do_sample": True, "top_p": 0})


def test_a_bare_gguf_gets_qwen25s_defaults(tiny_gguf) -> None:
    checkpoint = open_checkpoint(tiny_gguf)
    assert checkpoint.generation_config is None
    assert checkpoint.sampling_defaults() == SamplingDefaults.of(None).params
    assert set(checkpoint.info().sampling_defaults.sources.values()) == {QWEN25_DEFAULT, ENGINE_DEFAULT}


def test_qwen_info_shows_each_default_and_its_source(tiny_gguf, capsys) -> None:
    from qwen_engine.cli import main

    main(["info", "--json", "--model", str(tiny_gguf)])
    shown = json.loads(capsys.readouterr().out)["sampling_defaults"]
    assert shown["repetition_penalty"] == {"value": 1.05, "source": QWEN25_DEFAULT}
    assert shown["max_tokens"] == {"value": 512, "source": ENGINE_DEFAULT}
    main(["info", "--model", str(tiny_gguf)])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sampling defaults"))
    assert line.endswith(f"repetition_penalty 1.05 ({QWEN25_DEFAULT}); max_tokens 512 ({ENGINE_DEFAULT})")
