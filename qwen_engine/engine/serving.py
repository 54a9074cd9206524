"""The serving engine: many sequences at once over a paged KV cache (nano-vllm's LLMEngine).

`step()` = schedule → run → postprocess. The step's prompt chunks run together in one forward and all decoding
sequences together in another (the fused native step where the model has one); every operation treats tokens
(rows) independently and attention runs per sequence, so a sequence's tokens come out the same whether it ran alone
or beside others. `run_forever()` (or `start()`, on a background thread) runs steps for the HTTP server; `add` and
`abort` may then be called from any thread, and results come back through each request's callback, on the
engine's thread.
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
from ..llm import Model
from ..tokenizer import IncrementalDecoder
from .generate import StopStringFilter
from .paged import BlockAllocator, PagedBatch, PagedKVCache, block_bytes
from .sampling import Sampler, SamplingParams
from .scheduler import Scheduler, Sequence, Status, Step

log = logging.getLogger("qwen_engine.serving")
DEFAULT_KV_SHARE = 0.3  # of the memory available at start, when no KV budget is given


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this step and their log-probabilities


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


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    n: int = 1
    logprobs: int | None = None  # how many alternatives to report per token (0: the chosen token only)
    constraint: Callable[[], object] | None = None  # makes a per-sequence token filter (engine/constrained.py)
    logit_bias: dict[int, float] | None = None  # added to the logits before sampling (OpenAI's logit_bias)
    on_event: Callable[[Event], None] | None = None
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class _SequenceState:
    request: Request
    decoder: IncrementalDecoder
    stops: StopStringFilter
    constraint: object | None
    stop_ids: frozenset[int]  # tokens that end the output
    bias: tuple[torch.Tensor, torch.Tensor] | None  # the request's logit_bias as (token ids, values)


class ServingEngine:
    def __init__(self, model: Model, *, kv_cache_gb: float | None = None, num_blocks: int | None = None,
                 max_seqs: int = 32, prefill_tokens: int = 256) -> None:
        self.model = model
        self.decoder = model.decoder
        per_block = block_bytes(model.config, model.dtype)
        if num_blocks is None:
            budget = kv_cache_gb * 2**30 if kv_cache_gb is not None else DEFAULT_KV_SHARE * _available_memory()
            num_blocks = int(budget // per_block)
        if num_blocks < 2:
            raise QwenError(f"the KV cache budget holds {num_blocks} blocks of {per_block / 2**20:.1f} MiB; give "
                            "--kv-cache-gb enough for at least a few sequences")
        self.allocator = BlockAllocator(num_blocks)
        self.cache = PagedKVCache(model.config, num_blocks, model.dtype, model.device)
        self.scheduler = Scheduler(self.allocator, max_seqs=max_seqs, prefill_tokens=prefill_tokens)
        self.stop_token_ids = model.stop_token_ids
        self._by_request: dict[str, list[Sequence]] = {}
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None  # the thread whose loop owns the engine's state
        self._background: threading.Thread | None = None
        self._stopping = False
        self.on_step: Callable[[Step, float], None] | None = None  # metrics hook: the step and its seconds

    @property
    def capacity_tokens(self) -> int:
        return self.allocator.num_blocks * self.allocator.block_size

    @property
    def longest_sequence(self) -> int:
        """The most tokens (prompt plus output) a request may ask for: what `check` accepts."""
        fixed = self.decoder.rotary.fixed_frequencies_up_to
        limits = (self.model.config.context_length, self.capacity_tokens - self.allocator.block_size, fixed)
        return min(limit for limit in limits if limit is not None)

    # ---- requests -------------------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request (any thread). Raises QwenError when it can never fit."""
        self.check(request)
        self._send("add", request)

    def check(self, request: Request) -> None:
        """Raise QwenError when the request can never run here (too long for the context or the KV cache)."""
        needed = len(request.prompt_ids) + request.params.max_tokens
        if not request.prompt_ids:
            raise QwenError("the prompt is empty")
        if needed > self.model.config.context_length:
            raise QwenError(f"the prompt ({len(request.prompt_ids)} tokens) plus max_tokens "
                            f"({request.params.max_tokens}) exceed the model's context of {self.model.config.context_length}")
        if needed + self.allocator.block_size > self.capacity_tokens:
            raise QwenError(f"the prompt plus max_tokens ({needed}) exceed the KV cache ({self.capacity_tokens} tokens)")
        fixed = self.decoder.rotary.fixed_frequencies_up_to
        if fixed is not None and needed > fixed:
            raise QwenError(f"this model changes its rotary frequencies past {fixed} tokens (dynamic NTK or YaRN for long "
                            f"prompts), which batched serving does not do yet; keep prompt plus max_tokens within {fixed}")

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
        sequences = []
        bias = None
        if request.logit_bias:
            bias = torch.tensor(list(request.logit_bias)), torch.tensor(list(request.logit_bias.values()))
        for index in range(request.n):
            params = request.params
            if params.seed is not None and index:
                params = params.updated(seed=params.seed + index)
            sampler = Sampler(params, request.prompt_ids, self.model.config.vocab_size, self.model.device)
            seq = Sequence(list(request.prompt_ids), params, sampler, request.request_id, index)
            seq.state = _SequenceState(request, IncrementalDecoder(self.model.tokenizer), StopStringFilter(params.stop),
                                       request.constraint() if request.constraint else None,
                                       params.stop_ids(self.stop_token_ids), bias)
            sequences.append(seq)
            self.scheduler.add(seq)
        self._by_request[request.request_id] = sequences

    def _abort(self, request_id: str) -> None:
        for seq in self._by_request.pop(request_id, []):
            if seq.status is not Status.FINISHED:
                self.scheduler.abort(seq)

    # ---- stepping -------------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Event]:
        started = time.perf_counter()
        step = self.scheduler.schedule()
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
        with torch.inference_mode():
            if step.prefills:  # every prompt chunk of this step in one forward
                seqs, counts = [seq for seq, _ in step.prefills], [count for _, count in step.prefills]
                completes = [seq.computed + count == len(seq) for seq, count in step.prefills]
                logits = iter(self._forward(seqs, counts, completes))
                for seq, count, done in zip(seqs, counts, completes):
                    self.scheduler.computed(seq, count)
                    if done:
                        events.append((seq, self._append(seq, next(logits))))
            if step.decodes:
                logits = self._forward(step.decodes, [1] * len(step.decodes), [True] * len(step.decodes))
                for seq, row in zip(step.decodes, logits):
                    self.scheduler.computed(seq, 1)
                    events.append((seq, self._append(seq, row)))

    def _forward(self, seqs: list[Sequence], counts: list[int], wanted: list[bool]) -> torch.Tensor:
        """Run `counts[i]` tokens of each sequence in one forward; float32 logits at the last token of each sequence
        whose `wanted` is set, in order."""
        tokens = [t for seq, count in zip(seqs, counts) for t in seq.tokens[seq.computed : seq.computed + count]]
        batch = PagedBatch(self.cache, [seq.block_table for seq in seqs], [seq.computed for seq in seqs], counts)
        device = self.model.device
        last = (torch.tensor(counts).cumsum(0) - 1)[torch.tensor(wanted)]
        out = self.decoder(torch.tensor([tokens], device=device), cache=batch, positions=batch.positions().to(device),
                           logits_at=last.to(device))
        return out[0].to(torch.float32)

    def _append(self, seq: Sequence, logits: torch.Tensor) -> Event:
        """Sample the next token from `logits`, record it and decide whether the sequence ends."""
        state: _SequenceState = seq.state
        request = state.request
        steered = logits
        if state.bias is not None:
            steered = logits.clone()
            steered[state.bias[0]] += state.bias[1]
        if state.constraint is not None:
            steered = steered.masked_fill(~state.constraint.allowed(steered), float("-inf"))
        token = seq.sampler(steered)
        seq.output_ids.append(token)
        if state.constraint is not None:
            state.constraint.advance(token)
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
            if hit or (state.constraint is not None and state.constraint.done):  # a JSON object ends the output
                reason = "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens or len(seq) >= self.model.config.context_length:
                reason = "length"
        if reason is not None and not hit:  # the end: release what was held back in case it began a stop string
            tail, _ = state.stops.close(state.decoder.flush())
            text += tail
        if reason is not None:
            self.scheduler.finish(seq, reason)
        return Event(seq.request_id, seq.index, token, text, logprob, reason, len(seq.prompt_ids), len(seq.output_ids))

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
                    self.scheduler.abort(seq, "error")
                    callback = seq.state.request.on_event
                    if callback is not None:
                        callback(Event(request_id, seq.index, None, "", None, "error", len(seq.prompt_ids),
                                       len(seq.output_ids), error=message))
            self._by_request.pop(request_id, None)

    @property
    def alive(self) -> bool:
        """The loop runs (or none was started: the engine is driven by `step()` directly)."""
        return self._thread is None or (self._thread.is_alive() and not self._stopping)


def _available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30
