"""POST /v1/chat/completions: the conversation through the checkpoint's chat format (with Qwen-VL's images and
Qwen-Audio's clips), tool calls (forced, named or parsed from Qwen2.5's `<tool_call>` output, streamed too) and JSON
mode."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from ..engine.constrained import JsonObjectConstraint
from ..engine.serving import Event, Request as EngineRequest
from ..errors import QwenError
from ..prompt import Prompt
from .errors import ApiError
from .protocol import AudioPart, ChatCompletionRequest, ChatMessage, ContentPart, ImagePart, NamedToolChoice, TextPart
from .responses import DONE, Choice, sse, sse_error, usage
from .server import Server
from .tools import CLOSE, OPEN, StreamingToolParser, split_tool_calls


async def chat_completion(server: Server, body: ChatCompletionRequest, http: Request) -> Response:
    server.check_model(body.model)
    prompt, forced = await asyncio.to_thread(chat_prompt, server, body)  # tokenizing a long prompt takes a while
    params = server.sampling(body, len(prompt))
    json_mode = body.response_format is not None and body.response_format.type == "json_object"
    if json_mode and forced:
        raise ApiError(400, "response_format json_object and a forced tool call cannot go together", param="response_format")
    top = body.top_logprobs or 0 if body.logprobs else None
    object_start = forced[len(OPEN) + 1 :]  # a forced call goes on as a JSON object after its tag
    request = EngineRequest(
        f"chatcmpl-{uuid.uuid4().hex}", prompt, params, n=body.n, logprobs=top,
        constraint=partial(JsonObjectConstraint, server.model.token_texts, object_start) if json_mode or forced else None,
        logit_bias=server.bias(body),
    )
    tools_on = bool(body.tools) and body.tool_choice != "none"
    return await server.respond(request, body, http, lambda choices: _whole(server, request, body, choices, forced, tools_on),
                                lambda events, choices: _stream(server, request, body, events, choices, forced, tools_on))


def chat_prompt(server: Server, body: ChatCompletionRequest) -> tuple[Prompt, str]:
    """The prompt, and the text the reply is forced to start with (for a required or named tool call: the call's
    opening tag, and the name; the rest is then constrained to a JSON object)."""
    _check_text_fits(server, body.messages)
    parts = [part for m in body.messages if isinstance(m.content, list) for part in m.content]
    for kind, part_type in (("image", ImagePart), ("audio", AudioPart)):  # counted before any is decoded
        server.media.check_count(kind, sum(isinstance(part, part_type) for part in parts), "messages")
    messages = [_template_message(server, m) for m in body.messages]
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    choice = body.tool_choice
    if choice == "none":
        tools = None
    if choice not in (None, "none", "auto") and not tools:
        raise ApiError(400, "tool_choice needs tools", param="tool_choice")
    try:
        prompt = server.model.chat_prompt(messages, tools)
    except QwenError as err:
        raise ApiError(400, str(err), param="messages") from None
    tokenizer, name = server.model.tokenizer, None
    if isinstance(choice, NamedToolChoice):
        name = choice.function.get("name", "")
        if name not in {tool["function"]["name"] for tool in tools}:
            raise ApiError(400, f"tool_choice names '{name}', which is not among the tools", param="tool_choice")
    elif choice == "required" and len(tools) == 1:
        name = tools[0]["function"]["name"]
    if name is not None:  # the call's name is written for the model; its arguments must be an object
        start = '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": {'
        forced = OPEN + "\n" + start
        forced_ids = tokenizer.encode_markup(OPEN + "\n") + tokenizer.encode(start)
    elif choice == "required":
        forced = OPEN + "\n"
        forced_ids = tokenizer.encode_markup(forced)
    else:
        return prompt, ""
    return Prompt(prompt.token_ids + forced_ids, prompt.items), forced


def _check_text_fits(server: Server, messages: list[ChatMessage]) -> None:
    """Refuse, before any tokenizing, a conversation whose kept text alone is too long for any sequence. Every chat
    format keeps the system message and the last one (Qwen v1 drops older history past its window), so only
    those two are counted: a prompt that fits is never refused."""
    kept = {0, len(messages) - 1} if messages[0].role in ("system", "developer") else {len(messages) - 1}
    server.check_text_fits([text for i in sorted(kept) for text in _texts(messages[i])], "messages")


def _texts(message: ChatMessage) -> list[str]:
    content = message.content
    if isinstance(content, list):
        return [part.text for part in content if isinstance(part, TextPart)]
    return [content or ""]


def _template_message(server: Server, message: ChatMessage) -> dict[str, Any]:
    """The message as the chat format reads it: content parts go through as parts, images and audio read under the
    server's media policy (server/media.py); the chat format refuses those its model does not read."""
    content = message.content
    if isinstance(content, list):
        content = [_template_part(server, part) for part in content]
    out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role, "content": content or ""}
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            arguments = call.function.arguments
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    pass
            calls.append({"type": "function", "function": {"name": call.function.name, "arguments": arguments}})
        out["tool_calls"] = calls
    if message.name:
        out["name"] = message.name
    return out


