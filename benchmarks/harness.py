"""What the benchmark scripts share, so that they measure alike: workers in fresh processes over alternating rounds,
a process's own peak RSS, the machine's description, and for vision.py and audio.py an encoder variant (the engine's
or a plain PyTorch reference) built from seeded weights, timed, compared with the float32 reference and tabled.

Light to import (torch only inside the functions): audio.py's `qwen transcribe` worker must stay small.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from results import RESULTS

if TYPE_CHECKING:
    import torch

DEFAULT = "qwen-engine bfloat16"  # an encoder variant: the engine's default CPU format
REFERENCE = "reference float32"  # the plain PyTorch variant every error is measured against


def peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM, which exec starts afresh. getrusage's ru_maxrss (kB on Linux) survives
    exec, so a worker started from a large parent would report at least the parent's peak; it is only the fallback
    where /proc is not mounted."""
    status = Path("/proc/self/status")
    if not status.exists():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def machine() -> str:
    """The CPU, its cores usable here, the vector features the kernels choose between, and Python."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                 platform.processor())
    flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    features = [f for f in ("avx2", "avx_vnni", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f" {f}" in flags]
    return f"{model}; {len(os.sched_getaffinity(0))} cores usable; {', '.join(features)}; Python {platform.python_version()}"


def arguments(doc: str, layers: int, part: str, jobs: Sequence[str]) -> argparse.Namespace:
    """The command line of vision.py and audio.py, whose workers get --worker, --layers, --threads and --scratch from
    `spawn`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=layers,
                        help=f"{part} layers ({layers}: the real size; fewer for quick runs)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=jobs)
    parser.add_argument("--scratch", type=Path, help="(worker) the run's temporary directory")
    return parser.parse_args()


def work(args: argparse.Namespace, worker: Callable[[argparse.Namespace], dict]) -> None:
    """A torch worker's part: `worker` on --threads threads, its result printed as the JSON line `spawn` reads."""
    import torch

    torch.set_num_threads(args.threads)
    print(json.dumps(worker(args)))


