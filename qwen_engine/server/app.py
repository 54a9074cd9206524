"""The OpenAI-compatible HTTP API over the serving engine: /v1/models, /v1/chat/completions, /v1/completions
(streaming as server-sent events, or whole), /health and /metrics (Prometheus).

Requests are validated before they reach the engine; every failure is an OpenAI-shaped JSON error. The engine
runs on its own thread and sends each token back through an asyncio queue; a client that disconnects aborts its
request, which frees its KV blocks at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.constrained import JsonObjectConstraint, token_texts
from ..engine.serving import Event, Request as EngineRequest, ServingEngine
from ..errors import QwenError
from ..llm import Model
from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, NamedToolChoice
from .tools import CLOSE, OPEN, StreamingToolParser, split_tool_calls

DISCONNECT_POLL_S = 0.25


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.headers = status, message, kind, param, code, headers


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class Metrics:
    def __init__(self, engine: ServingEngine, in_flight: Any) -> None:
        self.registry = registry = CollectorRegistry()
        self.http = Counter("qwen_http_requests", "HTTP requests by path and status", ["path", "status"], registry=registry)
        self.prompt_tokens = Counter("qwen_prompt_tokens", "Prompt tokens of finished requests", registry=registry)
        self.generation_tokens = Counter("qwen_generation_tokens", "Generated tokens", registry=registry)
        self.finished = Counter("qwen_sequences_finished", "Finished sequences by reason", ["reason"], registry=registry)
        self.ttft = Histogram("qwen_time_to_first_token_seconds", "Arrival to first token", registry=registry,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64))
        self.latency = Histogram("qwen_request_latency_seconds", "Arrival to last token", registry=registry,
                                 buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128))
        gauges = {
            "qwen_requests_waiting": ("Sequences waiting for a slot", lambda: len(engine.scheduler.waiting)),
            "qwen_requests_running": ("Sequences in the running batch", lambda: len(engine.scheduler.running)),
            "qwen_requests_in_flight": ("HTTP requests being served", in_flight),
            "qwen_kv_blocks_free": ("Free KV-cache blocks", lambda: engine.allocator.num_free),
            "qwen_kv_blocks_used": ("KV-cache blocks in use", lambda: engine.allocator.num_blocks - engine.allocator.num_free),
            "qwen_kv_blocks_total": ("KV-cache blocks", lambda: engine.allocator.num_blocks),
        }
        for name, (description, read) in gauges.items():
            Gauge(name, description, registry=registry).set_function(read)


@dataclass
class Choice:
    """What one choice of a request collected."""

    text: str = ""
    completion_tokens: int = 0
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


class Server:
    def __init__(self, model: Model, engine: ServingEngine, *, name: str, api_key: str | None = None,
                 max_queue: int = 64) -> None:
        self.model, self.engine, self.name = model, engine, name
        self.api_key, self.max_queue = api_key, max_queue
        self.in_flight = 0
        self.metrics = Metrics(engine, lambda: self.in_flight)
        self.created = int(time.time())

    # ---- request admission ---------------------------------------------------------------------------------
    def check_auth(self, given: str) -> None:
        """`given`: the Authorization header ("" when absent)."""
        if self.api_key is None:
            return
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error",
                           code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise ApiError(400, f"model '{name}' is not served here; this server serves '{self.name}'",
                           param="model", code="model_not_found")

    def admit(self) -> None:
        if self.in_flight >= self.engine.scheduler.max_seqs + self.max_queue:
            raise ApiError(429, f"the queue is full ({self.in_flight} requests in flight); retry shortly",
                           "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    @cached_property
    def token_texts(self) -> list[str | bytes | None]:
        """Every token's text for the JSON constraint, built on the first request that needs it."""
        return token_texts(self.model.tokenizer.token_bytes, self.model.tokenizer.control_ids)

    def sampling(self, body: ChatCompletionRequest | CompletionRequest, prompt_tokens: int) -> Any:
        limit = body.token_limit if body.token_limit is not None else max(1, self.engine.longest_sequence - prompt_tokens)
        try:
            return self.model.defaults.updated(max_tokens=limit, **body.sampling())
        except QwenError as err:
            raise ApiError(400, str(err)) from None

    def bias(self, body: ChatCompletionRequest | CompletionRequest) -> dict[int, float] | None:
        try:
            return body.token_bias(self.model.config.vocab_size)
        except ValueError as err:
            raise ApiError(400, str(err), param="logit_bias") from None

    def queue_for(self, request: EngineRequest) -> asyncio.Queue[Event]:
        """Check that the request can run (400 if not) and route its events, from the engine's thread, into a queue
        of this event loop. It is added to the engine only when its response starts (see `respond`)."""
        try:
            self.engine.check(request)
        except QwenError as err:
            raise ApiError(400, str(err), param="max_tokens", code="context_length_exceeded") from None
        events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def deliver(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed (shutdown)
                pass

        request.on_event = deliver
        return events

    def finished(self, request: EngineRequest, choices: list[Choice]) -> None:
        self.metrics.prompt_tokens.inc(len(request.prompt_ids))
        for choice in choices:
            self.metrics.finished.labels(choice.finish_reason or "abort").inc()
        self.metrics.latency.observe(time.perf_counter() - request.arrived)

    async def events(self, request: EngineRequest, queue: asyncio.Queue[Event], n: int,
                     http: Request) -> AsyncIterator[Event]:
        """The request's events until every choice has finished; aborts it if the client goes away."""
        open_choices, first = n, True
        next_check = time.monotonic() + DISCONNECT_POLL_S
        try:
            while open_choices:
                try:
                    event = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    event = None
                if time.monotonic() >= next_check:  # tokens may keep coming: look whether anyone still waits
                    next_check = time.monotonic() + DISCONNECT_POLL_S
                    if await http.is_disconnected():
                        return
                if event is None:
                    continue
                if first and event.token_id is not None:
                    self.metrics.ttft.observe(time.perf_counter() - request.arrived)
                    first = False
                if event.token_id is not None:
                    self.metrics.generation_tokens.inc()
                if event.finish_reason is not None:
                    open_choices -= 1
                yield event
        finally:
            if open_choices:
                self.engine.abort(request.request_id)

    # ---- chat ------------------------------------------------------------------------------------------------
    def chat_prompt(self, body: ChatCompletionRequest) -> tuple[list[int], str]:
        """Prompt ids, and the text the reply is forced to start with (for a required or named tool call: the call's
        opening tag, and the name; the rest is then constrained to a JSON object)."""
        messages = [_template_message(m) for m in body.messages]
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
        choice = body.tool_choice
        if choice == "none":
            tools = None
        if choice not in (None, "none", "auto") and not tools:
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        try:
            ids = self.model.chat_prompt(messages, tools)
        except QwenError as err:
            raise ApiError(400, str(err), param="messages") from None
        tokenizer, forced, name = self.model.tokenizer, "", None
        if isinstance(choice, NamedToolChoice):
            name = choice.function.get("name", "")
            if name not in {tool["function"]["name"] for tool in tools}:
                raise ApiError(400, f"tool_choice names '{name}', which is not among the tools", param="tool_choice")
        elif choice == "required" and len(tools) == 1:
            name = tools[0]["function"]["name"]
        if name is not None:  # the call's name is written for the model; its arguments must be an object
            start = '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": {'
            forced = OPEN + "\n" + start
            ids += tokenizer.encode_markup(OPEN + "\n") + tokenizer.encode(start)
        elif choice == "required":
            forced = OPEN + "\n"
            ids += tokenizer.encode_markup(forced)
        return ids, forced

    async def chat(self, body: ChatCompletionRequest, http: Request) -> Response:
        self.check_model(body.model)
        prompt_ids, forced = self.chat_prompt(body)
        params = self.sampling(body, len(prompt_ids))
        json_mode = body.response_format is not None and body.response_format.type == "json_object"
        if json_mode and forced:
            raise ApiError(400, "response_format json_object and a forced tool call cannot go together", param="response_format")
        top = body.top_logprobs or 0 if body.logprobs else None
        object_start = forced[len(OPEN) + 1 :]  # a forced call goes on as a JSON object after its tag
        request = EngineRequest(
            f"chatcmpl-{uuid.uuid4().hex}", prompt_ids, params, n=body.n, logprobs=top,
            constraint=partial(JsonObjectConstraint, self.token_texts, object_start) if json_mode or forced else None,
            logit_bias=self.bias(body),
        )
        tools_on = bool(body.tools) and body.tool_choice != "none"
        return await self.respond(request, body, http, lambda choices: self._chat_body(request, body, choices, forced, tools_on),
                                  lambda events, choices: self._chat_stream(request, body, events, choices, forced, tools_on))

    def _chat_body(self, request: EngineRequest, body: ChatCompletionRequest, choices: list[Choice], forced: str,
                   tools_on: bool) -> dict[str, Any]:
        out = []
        for index, choice in enumerate(choices):
            reply = forced + choice.text + (CLOSE if forced else "")
            content, calls = split_tool_calls(reply, self.tool_names(body)) if tools_on else (choice.text, [])
            message: dict[str, Any] = {"role": "assistant", "content": content}
            finish = choice.finish_reason
            if calls:
                message["tool_calls"], finish = calls, "tool_calls"
            entry: dict[str, Any] = {"index": index, "message": message, "finish_reason": finish}
            entry["logprobs"] = {"content": [self._chat_logprob(lp) for lp in choice.logprobs]} if request.logprobs is not None else None
            out.append(entry)
        return {"id": request.request_id, "object": "chat.completion", "created": int(time.time()), "model": self.name,
                "choices": out, "usage": _usage(request, choices)}

    async def _chat_stream(self, request: EngineRequest, body: ChatCompletionRequest, events: AsyncIterator[Event],
                           choices: list[Choice], forced: str, tools_on: bool) -> AsyncIterator[str]:
        base = {"id": request.request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.name}

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            return _sse({**base, "choices": [choice]})

        parsers = [StreamingToolParser(self.tool_names(body)) for _ in range(body.n)]
        tool_counts = [0] * body.n
        for index in range(body.n):
            yield chunk(index, {"role": "assistant", "content": ""})
            if forced:  # (only with tools: chat_prompt refuses a forced call without them)
                parsers[index].push(forced)
        async for event in events:
            if event.error is not None:
                yield _sse_error(event.error)
                break
            index = event.index
            logprobs = None
            if request.logprobs is not None and event.logprob is not None:
                logprobs = {"content": [self._chat_logprob(event.logprob)]}
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
            yield _sse({**base, "choices": [], "usage": _usage(request, choices)})
        yield "data: [DONE]\n\n"

    @staticmethod
    def tool_names(body: ChatCompletionRequest) -> frozenset[str]:
        return frozenset(tool.function.name for tool in body.tools or ())

    def token_bytes(self, token: int) -> bytes:
        """A token's bytes, as logprobs report it (b"" for an id beyond the tokenizer's)."""
        table = self.model.tokenizer.token_bytes
        return table[token] if token < len(table) else b""

    def _chat_logprob(self, entry: Any) -> dict[str, Any]:
        def item(token: int, logprob: float) -> dict[str, Any]:
            raw = self.token_bytes(token)
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

        return {**item(entry.token_id, entry.logprob), "top_logprobs": [item(t, lp) for t, lp in entry.top]}

    # ---- completions -------------------------------------------------------------------------------------------
    async def completion(self, body: CompletionRequest, http: Request) -> Response:
        self.check_model(body.model)
        tokenizer = self.model.tokenizer
        if isinstance(body.prompt, str):
            prompt_ids = tokenizer.encode(body.prompt)
        else:
            vocab = self.model.config.vocab_size
            if any(not 0 <= token < vocab for token in body.prompt):
                raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
            prompt_ids = list(body.prompt)
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        params = self.sampling(body, len(prompt_ids))
        request = EngineRequest(f"cmpl-{uuid.uuid4().hex}", prompt_ids, params, n=body.n, logprobs=body.logprobs,
                                logit_bias=self.bias(body))
        echo = tokenizer.decode(prompt_ids) if body.echo else ""
        return await self.respond(request, body, http, lambda choices: self._completion_body(request, choices, echo),
                                  lambda events, choices: self._completion_stream(request, body, events, choices, echo))

    def _completion_body(self, request: EngineRequest, choices: list[Choice], echo: str) -> dict[str, Any]:
        out = []
        for index, choice in enumerate(choices):
            logprobs = self._completion_logprobs(choice.logprobs, len(echo)) if request.logprobs is not None else None
            out.append({"index": index, "text": echo + choice.text, "logprobs": logprobs, "finish_reason": choice.finish_reason})
        return {"id": request.request_id, "object": "text_completion", "created": int(time.time()), "model": self.name,
                "choices": out, "usage": _usage(request, choices)}

    async def _completion_stream(self, request: EngineRequest, body: CompletionRequest, events: AsyncIterator[Event],
                                 choices: list[Choice], echo: str) -> AsyncIterator[str]:
        base = {"id": request.request_id, "object": "text_completion", "created": int(time.time()), "model": self.name}
        if echo:
            for index in range(body.n):
                yield _sse({**base, "choices": [{"index": index, "text": echo, "logprobs": None, "finish_reason": None}]})
        async for event in events:
            if event.error is not None:
                yield _sse_error(event.error)
                break
            logprobs = None
            if request.logprobs is not None and event.logprob is not None:
                logprobs = self._completion_logprobs([event.logprob], 0)
            if event.text or logprobs or event.finish_reason:
                choice = {"index": event.index, "text": event.text, "logprobs": logprobs, "finish_reason": event.finish_reason}
                yield _sse({**base, "choices": [choice]})
        if body.include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(request, choices)})
        yield "data: [DONE]\n\n"

    def _completion_logprobs(self, entries: list[Any], offset: int) -> dict[str, Any]:
        def text(token: int) -> str:
            return self.token_bytes(token).decode("utf-8", errors="replace")

        tokens, offsets = [], []
        for entry in entries:
            offsets.append(offset)
            tokens.append(text(entry.token_id))
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [entry.logprob for entry in entries],
                "top_logprobs": [{text(t): lp for t, lp in entry.top} for entry in entries], "text_offset": offsets}

    # ---- shared ------------------------------------------------------------------------------------------------
    async def respond(self, request: EngineRequest, body: Any, http: Request, whole: Any, stream: Any) -> Response:
        self.admit()
        queue = self.queue_for(request)
        choices = [Choice() for _ in range(body.n)]

        async def tracked() -> AsyncIterator[Event]:
            # Added here, when the response starts: a stream whose client left before that never runs at all.
            self.engine.add(request)
            self.in_flight += 1
            try:
                async for event in self.events(request, queue, body.n, http):
                    choice = choices[event.index]
                    choice.completion_tokens = event.completion_tokens
                    if event.logprob is not None:
                        choice.logprobs.append(event.logprob)
                    choice.text += event.text
                    choice.finish_reason = event.finish_reason or choice.finish_reason
                    choice.error = event.error or choice.error
                    yield event
            finally:
                self.in_flight -= 1
                self.finished(request, choices)

        if body.stream:
            return StreamingResponse(stream(tracked(), choices), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        async for _ in tracked():
            pass
        failed = next((choice.error for choice in choices if choice.error), None)
        if failed is not None:
            raise ApiError(500, f"the engine failed while serving this request: {failed}", "server_error")
        if any(choice.finish_reason is None for choice in choices):  # the client left; nobody reads this
            return Response(status_code=499)
        return JSONResponse(whole(choices))


def _template_message(message: ChatMessage) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):
        content = "".join(part.text for part in content)
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


