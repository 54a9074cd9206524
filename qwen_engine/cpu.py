"""Which native kernel variant this CPU runs, decided from its flags and the environment alone (no torch: `qwen info`
reports it without loading anything; kernels/ builds and loads the variant chosen here).

Variants, best first:
- "amx": decoding on AVX-512 VNNI, prefill products on AMX tiles straight from the weight blocks;
- "avx512": decoding and prefill on AVX-512 VNNI integer products straight from the blocks (a CPU without AMX);
- "avx2_vnni": the same kernels on pairs of 256-bit registers, dot products on AVX-VNNI (Intel from Alder Lake on;
  not implied by AVX-512 VNNI: Zen 4 lacks it);
- "avx2": the same without VNNI (AVX2 + FMA + F16C; Haswell to Zen 3): most CPUs in use;
- "none": PyTorch's paths only (and `quant=auto` picks int8/int4, which PyTorch's own kernels read).
`QWEN_ENGINE_CPU` caps the choice, so that one machine can run what a lesser CPU would (comparisons, tests,
benchmarks); `QWEN_ENGINE_NO_KERNELS=1` is the same as `QWEN_ENGINE_CPU=none`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import QwenError

CPU_ENV = "QWEN_ENGINE_CPU"
DISABLE_ENV = "QWEN_ENGINE_NO_KERNELS"
AVX2 = ("avx2", "fma", "f16c")
AVX512 = (*AVX2, "avx512f", "avx512bw", "avx512vl", "avx512_vnni")
VARIANTS = {"amx": (*AVX512, "amx_tile", "amx_bf16"), "avx512": AVX512, "avx2_vnni": (*AVX2, "avx_vnni"), "avx2": AVX2,
            "none": ()}  # best first: the flags each needs


def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def kernel_variant() -> str:
    """The best variant this CPU can run, at most the one `QWEN_ENGINE_CPU` names."""
    cap = os.environ.get(CPU_ENV, "").strip().lower() or next(iter(VARIANTS))
    if cap not in VARIANTS:
        raise QwenError(f"{CPU_ENV}={cap} is not a kernel variant: use {', '.join(VARIANTS)}")
    if os.environ.get(DISABLE_ENV) == "1":
        return "none"
    names, flags = list(VARIANTS), cpu_flags()
    return next(name for name in names[names.index(cap):] if set(VARIANTS[name]) <= flags)
