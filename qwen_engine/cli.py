"""The `qwen` command: generate, chat and info.

Failures print one line to stderr and exit non-zero; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from .errors import QwenError
from .images import MAX_PIXELS
from .runtime import QUANT_CHOICES
from .results import GenerationResult
from .sampling_params import SamplingParams

STARTED = time.perf_counter()  # for "start to first token" in `qwen bench`
EXIT_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default="default", help="'default', a .gguf file or an HF checkpoint directory")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype (default: bfloat16)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--quant", choices=QUANT_CHOICES,
                        help="weight format (default: auto on CPU — GGUF's Q5_0/Q8_0 blocks as stored, 8-bit blocks "
                             "elsewhere; none with --dtype float32 or on GPU)")
    parser.add_argument("--threads", type=_positive_int, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--tp", type=_positive_int, default=1, metavar="N",
                        help="tensor parallelism over N processes of this machine (one GPU each on CUDA; float "
                             "formats; default 1)")
    _add_rope_scaling(parser)


def _add_rope_scaling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rope-scaling", metavar="yarn:FACTOR[:ORIGINAL][:long]",
                        help="extend the context with YaRN, e.g. yarn:4 for 128K on Qwen2/2.5 7B+ (':long' applies it "
                             "only to prompts longer than the original context)")


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", "-n", type=_positive_int, help="most tokens to generate")
    parser.add_argument("--temperature", "-t", type=float, help="0 for greedy decoding")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--presence-penalty", type=float)
    parser.add_argument("--frequency-penalty", type=float)
    parser.add_argument("--seed", type=int, help="makes sampling reproducible")
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qwen", description="Run Qwen models from their official checkpoints.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    generate = commands.add_parser("generate", help="complete a raw prompt")
    _add_model_options(generate)
    _add_sampling_options(generate)
    generate.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    generate.add_argument("--no-special", dest="special", action="store_false",
                          help="keep control-token markup in the prompt as text (by default <|im_start|> and the "
                               "like are parsed, as transformers, vLLM and llama.cpp read a raw prompt)")
    generate.add_argument("prompt")

    chat = commands.add_parser("chat", help="chat with the model (interactive; /reset, /exit)")
    _add_model_options(chat)
    _add_sampling_options(chat)
    chat.add_argument("--system", "-s", help="system prompt")
    chat.add_argument("--once", metavar="PROMPT", help="answer one message and exit")
    chat.add_argument("--image", action="append", default=[], metavar="PATH",
                      help="an image for the first message (Qwen-VL); repeatable. Interactive: /image PATH adds one "
                           "to the next message")
    chat.add_argument("--audio", action="append", default=[], metavar="PATH",
                      help="an audio clip for the first message (Qwen-Audio: WAV, FLAC, OGG or MP3); repeatable. "
                           "Interactive: /audio PATH adds one to the next message")
    chat.add_argument("--draw-boxes", metavar="PNG", help="write the last image with the reply's grounding boxes drawn")

    transcribe = commands.add_parser("transcribe", help="speech to text with Qwen-Audio (transcribe, translate, caption)")
    _add_model_options(transcribe)
    transcribe.add_argument("file", help="the audio: WAV, FLAC, OGG or MP3, any length (cut into 30 s windows)")
    transcribe.add_argument("--task", choices=("transcribe", "translate", "caption"), default="transcribe")
    transcribe.add_argument("--language", help="the spoken language (en, zh, de, es, ko, fr, ja, it); default: detected")
    transcribe.add_argument("--to", default="en", help="translate: the language to translate to (default en)")
    transcribe.add_argument("--timestamps", action="store_true", help="word timestamps, as segments")
    transcribe.add_argument("--format", choices=("text", "json", "srt", "vtt"), default="text")
    transcribe.add_argument("--output", "-o", metavar="FILE", help="write there (through a temporary name) instead of stdout")

    bench = commands.add_parser("bench", help="measure load, time to first token, prefill and decode speed, peak memory")
    _add_model_options(bench)
    bench.add_argument("--prompt-tokens", type=_positive_int, default=660)
    bench.add_argument("--gen-tokens", type=_positive_int, default=128)
    bench.add_argument("--json", action="store_true")

    perplexity = commands.add_parser("perplexity", help="perplexity of a text file (llama-perplexity's method)")
    _add_model_options(perplexity)
    perplexity.add_argument("--context", type=_positive_int, default=512, help="tokens per chunk (default 512)")
    perplexity.add_argument("--decode-path", action="store_true",
                            help="score every token through a decoding step, as generation computes it (slower)")
    perplexity.add_argument("--max-chunks", type=_positive_int, help="score at most this many chunks")
    perplexity.add_argument("--json", action="store_true")
    perplexity.add_argument("file")

    models = commands.add_parser("models", help="the model catalog: every Qwen model with its size and memory")
    models.add_argument("--json", action="store_true")

    memory = commands.add_parser("memory", help="what a model needs (weights, KV cache, activations) and whether it fits")
    memory.add_argument("model", help="a catalog name (see `qwen models`), an HF checkpoint directory or a .gguf file")
    memory.add_argument("--dtype", default="bf16",
                        help="bf16, fp16, fp32, int8, int4, gptq-int4, gptq-int8, awq (the official GPTQ/AWQ files), "
                             "gguf:<TYPE> or auto (this engine's CPU format; default bf16)")
    memory.add_argument("--context", type=int, help="tokens per sequence (default: the model's full context)")
    memory.add_argument("--batch", type=int, default=1, help="sequences at once (default 1)")
    memory.add_argument("--kv-dtype", help="KV-cache dtype: bf16, fp16, fp32, fp8 or int8 (default: the compute dtype)")
    memory.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs (1, 2, 4 or 8)")
    memory.add_argument("--group-size", type=_positive_int, default=128,
                        help="int4, GPTQ or AWQ quantization group (default 128, the official releases')")
    where = memory.add_mutually_exclusive_group()
    where.add_argument("--gpu", help="a GPU by name (H100, A100-40GB, RTX 4090, …): does it fit?")
    where.add_argument("--vram", type=float, help="GPU memory in GiB: does it fit?")
    memory.add_argument("--plot", metavar="PNG", help="write memory against context for each precision")
    memory.add_argument("--json", action="store_true")

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching, paged KV cache)")
    _add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", help="the model name clients send (default: the model argument)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (or set QWEN_API_KEY); the chat "
                       "page at / asks for it")
    serve.add_argument("--no-webui", action="store_true", help="leave out the chat page at /")
    serve.add_argument("--max-num-seqs", type=_positive_int, default=32, help="sequences decoded together (default 32)")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 429 (default 64)")
    serve.add_argument("--kv-cache-gb", type=float,
                       help="KV-cache size in GiB (default: what --max-num-seqs sequences of the full context need, at "
                            "most 30%% of the memory available at start; it is touched only as it fills)")
    serve.add_argument("--prefill-tokens", type=_positive_int,
                       help="prompt tokens computed per step; longer prompts go in chunks (default: the chunks the "
                            "library uses, so both give the same output)")
    serve.add_argument("--max-request-mb", type=float, default=40,
                       help="largest request body in MiB; larger ones get 413 before they are read (default %(default)g)")
    media = serve.add_argument_group("media (Qwen-VL images, Qwen-Audio clips)")
    media.add_argument("--allow-remote-media", action="store_true",
                       help="fetch http(s) image URLs that requests name (off: only inline data: URLs are read)")
    media.add_argument("--allowed-local-media-path", metavar="DIR",
                       help="read image files that requests name (file:// URLs, paths, <img>PATH</img> in raw prompts) "
                            "when they resolve to a file under DIR; off by default")
    media.add_argument("--limit-mm-per-prompt", metavar="LIMITS", default={}, type=_media_limits,
                       help="most media items a prompt may hold: image=N,audio=N or JSON {\"image\": N} (default 4 of each)")
    media.add_argument("--max-image-mb", type=float, default=20, help="largest image in MiB (default %(default)g)")
    media.add_argument("--max-image-pixels", type=_positive_int, default=MAX_PIXELS,
                       help="most pixels an image may have, checked before decoding (default %(default)d)")
    media.add_argument("--max-audio-mb", type=float, default=25,
                       help="largest audio clip or upload in MiB (default %(default)g, OpenAI's)")
    media.add_argument("--max-audio-seconds", type=float, default=1800,
                       help="longest audio a request may bring (default %(default)g)")

    info = commands.add_parser("info", help="describe a model without loading its weights")
    info.add_argument("--model", "-m", default="default", help="'default', a .gguf file or an HF checkpoint directory")
    _add_rope_scaling(info)
    info.add_argument("--json", action="store_true")
    return parser


def _sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Options given on the command line, validated before the (slow) model load."""
    overrides = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
        "seed": args.seed,
        "stop": args.stop,
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    SamplingParams().updated(**overrides)
    return overrides


