"""The library API: `load()` a checkpoint and get a `Model` that tokenizes, scores, generates and chats."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .chat import ChatFormat, Message
from .checkpoint import ModelInfo, open_checkpoint
from .engine.generate import Delta, GenerationResult, Generator
from .engine.kv_cache import StaticKVCache
from .engine.sampling import SamplingParams
from .errors import QwenError
from .model.decoder import QwenDecoder
from .model.fused import FusedDecodeStep
from .kernels import cpu_kernels
from .model.quantized import (
    CONVERTER_ID,
    QUANT_CHOICES,
    StoredEmbedding,
    place_quantized,
    quant_plan,
    quantize_modules,
    read_as_stored,
)
from .tokenizer import Tokenizer
from .weights.converted import converted_path, load_converted, save_converted

# Tokens that end a turn in every Qwen chat format, whatever the checkpoint declares as eos (qwen-family.md §1.7,
# §8.2): v1's chat stop words are <|im_end|> and <|im_start|>.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")

# Chosen by measurement (benchmarks/RESULTS.md): the fastest format whose perplexity stays within 1% of float32.
DEFAULT_CPU_QUANT = "auto"

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
    """A loaded checkpoint: config, tokenizer, chat template, decoder and generation defaults."""

    def __init__(
        self,
        decoder: QwenDecoder,
        tokenizer: Tokenizer,
        chat_template: ChatFormat,
        defaults: SamplingParams,
        info: ModelInfo,
        quant: str,
        load_s: float,
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
        self._generator = Generator(decoder, tokenizer, self.stop_token_ids)

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.dtype

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Float32 logits [len(ids), V] from one full forward pass without a cache."""
        if not ids:
            raise QwenError("logits() needs at least one token id")
        with torch.inference_mode():
            return self.decoder(torch.tensor([ids], device=self.device))[0].to(torch.float32)

    def stepwise_logits(self, ids: list[int], prefill: int) -> torch.Tensor:
        """Float32 logits [len(ids), V] computed the way generation computes them: one prefill of the first `prefill`
        ids, then one decoding step per later id through the KV cache (the fused decode path where it applies).
        Rows before prefill − 1 are not computed (zeros)."""
        if not 0 < prefill <= len(ids):
            raise QwenError(f"stepwise_logits needs 0 < prefill ≤ {len(ids)} (got {prefill})")
        cache = StaticKVCache(self.config, len(ids), self.dtype, self.device)
        out = torch.zeros(len(ids), self.config.vocab_size)
        with torch.inference_mode():
            out[prefill - 1] = self.decoder(torch.tensor([ids[:prefill]], device=self.device), cache=cache, last_only=True)[0, -1]
            for position in range(prefill, len(ids)):
                token = torch.tensor([[ids[position]]], device=self.device)
                out[position] = self.decoder(token, start=position, cache=cache, last_only=True)[0, -1]
        return out

    def chat_prompt(self, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a conversation in the checkpoint's chat format, ready for the assistant's reply."""
        return self.chat_template.prompt_ids(messages, self.tokenizer, tools)

    def stream_deltas(self, prompt: str | list[int], result: GenerationResult | None = None, **sampling: Any) -> Iterator[Delta]:
        """Token-by-token deltas; pass a `GenerationResult` to collect ids, counts, finish reason and timings."""
        params = self.defaults.updated(**sampling)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        result = GenerationResult() if result is None else result
        result.prompt_tokens = len(ids)
        return self._generator.stream(ids, params, result)

    def stream(self, prompt: str | list[int], **sampling: Any) -> Iterator[str]:
        """Text pieces as they are generated."""
        return (delta.text for delta in self.stream_deltas(prompt, **sampling) if delta.text)

    def generate(self, prompt: str | list[int], **sampling: Any) -> GenerationResult:
        """Complete a raw prompt (no chat template)."""
        result = GenerationResult()
        for _ in self.stream_deltas(prompt, result, **sampling):
            pass
        return result

    def chat(self, messages: list[Message], tools: list[dict[str, Any]] | None = None, **sampling: Any) -> GenerationResult:
        """The assistant's reply to a conversation, through the checkpoint's chat template."""
        return self.generate(self.chat_prompt(messages, tools), **sampling)


def load(
    model: str | Path = "default",
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    quant: str | None = None,
    rope_scaling: str | None = None,
    progress: bool = False,
) -> Model:
    """Load `model`: "default", a GGUF file, or an HF checkpoint directory.

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
    with torch.device("meta"):
        decoder = QwenDecoder(checkpoint.config)
    cache = None  # converted weights are cached for the CPU formats (pick_quant allows them there only)
    if chosen_quant != "none":
        # "auto" resolves differently where the block kernel cannot run, so that is part of the key.
        fmt = chosen_quant if cpu_kernels() else f"{chosen_quant}-no-kernel"
        cache = converted_path(checkpoint.path, checkpoint.fingerprint(), chosen_dtype, fmt, CONVERTER_ID)
    # An untied embedding table can stay in the file (CPU formats): lookups read their rows from it.
    rows = None
    if chosen_quant != "none" and not checkpoint.config.tie_word_embeddings:
        rows = checkpoint.stored_rows("model.embed_tokens.weight")
    cached = load_converted(cache) if cache else None
    if cached:
        state, plan = cached
        place_quantized(decoder, plan, state)
        if rows is not None:
            decoder.model.embed_tokens = StoredEmbedding(rows, chosen_dtype)
        decoder.adopt_state(state)
    else:
        # Planned on the shapes alone, so that tensors the formats take from the file as stored (blocks kept bit for
        # bit, an embedding read by rows) are never dequantized: the first start then peaks near the final size.
        stored_types = checkpoint.stored_types()
        plan = quant_plan(decoder, chosen_quant, stored_types)
        placeholders = read_as_stored(plan, stored_types)
        if rows is not None:
            plan.pop("model.embed_tokens", None)
            placeholders |= {"model.embed_tokens.weight"}
        bar = partial(tqdm, desc=f"loading {checkpoint.path.name}", unit="tensor", disable=not progress, leave=False)
        tensors = checkpoint.tensors(chosen_dtype, chosen_device, bar, placeholders)
        decoder.load_weights(tensors, source=str(checkpoint.path))
        del tensors
        if rows is not None:
            decoder.model.embed_tokens = StoredEmbedding(rows, chosen_dtype)
        quantize_modules(decoder, plan, checkpoint.stored_blocks)
        if cache:
            save_converted(cache, decoder.state_dict(), plan)
    decoder.eval()
    decoder.fused_decode = FusedDecodeStep.build(decoder)
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
    )
