"""Qwen-Audio at its real size (qwen-family.md §7.2: Whisper-large-v2's encoder, n_state 1280, 32 layers, 30 s →
750 audio tokens of 4096) on one 30 s clip, with seeded random weights: seconds per clip, peak RSS and the output's
error for

- qwen-engine's encoder (model/audio.py) in its default CPU format, bfloat16, and in float32;
- the same encoder with its linears (attn.query/key/value/out, mlp.0, mlp.2, proj) in the decoder's q8_0 blocks
  (model/quantized.py), to see whether they pay for its 1500-row products (on Qwen-VL's tower they did not);
- a plain PyTorch encoder written here from §7.2 (F.conv1d, F.linear, F.layer_norm, F.scaled_dot_product_attention,
  F.avg_pool1d on the checkpoint's tensors), in float32 (the reference every error is measured against) and
  bfloat16.

The weights are rounded to bfloat16 as the official checkpoint stores them, so every variant computes with the same
numbers. Like vision.py, every measurement runs in a fresh process, the variants alternate over the rounds (in
reverse order every other round) and medians are reported, in the audio section of RESULTS.md. It also times
`transcribe` and `qwen transcribe` on a tiny Qwen-Audio checkpoint: the real-time factor of a 60 s clip.

    python benchmarks/audio.py --rounds 3        (--layers 2 for a quick run of a shortened encoder)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import (  # benchmarks/harness.py, beside this script
    DEFAULT, REFERENCE, SeededWeights, alternate, arguments, build_variant, encode_twice, errors, machine, median,
    output_path, peak_rss_mb, spawn, variant_table, work)
from results import update_section

if TYPE_CHECKING:
    import numpy as np
    import torch

    from qwen_engine.config import AudioConfig
    from qwen_engine.llm import Model
    from qwen_engine.results import GenerationResult

HERE = Path(__file__).resolve().parent
VARIANTS = (DEFAULT, "qwen-engine float32", "qwen-engine q8_0", REFERENCE, "reference bfloat16")
LIBRARY = "transcribe()"
CLI = "qwen transcribe"
JOBS = (*VARIANTS, LIBRARY, CLI)
REAL_LAYERS = 32
EPS = 1e-5  # every LayerNorm of the encoder (§7.2)
SAMPLE_RATE = 16000
CLIP_SECONDS = 30  # the encoder's window (§7.3)
TRANSCRIBE_SECONDS = 60
SEED = 0


def encoder_config(layers: int) -> AudioConfig:
    from qwen_engine.config import AudioConfig

    return AudioConfig(n_layer=layers)  # Qwen-Audio's own values otherwise (§7.1)


def random_weights(config: AudioConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's `transformer.audio.*` tensors (prefix stripped), as SeededWeights makes them (convolutions
    with std 1/√fan-in too); `positional_embedding` is the sinusoid table the checkpoint stores."""
    import torch

    from qwen_engine.model.audio import sinusoids

    seeded = SeededWeights(SEED)
    normal, norm, linear = seeded.normal, seeded.norm, seeded.linear
    w, m, d = config.n_state, 4 * config.n_state, config.output_dim

    yield "conv1.weight", normal(w, config.n_mels, 3, std=(3 * config.n_mels) ** -0.5)
    yield "conv1.bias", normal(w, std=0.02)
    yield "conv2.weight", normal(w, w, 3, std=(3 * w) ** -0.5)
    yield "conv2.bias", normal(w, std=0.02)
    yield "positional_embedding", sinusoids(config.n_ctx, w).to(torch.bfloat16)
    for n in range(config.n_layer):
        block = f"blocks.{n}"
        yield from norm(f"{block}.attn_ln", w)
        yield from linear(f"{block}.attn.query", w, w)
        yield from linear(f"{block}.attn.key", w, w, bias=False)
        yield from linear(f"{block}.attn.value", w, w)
        yield from linear(f"{block}.attn.out", w, w)
        yield from norm(f"{block}.mlp_ln", w)
        yield from linear(f"{block}.mlp.0", m, w)
        yield from linear(f"{block}.mlp.2", w, m)
    yield from norm("ln_post", w)
    yield from linear("proj", d, w)
    yield "audio_bos_eos_token.weight", normal(2, d, std=1.0)


