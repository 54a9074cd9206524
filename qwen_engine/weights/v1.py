"""Qwen (v1) checkpoints in the qwen2 layout the decoder validates: names mapped and the fused QKV split.

The math is the same as Qwen2's (qwen-family.md §0, §1.3); only names differ, and v1 stores q, k and v as one
`c_attn` matrix whose output rows are Q, then K, then V (§1.2). The SiLU-gated branch is `w2`, the plain one `w1`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .names import LayerNameMap

if TYPE_CHECKING:
    import torch

# The intermediate name both v1 formats map their fused projection to, before `split_fused_qkv`.
FUSED_QKV = "model.layers.{}.self_attn.c_attn"

# qwen-family.md §1.2: HF v1 name → qwen2 name; `{}` is the layer index.
_V1_NAMES = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "transformer.h.{}.ln_1.weight": "model.layers.{}.input_layernorm.weight",
    "transformer.h.{}.attn.c_attn.weight": FUSED_QKV + ".weight",
    "transformer.h.{}.attn.c_attn.bias": FUSED_QKV + ".bias",
    "transformer.h.{}.attn.c_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "transformer.h.{}.ln_2.weight": "model.layers.{}.post_attention_layernorm.weight",
    "transformer.h.{}.mlp.w1.weight": "model.layers.{}.mlp.up_proj.weight",
    "transformer.h.{}.mlp.w2.weight": "model.layers.{}.mlp.gate_proj.weight",
    "transformer.h.{}.mlp.c_proj.weight": "model.layers.{}.mlp.down_proj.weight",
}
_FUSED = re.compile(r"^model\.layers\.(\d+)\.self_attn\.c_attn\.(weight|bias)$")


# The qwen2 name of an HF v1 tensor.
v1_name = LayerNameMap(_V1_NAMES, "transformer.h.")


def fused_parts(name: str) -> list[str]:
    """The names a tensor is split into: a fused c_attn weight/bias's q, k and v, in the order of its rows; else
    the name itself."""
    fused = _FUSED.match(name)
    if fused is None:
        return [name]
    layer, kind = fused.groups()
    return [f"model.layers.{layer}.self_attn.{part}.{kind}" for part in ("q_proj", "k_proj", "v_proj")]


def split_fused_qkv(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every fused c_attn weight/bias by q/k/v thirds (v1 is multi-head: three equal parts)."""
    result = {}
    for name, tensor in tensors.items():
        parts = fused_parts(name)
        result |= dict(zip(parts, tensor.chunk(len(parts), dim=0)))
    return result