def _load_options(args: argparse.Namespace) -> dict[str, Any]:
    """The load() options of every command that loads weights; applies --threads on the way."""
    import torch  # imported only by commands that need it

    if args.threads:
        torch.set_num_threads(args.threads)
    return {"dtype": args.dtype, "device": args.device, "quant": args.quant, "rope_scaling": args.rope_scaling,
            "progress": sys.stderr.isatty(), "tensor_parallel": args.tp}


_LOADED: list[Any] = []  # models this command loaded: closed when it ends (tensor-parallel workers stop)


def _load(args: argparse.Namespace) -> Any:
    from .llm import load

    model = load(args.model, **_load_options(args))
    _LOADED.append(model)
    return model


def cmd_generate(args: argparse.Namespace) -> None:
    sampling = _sampling_overrides(args)
    model = _load(args)
    result = GenerationResult()
    for delta in model.stream_deltas(args.prompt, result, special=args.special, **sampling):
        if not args.json and delta.text:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
    if args.json:
        timings = {"load_s": model.load_s, "ttft_s": result.timings.ttft_s, "decode_tok_s": result.timings.decode_tok_s}
        payload = {
            "text": result.text,
            "token_ids": result.token_ids,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "finish_reason": result.finish_reason,
            "timings": timings,
        }
        print(json.dumps(payload, ensure_ascii=False))
    else:
        sys.stdout.write("\n")