def test_samples(seconds: float, seed: int = SEED) -> np.ndarray:
    """Seeded 16 kHz mono audio in [-1, 1): a gliding tone with three harmonics in 4 Hz bursts (syllable-like)
    under faint noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 150 + 50 * np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in (1, 2, 3)) * np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    return (0.3 * voice + rng.normal(0, 0.01, t.shape)).astype(np.float32)


def reference_encoder(w: dict[str, torch.Tensor], config: AudioConfig, mel: torch.Tensor, mel_len: int) -> torch.Tensor:
    """The encoder of §7.2 in plain PyTorch, in the weights' dtype: log-mel [80, frames] → span [tokens + 2,
    output_dim]."""
    import torch
    import torch.nn.functional as F

    width, heads = config.n_state, config.n_head
    head_dim = width // heads
    length = (mel_len - 1) // 2 + 1  # frames after conv2 (§7.3)

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], EPS)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))

    def split_heads(x: torch.Tensor) -> torch.Tensor:  # [length, width] → [1, heads, length, head_dim]
        return x.view(1, length, heads, head_dim).transpose(1, 2)

    x = mel[None, :, : 2 * length].to(w["conv1.weight"].dtype)
    x = F.gelu(F.conv1d(x, w["conv1.weight"], w["conv1.bias"], padding=1))
    x = F.gelu(F.conv1d(x, w["conv2.weight"], w["conv2.bias"], stride=2, padding=1))[0].T
    x = x + w["positional_embedding"][:length]
    for n in range(config.n_layer):
        p = f"blocks.{n}."
        h = norm(x, p + "attn_ln")
        q, k, v = (split_heads(linear(h, p + f"attn.{name}")) for name in ("query", "key", "value"))
        # q and k each scaled by d^(−1/4) (§7.2): SDPA's default 1/√d on the scores
        attended = F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1).reshape(length, width)
        x = x + linear(attended, p + "attn.out")
        x = x + linear(F.gelu(linear(norm(x, p + "mlp_ln"), p + "mlp.0")), p + "mlp.2")
    x = F.avg_pool1d(x.T[None], kernel_size=2, stride=2)[0].T
    tokens = linear(norm(x, "ln_post"), "proj")
    bos, eos = w["audio_bos_eos_token.weight"]
    return torch.cat([bos[None], tokens, eos[None]])


def encoder_plan(config: AudioConfig, fmt: str) -> dict[str, str]:
    """Every nn.Linear of the encoder in `fmt` (the convolutions stay as they are)."""
    parts = ("attn.query", "attn.key", "attn.value", "attn.out", "mlp.0", "mlp.2")
    return dict.fromkeys([*(f"blocks.{n}.{part}" for n in range(config.n_layer) for part in parts), "proj"], fmt)


def worker_encoder(args: argparse.Namespace) -> dict:
    """Build one variant, encode the clip twice (the first pays one-time costs), save the second's output."""
    import torch

    from qwen_engine.audio import encoder_frames, log_mel
    from qwen_engine.model.audio import AudioEncoder

    config = encoder_config(args.layers)
    samples = test_samples(CLIP_SECONDS)
    t0 = time.perf_counter()
    mel = log_mel(samples)
    log_mel_s = time.perf_counter() - t0
    mel_len = encoder_frames(len(samples))[0]
    t0 = time.perf_counter()
    encode, tensors = build_variant(args.worker, lambda: random_weights(config),
                                    lambda weights, mel, mel_len: reference_encoder(weights, config, mel, mel_len),
                                    lambda: AudioEncoder(config), lambda fmt: encoder_plan(config, fmt))
    build_s = time.perf_counter() - t0
    out, first_s, clip_s = encode_twice(encode, mel, mel_len)
    torch.save(out.float(), output_path(args.scratch, args.worker))
    return {"clip_s": clip_s, "first_clip_s": first_s, "build_s": build_s, "log_mel_s": log_mel_s,
            "peak_rss_mb": peak_rss_mb(), "weights_mb": sum(t.nbytes for t in tensors) / 2**20,
            "span": out.shape[0]}


def counting_generate(model: Model, windows: list[dict]) -> None:
    """Have `model.generate` record each call's generated tokens, finish reason and timings in `windows`: transcribe
    calls it once per 30 s window and returns only the text."""
    generate = model.generate

    def counted(prompt: Any, **options: Any) -> GenerationResult:
        result = generate(prompt, **options)
        windows.append({"tokens": len(result.token_ids), "finish_reason": result.finish_reason,
                        "prompt_tokens": result.prompt_tokens, "to_first_token_s": result.timings.ttft_s,
                        "decode_s": result.timings.decode_s})
        return result
    model.generate = counted


