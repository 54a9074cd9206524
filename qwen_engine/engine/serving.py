"""The engine (nano-vllm's LLMEngine): every request, from the library, the CLI or the server, runs here.

`step()` = schedule → run → postprocess. The scheduler picks the step's prompt chunks and decoding sequences; the
model runner computes them (the chunks together in one forward, all decoding sequences in another: the fused
native step where the model has one); postprocessing samples, detokenizes and decides which sequences end. Every
operation treats tokens (rows) independently, attention runs per sequence and chunk boundaries depend on the
sequence alone, so a sequence's tokens come out the same whether it ran alone or beside others. `run_forever()`
(or `start()`, on a background thread) runs steps for the HTTP server; `add` and `abort` may then be called from
any thread, and results come back through each request's callback, on the engine's thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import QwenError
from ..prompt import Prompt
from ..results import TokenLogprob
from ..runtime import DEFAULT_PREFILL_TOKENS
from ..sampling_params import SamplingParams
from ..tokenizer import IncrementalDecoder, Tokenizer
from .paged import BlockAllocator
from .runner import ModelRunner
from .scheduler import Scheduler, Step
from .sequence import Sequence, Status
from .text import StopStringFilter

log = logging.getLogger("qwen_engine.serving")


@dataclass(slots=True)
class Event:
    """What one step produced for one sequence: a token and the text it released, or the end."""

    request_id: str
    index: int
    token_id: int | None
    text: str
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # with finish_reason "error": what failed (the engine, not the request)
    logits: torch.Tensor | None = None  # float32 [V] that the token was picked from (with Request.keep_logits)


@dataclass
class Request:
    request_id: str
    prompt: Prompt | list[int]  # token ids alone are a text prompt
    params: SamplingParams
    n: int = 1
    logprobs: int | None = None  # how many alternatives to report per token (0: the chosen token only)
    constraint: Callable[[], object] | None = None  # makes a per-sequence token filter (engine/constrained.py)
    logit_bias: dict[int, float] | None = None  # added to the logits before sampling (OpenAI's logit_bias)
    forced: list[int] | None = None  # outputs taken instead of sampled, as far as they go (scoring a given text)
    keep_logits: bool = False  # every event carries the logits its token came from
    on_event: Callable[[Event], None] | None = None
    arrived: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, Prompt):
            self.prompt = Prompt(list(self.prompt))

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompt.token_ids


@dataclass
class _SequenceState:
    request: Request
    decoder: IncrementalDecoder
    stops: StopStringFilter
    stop_ids: frozenset[int]  # tokens that end the output


class ServingEngine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, stop_token_ids: frozenset[int], *,
                 max_seqs: int = 32, prefill_tokens: int = DEFAULT_PREFILL_TOKENS) -> None:
        if runner.num_blocks < 2:
            raise QwenError(f"the KV cache holds {runner.num_blocks} blocks; give it enough for at least a few "
                            "sequences (--kv-cache-gb)")
        if prefill_tokens < 1 or max_seqs < 1:
            raise QwenError(f"prefill tokens and sequences per step must be ≥ 1 (got {prefill_tokens}, {max_seqs})")
        self.runner = runner
        self.tokenizer = tokenizer
        self.stop_token_ids = stop_token_ids
        self.context_length = runner.config.context_length
        self._allocator = BlockAllocator(runner.num_blocks)
        self._scheduler = Scheduler(self._allocator, max_seqs=max_seqs, prefill_tokens=prefill_tokens)
        self._by_request: dict[str, list[Sequence]] = {}
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None  # the thread whose loop owns the engine's state
        self._background: threading.Thread | None = None
        self._stopping = False
        self.on_step: Callable[[Step, float], None] | None = None  # metrics hook: the step and its seconds

    @property
    def max_seqs(self) -> int:
        return self._scheduler.max_seqs

    @property
    def capacity_tokens(self) -> int:
        return self._allocator.num_blocks * self._allocator.block_size

    @property
    def longest_sequence(self) -> int:
        """The most tokens (prompt plus output) a request may ask for: what `check` accepts."""
        return min(self.context_length, self.capacity_tokens - self._allocator.block_size)

    def stats(self) -> dict[str, int]:
        """Sequences waiting and running, KV blocks free, used and in all, and the tokens the cache holds."""
        return self._scheduler.stats()

    # ---- requests -------------------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request (any thread). Raises QwenError when it can never run."""
        self.check(request)
        self._send("add", request)

    def check(self, request: Request) -> None:
        """Raise QwenError when the request can never run here (no prompt, ids outside the vocabulary, media no
        encoder reads, too long for the context or the KV cache)."""
        ids, vocab = request.prompt_ids, self.runner.config.vocab_size
        if not ids:
            raise QwenError("the prompt is empty; give at least one token of text")
        if min(ids) < 0 or max(ids) >= vocab:
            raise QwenError(f"prompt token ids must lie in [0, {vocab})")
        for item in request.prompt.items:
            if item.kind not in self.runner.encoders:
                raise QwenError(f"this model has no {item.kind} encoder; give {item.kind} input to a checkpoint "
                                "that reads it")
        needed = len(ids) + request.params.max_tokens
        if needed > self.context_length:
            raise QwenError(f"the prompt ({len(ids)} tokens) plus max_tokens ({request.params.max_tokens}) exceed the "
                            f"model's context of {self.context_length}; shorten the prompt or lower max_tokens")
        if needed + self._allocator.block_size > self.capacity_tokens:
            raise QwenError(f"the prompt plus max_tokens ({needed}) exceed the KV cache ({self.capacity_tokens} "
                            "tokens); lower max_tokens or give the cache more memory (--kv-cache-gb)")

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks (any thread)."""
        self._send("abort", request_id)

    def _send(self, command: str, payload: object) -> None:
        """Carry out a command now when no loop owns the engine, else hand it to the loop's thread (it owns the state)."""
        if self._thread is None:
            self._enqueue(payload) if command == "add" else self._abort(payload)
        else:
            self._inbox.put((command, payload))
            self._wake.set()

    def _enqueue(self, request: Request) -> None:
        bias = None
        if request.logit_bias:
            bias = torch.tensor(list(request.logit_bias)), torch.tensor(list(request.logit_bias.values()))
        runner, rotary = self.runner, self.runner.rotary_choice(request.prompt)
        sequences = []
        for index in range(request.n):
            params = request.params
            if params.seed is not None and index:
                params = params.updated(seed=params.seed + index)
            seq = Sequence(request.prompt, params, runner.sampler(params, request.prompt), rotary, request.request_id,
                           index, bias, request.constraint() if request.constraint else None, request.forced)
            seq.state = _SequenceState(request, IncrementalDecoder(self.tokenizer), StopStringFilter(params.stop),
                                       params.stop_ids(self.stop_token_ids))
            sequences.append(seq)
            self._scheduler.add(seq)
        self._by_request[request.request_id] = sequences

    def _abort(self, request_id: str) -> None:
        for seq in self._by_request.pop(request_id, []):
            if seq.status is not Status.FINISHED:
                self._scheduler.abort(seq)

    # ---- stepping -------------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self._scheduler.has_work()

    def step(self) -> list[Event]:
        started = time.perf_counter()
        step = self._scheduler.schedule()
        events: list[tuple[Sequence, Event]] = []
        try:
            self._run(step, events)
        finally:  # what finished before a failure still reaches its client
            for seq, event in events:
                if event.finish_reason is not None:
                    self._forget_if_done(event.request_id)
                if seq.state.request.on_event is not None:
                    seq.state.request.on_event(event)
        if self.on_step is not None:
            self.on_step(step, time.perf_counter() - started)
        return [event for _, event in events]

    def _run(self, step: Step, events: list[tuple[Sequence, Event]]) -> None:
        if step.prefills:  # every prompt chunk of this step in one forward
            seqs, counts = [seq for seq, _ in step.prefills], [count for _, count in step.prefills]
            completes = [seq.computed + count == len(seq) for seq, count in step.prefills]
            logits = iter(self.runner.run(seqs, counts, completes))
            for seq, count, done in zip(seqs, counts, completes):
                self._scheduler.computed(seq, count)
                if done:
                    events.append((seq, self._append(seq, next(logits))))
        if step.decodes:
            logits = self.runner.run(step.decodes, [1] * len(step.decodes), [True] * len(step.decodes))
            for seq, row in zip(step.decodes, logits):
                self._scheduler.computed(seq, 1)
                events.append((seq, self._append(seq, row)))

    def _append(self, seq: Sequence, logits: torch.Tensor) -> Event:
        """Sample the next token from `logits`, record it and decide whether the sequence ends."""
        state: _SequenceState = seq.state
        request = state.request
        token = self.runner.sample(seq, logits)
        seq.output_ids.append(token)
        logprob = None
        if request.logprobs is not None:
            logprobs = torch.log_softmax(logits, dim=-1)
            top = torch.topk(logprobs, request.logprobs) if request.logprobs else None
            logprob = TokenLogprob(token, float(logprobs[token]),
                                   [] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))
        reason, text, hit = None, "", False
        if token in state.stop_ids:
            reason = "stop"
        else:
            text, hit = state.stops.push(state.decoder.push(token))
            if hit or (seq.constraint is not None and seq.constraint.done):  # a JSON object ends the output
                reason = "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens or len(seq) >= self.context_length:
                reason = "length"
        if reason is not None and not hit:  # the end: release what was held back in case it began a stop string
            tail, _ = state.stops.close(state.decoder.flush())
            text += tail
        if reason is not None:
            self._scheduler.finish(seq, reason)
        return Event(seq.request_id, seq.index, token, text, logprob, reason, len(seq.prompt_ids), len(seq.output_ids),
                     logits=logits if request.keep_logits else None)

    def _forget_if_done(self, request_id: str) -> None:
        sequences = self._by_request.get(request_id, [])
        if all(seq.status is Status.FINISHED for seq in sequences):
            self._by_request.pop(request_id, None)

    # ---- synchronous use --------------------------------------------------------------------------------------
    def run(self, requests: list[Request]) -> dict[str, list[list[Event]]]:
        """Run requests to the end on this thread; each request's events by choice index."""
        results: dict[str, list[list[Event]]] = {r.request_id: [[] for _ in range(r.n)] for r in requests}
        for request in requests:
            self.add(request)
        while self.has_work():
            for event in self.step():
                results[event.request_id][event.index].append(event)
        return results

    # ---- the serving loop --------------------------------------------------------------------------------------
    # Run it on the main thread where possible (`qwen serve` does, with HTTP on another thread): OpenMP parallel
    # regions started from any other thread ran at half speed here (measured: 26.5 against 18.1 ms a decoding step).
    def start(self) -> None:
        """Run the loop on a background thread (tests, embedding in another program)."""
        self._thread = self._background = threading.Thread(target=self.run_forever, name="qwen-engine", daemon=True)
        self._thread.start()

    def own(self) -> None:
        """Make this thread the engine's before `run_forever` starts, so requests that come first are queued for it."""
        self._thread = threading.current_thread()

    def stop(self) -> None:
        """End the loop (any thread); waits for a loop that `start()` began."""
        self._stopping = True
        self._wake.set()
        if self._background is not None and self._background is not threading.current_thread():
            self._background.join()

    def run_forever(self, keep_going: Callable[[], bool] = lambda: True) -> None:
        """Take commands and run steps on this thread until `stop()` or until `keep_going()` turns false."""
        self._thread = threading.current_thread()
        while not self._stopping and keep_going():
            try:
                while True:
                    try:
                        command, payload = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    self._enqueue(payload) if command == "add" else self._abort(payload)
                if not self.has_work():
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self.step()
            except Exception as err:  # a bug must not hang every client: fail the requests in flight, keep serving
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(f"{type(err).__name__}: {err}")

    def _fail_all(self, message: str) -> None:
        for request_id, sequences in list(self._by_request.items()):
            for seq in sequences:
                if seq.status is not Status.FINISHED:
                    self._scheduler.abort(seq, "error")
                    callback = seq.state.request.on_event
                    if callback is not None:
                        callback(Event(request_id, seq.index, None, "", None, "error", len(seq.prompt_ids),
                                       len(seq.output_ids), error=message))
            self._by_request.pop(request_id, None)

    @property
    def alive(self) -> bool:
        """The loop runs (or none was started: the engine is driven by `step()` directly), and the runner can run
        forwards (a tensor-parallel rank may be gone)."""
        looping = self._thread is None or (self._thread.is_alive() and not self._stopping)
        return looping and self.runner.alive
