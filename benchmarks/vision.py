"""Qwen-VL's visual tower at its real size (qwen-family.md §6: width 1664, 48 layers, 448×448 → 1024 patches → 256
vectors of 4096) on one image, with seeded random weights: seconds per image, peak RSS and the output's error for

- qwen-engine's tower (model/vision.py) in its default CPU format, bfloat16, and in float32;
- the same tower with its linears (attn.in_proj, attn.out_proj, mlp.c_fc, mlp.c_proj, attn_pool.kv_proj) in the
  decoder's CPU formats (q8_0 blocks, int8 per channel; model/quantized.py), to see whether they pay for the
  tower's 1024-row products as they do for the decoder's prefill;
- a plain PyTorch tower written here from §6.2 (F.linear, F.layer_norm, F.scaled_dot_product_attention on the
  checkpoint's tensors), in float32 (the reference every error is measured against) and bfloat16.

The weights are rounded to bfloat16 as the official checkpoint stores them, so every variant computes with the same
numbers. Like run.py, every measurement runs in a fresh process, the variants alternate over the rounds (in reverse
order every other round) and medians are reported, in the vision section of RESULTS.md. It also times a one-image
chat on a tiny Qwen-VL-Chat checkpoint from process start to the first token.

    python benchmarks/vision.py --rounds 3        (--layers 4 for a quick run of a shortened tower)
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before any heavy import: "start to first token" counts imports too

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from harness import (  # noqa: E402  (benchmarks/harness.py, beside this script)
    DEFAULT, REFERENCE, SeededWeights, alternate, arguments, build_variant, encode_twice, errors, machine, median,
    output_path, peak_rss_mb, spawn, variant_table, work)
from results import update_section  # noqa: E402

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from qwen_engine.config import VisionConfig

HERE = Path(__file__).resolve().parent
VARIANTS = (DEFAULT, "qwen-engine float32", "qwen-engine q8_0", "qwen-engine int8", REFERENCE, "reference bfloat16")
TTFT = "one-image chat"
EPS = 1e-6  # every LayerNorm of the tower (§6.2)
POOL_HEAD_DIM = 128  # the resampler's heads (§6.2)
SEED = 0


def tower_config(layers: int) -> VisionConfig:
    from qwen_engine.config import VisionConfig

    return VisionConfig(layers=layers)  # Qwen-VL's own values otherwise (§6.1)


def random_weights(config: VisionConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's `transformer.visual.*` tensors (prefix stripped), as SeededWeights makes them; `pos_embed`
    is the sin-cos table it stores."""
    import torch

    from qwen_engine.model.vision import sincos_table

    seeded = SeededWeights(SEED)
    normal, norm, linear = seeded.normal, seeded.norm, seeded.linear
    w, d, m = config.width, config.output_dim, config.mlp_width

    patch = config.patch_size
    yield "conv1.weight", normal(w, 3, patch, patch, std=(3 * patch * patch) ** -0.5)
    yield "positional_embedding", normal(256, w, std=0.5)
    yield from norm("ln_pre", w)
    for n in range(config.layers):
        block = f"transformer.resblocks.{n}"
        yield from norm(f"{block}.ln_1", w)
        yield from linear(f"{block}.attn.in_proj", 3 * w, w)
        yield from linear(f"{block}.attn.out_proj", w, w)
        yield from norm(f"{block}.ln_2", w)
        yield from linear(f"{block}.mlp.c_fc", m, w)
        yield from linear(f"{block}.mlp.c_proj", w, m)
    yield "attn_pool.query", normal(config.n_queries, d, std=1.0)
    yield "attn_pool.pos_embed", sincos_table(d, 16).to(torch.bfloat16)
    yield from linear("attn_pool.kv_proj", d, w, bias=False)
    yield from norm("attn_pool.ln_q", d)
    yield from norm("attn_pool.ln_kv", d)
    yield "attn_pool.attn.in_proj_weight", normal(3 * d, d, std=d ** -0.5)
    yield "attn_pool.attn.in_proj_bias", normal(3 * d, std=0.02)
    yield from linear("attn_pool.attn.out_proj", d, d)
    yield from norm("ln_post", d)
    yield "proj", normal(d, d, std=d ** -0.5)


