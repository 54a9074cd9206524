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
# activations once. By the last part of the name, so that an expert's or shared expert's MLP packs as a layer's does
# (`mlp.experts.3.gate_proj` and `up_proj` → `mlp.experts.3.gate_up_proj`). Quantized formats treat each packed
# projection as one matrix.
PACKED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def stored_as(module: str) -> list[str]:
    """Checkpoint weight names behind a decoder module (`model.layers.0.mlp.gate_up_proj` → gate and up)."""
    parent, _, last = module.rpartition(".")
    if last in PACKED:
        return [f"{parent}.{part}.weight" for part in PACKED[last]]
    return [f"{module}.weight"]


def packed_with(tensor: str) -> list[str]:
    """The checkpoint weights stored in the same decoder module as `tensor` (itself alone when not packed)."""
    parent, _, last = tensor.removesuffix(".weight").rpartition(".")
    for packed, parts in PACKED.items():
        if last in parts:
            return stored_as(f"{parent}.{packed}")
    return [tensor]