def _template_part(server: Server, part: ContentPart) -> dict[str, Any]:
    if isinstance(part, ImagePart):
        return {"type": "image", "image": server.media.image(part.image_url.url)}
    if isinstance(part, AudioPart):
        return {"type": "audio", "audio": server.media.inline_audio(part.input_audio.data)}
    return part.model_dump()


def _whole(server: Server, request: EngineRequest, body: ChatCompletionRequest, choices: list[Choice], forced: str,
           tools_on: bool) -> dict[str, Any]:
    out = []
    for index, choice in enumerate(choices):
        reply = forced + choice.text + (CLOSE if forced else "")
        content, calls = split_tool_calls(reply, _tool_names(body)) if tools_on else (choice.text, [])
        message: dict[str, Any] = {"role": "assistant", "content": content}
        finish = choice.finish_reason
        if calls:
            message["tool_calls"], finish = calls, "tool_calls"
        entry: dict[str, Any] = {"index": index, "message": message, "finish_reason": finish}
        entry["logprobs"] = {"content": [_logprob(server, lp) for lp in choice.logprobs]} if request.logprobs is not None else None
        out.append(entry)
    return {"id": request.request_id, "object": "chat.completion", "created": int(time.time()), "model": server.name,
            "choices": out, "usage": usage(request, choices)}


async def _stream(server: Server, request: EngineRequest, body: ChatCompletionRequest, events: AsyncIterator[Event],
                  choices: list[Choice], forced: str, tools_on: bool) -> AsyncIterator[str]:
    base = {"id": request.request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": server.name}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        return sse({**base, "choices": [choice]})

    parsers = [StreamingToolParser(_tool_names(body)) for _ in range(body.n)]
    tool_counts = [0] * body.n
    for index in range(body.n):
        yield chunk(index, {"role": "assistant", "content": ""})
        if forced:  # (only with tools: chat_prompt refuses a forced call without them)
            parsers[index].push(forced)
    async for event in events:
        if event.error is not None:
            yield sse_error(event.error)
            break
        index = event.index
        logprobs = None
        if request.logprobs is not None and event.logprob is not None:
            logprobs = {"content": [_logprob(server, event.logprob)]}
        text, calls = parsers[index].push(event.text) if tools_on else (event.text, [])
        if event.finish_reason is not None and tools_on:
            if forced:  # the constrained call ended with its object: close the tag it was forced to open
                more_text, more_calls = parsers[index].push(CLOSE)
                text, calls = text + more_text, calls + more_calls
            tail, last_calls = parsers[index].flush()
            text, calls = text + tail, calls + last_calls
        if text or logprobs:
            yield chunk(index, {"content": text}, logprobs=logprobs)
        for call in calls:
            delta = {"tool_calls": [{"index": tool_counts[index], **call}]}
            tool_counts[index] += 1
            yield chunk(index, delta)
        if event.finish_reason is not None:
            finish = "tool_calls" if tool_counts[index] else event.finish_reason
            yield chunk(index, {}, finish)
    if body.include_usage:
        yield sse({**base, "choices": [], "usage": usage(request, choices)})
    yield DONE


def _tool_names(body: ChatCompletionRequest) -> frozenset[str]:
    return frozenset(tool.function.name for tool in body.tools or ())


def _logprob(server: Server, entry: Any) -> dict[str, Any]:
    def item(token: int, logprob: float) -> dict[str, Any]:
        raw = server.token_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {**item(entry.token_id, entry.logprob), "top_logprobs": [item(t, lp) for t, lp in entry.top]}