def _read_messages(stream: TextIO, interactive: bool) -> Iterator[str]:
    """User turns: one line each; a line ending in '\\' continues, and '\"\"\"' opens and closes a multi-line block."""
    while True:
        if interactive:
            sys.stdout.write(">>> ")
            sys.stdout.flush()
        line = stream.readline()
        if not line:
            return
        line = line.rstrip("\n")
        lines = []
        if line.strip() == '"""':
            while (more := stream.readline()) and more.rstrip("\n").strip() != '"""':
                lines.append(more.rstrip("\n"))
        else:
            while line.endswith("\\"):
                lines.append(line[:-1])
                if interactive:
                    sys.stdout.write("... ")
                    sys.stdout.flush()
                line = stream.readline().rstrip("\n")
            lines.append(line)
        text = "\n".join(lines)
        if text.strip():
            yield text


def _answer(model: Any, messages: list[dict[str, Any]], sampling: dict[str, Any], draw_boxes: str | None) -> str:
    result = GenerationResult()
    for delta in model.stream_deltas(model.chat_prompt(messages), result, **sampling):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    images = [part["image"] for m in messages if isinstance(m["content"], list) for part in m["content"]
              if part.get("type") == "image"]
    if draw_boxes and images and result.boxes:
        _save_drawn(images[-1], result.boxes, draw_boxes)
    return result.text


def _save_drawn(image: str, boxes: list[Any], target: str) -> None:
    """The image with its boxes, as a PNG written through a temporary name."""
    import io

    from .grounding import draw_boxes
    from .images import load_image

    png = io.BytesIO()
    draw_boxes(load_image(image).image, boxes).save(png, format="PNG")
    _write_atomically(target, png.getvalue())
    sys.stderr.write(f"qwen: {len(boxes)} box(es) drawn into {target}\n")


def _user_message(text: str, media: list[dict[str, str]]) -> dict[str, Any]:
    """A user turn: text alone, or the media parts (images, audio: their list format) and then the text."""
    if not media:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*media, {"type": "text", "text": text}]}


MEDIA_COMMANDS = {"/image ": "image", "/audio ": "audio"}


def cmd_chat(args: argparse.Namespace) -> None:
    sampling = _sampling_overrides(args)
    model = _load(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    media = [{"type": "image", "image": path} for path in args.image] + [{"type": "audio", "audio": path} for path in args.audio]
    messages = list(start)
    if args.once is not None:
        messages.append(_user_message(args.once, media))
        _answer(model, messages, sampling, args.draw_boxes)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with the model. /reset starts over, /exit quits; end a line with \\ or use \"\"\" for more lines.")
    for text in _read_messages(sys.stdin, interactive):
        command = text.strip()
        if command == "/exit":
            return
        if command == "/reset":
            messages, media = list(start), []
            if interactive:
                print("(conversation cleared)")
            continue
        kind = next((kind for prefix, kind in MEDIA_COMMANDS.items() if command.startswith(prefix)), None)
        if kind is not None:
            media.append({"type": kind, kind: command.split(" ", 1)[1].strip()})
            if interactive:
                print(f"({kind} added to the next message: {media[-1][kind]})")
            continue
        messages.append(_user_message(text, media))
        media = []
        messages.append({"role": "assistant", "content": _answer(model, messages, sampling, args.draw_boxes)})