def worker_library(args: argparse.Namespace) -> dict:
    """`transcribe(model, path, language="en")` on the 60 s clip, after one on a short other clip (a process's first
    call pays one-time costs): the library's steady real-time factor."""
    import qwen_engine
    from qwen_engine.transcribe import transcribe

    t0 = time.perf_counter()
    model = qwen_engine.load(args.scratch / "qwen-audio", progress=False)
    load_s = time.perf_counter() - t0
    transcribe(model, args.scratch / "warm-up.wav", language="en")
    windows: list[dict] = []
    counting_generate(model, windows)
    t0 = time.perf_counter()
    result = transcribe(model, args.scratch / "speech.wav", language="en")
    seconds = time.perf_counter() - t0
    (args.scratch / "library.txt").write_text(result.text + "\n", encoding="utf-8")
    return {"transcribe_s": seconds, "rtf": seconds / result.duration, "load_s": load_s, "windows": windows,
            "peak_rss_mb": peak_rss_mb()}


def worker_cli(args: argparse.Namespace) -> dict:
    """`qwen transcribe --language en` on the 60 s clip in a fresh process, from its start to its exit (its text
    printed). This worker imports no torch, so the command's ru_maxrss (which exec carries over) is its own."""
    qwen = Path(sys.executable).with_name("qwen")
    command = [str(qwen), "transcribe", "--model", str(args.scratch / "qwen-audio"), "--language", "en",
               "--threads", str(args.threads), str(args.scratch / "speech.wav")]
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{CLI} failed:\n{done.stderr[-3000:]}")
    (args.scratch / "cli.txt").write_text(done.stdout, encoding="utf-8")
    return {"start_to_output_s": seconds, "rtf": seconds / TRANSCRIBE_SECONDS,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def write_inputs(scratch: Path) -> None:
    """The tiny Qwen-Audio checkpoint as the tests write it (tests/tiny.py: a 2-layer decoder, a 2-layer encoder of
    width 64, the default model's vocabulary as qwen.tiktoken) and the clips to transcribe, as 16-bit WAV files."""
    import soundfile

    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny import write_qwen_audio

    from qwen_engine.checkpoint import GGUFSource
    from qwen_engine.default_model import default_model_path

    tokens = GGUFSource(default_model_path(progress=False)).gguf.metadata["tokenizer.ggml.tokens"]
    write_qwen_audio(scratch / "qwen-audio", tokens)
    soundfile.write(scratch / "speech.wav", test_samples(TRANSCRIBE_SECONDS), SAMPLE_RATE, subtype="PCM_16")
    soundfile.write(scratch / "warm-up.wav", test_samples(2, seed=SEED + 1), SAMPLE_RATE, subtype="PCM_16")


def main() -> None:
    args = arguments(__doc__, REAL_LAYERS, "encoder", JOBS)
    if args.worker == CLI:  # no torch in this process: the command it starts reports its own peak RSS
        print(json.dumps(worker_cli(args)))
        return
    if args.worker:
        work(args, worker_library if args.worker == LIBRARY else worker_encoder)
        return

    args.scratch = Path(tempfile.mkdtemp(prefix="qwen-audio-bench-"))
    try:
        write_inputs(args.scratch)
        spawn(__file__, args, CLI)  # converts the tiny checkpoint and builds the kernels once: a user's second start
        runs = alternate(JOBS, args.rounds, lambda job: spawn(__file__, args, job))
        found = errors(args.scratch, VARIANTS)
        library, cli = ((args.scratch / name).read_text(encoding="utf-8") for name in ("library.txt", "cli.txt"))
        same_text = library == cli
    finally:
        shutil.rmtree(args.scratch, ignore_errors=True)
    text = report(args, runs, found, same_text)
    update_section("audio", text, args.output)
    print(text)


def report(args: argparse.Namespace, runs: dict[str, list[dict]], found: dict[str, dict[str, float]],
           same_text: bool) -> str:
    import torch

    config = encoder_config(args.layers)
    size = ("the real size" if args.layers == REAL_LAYERS else
            f"**a shortened encoder: {args.layers} of the real {REAL_LAYERS} layers** (a development run; not the real size)")
    command = "python benchmarks/audio.py" + (f" --rounds {args.rounds}" if args.rounds != 3 else "") + (
        f" --layers {args.layers}" if args.layers != REAL_LAYERS else "")
    default_s = median(runs[DEFAULT], "clip_s")
    span = runs[DEFAULT][0]["span"]
    lines = [
        "## Qwen-Audio encoder and transcription", "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}.", "",
        f"- Machine: {machine()}; torch {torch.__version__}; {args.threads} threads",
        f"- Encoder: {size}: n_state {config.n_state}, {config.n_layer} layers, {config.n_head} heads, MLP "
        f"{4 * config.n_state}, output {config.output_dim}; one {CLIP_SECONDS} s clip (seeded tones and noise) → log-mel "
        f"{config.n_mels}×{CLIP_SECONDS * 100} → {CLIP_SECONDS * 50} frames after conv2 → a span of {span}×"
        f"{config.output_dim} (audio BOS, {span - 2} tokens, audio EOS). Seeded random weights, rounded to bfloat16 as "
        "the checkpoint stores them.",
        f"- Medians of {args.rounds} rounds, variants alternating (in reverse order every other round), each a fresh "
        "process. s/clip: the second clip encoded in the process (the first pays one-time costs: its column), the "
        f"log-mel not included ({median(runs[DEFAULT], 'log_mel_s'):.3f} s); RTF: s/clip ÷ {CLIP_SECONDS} s; weights: "
        "the bytes of the tensors the encoder holds; peak RSS: the whole process, building the encoder included. "
        f"Errors: the variant's {span}×{config.output_dim} span against the float32 reference's on the same clip "
        "(max |Δ|, max |Δ| ÷ max |reference|, ‖Δ‖ ÷ ‖reference‖).",
        "- q8_0: the encoder in bfloat16 with its linears (attn.query, attn.key, attn.value, attn.out, mlp.0, mlp.2, "
        "proj) replaced by the decoder's 8-bit blocks (quantized.py's `quantize_modules`); build s includes that "
        "conversion.", "",
        *variant_table(runs, found, VARIANTS, "clip", CLIP_SECONDS),
    ]
    q8 = "qwen-engine q8_0"
    lines += [
        "", f"q8_0 against the default bfloat16 encoder: {median(runs[q8], 'clip_s') / default_s:.2f}× the time, "
        f"{found[q8]['norm_relative'] / found[DEFAULT]['norm_relative']:.1f}× the error (relative, by norm). A format "
        "would pay as the encoder's where it is more than 10% faster with an error comparable to bfloat16's.",
    ]
    library, cli = runs[LIBRARY], runs[CLI]
    windows = library[0]["windows"]
    tokens = [window["tokens"] for window in windows]
    finished = sorted({window["finish_reason"] for window in windows})
    lines += [
        "", f"Transcription of a {TRANSCRIBE_SECONDS} s clip (the same kind of signal, a 16-bit WAV) on a tiny "
        "Qwen-Audio checkpoint (tests/tiny.py's: 2-layer decoder of width 128, 2-layer encoder of width 64, the real "
        "tokenizer and 155,947 embedding rows; the engine's defaults, a warm converted-weights cache), "
        "`language=\"en\"`, greedy. The random decoder says nothing meaningful: it generated "
        f"{sum(tokens)} tokens in {len(windows)} windows ({', '.join(map(str, tokens))}; finish: {', '.join(finished)}; "
        "at most 448 a window), so these figures are the pipeline's cost (audio decoding, windowing, log-mel, tiny "
        "encoder, prompt, decoding loop), not a 7B model's. "
        f"The library's and the command's texts are {'the same' if same_text else '**different**'}.", "",
        "| run | seconds | RTF (÷ 60 s) | peak RSS (MB) |", "|---|---|---|---|",
        f"| `transcribe(model, path, language=\"en\")`, a loaded model's second call | {median(library, 'transcribe_s'):.2f} | "
        f"{median(library, 'rtf'):.3f} | {median(library, 'peak_rss_mb'):.0f} |",
        f"| `qwen transcribe --language en speech.wav`, process start to exit | {median(cli, 'start_to_output_s'):.2f} | "
        f"{median(cli, 'rtf'):.3f} | {median(cli, 'peak_rss_mb'):.0f} |",
        "", f"At the real size each 30 s window adds the encoder's time, {default_s:.2f} s in bfloat16 (RTF "
        f"{default_s / CLIP_SECONDS:.3f}), before the 7B decoder's prefill of its {span + 6}-token prompt (the span and "
        "6 task tags) and its decoding.",
        "", "### Every run", "", "```", json.dumps(runs, indent=1), "```", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
