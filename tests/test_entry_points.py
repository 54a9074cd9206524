"""One engine under every entry point: for the same prompt and greedy sampling, `Model.chat`/`generate`, the engine
crowded with 15 other requests, `qwen generate`, `qwen chat --once` and `qwen serve` (beside 15 others) give the
same tokens, on the default model, for 10 prompts of which one is over 2,048 tokens (two prompt chunks)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from serve_command import ServeCommand

from qwen_engine import cli
from qwen_engine.engine.serving import Request
from qwen_engine.runtime import DEFAULT_PREFILL_TOKENS

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
QUESTIONS = ["What is a monad?", "Write a haiku about rust.", "Explain RoPE in two sentences.",
             "Write a Python function that reverses a string.", "What is the capital of France?",
             "Name three sorting algorithms.", "What does HTTP 404 mean?", "Say hello in Japanese.",
             "What is 17 times 23?"]
CORPUS = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "corpus.md"


def conversations() -> list[list[dict[str, str]]]:
    long = "Summarise this text in one sentence:\n\n" + CORPUS.read_text(encoding="utf-8")[:9000]
    return [[{"role": "user", "content": question}] for question in QUESTIONS] + [[{"role": "user", "content": long}]]


GREEDY = dict(max_tokens=MAX_TOKENS, temperature=0.0, repetition_penalty=1.0)
FILLERS = [[{"role": "user", "content": f"Count from {i} to {i + 20}."}] for i in range(6)]


@pytest.fixture(scope="module")
def library(default_model) -> list:
    """Each conversation alone, through the library."""
    return [default_model.chat(messages, **GREEDY) for messages in conversations()]


def test_the_long_prompt_takes_several_chunks(default_model) -> None:
    assert len(default_model.chat_prompt(conversations()[-1]).token_ids) > DEFAULT_PREFILL_TOKENS


def test_crowded_engine_gives_each_sequence_its_output_alone(default_model, library) -> None:
    engine = default_model.serving_engine(num_blocks=1024)
    params = default_model.defaults.updated(**GREEDY)
    requests = [Request(f"r{i}", default_model.chat_prompt(m), params) for i, m in enumerate(conversations() + FILLERS)]
    results = engine.run(requests)
    crowded = [[e.token_id for e in results[f"r{i}"][0] if e.token_id is not None] for i in range(len(library))]
    assert crowded == [result.token_ids for result in library]


def test_qwen_generate_and_chat_once_give_the_library_tokens(default_model, default_gguf, library, capsys) -> None:
    options = ["--model", str(default_gguf), "--max-tokens", str(MAX_TOKENS), "--temperature", "0",
               "--repetition-penalty", "1.0"]
    for messages, expected in zip(conversations(), library):
        # A raw ChatML prompt means what it says: its control tokens are parsed, as the template makes them.
        prompt_ids = default_model.chat_prompt(messages).token_ids
        raw = default_model.tokenizer.decode(prompt_ids, skip_special=False)
        assert default_model.tokenizer.encode(raw, special=True) == prompt_ids
        assert cli.main(["generate", raw, "--json", *options]) == 0
        assert json.loads(capsys.readouterr().out)["token_ids"] == expected.token_ids
        assert cli.main(["chat", "--once", messages[0]["content"], *options]) == 0
        assert capsys.readouterr().out == expected.text + "\n"


def test_qwen_serve_beside_15_others_gives_the_library_tokens(default_gguf, library) -> None:
    serve = ServeCommand(default_gguf, "--served-model-name", "m", "--kv-cache-gb", "0.5")
    try:
        client = serve.client()

        def ask(messages: list[dict[str, str]]) -> str:
            reply = client.chat.completions.create(model="m", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                                   extra_body={"repetition_penalty": 1.0})
            return reply.choices[0].message.content

        with ThreadPoolExecutor(16) as pool:
            crowded = list(pool.map(ask, conversations() + FILLERS))[: len(library)]
        alone = ask(conversations()[0])
    finally:
        serve.close()
    assert crowded == [result.text for result in library]
    assert alone == library[0].text
