"""The default model against transformers loading the same GGUF, in float32 (the foundation's acceptance bar)."""

from __future__ import annotations

import inspect
import textwrap

import pytest
import torch

CHAT = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "Write a haiku about the sea."},
    {"role": "assistant", "content": "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time."},
    {"role": "user", "content": "Now explain it in one sentence."},
]
PROMPTS = {
    "english": "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg",
    "chinese": "人工智能的发展经历了几个重要阶段。首先，",
    "code": "def quicksort(items: list[int]) -> list[int]:\n    \"\"\"Sort a list of integers.\"\"\"\n",
    # About 1,000 tokens of real prose and code: the standard library's textwrap module.
    "long": inspect.getsource(textwrap)[:4200],
}


@pytest.fixture(scope="module")
def prompt_ids(engine_model) -> dict[str, list[int]]:
    ids = {name: engine_model.tokenizer.encode(text) for name, text in PROMPTS.items()}
    ids["chat"] = engine_model.chat_prompt(CHAT).token_ids
    return ids


def test_long_prompt_is_about_a_thousand_tokens(prompt_ids) -> None:
    assert 900 <= len(prompt_ids["long"]) <= 1300


def test_chat_prompt_ids_match_transformers(engine_model, ref_tokenizer) -> None:
    expected = ref_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert engine_model.chat_prompt(CHAT).token_ids == list(expected)


@pytest.mark.parametrize("name", ["english", "chinese", "code", "chat", "long"])
def test_logits_match_transformers(engine_model, ref_model, prompt_ids, name: str) -> None:
    ids = prompt_ids[name]
    ours = engine_model.logits(ids)
    with torch.inference_mode():
        theirs = ref_model(torch.tensor([ids])).logits[0].to(torch.float32)
    assert ours.shape == theirs.shape == (len(ids), engine_model.config.vocab_size)
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= 1e-3 * scale
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("name", ["code", "chat"])
def test_greedy_continuation_matches_transformers(engine_model, ref_model, prompt_ids, name: str) -> None:
    ids = prompt_ids[name]
    ours = engine_model.generate(ids, max_tokens=64, temperature=0.0, repetition_penalty=1.0)
    with torch.inference_mode():
        out = ref_model.generate(
            torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=sorted(engine_model.stop_token_ids)
        )
    theirs = out[0, len(ids):].tolist()
    assert ours.token_ids == theirs
    assert len(ours.token_ids) == 64 or ours.finish_reason == "stop"
