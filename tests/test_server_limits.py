"""What the server refuses before spending work on it: a body over --max-request-mb (413, before it is read) and a
prompt text too long for any sequence (400, before the tokenizer runs). Driven through the ASGI app directly, so
each test sees exactly which body chunks were read."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest

from qwen_engine.server.app import create_app
from qwen_engine.server.server import Server

LIMIT = 1 << 20
CHUNK = 64 << 10


@pytest.fixture(scope="module")
def server(tiny_gguf):
    from qwen_engine import load

    model = load(tiny_gguf)
    return Server(model, model.serving_engine(num_blocks=16), name="tiny", max_request_bytes=LIMIT)


@pytest.fixture(scope="module")
def app(server):
    return create_app(server)


def exchange(app, path: str, headers: dict[str, str], messages: Iterator[dict[str, Any]]) -> tuple[int, dict[str, Any], int]:
    """POST to `path` with the body messages `messages`; the status, the JSON answer and how many messages were read."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(key.encode(), value.encode()) for key, value in headers.items()],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    reads, status, answer = 0, None, b""

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, answer
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            answer += message.get("body", b"")

    asyncio.run(app(scope, receive, send))
    return status, json.loads(answer), reads


def whole(body: dict[str, Any]) -> tuple[dict[str, str], Iterator[dict[str, Any]]]:
    data = json.dumps(body).encode()
    headers = {"content-type": "application/json", "content-length": str(len(data))}
    return headers, iter([{"type": "http.request", "body": data, "more_body": False}])


def test_a_declared_body_over_the_limit_is_refused_before_a_byte_is_read(app) -> None:
    headers = {"content-type": "application/json", "content-length": str(50 << 20)}
    status, answer, reads = exchange(app, "/v1/completions", headers, iter([]))
    assert (status, reads) == (413, 0)
    assert answer["error"]["code"] == "request_too_large" and "--max-request-mb" in answer["error"]["message"]


def test_a_chunked_body_is_cut_off_where_it_passes_the_limit(app) -> None:
    endless = itertools.repeat({"type": "http.request", "body": b" " * CHUNK, "more_body": True})
    headers = {"content-type": "application/json", "transfer-encoding": "chunked"}
    status, answer, reads = exchange(app, "/v1/chat/completions", headers, endless)
    assert status == 413 and reads == LIMIT // CHUNK + 1
    assert answer["error"]["type"] == "invalid_request_error"


def test_a_chunked_body_within_the_limit_reaches_the_endpoint(app) -> None:
    data = json.dumps({"model": "other", "prompt": "hello"}).encode()
    pieces = [data[i : i + 7] for i in range(0, len(data), 7)]
    messages = iter([{"type": "http.request", "body": piece, "more_body": i < len(pieces) - 1}
                     for i, piece in enumerate(pieces)])
    headers = {"content-type": "application/json", "transfer-encoding": "chunked"}
    status, answer, _ = exchange(app, "/v1/completions", headers, messages)
    assert status == 400 and "not served" in answer["error"]["message"]  # parsed whole, checked by the endpoint


@pytest.fixture
def encoded(server, monkeypatch) -> list[int]:
    """The lengths of the texts the tokenizer is asked to encode."""
    calls = []
    tokenizer = server.model.tokenizer
    for name in ("encode", "encode_markup"):
        original = getattr(tokenizer, name)

        def spy(text, *args, original=original, **kwargs):
            calls.append(len(text))
            return original(text, *args, **kwargs)

        monkeypatch.setattr(tokenizer, name, spy)
    return calls


def test_a_prompt_text_that_cannot_fit_is_refused_before_tokenizing(app, server, encoded) -> None:
    longest = server.longest_prompt_text
    status, answer, _ = exchange(app, "/v1/completions", *whole({"model": "tiny", "prompt": "a" * (longest + 1)}))
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded" and encoded == []
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "b" * longest}]
    status, answer, _ = exchange(app, "/v1/chat/completions", *whole({"model": "tiny", "messages": messages}))
    assert status == 400 and "characters cannot fit" in answer["error"]["message"] and encoded == []
    # At the bound it may still fit as far as characters tell: the tokenizer decides (and the context refuses it).
    status, answer, _ = exchange(app, "/v1/completions", *whole({"model": "tiny", "prompt": "a" * longest}))
    assert status == 400 and "characters cannot fit" not in answer["error"]["message"] and longest in encoded


def test_characters_count_as_the_tokenizer_sees_them_after_nfc(app, server, encoded) -> None:
    """'e' + combining acute is one character once NFC composes it: twice the bound's length as given, within it as
    read."""
    status, answer, _ = exchange(app, "/v1/completions", *whole({"model": "tiny", "prompt": "e\u0301" * server.longest_prompt_text}))
    assert status == 400 and "characters cannot fit" not in answer["error"]["message"] and encoded


def test_the_bound_admits_the_longest_text_any_sequence_can_hold(server) -> None:
    """The longest token, repeated as often as a sequence has room for, is within the bound: no prompt that fits
    can be refused by it."""
    tokenizer = server.model.tokenizer
    longest_token = max(tokenizer.token_bytes, key=len).decode("utf-8", errors="replace")
    densest = longest_token * (server.engine.longest_sequence - 1)
    assert len(densest) <= server.longest_prompt_text


def test_only_the_messages_every_chat_format_keeps_are_counted(app, server, encoded) -> None:
    """Qwen v1 drops old history past its window, so a long early message alone is no reason to refuse."""
    messages = [{"role": "user", "content": "c" * (server.longest_prompt_text + 1)}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "And now?"}]
    status, answer, _ = exchange(app, "/v1/chat/completions", *whole({"model": "tiny", "messages": messages}))
    assert status == 400 and "characters cannot fit" not in answer["error"]["message"] and encoded
