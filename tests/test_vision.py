"""Qwen-VL's visual tower (model/vision.py) against a float64 reference written here from qwen-family.md §6.2 with
explicit loops: per-head interleaved q/k/v, the resampler's cross-attention from the stacked Wq/Wk/Wv, the 2-D
sin-cos table. A scaled-down tower keeps the real image size and patch (448 px, 14: a 32×32 grid) and the 256
queries (16×16)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qwen_engine.config import VisionConfig
from qwen_engine.model.vision import VisionTower, resize_grid, sincos_table
from tiny import official_state

CONFIG = VisionConfig(width=48, layers=2, heads=4, mlp_ratio=2.5, output_dim=256, n_queries=256)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + 1e-6) * weight + bias


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = q @ k.T / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v


def reference(state: dict[str, torch.Tensor], config: VisionConfig, pixels: torch.Tensor) -> torch.Tensor:
    """The tower for one image [3, 448, 448], in float64, from the description alone."""
    s = {name: tensor.double() for name, tensor in state.items()}
    w, heads, hd, grid = config.width, config.heads, config.width // config.heads, config.grid
    # Patch embedding: patch (r, c) → row r·grid + c.
    patches = torch.stack([(s["conv1.weight"] * pixels.double()[:, r * 14 : r * 14 + 14, c * 14 : c * 14 + 14]).sum((1, 2, 3))
                           for r in range(grid) for c in range(grid)])
    x = layer_norm(patches + resize_grid(s["positional_embedding"], grid), s["ln_pre.weight"], s["ln_pre.bias"])
    for n in range(config.layers):
        p = f"transformer.resblocks.{n}."
        h = layer_norm(x, s[p + "ln_1.weight"], s[p + "ln_1.bias"])
        qkv = h @ s[p + "attn.in_proj.weight"].T + s[p + "attn.in_proj.bias"]
        heads_out = []
        for head in range(heads):
            base = head * 3 * hd  # q, k, v of one head side by side
            q, k, v = (qkv[:, base + i * hd : base + (i + 1) * hd] for i in range(3))
            heads_out.append(attention(q, k, v))
        x = x + torch.cat(heads_out, dim=1) @ s[p + "attn.out_proj.weight"].T + s[p + "attn.out_proj.bias"]
        h = layer_norm(x, s[p + "ln_2.weight"], s[p + "ln_2.bias"])
        hidden = h @ s[p + "mlp.c_fc.weight"].T + s[p + "mlp.c_fc.bias"]
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
        x = x + hidden @ s[p + "mlp.c_proj.weight"].T + s[p + "mlp.c_proj.bias"]
    kv = layer_norm(x @ s["attn_pool.kv_proj.weight"].T, s["attn_pool.ln_kv.weight"], s["attn_pool.ln_kv.bias"])
    keys = kv + resize_grid(s["attn_pool.pos_embed"], grid)
    queries = layer_norm(s["attn_pool.query"], s["attn_pool.ln_q.weight"], s["attn_pool.ln_q.bias"]) + s["attn_pool.pos_embed"]
    d, wide = config.output_dim, 128
    wq, wk, wv = s["attn_pool.attn.in_proj_weight"].split(d)
    bq, bk, bv = s["attn_pool.attn.in_proj_bias"].split(d)
    q, k, v = queries @ wq.T + bq, keys @ wk.T + bk, kv @ wv.T + bv
    pooled = torch.cat([attention(q[:, i : i + wide], k[:, i : i + wide], v[:, i : i + wide]) for i in range(0, d, wide)], 1)
    pooled = pooled @ s["attn_pool.attn.out_proj.weight"].T + s["attn_pool.attn.out_proj.bias"]
    return layer_norm(pooled, s["ln_post.weight"], s["ln_post.bias"]) @ s["proj"]


@pytest.fixture(scope="module")
def tower() -> tuple[VisionTower, dict[str, torch.Tensor]]:
    state = official_state(CONFIG)
    model = VisionTower(CONFIG)
    model.load_state_dict(state)  # the checkpoint's names, prefix stripped, load as they are
    return model.eval(), state


def test_the_tower_matches_the_float64_reference(tower) -> None:
    model, state = tower
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours = model(pixels)
    assert ours.shape == (2, 256, CONFIG.output_dim)
    for image in range(2):
        expected = reference(state, CONFIG, pixels[image])
        assert (ours[image].double() - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert not torch.allclose(ours[0], ours[1])


def test_bfloat16_stays_close_to_float32(tower) -> None:
    model, state = tower
    half = VisionTower(CONFIG)
    half.load_state_dict(state)
    half = half.to(torch.bfloat16).eval()
    pixels = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        exact, approximate = model(pixels), half(pixels).float()
    assert (approximate - exact).abs().max() <= 0.05 * exact.abs().max()


def test_sincos_table_layout() -> None:
    """§6.2: the first half encodes the column, the second the row; each half sin then cos, ω_k = 10000^(−k/(D/4))."""
    table = sincos_table(16, 4)  # D = 16: four frequencies a half
    row, column = 2, 3
    entry = table[row * 4 + column]
    omega = [10000 ** (-k / 4) for k in range(4)]
    expected = [math.sin(column * w) for w in omega] + [math.cos(column * w) for w in omega]
    expected += [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega]
    assert torch.allclose(entry, torch.tensor(expected, dtype=torch.float32), atol=1e-6)


def test_positions_are_resized_bicubically_on_the_grid() -> None:
    """In float32 whatever the table's dtype (§6.2), the 16×16 grid row-major in and the 32×32 grid row-major out."""
    table = torch.randn(256, 8, dtype=torch.bfloat16)
    resized = resize_grid(table, 32)
    grid = table.float().reshape(16, 16, 8)
    expected = F.interpolate(grid.permute(2, 0, 1)[None], size=(32, 32), mode="bicubic", align_corners=False)[0]
    assert resized.dtype == torch.bfloat16 and resized.shape == (1024, 8)
    assert torch.equal(resized, expected.permute(1, 2, 0).reshape(1024, 8).to(torch.bfloat16))
    assert resize_grid(table, 16) is table


def test_the_real_visual_config_and_its_shapes() -> None:
    """Qwen-VL's own numbers (§6.1): MLP width 8192, 32 resampler heads, 1,935,610,624 parameters in the tower."""
    config = VisionConfig.from_dict({"image_size": 448, "patch_size": 14, "width": 1664, "layers": 48, "heads": 16,
                                     "mlp_ratio": 4.9231, "output_dim": 4096, "image_start_id": 151857, "unknown": 1})
    assert (config.grid, config.mlp_width, config.pool_heads) == (32, 8192, 32)
    with torch.device("meta"):
        tower = VisionTower(config)
    assert sum(p.numel() for p in tower.parameters()) == 1_935_610_624
