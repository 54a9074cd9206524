"""Prefill without AMX (issue 17): which product is faster for a CPU class, the decoding kernel's integer products
straight from the blocks (int8 activations, AVX-512 VNNI, any number of rows) or dequantizing to bfloat16 for
PyTorch's matmul (oneDNN). The engine's "avx512" variant takes the first: this measures why.

One fresh process per oneDNN ISA cap (`ONEDNN_MAX_CPU_ISA`): uncapped (AMX where the CPU has it), AVX512_CORE_BF16
(what an AVX-512 CPU with BF16 and no AMX, such as AMD Zen 4, gets from oneDNN) and AVX512_CORE_VNNI (no BF16, such
as Intel Ice Lake). Each times both products on the default model's matrices (q/k/v, o, gate/up, down; 8-bit and
5-bit blocks, random weights) at `--rows` activation rows, the median of 5 after a warm-up.

    python benchmarks/prefill_kernels.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from harness import machine  # (benchmarks/harness.py, beside this script)
from results import RESULTS, update_section

CAPS = ("uncapped", "AVX512_CORE_BF16", "AVX512_CORE_VNNI")
SHAPES = {"q/k/v": (1152, 896), "o": (896, 896), "gate/up": (9728, 896), "down": (896, 4864)}  # [out, in]


def worker(rows: int) -> dict[str, dict[str, float]]:
    import torch
    import torch.nn.functional as F

    from qwen_engine.kernels import cpu_kernels
    from qwen_engine.model.quantized import pack_blocks, quantize_blocks

    kernels = cpu_kernels()
    if kernels is None:
        raise SystemExit("the native kernels do not run on this CPU")
    results = {}
    for name, (out_features, in_features) in SHAPES.items():
        for bits in (8, 5):
            blocks = quantize_blocks(torch.randn(out_features, in_features) * 0.02, bits)
            codes, high_bits = pack_blocks(blocks)
            x = torch.randn(rows, in_features).to(torch.bfloat16)
            products = {
                "integer products": lambda: kernels.matmul(x, codes, high_bits, blocks.scales),
                "dequantize + matmul": lambda: F.linear(x, kernels.dequantize(codes, high_bits, blocks.scales)),
            }
            timings = {}
            for label, product in products.items():
                product()
                times = []
                for _ in range(5):
                    started = time.perf_counter()
                    product()
                    times.append(time.perf_counter() - started)
                timings[label] = sorted(times)[2] * 1000
            results[f"{name}, {bits}-bit"] = timings
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=660)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.rows)))
        return
    runs = {}
    for cap in CAPS:
        environment = dict(os.environ, QWEN_ENGINE_CPU="avx512")  # the variant a CPU without AMX runs
        if cap != "uncapped":
            environment["ONEDNN_MAX_CPU_ISA"] = cap
        done = subprocess.run([sys.executable, __file__, "--worker", "--rows", str(args.rows)], env=environment,
                              capture_output=True, text=True, check=True)
        runs[cap] = json.loads(done.stdout.strip().splitlines()[-1])
    lines = [
        "## Prefill without AMX: integer products against dequantize + matmul (issue 17)", "",
        f"Produced by `python benchmarks/prefill_kernels.py` on {time.strftime('%Y-%m-%d')}.", "",
        f"- Machine: {machine()}",
        f"- {args.rows} activation rows through each of the default model's matrices (random weights in 8- and 5-bit "
        "blocks), ms, median of 5. \"integer products\": the decoding kernel's (int8 activations in blocks of 32, "
        "VNNI) on any number of rows, what the `avx512` variant prefills with. \"dequantize + matmul\": the matrix in "
        "bfloat16, then PyTorch's matmul (oneDNN), capped with ONEDNN_MAX_CPU_ISA to what a CPU class would run. "
        "On this machine the caps stand in for those CPUs; a real one of each may differ.", "",
        "| oneDNN | " + " | ".join(runs[CAPS[0]]) + " | all | integer products ÷ dequantize |",
        "|---|" + "---|" * (len(runs[CAPS[0]]) + 2),
    ]
    for cap, results in runs.items():
        totals = {label: sum(timing[label] for timing in results.values()) for label in next(iter(results.values()))}
        for label in totals:
            cells = [f"{timing[label]:.1f}" for timing in results.values()]
            ratio = totals["integer products"] / totals["dequantize + matmul"] if label == "integer products" else None
            lines.append(f"| {cap}, {label} | {' | '.join(cells)} | {totals[label]:.1f} | "
                         f"{'' if ratio is None else f'{ratio:.2f}'} |")
    lines.append("")
    text = "\n".join(lines)
    update_section("prefill-kernels", text, args.output)
    print(text)


if __name__ == "__main__":
    main()
