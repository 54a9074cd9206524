"""Tensor parallelism on this machine (issue 15): the default model with `--tp 1` and `--tp 2` (local gloo ranks), in
the engine's CPU default (bfloat16, quant auto; at --tp 2 the fused native decoding step on each rank). For each, in
a fresh process:

- `qwen_engine.bench.run_bench` (what `qwen bench --tp N` prints): prefill and decode tok/s, start → first token;
- peak RSS (VmHWM) of rank 0 and of each worker rank, read from /proc before the model is closed;
- 16 concurrent streams on `model.serving_engine(max_seqs=16)`: generated tokens ÷ seconds, end to end.

The sizes alternate over the rounds (in reverse order every other round) and medians go to the tensor-parallel
section of RESULTS.md. On a machine with few cores no speed-up is expected: the ranks split the cores between them.

    python benchmarks/tp.py --rounds 3
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before any heavy import: "start to first token" counts imports too

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

from harness import alternate, machine, median, peak_rss_mb, work  # noqa: E402  (benchmarks/harness.py, beside this script)
from results import RESULTS, update_section  # noqa: E402

if TYPE_CHECKING:
    from qwen_engine.llm import Model

SIZES = ("1", "2")  # --tp
STREAMS = 16
STREAM_PROMPT_TOKENS = 32  # short, so the streams' time is mostly decoding
DEFAULTS = {"rounds": 3, "prompt_tokens": 256, "gen_tokens": 64}  # small enough for 2 cores


def vm_hwm_mb(pid: int) -> float:
    """Process `pid`'s peak RSS (VmHWM)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024


def worker(args: argparse.Namespace) -> dict:
    """`run_bench` at --tp `args.worker`, keeping the model it loads (its `load` wrapped, so the one load is timed
    as `qwen bench` times it), then the streams on that model; every rank's peak RSS last, before closing it."""
    import torch

    from qwen_engine import bench, llm

    loaded: list[Model] = []

    def load(*options: Any, **named: Any) -> Model:
        loaded.append(original(*options, **named))
        return loaded[-1]

    original, llm.load = llm.load, load  # (run_bench imports it when called)
    result = bench.run_bench("default", args.prompt_tokens, args.gen_tokens, started=STARTED,
                             tensor_parallel=int(args.worker)).as_dict()
    model = loaded[0]
    try:
        engine = model.serving_engine(max_seqs=STREAMS)
        requests = [model.request(bench.bench_prompt(model.config.vocab_size, STREAM_PROMPT_TOKENS, seed=2 + i),
                                  max_tokens=args.gen_tokens, temperature=0, ignore_eos=True) for i in range(STREAMS)]
        t0 = time.perf_counter()
        events = engine.run(requests)
        streams_s = time.perf_counter() - t0
        generated = sum(e.token_id is not None for choices in events.values() for choice in choices for e in choice)
        workers = [vm_hwm_mb(process.pid) for process in model._ranks.processes] if model._ranks else []
    finally:
        model.close()
    return {**result, "streams_s": streams_s, "streams_tokens": generated, "streams_tok_s": generated / streams_s,
            "rank0_peak_rss_mb": peak_rss_mb(), "worker_peak_rss_mb": workers, "threads_per_rank": torch.get_num_threads()}


def spawn(args: argparse.Namespace, size: str) -> dict:
    """A worker at --tp `size` in a fresh process; its last line of output is its JSON result."""
    command = [sys.executable, __file__, "--worker", size, "--prompt-tokens", str(args.prompt_tokens),
               "--gen-tokens", str(args.gen_tokens), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"--tp {size} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace, runs: dict[str, list[dict]]) -> str:
    import torch

    command = "python benchmarks/tp.py" + "".join(
        f" --{name.replace('_', '-')} {getattr(args, name)}" for name, default in DEFAULTS.items()
        if getattr(args, name) != default)
    metrics = [("prefill tok/s", "prefill_tok_s", ".1f"), ("decode tok/s", "decode_tok_s", ".2f"),
               ("start → first token (s)", "start_to_first_token_s", ".2f"), ("load (s)", "load_s", ".2f"),
               (f"{STREAMS} streams, tok/s", "streams_tok_s", ".2f"), ("rank 0 peak RSS (MB)", "rank0_peak_rss_mb", ".0f"),
               ("worker peak RSS (MB)", "worker_peak_mb", ".0f"), ("all ranks' peak RSS (MB)", "total_peak_mb", ".0f")]
    for run in (run for size in SIZES for run in runs[size]):
        run["worker_peak_mb"] = sum(run["worker_peak_rss_mb"])
        run["total_peak_mb"] = run["rank0_peak_rss_mb"] + run["worker_peak_mb"]
    lines = [
        "## Tensor parallelism on one machine (issue 15)", "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}.", "",
        f"- Machine: {machine()}; torch {torch.__version__}",
        "- The default model (Qwen2.5-Coder-0.5B-Instruct) in the engine's CPU default (bfloat16, quant auto: the "
        "file's Q8_0/Q5_0 blocks, the fused native decoding step) for both sizes. --tp 2: rank 0 plus one worker "
        "process over gloo, the native step calling back for its two all-reduces a layer, each "
        f"rank on {runs['2'][0]['threads_per_rank']} thread(s) (the cores split between the ranks); --tp 1 on "
        f"{runs['1'][0]['threads_per_rank']}.",
        f"- Medians of {args.rounds} rounds, the sizes alternating (in reverse order every other round), each a fresh "
        f"process. Prefill, decode and start → first token: `run_bench(\"default\", {args.prompt_tokens}, "
        f"{args.gen_tokens}, tensor_parallel=N)`'s (= `qwen bench --tp N --prompt-tokens "
        f"{args.prompt_tokens} --gen-tokens {args.gen_tokens}`), start → first token from the process's start, imports "
        f"and the workers' start included. {STREAMS} streams: then, on the same model, `serving_engine(max_seqs="
        f"{STREAMS})` running {STREAMS} greedy requests at once ({STREAM_PROMPT_TOKENS}-token random prompts, "
        f"{args.gen_tokens} tokens each, ignore_eos), generated tokens ÷ seconds from `run` to its end (prefill "
        "included). Peak RSS: VmHWM of rank 0 and of the worker process (`/proc/<pid>/status`), read after the "
        "streams, before the model is closed; the model is loaded once (run_bench's load, its `load` wrapped to keep "
        "the model).", "",
        "| | --tp 1 | --tp 2 | tp 2 ÷ tp 1 |", "|---|---|---|---|",
    ]
    for label, key, form in metrics:
        one, two = median(runs["1"], key), median(runs["2"], key)
        cells = [f"{one:{form}}", f"{two:{form}}", f"{two / one:.2f}"] if one else ["—", f"{two:{form}}", "—"]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines += ["", "### Every run", "", "```", json.dumps(runs, indent=1), "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads at --tp 1 (each rank of --tp N takes its share of the cores)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=SIZES, help="(worker) the --tp to run")
    args = parser.parse_args()
    if args.worker:
        work(args, worker)
        return
    runs = alternate(SIZES, args.rounds, lambda size: spawn(args, size))
    text = report(args, runs)
    update_section("tensor-parallel", text, args.output)
    print(text)


if __name__ == "__main__":
    main()