def spawn(script: str, args: argparse.Namespace, job: str) -> dict:
    """Worker `job` of vision.py or audio.py (`script`) in a fresh process, so its time and peak RSS are its own, with
    the run's own cache (converted weights, compiled kernels); its last line of output is its JSON result."""
    from qwen_engine.cache_dir import CACHE_ENV

    command = [sys.executable, script, "--worker", job, "--layers", str(args.layers), "--threads", str(args.threads),
               "--scratch", str(args.scratch)]
    env = {**os.environ, CACHE_ENV: str(args.scratch / "cache")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def alternate(jobs: Sequence[str], rounds: int, run: Callable[[str], dict]) -> dict[str, list[dict]]:
    """Every job once a round, in reverse order every other round, so drift on a noisy machine hits all alike and
    no job always runs first; each result is logged as it comes."""
    runs: dict[str, list[dict]] = {job: [] for job in jobs}
    for round_ in range(rounds):
        for job in jobs if round_ % 2 == 0 else jobs[::-1]:
            runs[job].append(run(job))
            print(f"round {round_ + 1}: {job} {runs[job][-1]}", file=sys.stderr)
    return runs


class SeededWeights:
    """Random tensors for a checkpoint's layout from one seeded stream, rounded to bfloat16 as the official
    checkpoints store them: projections with std 1/√fan-in (unit-sized activations through all the layers),
    LayerNorm weights near 1. Each comes as the caller asks for it, so a caller keeping them in another dtype
    peaks at its own size."""

    def __init__(self, seed: int) -> None:
        import torch

        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        import torch

        return (torch.randn(*shape, generator=self.generator) * std + mean).to(torch.bfloat16)

    def norm(self, prefix: str, size: int) -> Iterator[tuple[str, torch.Tensor]]:
        yield f"{prefix}.weight", self.normal(size, std=0.1, mean=1.0)
        yield f"{prefix}.bias", self.normal(size, std=0.1)

    def linear(self, prefix: str, rows: int, columns: int, bias: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        yield f"{prefix}.weight", self.normal(rows, columns, std=columns ** -0.5)
        if bias:
            yield f"{prefix}.bias", self.normal(rows, std=0.02)


def build_variant(variant: str, weights: Callable[[], Iterable[tuple[str, torch.Tensor]]],
                  reference: Callable[..., torch.Tensor], module: Callable[[], torch.nn.Module],
                  plan: Callable[[str], dict[str, str]]) -> tuple[Callable[..., torch.Tensor], list[torch.Tensor]]:
    """The forward of `variant` and the tensors it holds. "reference DTYPE": `reference(tensors, *inputs)` on the
    checkpoint's tensors in that dtype. "qwen-engine FORMAT": `module()` built as qwen_engine.load builds it, in
    float32 for FORMAT float32, else in bfloat16 with the linears `plan(FORMAT)` names in the decoder's FORMAT
    (q8_0, int8) where it is not bfloat16."""
    import torch

    kind, _, fmt = variant.partition(" ")
    if kind == "reference":
        dtype = getattr(torch, fmt)
        tensors = {name: tensor.to(dtype) for name, tensor in weights()}
        return functools.partial(reference, tensors), list(tensors.values())
    from qwen_engine.llm import keep_temporaries_in_heap
    from qwen_engine.model.quantized import quantize_modules

    dtype = torch.float32 if fmt == "float32" else torch.bfloat16
    with torch.device("meta"):  # allocates nothing: the tensors are assigned, as the loader does
        built = module()
    built.load_state_dict({name: tensor.to(dtype) for name, tensor in weights()}, assign=True)
    if fmt not in ("float32", "bfloat16"):
        quantize_modules(built, plan(fmt))
    keep_temporaries_in_heap()  # as qwen_engine.load ends
    return built.eval(), list(built.state_dict().values())


def encode_twice(encode: Callable[..., torch.Tensor], *inputs: object) -> tuple[torch.Tensor, float, float]:
    """The output of a second forward, and the seconds of the first (it pays the one-time costs) and the second."""
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        encode(*inputs)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = encode(*inputs)
        return out, first_s, time.perf_counter() - t0


def output_path(scratch: Path, variant: str) -> Path:
    """Where a variant's worker leaves its output for `errors`."""
    return scratch / f"{variant.replace(' ', '-')}.pt"


def errors(scratch: Path, variants: Iterable[str]) -> dict[str, dict[str, float]]:
    """Each variant's output against the float32 reference's, on the same input: max |Δ|, max |Δ| ÷ max |reference|
    and ‖Δ‖ ÷ ‖reference‖."""
    import torch

    exact = torch.load(output_path(scratch, REFERENCE))
    found = {}
    for variant in variants:
        difference = torch.load(output_path(scratch, variant)) - exact
        found[variant] = {"max_abs": difference.abs().max().item(),
                          "max_abs_relative": (difference.abs().max() / exact.abs().max()).item(),
                          "norm_relative": (difference.norm() / exact.norm()).item()}
    return found


def variant_table(runs: dict[str, list[dict]], found: dict[str, dict[str, float]], variants: Iterable[str], unit: str,
                  duration: float | None = None) -> list[str]:
    """The variants' table in vision.py's and audio.py's sections: the medians of the seconds per `unit` (the second
    encoded; against the default's, and as a real-time factor where the input lasts `duration` s), of the first's
    and the build's, the weights and the peak RSS, and the errors."""
    rtf = duration is not None
    lines = [f"| variant | s/{unit} | ÷ default |{' RTF |' if rtf else ''} first {unit} (s) | build (s) | weights (MB) | "
             "peak RSS (MB) | max abs err | max err ÷ max | rel. err (norm) |", "|---" * (11 if rtf else 10) + "|"]
    default_s = median(runs[DEFAULT], f"{unit}_s")
    for variant in variants:
        r, e = runs[variant], found[variant]
        name = f"{variant} (default)" if variant == DEFAULT else variant
        seconds = median(r, f"{unit}_s")
        real_time = f" {seconds / duration:.3f} |" if rtf else ""
        lines.append(f"| {name} | {seconds:.3f} | {seconds / default_s:.2f} |{real_time} {median(r, f'first_{unit}_s'):.3f} | "
                     f"{median(r, 'build_s'):.1f} | {median(r, 'weights_mb'):.0f} | {median(r, 'peak_rss_mb'):.0f} | "
                     f"{e['max_abs']:.2e} | {e['max_abs_relative']:.2e} | {e['norm_relative']:.2e} |")
    return lines


def median(runs: list[dict], metric: str) -> float:
    """`metric` over the rounds: the median, which one slow round on a noisy machine does not move."""
    return statistics.median(run[metric] for run in runs)
