"""A wheel built from the repository carries every kernel build (setup.py, kernels/build.py) and a machine with no C
compiler runs them: the engine loads the library for its CPU from the wheel and compiles nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qwen_engine.cpu import kernel_variant
from qwen_engine.kernels.build import BUILDS

ROOT = Path(__file__).resolve().parents[1]
CHECK = """
import json, torch, qwen_engine
from qwen_engine.kernels import cpu_kernels
from qwen_engine.model.quantized import pack_blocks, quantize_blocks
kernels = cpu_kernels()
result = {"package": qwen_engine.__file__, "library": None if kernels is None else str(kernels.path)}
if kernels is not None:
    weight = torch.randn(64, 128)
    blocks = quantize_blocks(weight, 8)
    x = torch.randn(3, 128).to(torch.bfloat16)
    product = kernels.matmul(x, *pack_blocks(blocks), blocks.scales)
    reference = torch.nn.functional.linear(x.float(), blocks.dequantized())
    result["error"] = float((product.float() - reference).abs().max() / reference.abs().max())
print(json.dumps(result))
"""


@pytest.mark.slow
def test_a_wheel_carries_the_kernels_and_runs_them_without_a_compiler(tmp_path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "wheel").glob("qwen_engine-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    assert {f"qwen_engine/kernels/prebuilt/qwen_kernels-{name}.so" for name in BUILDS} <= names
    assert "qwen_engine/kernels/prebuilt/sources.sha256" in names
    environment = {key: value for key, value in os.environ.items() if key not in ("CC", "PYTHONPATH")}
    environment |= {"PYTHONPATH": str(tmp_path / "site"), "PATH": str(Path(sys.executable).parent),
                    "QWEN_ENGINE_CACHE": str(tmp_path / "cache")}  # no compiler to be found, nothing compiled yet
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=environment,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["package"]).is_relative_to(tmp_path / "site")  # the wheel's code, not this checkout's
    if kernel_variant() == "none":
        assert result["library"] is None  # (a CPU without AVX2: no variant to run, nothing to load)
        return
    assert Path(result["library"]).is_relative_to(tmp_path / "site" / "qwen_engine" / "kernels" / "prebuilt")
    assert result["error"] <= 0.02
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing was compiled
