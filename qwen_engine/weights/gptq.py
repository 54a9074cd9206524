"""The official GPTQ and AWQ releases (Qwen2.5-*-Instruct-GPTQ-Int4/Int8 and -AWQ, Qwen1.5/Qwen2 likewise, QwQ-AWQ,
v1's Int4/Int8 chat models): their packed linear layers made float weights again, as the kernels that run them
compute them, so the rest of the loader sees an ordinary checkpoint.

A packed layer `X` stores `X.qweight`, `X.qzeros`, `X.scales` (and GPTQ's `X.g_idx`) instead of `X.weight`:

- GPTQ (AutoGPTQ / GPTQModel): qweight int32 [K·b/32, N], the inputs packed along its rows, value j of a word at
  bits j·b; qzeros int32 [G, N·b/32], packed the same way along the outputs; scales [G, N]; g_idx [K], each input's
  group (k // group_size without act-order, a permutation's groups with it). w[k, n] = s[g, n] · (q[k, n] − z[g, n])
  with g = g_idx[k], where the checkpoint's packer stored z − 1 (checkpoint_format "gptq", the released files) or z
  itself ("gptq_v2").
- AWQ (AutoAWQ's GEMM layout): qweight int32 [K, N/8], the outputs packed along its columns in the order 0, 2, 4, 6,
  1, 3, 5, 7 within each word; qzeros int32 [K/group, N/8] alike; scales [K/group, N]; w = s · (q − z).

The weight is then wᵀ [N, K], nn.Linear's layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import QwenError

if TYPE_CHECKING:  # torch is imported where weights are unpacked: reading the config (`qwen info`) needs none
    import torch

    from .quants import BlockCodes

PARTS = ("qweight", "qzeros", "scales", "g_idx")
AWQ_COLUMN_OF_NIBBLE = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a packed word holds column AWQ_COLUMN_OF_NIBBLE[i] of its 8


@dataclass(frozen=True, slots=True)
class PackedFormat:
    """A checkpoint's `quantization_config` (config.json) or quantize_config.json."""

    method: str  # "gptq" or "awq"
    bits: int
    group_size: int  # −1: one group for all inputs
    zero_stored_minus_one: bool  # GPTQ's packer before its v2 format stored each zero point less one
    act_order: bool = False  # desc_act: GPTQ's inputs quantized in another order, g_idx says each one's group
    sym: bool = False  # the zero point fixed at 2^(bits−1)

    @property
    def name(self) -> str:
        return f"{self.method}-int{self.bits}"

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> PackedFormat:
        method = str(raw.get("quant_method", "gptq")).lower()
        bits, group = int(raw.get("bits", raw.get("w_bit", 4))), int(raw.get("group_size", raw.get("q_group_size", 128)))
        if method not in ("gptq", "awq"):
            raise QwenError(f"quantization method {method!r} is not supported: qwen-engine reads GPTQ and AWQ checkpoints")
        if bits not in ((4, 8) if method == "gptq" else (4,)) or group == 0 or group < -1:
            raise QwenError(f"{method} with {bits} bits in groups of {group} is not supported: the official releases are "
                            "GPTQ 4- and 8-bit and AWQ 4-bit")
        if method == "awq" and str(raw.get("version", "gemm")).lower() != "gemm":
            raise QwenError(f"AWQ version {raw.get('version')!r} is not supported: qwen-engine reads AWQ's GEMM layout")
        v2 = str(raw.get("checkpoint_format", "gptq")).lower() == "gptq_v2"
        return cls(method, bits, group, method == "gptq" and not v2, bool(raw.get("desc_act", False)),
                   bool(raw.get("sym", method == "gptq")) and method == "gptq")

    @property
    def block_type(self) -> str | None:
        """The GGUF block type whose values these layers hold exactly, where the config promises it ("Q5_0": 4-bit
        codes less their zero point, 16 added, lie in 0…31 with the group's scale, which a group that is a multiple
        of 32 gives every block; "Q8_0": symmetric 8-bit), so the CPU formats take them without requantizing; None
        otherwise (act-order gives the inputs of one block different groups)."""
        if self.group_size != -1 and self.group_size % 32 or self.act_order:
            return None
        return "Q5_0" if self.bits == 4 else "Q8_0" if self.sym else None

    def blocks(self, parts: dict[str, torch.Tensor], name: str) -> BlockCodes | None:
        """The layer's weight as blocks of 32 (weights/quants.py), bit for bit, or None where the values do not fit."""
        import torch

        from .quants import BlockCodes

        if self.block_type is None or parts["scales"].dtype != torch.float16 or self.weight_shape(parts)[1] % 32:
            return None
        codes, zeros, groups = self._integers(parts, name)
        if not torch.equal(groups, torch.arange(codes.shape[0]) // self._group(codes.shape[0])):
            return None
        offset = BlockCodes.OFFSETS[5 if self.bits == 4 else 8]
        values = codes - zeros[groups] + offset
        if values.min() < 0 or values.max() > 2 * offset - 1:
            return None
        scales = parts["scales"][groups[::32]]  # [K/32, N]: each block's group
        return BlockCodes(values.t().to(torch.uint8).contiguous(), scales.t().contiguous(), 5 if self.bits == 4 else 8)

    def weight(self, parts: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """The float32 weight [N, K] of packed layer `name` from its parts."""
        codes, zeros, groups = self._integers(parts, name)
        return (parts["scales"].float()[groups] * (codes - zeros[groups]).float()).t().contiguous()

    def weight_shape(self, parts: dict[str, torch.Tensor]) -> tuple[int, int]:
        """[N, K] of the layer, from its qweight's shape alone (no unpacking)."""
        rows, columns = parts["qweight"].shape
        per_word = 32 // self.bits
        return (columns * per_word, rows) if self.method == "awq" else (columns, rows * per_word)

    def _group(self, inputs: int) -> int:
        return inputs if self.group_size == -1 else self.group_size

    def _integers(self, parts: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes [K, N], zero points [G, N], each input's group [K]) of packed layer `name`."""
        import torch

        missing = [part for part in PARTS[:3] if part not in parts]
        if missing:
            raise QwenError(f"packed layer {name} lacks {', '.join(missing)}; the checkpoint is incomplete")
        awq = self.method == "awq"
        try:
            packed = parts["qweight"]
            codes = _unpack_columns(packed, self.bits, reorder=True) if awq else _unpack_rows(packed, self.bits)  # [K, N]
            zeros = _unpack_columns(parts["qzeros"], self.bits, reorder=awq)  # [G, N]
            inputs = codes.shape[0]
            groups = parts.get("g_idx")
            groups = torch.arange(inputs) // self._group(inputs) if groups is None else groups.long()
            zeros = zeros + (1 if self.zero_stored_minus_one else 0)
            if zeros.shape[1] != codes.shape[1] or parts["scales"].shape != zeros.shape or groups.shape != (inputs,):
                raise IndexError(f"qweight {tuple(packed.shape)}, qzeros {tuple(parts['qzeros'].shape)}, scales "
                                 f"{tuple(parts['scales'].shape)}")
            zeros[groups]  # (every group index names a row)
        except (IndexError, RuntimeError) as err:
            raise QwenError(f"packed layer {name} has parts of shapes that do not fit {self.name} ({err}); the "
                            "checkpoint is damaged") from None
        return codes, zeros, groups


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, N] holding 32/bits values a word down its rows → int32 [R·32/bits, N]."""
    import torch

    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    values = (packed.to(torch.int32)[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
    return values.reshape(-1, packed.shape[1])


def _unpack_columns(packed: torch.Tensor, bits: int, reorder: bool = False) -> torch.Tensor:
    """int32 [R, C] holding 32/bits values a word along its columns → int32 [R, C·32/bits] (AWQ's words: `reorder`)."""
    import torch

    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    values = (packed.to(torch.int32)[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)  # [R, C, nibble]
    if reorder:
        order = torch.empty(per_word, dtype=torch.long)
        order[list(AWQ_COLUMN_OF_NIBBLE)] = torch.arange(per_word)  # column j sits in nibble order[j]
        values = values[:, :, order]
    return values.reshape(packed.shape[0], -1)


class PackedLayers:
    """Collects the packed parts of a checkpoint as they are read, and gives each layer's float weight at the end."""

    def __init__(self, packed_format: PackedFormat) -> None:
        self.format = packed_format
        self._parts: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> bool:
        """Keep `tensor` if it is a packed part (True), else leave it to the caller (False)."""
        layer, _, part = name.rpartition(".")
        if part not in PARTS:
            return False
        self._parts.setdefault(layer, {})[part] = tensor
        return True

    def weights(self, as_blocks: Callable[[str], bool] = lambda name: False) -> dict[str, torch.Tensor]:
        """Checkpoint name `X.weight` → float32 [N, K], for every packed layer read; those `as_blocks` names (a
        caller takes their blocks instead: `PackedFormat.blocks`) as meta tensors of that shape, never unpacked."""
        import torch

        return {f"{layer}.weight": torch.empty(self.format.weight_shape(parts), device="meta")
                if as_blocks(f"{layer}.weight") else self.format.weight(parts, layer) for layer, parts in self._parts.items()}