def test_image() -> Image.Image:
    """A seeded 640×480 picture: smooth colour gradients under noise, so the resize has something to do."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(SEED)
    rows, columns = np.mgrid[0:480, 0:640]
    base = np.stack([rows / 480 * 255, columns / 640 * 255, (rows + columns) % 256], axis=-1)
    noisy = base + rng.normal(0, 40, base.shape)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def bicubic(table: torch.Tensor, side: int) -> torch.Tensor:
    """A 16×16 table resized to side×side on its grid, in float32 (align_corners=False), flattened row-major."""
    import torch.nn.functional as F

    source = math.isqrt(table.shape[0])
    grid = table.float().reshape(1, source, source, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(side * side, -1).to(table.dtype)


def reference_tower(w: dict[str, torch.Tensor], config: VisionConfig, pixels: torch.Tensor) -> torch.Tensor:
    """The tower of §6.2 in plain PyTorch, in the weights' dtype: pixels [B, 3, 448, 448] → [B, 256, output_dim]."""
    import torch.nn.functional as F

    width, heads, grid = config.width, config.heads, config.grid
    head_dim = width // heads

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], EPS)

    x = F.conv2d(pixels.to(w["conv1.weight"].dtype), w["conv1.weight"], stride=config.patch_size).flatten(2).transpose(1, 2)
    x = norm(x + bicubic(w["positional_embedding"], grid), "ln_pre")
    batch, length = x.shape[:2]
    for n in range(config.layers):
        p = f"transformer.resblocks.{n}."
        qkv = F.linear(norm(x, p + "ln_1"), w[p + "attn.in_proj.weight"], w[p + "attn.in_proj.bias"])
        # per head interleaved: features h·3d … h·3d+3d−1 are head h's q, k and v
        q, k, v = qkv.view(batch, length, heads, 3 * head_dim).transpose(1, 2).split(head_dim, dim=-1)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, width)
        x = x + F.linear(attended, w[p + "attn.out_proj.weight"], w[p + "attn.out_proj.bias"])
        hidden = F.gelu(F.linear(norm(x, p + "ln_2"), w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"]))
        x = x + F.linear(hidden, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
    # The resampler: 256 queries (with the 16×16 table) attend the patches (keys with the table resized, values without).
    kv = norm(F.linear(x, w["attn_pool.kv_proj.weight"]), "attn_pool.ln_kv")
    queries = norm(w["attn_pool.query"], "attn_pool.ln_q") + w["attn_pool.pos_embed"]
    keys = kv + bicubic(w["attn_pool.pos_embed"], grid)
    wq, wk, wv = w["attn_pool.attn.in_proj_weight"].chunk(3)
    bq, bk, bv = w["attn_pool.attn.in_proj_bias"].chunk(3)

    def split_heads(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (-1, POOL_HEAD_DIM)).transpose(-3, -2)

    q = split_heads(F.linear(queries, wq, bq)).expand(batch, -1, -1, -1)
    pooled = F.scaled_dot_product_attention(q, split_heads(F.linear(keys, wk, bk)), split_heads(F.linear(kv, wv, bv)))
    pooled = F.linear(pooled.transpose(1, 2).flatten(2), w["attn_pool.attn.out_proj.weight"], w["attn_pool.attn.out_proj.bias"])
    return norm(pooled, "ln_post") @ w["proj"]


def tower_plan(config: VisionConfig, fmt: str) -> dict[str, str]:
    """The tower's nn.Linear modules in `fmt`; not the resampler's nn.MultiheadAttention, whose forward reads its
    projections' weights itself."""
    parts = ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")
    names = [f"transformer.resblocks.{n}.{part}" for n in range(config.layers) for part in parts]
    return dict.fromkeys([*names, "attn_pool.kv_proj"], fmt)


def worker_tower(args: argparse.Namespace) -> dict:
    """Build one variant, encode the image twice (the first pays one-time costs), save the second's output."""
    import torch

    from qwen_engine.images import pixels
    from qwen_engine.model.vision import VisionTower

    config = tower_config(args.layers)
    image = pixels(test_image())[None]
    t0 = time.perf_counter()
    encode, tensors = build_variant(args.worker, lambda: random_weights(config),
                                    lambda weights, pixels: reference_tower(weights, config, pixels),
                                    lambda: VisionTower(config), lambda fmt: tower_plan(config, fmt))
    build_s = time.perf_counter() - t0
    out, first_s, image_s = encode_twice(encode, image)
    torch.save(out[0].float(), output_path(args.scratch, args.worker))
    return {"image_s": image_s, "first_image_s": first_s, "build_s": build_s, "peak_rss_mb": peak_rss_mb(),
            "weights_mb": sum(t.nbytes for t in tensors) / 2**20}


def worker_ttft(args: argparse.Namespace) -> dict:
    import qwen_engine

    model = qwen_engine.load(args.scratch / "qwen-vl-chat", progress=False)
    load_s = time.perf_counter() - STARTED
    content = [{"type": "image", "image": str(args.scratch / "qwen-vl-chat" / "picture.png")},
               {"type": "text", "text": "What is this?"}]
    model.chat([{"role": "user", "content": content}], max_tokens=1)
    return {"start_to_first_token_s": time.perf_counter() - STARTED, "load_s": load_s, "peak_rss_mb": peak_rss_mb()}


def write_tiny_qwen_vl(directory: Path) -> None:
    """A tiny Qwen-VL-Chat directory in the official layout, as the tests write it (tests/tiny.py): a 2-layer decoder
    and tower, the default model's vocabulary as qwen.tiktoken, one picture."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny import write_qwen_vl

    from qwen_engine.checkpoint import GGUFSource
    from qwen_engine.default_model import default_model_path

    write_qwen_vl(directory, GGUFSource(default_model_path(progress=False)).gguf.metadata["tokenizer.ggml.tokens"])
    test_image().save(directory / "picture.png")


def main() -> None:
    args = arguments(__doc__, 48, "tower", (*VARIANTS, TTFT))
    if args.worker:
        work(args, worker_ttft if args.worker == TTFT else worker_tower)
        return

    args.scratch = Path(tempfile.mkdtemp(prefix="qwen-vision-bench-"))
    try:
        write_tiny_qwen_vl(args.scratch / "qwen-vl-chat")
        spawn(__file__, args, TTFT)  # converts the tiny checkpoint and builds the kernels once: a user's second start
        runs = alternate((*VARIANTS, TTFT), args.rounds, lambda job: spawn(__file__, args, job))
        found = errors(args.scratch, VARIANTS)
    finally:
        shutil.rmtree(args.scratch, ignore_errors=True)
    text = report(args, runs, found)
    update_section("vision", text, args.output)
    print(text)


def report(args: argparse.Namespace, runs: dict[str, list[dict]], found: dict[str, dict[str, float]]) -> str:
    import torch

    config = tower_config(args.layers)
    size = ("the real size" if args.layers == 48 else
            f"**a shortened tower: {args.layers} of the real 48 layers** (a development run; not the real size)")
    command = "python benchmarks/vision.py" + (f" --rounds {args.rounds}" if args.rounds != 3 else "") + (
        f" --layers {args.layers}" if args.layers != 48 else "")
    default_s = median(runs[DEFAULT], "image_s")
    lines = [
        "## Qwen-VL visual tower", "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}.", "",
        f"- Machine: {machine()}; torch {torch.__version__}; {args.threads} threads",
        f"- Tower: {size}: width {config.width}, {config.layers} layers, {config.heads} heads, MLP {config.mlp_width}, "
        f"output {config.output_dim}; one {config.image_size}×{config.image_size} image → {config.grid ** 2} patches → "
        f"{config.n_queries} vectors. Seeded random weights, rounded to bfloat16 as the checkpoint stores them.",
        f"- Medians of {args.rounds} rounds, variants alternating (in reverse order every other round), each a fresh "
        "process. s/image: the second image encoded in the process (the first pays one-time costs: its column); "
        "weights: the bytes of the tensors the tower holds; peak RSS: the whole process, building the tower included. "
        "Errors: the variant's 256×4096 output against the float32 reference's on the same image (max |Δ|, "
        "max |Δ| ÷ max |reference|, ‖Δ‖ ÷ ‖reference‖).",
        "- q8_0 and int8: the tower in bfloat16 with its linears (attn.in_proj, attn.out_proj, mlp.c_fc, mlp.c_proj, "
        "attn_pool.kv_proj) replaced by the decoder's formats (quantized.py's `quantize_modules`); build s includes "
        "that conversion.", "",
        *variant_table(runs, found, VARIANTS, "image"),
    ]
    verdict = "; ".join(
        f"{fmt}: {median(runs[f'qwen-engine {fmt}'], 'image_s') / default_s:.2f}× the time, "
        f"{found[f'qwen-engine {fmt}']['norm_relative'] / found[DEFAULT]['norm_relative']:.1f}× the error" for fmt in ("q8_0", "int8"))
    chat = runs[TTFT]
    lines += [
        "", f"The decoder's formats against the default bfloat16 tower (relative error by norm): {verdict}. A format "
        "would pay as the tower's where it is more than 10% faster with an error comparable to bfloat16's.",
        "", f"{TTFT.capitalize()} on a tiny Qwen-VL-Chat checkpoint (2-layer decoder and tower, the real tokenizer; "
        "the engine's defaults, a warm converted-weights cache): `qwen_engine.load(dir)`, then `model.chat([{image, "
        "\"What is this?\"}], max_tokens=1)`, timed from process start: "
        f"**{median(chat, 'start_to_first_token_s'):.2f} s** to the first token (load done at "
        f"{median(chat, 'load_s'):.2f} s; peak RSS {median(chat, 'peak_rss_mb'):.0f} MB).",
        "", "### Every run", "", "```", json.dumps(runs, indent=1), "```", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
