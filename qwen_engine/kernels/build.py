"""How the native kernels are compiled: one plain C shared library (no Python or PyTorch headers) per variant.

Torch-free, so that setup.py can load it by path: a wheel carries every variant prebuilt (kernels/prebuilt/), and a
machine without a C compiler still gets them; a source checkout compiles its CPU's variant at first use instead
(kernels/__init__.py), into the cache.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = tuple(HERE / name for name in ("block_quant.c", "decode_layer.c", "layer_ops.c", "amx_matmul.c"))
HEADERS = (HERE / "block_quant.h", HERE / "simd.h")
PREBUILT = HERE / "prebuilt"
CFLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp")
# The compiler flags of each instruction set a build may use (the sources check with #ifdef: simd.h picks its vector
# width and dot product, amx_matmul.c compiles to a stub without AMX).
FEATURE_CFLAGS = {
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "avx_vnni": ("-mavxvnni",),
    "avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"),
    "avx512_bf16": ("-mavx512bf16",),
    "amx": ("-mamx-tile", "-mamx-bf16"),
}
# Every build: the instruction sets it uses. A wheel carries them all; a source checkout compiles its CPU's one. A
# CPU gets the richest build its flags allow within its variant (every AMX CPU has AVX-512 BF16; AVX-512 CPUs may lack
# it, as Ice Lake does).
BUILDS = {
    "amx": frozenset({"avx2", "avx512", "avx512_bf16", "amx"}),
    "avx512_bf16": frozenset({"avx2", "avx512", "avx512_bf16"}),
    "avx512": frozenset({"avx2", "avx512"}),
    "avx2_vnni": frozenset({"avx2", "avx_vnni"}),
    "avx2": frozenset({"avx2"}),
}


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def flags(features: frozenset[str]) -> list[str]:
    return [*CFLAGS, *(flag for feature, more in FEATURE_CFLAGS.items() if feature in features for flag in more)]


def sources_digest() -> str:
    """Changes with any source or header: a prebuilt library of other sources is never loaded."""
    return hashlib.sha256(b"\n".join(path.read_bytes() for path in SOURCES + HEADERS)).hexdigest()


def build_for(variant: str, cpu_features: frozenset[str]) -> str:
    """The build a CPU with these flags runs for `variant` (cpu.py's names): an AVX-512 CPU without AVX-512 BF16 (Ice
    Lake) takes the build without it."""
    if variant == "avx512":
        return "avx512_bf16" if "avx512_bf16" in cpu_features else "avx512"
    return variant


def compile_library(cc: str, features: frozenset[str], target: Path) -> None:
    """Compile the sources with `features`' flags into `target`: a temporary file, checked to load, then renamed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f"{target.name}.partial-", dir=target.parent)
    os.close(descriptor)
    partial = Path(name)
    try:
        command = [cc, *flags(features), "-o", str(partial), *map(str, SOURCES), "-lm"]
        subprocess.run(command, capture_output=True, check=True, timeout=120)
        ctypes.CDLL(str(partial)).qe_decode_batch  # loads and links, or raises OSError/AttributeError
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def build_prebuilt(directory: Path, cc: str) -> list[str]:
    """Every build into `directory` (a wheel's kernels/prebuilt/) with the digest of their sources; the names of
    those this compiler could not make (an old one without AMX, say): that variant then compiles at first use."""
    failed = []
    for name, features in BUILDS.items():
        try:
            compile_library(cc, features, directory / f"qwen_kernels-{name}.so")
        except (OSError, AttributeError, subprocess.SubprocessError):
            failed.append(name)
    (directory / "sources.sha256").write_text(sources_digest() + "\n")
    return failed
