"""What every endpoint shares: admission (API key, model name, queue room, prompt size), sampling options, and
running one request on the engine into a whole response or a stream.

The engine runs on its own thread and sends each token back through an asyncio queue; a client that disconnects
aborts its request, which frees its KV blocks at the next step. The engine is read only through its public surface
(`check`, `add`, `abort`, `stats`, `max_seqs`, `longest_sequence`, `alive`).
"""

from __future__ import annotations

import asyncio
import hmac
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Iterable
from functools import cached_property
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.serving import Event, Request as EngineRequest, ServingEngine
from ..errors import QwenError
from ..llm import Model
from .errors import ApiError
from .media import MediaPolicy
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest
from .responses import Choice

DISCONNECT_POLL_S = 0.25


class Server:
    def __init__(self, model: Model, engine: ServingEngine, *, name: str, api_key: str | None = None,
                 max_queue: int = 64, max_request_bytes: int, media: MediaPolicy | None = None) -> None:
        self.model, self.engine, self.name = model, engine, name
        self.api_key, self.max_queue, self.max_request_bytes = api_key, max_queue, max_request_bytes
        self.media = media if media is not None else MediaPolicy()
        self.in_flight = 0
        self.metrics = Metrics(engine, lambda: self.in_flight)
        self.created = int(time.time())

    @property
    def input_modalities(self) -> list[str]:
        """What a message may carry to this model (/v1/models says it; the chat page offers attachments by it)."""
        return ["text"] + ["image"] * (self.model.vision is not None) + ["audio"] * (self.model.audio is not None)

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
        if self.in_flight >= self.engine.max_seqs + self.max_queue:
            raise ApiError(429, f"the queue is full ({self.in_flight} requests in flight); retry shortly",
                           "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    @cached_property
    def longest_prompt_text(self) -> int:
        """The most characters (of NFC text, which the tokenizer reads) a prompt can have in the longest sequence the
        engine takes: no token covers more characters than the longest token has bytes."""
        longest_token = max(map(len, self.model.tokenizer.token_bytes))
        return longest_token * self.engine.longest_sequence

    def check_text_fits(self, texts: Iterable[str], param: str) -> None:
        """Refuse texts that need more tokens than any sequence holds, whatever they say, before the tokenizer spends
        seconds and GBs on them (a few ms here). A text counts its characters after NFC, as the tokenizer sees it,
        or as given where that is fewer (NFC may also expand a character), so a prompt that fits is never refused."""
        characters = sum(min(len(text), len(unicodedata.normalize("NFC", text))) for text in texts)
        if characters > self.longest_prompt_text:
            raise ApiError(400, f"the prompt's {characters:,} characters cannot fit in {self.engine.longest_sequence:,} "
                           "tokens (the most a sequence may hold here); shorten it", param=param,
                           code="context_length_exceeded")

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

    def token_bytes(self, token: int) -> bytes:
        """A token's bytes, as logprobs report it (b"" for an id beyond the tokenizer's)."""
        table = self.model.tokenizer.token_bytes
        return table[token] if token < len(table) else b""

    # ---- running a request ---------------------------------------------------------------------------------
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

    async def respond(self, request: EngineRequest, body: ChatCompletionRequest | CompletionRequest, http: Request,
                      whole: Callable[[list[Choice]], dict[str, Any]],
                      stream: Callable[[AsyncIterator[Event], list[Choice]], AsyncIterator[str]]) -> Response:
        """Run the request: `whole(choices)` makes the JSON body once every choice finished, or (with `stream` in
        the body) `stream(events, choices)` the server-sent events as they come."""
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
