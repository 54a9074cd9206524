"""The library API: `load()` a checkpoint and get a `Model` that tokenizes, scores, generates and chats."""

from __future__ import annotations

import atexit
import ctypes
import itertools
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from .chat import ChatFormat, Message
from .audio import LoadedAudio, audio_items, encoder_frames, log_mel
from .checkpoint import AUDIO_PREFIX, VISION_PREFIX, Checkpoint, ModelInfo, open_checkpoint
from .engine.constrained import JsonObjectConstraint, token_texts
from .engine.paged import BLOCK_SIZE, block_bytes
from .engine.runner import ModelRunner, Step, run_step
from .engine.serving import Request, ServingEngine
from .errors import QwenError
from .runtime import DEFAULT_PREFILL_TOKENS, QUANT_CHOICES
from .grounding import read_boxes
from .images import image_items, pixels
from .kernels import cpu_kernels
from .model.decoder import QwenDecoder
from .model.fused import FusedDecodeStep
from .model.quantized import (
    CONVERTER_ID,
    StoredEmbedding,
    input_groups,
    keep_partial_sums,
    place_quantized,
    quant_plan,
    quantize_modules,
    read_as_stored,
)
from .model.audio import AudioEncoder
from .model.parallel import TensorParallel
from .model.vision import VisionTower
from .prompt import MediaItem, Prompt
from .results import Completion, Delta, GenerationResult
from .sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from .sharding import RankSlices, check_split
from .tokenizer import Tokenizer
from .weights.converted import converted_path, load_converted, save_converted

if TYPE_CHECKING:
    from .distributed import LaunchedRanks, LocalRanks

# Tokens that end a turn in every Qwen chat format, whatever the checkpoint declares as eos (qwen-family.md §1.7,
# §8.2): v1's chat stop words are <|im_end|> and <|im_start|>.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")

# Chosen by measurement (benchmarks/RESULTS.md): the fastest format whose perplexity stays within 1% of float32.
DEFAULT_CPU_QUANT = "auto"

ENCODER_CACHE_ITEMS = 16  # encoder outputs kept by digest (a Qwen-VL image's: 256 × 4096 bfloat16, 2 MB)

