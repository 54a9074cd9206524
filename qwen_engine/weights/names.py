"""Renaming checkpoint tensors through a table whose per-layer entries use `{}` for the layer index."""

from __future__ import annotations

import re


class LayerNameMap:
    """Maps `prefix.N.rest` names through `table` entries written as `prefix.{}.rest`; unknown names pass through
    unchanged (the loader then reports them as unexpected)."""

    def __init__(self, table: dict[str, str], layer_prefix: str) -> None:
        self.table = table
        self.layer_prefix = layer_prefix  # e.g. "blk." or "transformer.h."
        self._layer = re.compile("^" + re.escape(layer_prefix) + r"(\d+)\.")

    def __call__(self, name: str) -> str:
        layer = self._layer.match(name)
        if layer is None:
            return self.table.get(name, name)
        template = self.table.get(self._layer.sub(self.layer_prefix + "{}.", name))
        return template.format(layer.group(1)) if template else name


# Checkpoint projections the decoder stores concatenated, in order (model/decoder.py): one larger matmul reads the
# activations once. Quantized formats treat each packed projection as one matrix.
PACKED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def stored_as(module: str) -> list[str]:
    """Checkpoint weight names behind a decoder module (`model.layers.0.mlp.gate_up_proj` → gate and up)."""
    for packed, parts in PACKED.items():
        if module.endswith("." + packed):
            layer = module[: -len(packed)]
            return [f"{layer}{part}.weight" for part in parts]
    return [f"{module}.weight"]


def packed_with(tensor: str) -> list[str]:
    """The checkpoint weights stored in the same decoder module as `tensor` (itself alone when not packed)."""
    for packed, parts in PACKED.items():
        for part in parts:
            if tensor.endswith(f".{part}.weight"):
                return stored_as(tensor[: -len(f"{part}.weight")] + packed)
    return [tensor]