def cmd_transcribe(args: argparse.Namespace) -> None:
    from .transcribe import as_json, srt, transcribe, vtt

    model = _load(args)
    result = transcribe(model, args.file, task=args.task, language=args.language, target=args.to,
                        timestamps=args.timestamps or args.format in ("srt", "vtt"))
    text = {"text": lambda r: r.text + "\n", "json": lambda r: as_json(r) + "\n", "srt": srt, "vtt": vtt}[args.format](result)
    if args.output is None:
        sys.stdout.write(text)
        return
    _write_atomically(args.output, text.encode("utf-8"))


def _write_atomically(target: str, data: bytes) -> None:
    """Write to a temporary name beside the target, then rename: never a half-written file."""
    import os

    partial = f"{target}.partial-{os.getpid()}"
    try:
        with open(partial, "wb") as handle:
            handle.write(data)
        os.replace(partial, target)
    except OSError as err:
        raise QwenError(f"cannot write {target} ({err.strerror or err})") from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def cmd_info(args: argparse.Namespace) -> None:
    from .checkpoint import open_checkpoint
    from .cpu import kernel_variant

    info = open_checkpoint(args.model, progress=sys.stderr.isatty(), rope_scaling=args.rope_scaling).info()
    config, defaults = info.config, info.sampling_defaults
    facts = {
        "source": info.source,
        "format": info.format,
        "architecture": config.architecture,
        "parameters": config.parameter_count(),
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "attention_heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "context_length": config.context_length,
        "rope_scaling": None if config.rope_scaling is None else f"yarn ×{config.rope_scaling.factor:g} from "
                        f"{config.rope_scaling.original_max_position_embeddings}",
        "long_context": " + ".join(name for name, on in (("dynamic NTK", config.use_dynamic_ntk), ("logN", config.use_logn_attn),
                                   (f"sliding window {config.sliding_window}", config.sliding_window)) if on) or None,
        "rope_theta": config.rope_theta,
        "tied_embeddings": config.tie_word_embeddings,
        "tensor_types": info.tensor_types,
        "chat_template": info.has_chat_template,
        "sampling_defaults": {name: {"value": getattr(defaults.params, name), "source": source}
                              for name, source in defaults.sources.items()},
        "kernels": kernel_variant(),  # what this CPU runs (QWEN_ENGINE_CPU caps it)
    }
    moe = config.moe
    if moe is not None:
        facts["experts"] = {"count": moe.num_experts, "per_token": moe.experts_per_token, "expert_size": moe.expert_size,
                            "shared_expert_size": moe.shared_expert_size, "norm_topk_prob": moe.norm_topk_prob,
                            "dense_layers": [i for i in range(config.num_layers) if not moe.is_sparse(i)],
                            "active_parameters": config.active_parameter_count()}
    vision, audio = config.vision, config.audio
    if vision is not None or audio is not None:
        from dataclasses import asdict

        from .catalog import audio_shapes, vision_shapes
    if vision is not None:
        tower = asdict(vision) | {"parameters": sum(math.prod(shape) for shape in vision_shapes(vision).values())}
        facts["vision_tower"] = tower
    if audio is not None:
        shapes = audio_shapes(audio, config.hidden_size)
        encoder = asdict(audio) | {"parameters": sum(math.prod(shape) for shape in shapes.values())}
        facts["audio_encoder"] = encoder
    if args.json:
        print(json.dumps(facts))
        return
    if audio is not None:
        facts["audio_encoder"] = (
            f"{audio.n_layer} layers × {audio.n_state} ({audio.n_head} heads), {audio.n_mels} mel bins, 40 ms a "
            f"position (at most {audio.n_ctx // 2} for 30 s) → {audio.output_dim}; {encoder['parameters']:,} parameters")
    if vision is not None:
        facts["vision_tower"] = (
            f"{vision.layers} layers × {vision.width} ({vision.heads} heads, MLP {vision.mlp_width}); {vision.patch_size}-px "
            f"patches of a {vision.image_size}² image ({vision.grid ** 2}) → resampler of {vision.n_queries} queries → "
            f"{vision.output_dim}; {tower['parameters']:,} parameters")
    if moe is not None:
        experts = facts["experts"]
        facts["experts"] = (
            f"{moe.experts_per_token} of {moe.num_experts} a token (width {moe.expert_size}"
            f"{', renormalized' if moe.norm_topk_prob else ''}) + a shared expert of {moe.shared_expert_size}; "
            f"dense layers: {', '.join(map(str, experts['dense_layers'])) or 'none'}; "
            f"{experts['active_parameters']:,} parameters active a token")
    facts["parameters"] = f"{config.parameter_count():,} ({config.parameter_count() / 1e9:.2f} B)"
    facts["tensor_types"] = ", ".join(f"{name} ×{count}" for name, count in sorted(info.tensor_types.items()))
    facts["chat_template"] = "yes" if info.has_chat_template else (
        "Qwen v1 layout (make_context)" if config.architecture == "qwen" else "no (ChatML fallback)")
    by_source: dict[str, list[str]] = {}
    for name, source in defaults.sources.items():
        by_source.setdefault(source, []).append(f"{name} {getattr(defaults.params, name):g}")
    facts["sampling_defaults"] = "; ".join(f"{', '.join(values)} ({source})" for source, values in by_source.items())
    width = max(map(len, facts))
    for key, value in facts.items():
        print(f"{key.replace('_', ' '):<{width}}  {'—' if value is None else value}")


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from .bench import run_bench

    result = run_bench(args.model, args.prompt_tokens, args.gen_tokens, started=STARTED, **_load_options(args))
    if args.json:
        print(json.dumps(result.as_dict()))
        return
    print(f"model            {args.model} ({result.dtype}, quant {result.quant}, {torch.get_num_threads()} threads, "
          f"kernels {result.kernels})")
    print(f"load             {result.load_s:.2f} s (first token {result.start_to_first_token_s:.2f} s after start)")
    print(f"prefill          {result.prefill_tok_s:.1f} tok/s ({result.prompt_tokens} tokens, TTFT {result.ttft_s:.2f} s)")
    print(f"decode           {result.decode_tok_s:.1f} tok/s ({result.gen_tokens} tokens)")
    print(f"peak RSS         {result.peak_rss_mb:.0f} MB")