DEFAULT_KV_SHARE = 0.3  # of the memory available at start: the most a server's KV cache takes by default

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def keep_temporaries_in_heap() -> None:
    """Have glibc serve large allocations from its heap and keep freed ones there.

    Prefill allocates temporaries of several MB a layer. By default glibc maps each one fresh and faults it in page
    by page until its adaptive threshold catches up, which cost a first 660-token prefill ~30% of its time here;
    from the heap, the first prefill runs as fast as later ones. Peak memory is the same; it is just not handed back
    between calls. No-op where the C library has no mallopt.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):
        pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise QwenError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise QwenError("device cuda was asked for but PyTorch sees no CUDA GPU; install a CUDA build of torch or use --device cpu")
    return chosen


def pick_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        # bfloat16 halves memory traffic; float32 stays available as the exact reference path.
        return torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise QwenError(f"unknown dtype {dtype!r}: use {', '.join(DTYPES)}")
    return DTYPES[dtype]


def pick_quant(quant: str | None, dtype: torch.dtype, device: torch.device) -> str:
    if quant is None:
        # The packed kernels are CPU kernels computing in bfloat16; an explicit float32/float16 asks for that dtype.
        return DEFAULT_CPU_QUANT if device.type == "cpu" and dtype == torch.bfloat16 else "none"
    if quant not in QUANT_CHOICES:
        raise QwenError(f"unknown quant {quant!r}: use {', '.join(QUANT_CHOICES)}")
    if quant != "none" and device.type != "cpu":
        raise QwenError(f"quant {quant} runs on the CPU only for now; use --quant none on {device.type}")
    return quant


class Model:
    """A loaded checkpoint: config, tokenizer, chat format, decoder and generation defaults.

    Every generation runs on the engine (engine/serving.py): a call gets an engine sized for its own request, on
    the calling thread, so calls from several threads at once are safe (their steps take turns on the decoder);
    `serving_engine` makes the long-lived one `qwen serve` runs.
    """

    def __init__(
        self,
        decoder: QwenDecoder,
        tokenizer: Tokenizer,
        chat_template: ChatFormat,
        defaults: SamplingParams,
        info: ModelInfo,
        quant: str,
        load_s: float,
        vision: VisionTower | None = None,
        audio: AudioEncoder | None = None,
        ranks: LocalRanks | LaunchedRanks | None = None,
    ) -> None:
        self.decoder = decoder
        self.config = decoder.config
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.defaults = defaults
        self.info = info
        self.quant = quant  # runtime weight format of the projections
        self.load_s = load_s
        stop_ids = set(decoder.config.eos_token_ids)
        stop_ids.update(i for i in map(tokenizer.token_to_id, END_OF_TURN_TOKENS) if i is not None)
        self.stop_token_ids = frozenset(stop_ids)
        self.vision = vision  # Qwen-VL's visual tower: image items' encoder
        self.audio = audio  # Qwen-Audio's encoder: audio items'
        self._encoders = {kind: encode for kind, encode, module in (("image", self._encode_image, vision),
                                                                     ("audio", self._encode_audio, audio)) if module is not None}
        self._encoded: OrderedDict[tuple[str, bytes], torch.Tensor] = OrderedDict()  # see _encode
        self._compute = threading.Lock()  # one forward at a time on this decoder, whichever engine asks
        self._ranks = ranks  # the other tensor-parallel ranks (distributed.py), or None
        if ranks is not None:
            atexit.register(ranks.close)

    def close(self) -> None:
        """Stop the tensor-parallel workers (also done at exit); a model on one process holds nothing to close."""
        if self._ranks is not None:
            self._ranks.close()

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.dtype

    @cached_property
    def token_texts(self) -> list[str | bytes | None]:
        """Every token's text for the JSON constraint, built on the first request that needs it."""
        return token_texts(self.tokenizer.token_bytes, self.tokenizer.control_ids)

    # ---- engines ------------------------------------------------------------------------------------------
    def runner(self, num_blocks: int) -> ModelRunner:
        """A model runner over a KV cache of `num_blocks` blocks (touched only as they are used)."""
        encoders = {kind: self._encode for kind in self._encoders}
        runner = ModelRunner(self.decoder, num_blocks, encoders=encoders, lock=self._compute, ranks=self._ranks)
        if self._ranks is not None:  # the workers free their copy of its cache once it is gone
            weakref.finalize(runner, self._ranks.drop, runner.cache_id)
        return runner

    def _encode(self, item: MediaItem) -> torch.Tensor:
        """The item's encoder output, from a small LRU keyed by its digest: an image sent again (a conversation's
        next turn, the same picture in another request) skips its encoder. Called under the compute lock."""
        key = (item.kind, item.digest)
        if key in self._encoded:
            self._encoded.move_to_end(key)
            return self._encoded[key]
        embedding = self._encoders[item.kind](item)
        self._encoded[key] = embedding
        if len(self._encoded) > ENCODER_CACHE_ITEMS:
            self._encoded.popitem(last=False)
        return embedding

    def _encode_image(self, item: MediaItem) -> torch.Tensor:
        """An image item's 256 vectors (its payload is the LoadedImage; preprocessed as the original does)."""
        return self.vision(pixels(item.payload.image)[None].to(self.vision.proj.device))[0]

    def _encode_audio(self, item: MediaItem) -> torch.Tensor:
        """An audio item's span vectors: its own log-mel (each clip alone, so the output depends on the clip only and
        can be kept by digest; qwen-family.md §7.5 says how the original's batching differs), then the encoder."""
        clip = item.payload
        return self.audio(log_mel(clip.samples).to(self.audio.proj.weight.device), encoder_frames(len(clip.samples))[0])

    def serving_engine(self, *, kv_cache_gb: float | None = None, num_blocks: int | None = None, max_seqs: int = 32,
                       prefill_tokens: int | None = None) -> ServingEngine:
        """The engine `qwen serve` runs. Its KV cache takes `kv_cache_gb` (or `num_blocks` blocks), by default what
        `max_seqs` sequences of the full context need, at most 30% of the memory available now; prompts go in
        chunks of `prefill_tokens` (by default the library's, so both give the same text)."""
        if num_blocks is None:
            per_block = block_bytes(self.config, self.dtype)
            full = max_seqs * -(-self.config.context_length // BLOCK_SIZE) * per_block
            budget = kv_cache_gb * 2**30 if kv_cache_gb is not None else min(DEFAULT_KV_SHARE * available_memory(), full)
            num_blocks = int(budget // per_block)
        return ServingEngine(self.runner(num_blocks), self.tokenizer, self.stop_token_ids, max_seqs=max_seqs,
                             prefill_tokens=prefill_tokens or DEFAULT_PREFILL_TOKENS)

    def _engine_for(self, request: Request) -> ServingEngine:
        """An engine with blocks for this request's sequences at their longest and nothing more."""
        tokens = len(request.prompt_ids) + request.params.max_tokens + 1
        blocks = request.n * -(-tokens // BLOCK_SIZE) + 1
        return ServingEngine(self.runner(blocks), self.tokenizer, self.stop_token_ids, max_seqs=request.n)

    # ---- scoring ------------------------------------------------------------------------------------------
    def logits(self, prompt: str | list[int] | Prompt, *, special: bool = True) -> torch.Tensor:
        """Float32 logits [len(ids), V] from one full forward pass without a cache. A string is encoded as `request`
        encodes one (Qwen-VL's `<img>PATH</img>` list format included: the image's vectors replace the embeddings
        between the tags, qwen-family.md §6.4)."""
        prompt = self._prompt(prompt, special)
        if not prompt.token_ids:
            raise QwenError("logits() needs at least one token")
        with self._compute, torch.inference_mode():
            step = Step(prompt.token_ids, media=[(item.offset, self._encode(item)) for item in prompt.items])
            return run_step(self.decoder, None, step, self._ranks)

    def stepwise_logits(self, ids: list[int], prefill: int) -> torch.Tensor:
        """Float32 logits [len(ids), V] computed the way generation computes them: the first `prefill` ids as a
        prompt, then one decoding step per later id (the fused decode path where it applies), on the engine.
        Rows before prefill − 1 are not computed (zeros), nor the last one where the ids fill the whole context
        (it would predict a token past its end, which no decoding step computes)."""
        if not 0 < prefill <= len(ids):
            raise QwenError(f"stepwise_logits needs 0 < prefill ≤ {len(ids)} (got {prefill})")
        steps = len(ids) - prefill + (len(ids) < self.config.context_length)  # the last row's step where it fits
        if not steps:
            raise QwenError("stepwise_logits of ids that fill the whole context computes no row; give prefill < len(ids)")
        params = SamplingParams(max_tokens=steps, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
        request = Request("stepwise", ids[:prefill], params, forced=ids[prefill:], keep_logits=True)
        out = torch.zeros(len(ids), self.config.vocab_size)
        events = self._engine_for(request).run([request])["stepwise"][0]
        for position, event in enumerate(events, start=prefill - 1):
            out[position] = event.logits
        return out

    # ---- generation ---------------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> Prompt:
        """A conversation in the checkpoint's chat format, ready for the assistant's reply (contents are text or
        lists of content parts)."""
        return self.chat_template.prompt(messages, self.tokenizer, tools)

    def request(self, prompt: str | list[int] | Prompt, *, special: bool = True, n: int = 1,
                logprobs: bool | int | None = None, top_logprobs: int | None = None,
                logit_bias: dict[int, float] | None = None, response_format: dict[str, Any] | None = None,
                **sampling: Any) -> Request:
        """The engine request for a prompt and options. A raw string prompt is encoded with its control tokens
        (`<|im_start|>` …) parsed, as transformers, vLLM and llama.cpp do; `special=False` keeps every character as
        text. A `max_tokens` not given is what the context leaves, at most the default's."""
        prompt = self._prompt(prompt, special)
        if sampling.get("max_tokens") is None:
            room = self.config.context_length - len(prompt)
            sampling["max_tokens"] = max(1, min(self.defaults.max_tokens, room))
        params = self.defaults.updated(**sampling)
        if not isinstance(n, int) or n < 1:
            raise QwenError(f"n must be an integer ≥ 1 (got {n!r})")
        top = top_logprobs if top_logprobs is not None else (logprobs if type(logprobs) is int else 0)
        if not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise QwenError(f"top_logprobs must be an integer in 0…{MAX_TOP_LOGPROBS} (got {top!r})")
        if logit_bias is not None and any(not 0 <= int(token) < self.config.vocab_size for token in logit_bias):
            raise QwenError(f"logit_bias keys must be token ids in [0, {self.config.vocab_size})")
        constraint = None
        if response_format is not None:
            kind = response_format.get("type") if isinstance(response_format, dict) else None
            if kind == "json_object":
                constraint = partial(JsonObjectConstraint, self.token_texts)
            elif kind != "text":
                raise QwenError(f"response_format must be {{'type': 'json_object'}} or {{'type': 'text'}} (got {response_format!r})")
        bias = None if logit_bias is None else {int(token): float(value) for token, value in logit_bias.items()}
        wants_logprobs = (logprobs is not None and logprobs is not False) or top_logprobs is not None
        return Request(f"call-{next(_calls)}", prompt, params, n=n, logprobs=top if wants_logprobs else None,
                       constraint=constraint, logit_bias=bias)

    def _prompt(self, prompt: str | list[int] | Prompt, special: bool) -> Prompt:
        """A raw prompt as the engine takes it: a string encoded (with `special`, the list formats' `<img>` and
        `<audio>` spans load their images and clips), ids as they are."""
        if isinstance(prompt, Prompt):
            return prompt
        if not isinstance(prompt, str):
            return Prompt(list(prompt))
        clips: list[LoadedAudio] = []
        ids = self.tokenizer.encode(prompt, special=special, audio=clips)
        vision, audio = self.config.vision, self.config.audio
        items = image_items(ids, vision.image_start_id) if vision is not None and special else []
        if audio is not None and clips:
            items += audio_items(ids, audio.audio_start_id, clips)
        return Prompt(ids, items)

    def stream_deltas(self, prompt: str | list[int] | Prompt, result: GenerationResult | None = None,
                      **options: Any) -> Iterator[Delta]:
        """Token-by-token deltas of choice 0 (with n > 1 the others are collected in `result` as they come); pass a
        `GenerationResult` to collect ids, counts, finish reasons, logprobs and timings. Options: those of
        `request`."""
        called = time.perf_counter()
        request = self.request(prompt, **options)
        engine = self._engine_for(request)
        engine.add(request)  # checks it first: a bad request fails here, before the first delta
        result = GenerationResult() if result is None else result
        return self._deltas(engine, request, result, called)

    def _deltas(self, engine: ServingEngine, request: Request, result: GenerationResult, called: float) -> Iterator[Delta]:
        result.prompt_tokens = len(request.prompt_ids)
        result.choices = [Completion(logprobs=None if request.logprobs is None else []) for _ in range(request.n)]
        timings, first_at = result.timings, None
        started = time.perf_counter()
        try:
            while engine.has_work():
                for event in engine.step():
                    choice = result.choices[event.index]
                    if event.token_id is not None:
                        choice.token_ids.append(event.token_id)
                        if event.logprob is not None:
                            choice.logprobs.append(event.logprob)
                        now = time.perf_counter()
                        if first_at is None:
                            first_at = now
                            timings.ttft_s, timings.prefill_s = now - called, now - started
                        elif event.index == 0:
                            timings.decode_s, timings.decode_tokens = now - first_at, len(choice.token_ids) - 1
                    choice.text += event.text
                    if event.finish_reason is not None:
                        choice.finish_reason = event.finish_reason
                    if event.index == 0 and (event.text or event.token_id is not None):
                        yield Delta(-1 if event.token_id is None else event.token_id, event.text)
            images = [item.payload for item in request.prompt.items if item.kind == "image"]
            if images:  # Qwen-VL's grounding, in the pixels of the prompt's last image (§6.4)
                for choice in result.choices:
                    choice.boxes = read_boxes(choice.text, images[-1].size)
        finally:  # a consumer that stops early frees the engine's sequences
            engine.abort(request.request_id)

    def stream(self, prompt: str | list[int] | Prompt, **options: Any) -> Iterator[str]:
        """Text pieces as they are generated (of one choice: n > 1 is for `generate`)."""
        if options.get("n", 1) != 1:
            raise QwenError("stream() yields one choice; use generate(…, n=…) for several")
        return (delta.text for delta in self.stream_deltas(prompt, **options) if delta.text)

    def generate(self, prompt: str | list[int] | Prompt, **options: Any) -> GenerationResult:
        """Complete a prompt (no chat template). Options: sampling (`max_tokens`, `temperature`, `top_p`, …, `seed`,
        `stop`), `n`, `logprobs`/`top_logprobs`, `logit_bias`, `response_format={"type": "json_object"}` and
        `special`."""
        result = GenerationResult()
        for _ in self.stream_deltas(prompt, result, **options):
            pass
        return result

    def chat(self, messages: list[Message], tools: list[dict[str, Any]] | None = None, **options: Any) -> GenerationResult:
        """The assistant's reply to a conversation, through the checkpoint's chat template."""
        return self.generate(self.chat_prompt(messages, tools), **options)


_calls = itertools.count()


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def load(
    model: str | Path = "default",
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    quant: str | None = None,
    rope_scaling: str | None = None,
    progress: bool = False,
    tensor_parallel: int = 1,
) -> Model:
    """Load `model`: "default", a GGUF file, or an HF checkpoint directory.

    `tensor_parallel=N` splits the decoder over N processes on this machine (this one is rank 0; sharding.py says
    how), joined by torch.distributed (gloo on the CPU, NCCL with one GPU a rank), in any `quant`: each rank cuts
    its part of every tensor as it reads it, before any conversion.

    `quant` picks the runtime weight format: "none" (the dtype itself), "int8", "int4", "q8_0" or "auto" (GGUF's
    Q5_0/Q8_0 blocks kept as stored, 8-bit blocks elsewhere; see `quant_plan`); the CPU default is measured in
    benchmarks/.
    `rope_scaling` ("yarn:4", …) extends the context of a qwen2-family checkpoint whose config lacks it.
    """
    started = time.perf_counter()
    chosen_device = pick_device(device)
    chosen_dtype = pick_dtype(dtype)
    chosen_quant = pick_quant(quant, chosen_dtype, chosen_device)
    checkpoint = open_checkpoint(model, progress=progress, rope_scaling=rope_scaling)
    tokenizer = checkpoint.tokenizer()
    ranks = None
    if not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise QwenError(f"tensor_parallel must be an integer ≥ 1 (got {tensor_parallel!r})")
    if tensor_parallel > 1:
        from .distributed import join_launched, launched, rank_device, rank_threads, spawn

        check_split(checkpoint.config, tensor_parallel, *input_groups(chosen_quant))
        load_rank = partial(_load_rank, str(checkpoint.path), rope_scaling, chosen_dtype, chosen_quant)
        if launched() is not None:  # torchrun's processes, on this machine or several
            ranks, parallel = join_launched(tensor_parallel, chosen_device, load_rank)
        else:
            torch.set_num_threads(rank_threads(tensor_parallel))
            ranks, parallel = spawn(tensor_parallel, chosen_device, load_rank)
        try:
            decoder = load_decoder(checkpoint, chosen_dtype, rank_device(chosen_device, 0), chosen_quant, progress, parallel)
        except BaseException:
            ranks.close()
            raise
    else:
        decoder = load_decoder(checkpoint, chosen_dtype, chosen_device, chosen_quant, progress)
    config = checkpoint.config
    vision = _load_encoder(checkpoint, VisionTower, config.vision, VISION_PREFIX, chosen_dtype, chosen_device)
    audio = _load_encoder(checkpoint, AudioEncoder, config.audio, AUDIO_PREFIX, chosen_dtype, chosen_device)
    if chosen_device.type == "cpu":
        keep_temporaries_in_heap()
    return Model(
        decoder,
        tokenizer,
        checkpoint.chat_template(tokenizer),
        checkpoint.sampling_defaults(),
        checkpoint.info(),
        chosen_quant,
        time.perf_counter() - started,
        vision,
        audio,
        ranks,
    )


def _load_rank(path: str, rope_scaling: str | None, dtype: torch.dtype, quant: str, parallel: TensorParallel,
               device: torch.device) -> QwenDecoder:
    """A worker rank's shard (distributed.py runs this in the worker's process)."""
    return load_decoder(open_checkpoint(path, rope_scaling=rope_scaling), dtype, device, quant, False, parallel)


def load_decoder(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device, quant: str, progress: bool = False,
                 parallel: TensorParallel | None = None) -> QwenDecoder:
    """The checkpoint's decoder in `quant` (converted weights cached for the CPU formats), or under tensor
    parallelism (`parallel`) one rank's shard of it: each tensor is cut as it is read, before any conversion."""
    with torch.device("meta"):
        decoder = QwenDecoder(checkpoint.config, parallel)
    slices = None if parallel is None else RankSlices(checkpoint.config, parallel.size, parallel.rank)
    cache = None  # converted weights are cached for the CPU formats (pick_quant allows them there only)
    if quant != "none":
        # "auto" resolves differently where the block kernel cannot run, so that is part of the key.
        fmt = quant if cpu_kernels() else f"{quant}-no-kernel"
        if parallel is not None:
            fmt += f"-tp{parallel.size}-rank{parallel.rank}"
        cache = converted_path(checkpoint.path, checkpoint.fingerprint(), dtype, fmt, CONVERTER_ID)
    # An untied embedding table can stay in the file (CPU formats): lookups read their rows from it.
    rows = None
    if quant != "none" and not checkpoint.config.tie_word_embeddings:
        rows = checkpoint.stored_rows("model.embed_tokens.weight", slices)
    cached = load_converted(cache) if cache else None
    if cached:
        state, plan = cached
        place_quantized(decoder, plan, state)
        if rows is not None:
            decoder.model.embed_tokens = StoredEmbedding(rows, dtype)
        decoder.adopt_state(state)
    else:
        # Planned on the shapes alone, so that tensors the formats take from the file as stored (blocks kept bit for
        # bit, an embedding read by rows) are never dequantized: the first start then peaks near the final size.
        stored_types = checkpoint.stored_types()
        plan = quant_plan(decoder, quant, stored_types)
        placeholders = read_as_stored(plan, stored_types)
        if rows is not None:
            plan.pop("model.embed_tokens", None)
            placeholders |= {"model.embed_tokens.weight"}
        bar = partial(tqdm, desc=f"loading {checkpoint.path.name}", unit="tensor", disable=not progress, leave=False)
        tensors = checkpoint.tensors(dtype, device, bar, placeholders, slices)
        decoder.load_weights(tensors, source=str(checkpoint.path))
        del tensors
        if rows is not None:
            decoder.model.embed_tokens = StoredEmbedding(rows, dtype)
        quantize_modules(decoder, plan, partial(checkpoint.stored_blocks, shard=slices))
        if cache:
            save_converted(cache, decoder.state_dict(), plan)
    if parallel is not None:
        keep_partial_sums(decoder)
    decoder.eval()
    decoder.fused_decode = FusedDecodeStep.build(decoder)
    return decoder


def _load_encoder(checkpoint: Checkpoint, module: type[torch.nn.Module], config: Any, prefix: str, dtype: torch.dtype,
                  device: torch.device) -> Any:
    """A multimodal checkpoint's encoder (None where its config has none), in the compute dtype."""
    if config is None:
        return None
    with torch.device("meta"):
        encoder = module(config)
    try:
        encoder.load_state_dict(checkpoint.encoder_tensors(prefix, dtype, device), assign=True)
    except RuntimeError as err:  # names or shapes that are not the encoder's
        raise QwenError(f"{checkpoint.path}: the {prefix}* tensors do not match the config ({str(err)[:300]})") from None
    return encoder.eval()
