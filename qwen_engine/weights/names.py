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
