"""POST /v1/completions: a raw prompt (text with its control tokens parsed, or token ids) continued as it is, with
optional echo and logprobs."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from ..engine.serving import Event, Request as EngineRequest
from ..errors import QwenError
from ..audio import audio_items
from ..images import image_items
from ..prompt import Prompt
from .errors import ApiError
from .protocol import CompletionRequest
from .responses import DONE, Choice, sse, sse_error, usage
from .server import Server


async def completion(server: Server, body: CompletionRequest, http: Request) -> Response:
    server.check_model(body.model)
    tokenizer = server.model.tokenizer
    if isinstance(body.prompt, str):
        server.check_text_fits([body.prompt], "prompt")
        # A raw prompt's markup means what it says (`<|im_start|>` is the control token), as vLLM reads it; tokenizing
        # a long one takes a while, so not on the event loop.
        prompt = await asyncio.to_thread(_raw_prompt, server, body.prompt)
    else:
        vocab = server.model.config.vocab_size
        if any(not 0 <= token < vocab for token in body.prompt):
            raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        prompt = Prompt(list(body.prompt))
    if not prompt.token_ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    params = server.sampling(body, len(prompt))
    request = EngineRequest(f"cmpl-{uuid.uuid4().hex}", prompt, params, n=body.n, logprobs=body.logprobs,
                            logit_bias=server.bias(body))
    echo = tokenizer.decode(prompt.token_ids) if body.echo else ""
    return await server.respond(request, body, http, lambda choices: _whole(server, request, choices, echo),
                                lambda events, choices: _stream(server, request, body, events, choices, echo))


def _raw_prompt(server: Server, text: str) -> Prompt:
    """A raw prompt's ids (its markup means what it says: `<|im_start|>` is the control token, as vLLM reads it) and
    the media its `<img>PATH</img>` and `<audio>PATH</audio>` spans name: files read only under the media policy."""
    config, media = server.model.config, server.media
    clips: list = []
    try:
        ids = server.model.tokenizer.encode(text, special=True, audio=clips, read_audio=media.local_audio)
        items = []
        if config.vision is not None and config.vision.image_start_id in ids:
            media.check_count("image", ids.count(config.vision.image_start_id), "prompt")
            items += image_items(ids, config.vision.image_start_id, media.local_image)
        if clips:
            media.check_count("audio", len(clips), "prompt")
            items += audio_items(ids, config.audio.audio_start_id, clips)
        return Prompt(ids, sorted(items, key=lambda item: item.offset))
    except QwenError as err:  # a malformed <img> or <audio> span
        raise ApiError(400, str(err), param="prompt") from None


def _whole(server: Server, request: EngineRequest, choices: list[Choice], echo: str) -> dict[str, Any]:
    out = []
    for index, choice in enumerate(choices):
        logprobs = _logprobs(server, choice.logprobs, len(echo)) if request.logprobs is not None else None
        out.append({"index": index, "text": echo + choice.text, "logprobs": logprobs, "finish_reason": choice.finish_reason})
    return {"id": request.request_id, "object": "text_completion", "created": int(time.time()), "model": server.name,
            "choices": out, "usage": usage(request, choices)}


async def _stream(server: Server, request: EngineRequest, body: CompletionRequest, events: AsyncIterator[Event],
                  choices: list[Choice], echo: str) -> AsyncIterator[str]:
    base = {"id": request.request_id, "object": "text_completion", "created": int(time.time()), "model": server.name}
    if echo:
        for index in range(body.n):
            yield sse({**base, "choices": [{"index": index, "text": echo, "logprobs": None, "finish_reason": None}]})
    async for event in events:
        if event.error is not None:
            yield sse_error(event.error)
            break
        logprobs = None
        if request.logprobs is not None and event.logprob is not None:
            logprobs = _logprobs(server, [event.logprob], 0)
        if event.text or logprobs or event.finish_reason:
            choice = {"index": event.index, "text": event.text, "logprobs": logprobs, "finish_reason": event.finish_reason}
            yield sse({**base, "choices": [choice]})
    if body.include_usage:
        yield sse({**base, "choices": [], "usage": usage(request, choices)})
    yield DONE


def _logprobs(server: Server, entries: list[Any], offset: int) -> dict[str, Any]:
    def text(token: int) -> str:
        return server.token_bytes(token).decode("utf-8", errors="replace")

    tokens, offsets = [], []
    for entry in entries:
        offsets.append(offset)
        tokens.append(text(entry.token_id))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [{text(t): lp for t, lp in entry.top} for entry in entries], "text_offset": offsets}