def _usage(request: EngineRequest, choices: list[Choice]) -> dict[str, int]:
    prompt, completion = len(request.prompt_ids), sum(choice.completion_tokens for choice in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _sse_error(message: str) -> str:
    """A stream cannot change its 200 status any more: the failure goes out as an error event (as vLLM sends it)."""
    return _sse({"error": {"message": f"the engine failed while serving this request: {message}", "type": "server_error",
                           "param": None, "code": None}})


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        server.engine.stop()

    app = FastAPI(title="qwen-engine", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.message, err.kind, err.param, err.code, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        first = problems[0] if problems else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else str(first.get("msg", "invalid request"))
        return error_response(400, message, param=where or None, code=first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), "not_found_error" if err.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(err).__name__}: {err}", "server_error")

    @app.get("/health")
    async def health() -> Response:
        alive = server.engine.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": server.name, "object": "model", "created": server.created, "owned_by": "qwen-engine",
                "max_model_len": server.model.config.context_length}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await server.chat(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await server.completion(body, request)

    app.add_middleware(Gate, server=server)
    return app


class Gate:
    """Checks the API key on /v1/ and counts responses by path and status. Plain ASGI: Starlette's BaseHTTPMiddleware
    would hide client disconnects from the endpoints, and a request whose client left must be aborted."""

    PATHS = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}

    def __init__(self, app: Any, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counted(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope["path"]
        try:
            if path.startswith("/v1/"):
                headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
                self.server.check_auth(headers.get("authorization", ""))
            await self.app(scope, receive, counted)
        except ApiError as err:
            await error_response(err.status, err.message, err.kind, err.param, err.code, err.headers)(scope, receive, counted)
        finally:
            self.server.metrics.http.labels(path if path in self.PATHS else "other", str(status)).inc()