def cmd_perplexity(args: argparse.Namespace) -> None:
    from .engine.perplexity import perplexity, scored_from

    try:
        text = open(args.file, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as err:
        raise QwenError(f"cannot read {args.file} ({err})") from None
    model = _load(args)
    ids = model.tokenizer.encode(text)
    context = min(args.context, model.config.context_length)
    if args.decode_path:
        def logits_of(chunk: list[int]) -> Any:
            return model.stepwise_logits(chunk, scored_from(len(chunk)) + 1)
    else:
        logits_of = model.logits
    result = perplexity(logits_of, ids, context, args.max_chunks)
    if args.json:
        print(json.dumps({"perplexity": result.perplexity, "tokens": len(ids), "tokens_scored": result.tokens_scored,
                          "chunks": result.chunks, "context": args.context, "quant": model.quant}))
    else:
        print(f"perplexity {result.perplexity:.4f} over {result.tokens_scored} tokens ({result.chunks} chunks of {args.context})")


def cmd_models(args: argparse.Namespace) -> None:
    from .catalog import entries
    from .planner import GiB, plan

    rows = []
    for entry in entries():
        config, params = entry.config, entry.parameters()
        exact = plan(entry, "bf16")
        rows.append({
            "name": entry.name, "parameters": params, "non_embedding": params - entry.embedding_parameters(),
            "active": config.active_parameter_count() + entry.encoder_parameters(),
            "layers": config.num_layers, "heads": config.num_heads, "kv_heads": config.num_kv_heads,
            "context": entry.context, "rule_of_thumb_gib": 2 * params / GiB, "exact_bf16_gib": exact.per_gpu / GiB,
        })
    if args.json:
        print(json.dumps(rows))
        return
    header = ("model", "params", "non-emb", "active/token", "layers", "heads/kv", "context", "FP16 rule (2 B/param)",
              "exact bf16 at full context")
    lines = [(r["name"], f"{r['parameters'] / 1e9:.2f} B", f"{r['non_embedding'] / 1e9:.2f} B",
              f"{r['active'] / 1e9:.2f} B" if r["active"] != r["parameters"] else "all", str(r["layers"]),
              f"{r['heads']}/{r['kv_heads']}", f"{r['context']:,}", f"{r['rule_of_thumb_gib']:.1f} GiB",
              f"{r['exact_bf16_gib']:.1f} GiB") for r in rows]
    widths = [max(len(row[i]) for row in (header, *lines)) for i in range(len(header))]
    for row in (header, *lines):
        print("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths))))
    print("active/token = all but the experts a token's router leaves out (mixture-of-experts models)")
    print("exact = weights + KV cache for the full context + prefill activations + 0.75 GiB GPU overhead, batch 1")


def cmd_memory(args: argparse.Namespace) -> None:
    from .planner import GiB, fit, gpu_memory, memory_entry, plan, plot_memory

    entry = memory_entry(args.model)
    result = plan(entry, args.dtype, args.context, args.batch, args.kv_dtype, args.tp, args.group_size)
    capacity = None
    if args.gpu or args.vram is not None:
        capacity = gpu_memory(args.gpu) if args.gpu else int(args.vram * GiB)
        if capacity <= 0:
            raise QwenError(f"--vram must be positive (got {args.vram})")
    verdict = fit(entry, capacity, args.dtype, args.context, args.batch, args.kv_dtype, args.tp, args.group_size) if capacity else None
    if args.plot:
        plot_memory(entry, args.plot, capacity, args.batch, args.tp, args.group_size)
    report = {
        "model": entry.name, "precision": result.precision, "context": result.context, "batch": result.batch,
        "tp": result.tp, "weights_per_gpu": result.weights, "kv_cache_per_gpu": result.kv_cache,
        "activations_per_gpu": result.activations, "encoders_per_gpu": result.encoders, "overhead_per_gpu": result.overhead,
        "per_gpu": result.per_gpu, "total_gpu": result.total_gpu, "host_ram_cpu": result.host_ram,
        "host_ram_cpu_worker": result.host_ram_worker, "host_ram_gpu_load": result.host_ram_gpu_load,
        "layout_problems": result.problems,
    }
    if verdict:
        report.update({"gpu_memory": capacity, "fits": verdict.fits, "max_context": verdict.max_context,
                       "max_batch": verdict.max_batch, "suggestion": verdict.suggestion})
    if args.json:
        print(json.dumps(report))
        return
    gib = lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
    print(f"{entry.name}: {result.precision} weights, {result.context:,} tokens × batch {result.batch}, tp={result.tp}")
    for label, key in (("weights", "weights_per_gpu"), ("KV cache", "kv_cache_per_gpu"), ("activations", "activations_per_gpu"),
                       ("encoders", "encoders_per_gpu"), ("GPU overhead", "overhead_per_gpu"), ("per GPU", "per_gpu")):
        print(f"  {label:<13}{gib(report[key]):>12}")
    print(f"  {'all GPUs':<13}{gib(result.total_gpu):>12}")
    on_cpu = gib(result.host_ram) + (f" for rank 0 and {gib(result.host_ram_worker)} for each other rank" if result.tp > 1 else "")
    print(f"  host RAM: {gib(result.host_ram_gpu_load)} while loading onto GPUs, {on_cpu} to run on the CPU")
    for problem in result.problems:
        print(f"  layout problem: {problem}")
    if verdict:
        print(f"  fits in {gib(capacity)} per GPU: {'yes' if verdict.fits else 'no'}; longest context {verdict.max_context:,} "
              f"tokens at batch {result.batch}; largest batch {verdict.max_batch} at {result.context:,} tokens")
        if verdict.suggestion:
            print(f"  to make it fit: {verdict.suggestion}")
    if args.plot:
        print(f"  plot written to {args.plot}")


MEDIA_KINDS = ("image", "audio")


def _media_limits(text: str) -> dict[str, int]:
    """--limit-mm-per-prompt: `image=4,audio=1` or vLLM's JSON `{"image": 4}`."""
    try:
        limits = json.loads(text) if text.lstrip().startswith("{") else dict(
            (kind.strip(), int(count)) for kind, _, count in (pair.partition("=") for pair in text.split(",")))
    except ValueError:
        limits = None
    if not isinstance(limits, dict) or any(kind not in MEDIA_KINDS or type(count) is not int or count < 0
                                           for kind, count in limits.items()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a media limit: write image=N (N ≥ 0) or {{\"image\": N}}")
    return limits


def cmd_serve(args: argparse.Namespace) -> None:
    import os
    import signal
    import threading

    if not 0 < args.port < 65536:
        raise QwenError(f"--port must be in 1…65535 (got {args.port})")
    if args.max_queue < 0:
        raise QwenError(f"--max-queue must be ≥ 0 (got {args.max_queue})")
    if not args.max_request_mb > 0:
        raise QwenError(f"--max-request-mb must be positive (got {args.max_request_mb:g})")
    try:
        import uvicorn

        from .server.app import create_app
        from .server.server import Server
    except ImportError as err:
        raise QwenError(f"the server needs its extra dependencies ({err.name} is missing); pip install 'qwen-engine[serve]'") from None
    from .server.listen import listen
    from .server.media import MediaPolicy

    root = None
    if args.allowed_local_media_path is not None:
        root = Path(args.allowed_local_media_path).resolve()
        if not root.is_dir():
            raise QwenError(f"--allowed-local-media-path {args.allowed_local_media_path} is not a directory")
    for flag in ("max_image_mb", "max_audio_mb", "max_audio_seconds"):
        if not getattr(args, flag) > 0:
            raise QwenError(f"--{flag.replace('_', '-')} must be positive (got {getattr(args, flag):g})")
    media = MediaPolicy(args.allow_remote_media, root, {"image": 4, "audio": 4} | args.limit_mm_per_prompt,
                        int(args.max_image_mb * 2**20), args.max_image_pixels, int(args.max_audio_mb * 2**20),
                        args.max_audio_seconds)
    listener = listen(args.host, args.port)  # before the slow load: a port in use fails at once
    model = _load(args)
    engine = model.serving_engine(kv_cache_gb=args.kv_cache_gb, max_seqs=args.max_num_seqs,
                                  prefill_tokens=args.prefill_tokens)
    server = Server(model, engine, name=args.served_model_name or args.model,
                    api_key=args.api_key or os.environ.get("QWEN_API_KEY"), max_queue=args.max_queue,
                    max_request_bytes=int(args.max_request_mb * 2**20), media=media)
    # HTTP on a thread of its own, the engine on this one (the main thread: see ServingEngine.run_forever).
    http = uvicorn.Server(uvicorn.Config(create_app(server, webui=not args.no_webui), log_level="warning",
                                         timeout_graceful_shutdown=5))
    http_thread = threading.Thread(target=http.run, kwargs={"sockets": [listener]}, name="qwen-http", daemon=True)
    engine.own()  # requests that arrive before the loop starts wait in its queue
    signal.signal(signal.SIGTERM, lambda *_: engine.stop())  # from here on SIGTERM shuts down in order
    http_thread.start()
    while not http.started and http_thread.is_alive():
        time.sleep(0.05)
    if not http_thread.is_alive():
        raise QwenError(f"the HTTP server on {args.host}:{args.port} stopped while starting (uvicorn says why above)")
    stats = engine.stats()
    page = "" if args.no_webui else f"; chat page at http://{args.host}:{args.port}/"
    sys.stderr.write(f"qwen: serving {server.name} on http://{args.host}:{args.port}/v1 "
                     f"({stats['kv_blocks_total']} KV blocks, {stats['capacity_tokens']:,} tokens){page}\n")
    try:
        engine.run_forever(keep_going=lambda: http_thread.is_alive() and engine.runner.alive)
    except KeyboardInterrupt:
        pass
    finally:
        http.should_exit = True
        http_thread.join(timeout=10)
    if not engine.runner.alive:
        raise QwenError("a tensor-parallel rank has stopped, so this server stopped too; start it again")


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "transcribe": cmd_transcribe, "info": cmd_info, "bench": cmd_bench, "perplexity": cmd_perplexity,
            "models": cmd_models, "memory": cmd_memory, "serve": cmd_serve}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            COMMANDS[args.command](args)
        finally:
            while _LOADED:
                _LOADED.pop().close()
    except QwenError as err:
        if args.debug:
            raise
        sys.stderr.write(f"qwen: error: {err}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except BrokenPipeError:
        return EXIT_ERROR
    except Exception as err:  # a bug, not a user error: still one line unless --debug
        if args.debug:
            raise
        sys.stderr.write(f"qwen: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)\n")
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
