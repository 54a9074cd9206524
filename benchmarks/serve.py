"""Serving throughput: qwen-engine's `qwen serve` against llama.cpp's servers on the same GGUF.

For each server and each concurrency (1 and 16 by default), every round starts that many streaming chat requests
at once, each asking for exactly --max-tokens tokens (the end-of-turn tokens are banned through logit_bias, which
every server takes), and records the time to first token of each and the generated tokens per second of wall time
for the round as a whole. Servers run one after the other, never together, with --threads threads each; each round
is repeated --rounds times and medians are reported, in the serving section of benchmarks/RESULTS.md.

The llama.cpp peers, both the llama.cpp that llama-cpp-python vendors:
- `llama-server`: llama.cpp's own server, with as many parallel slots as the highest concurrency (continuous
  batching). Build it with benchmarks/build_llama_server.sh; --llama-server names the binary.
- `llama-cpp-python`: `python -m llama_cpp.server`. It has no parallel slots (0.3.x): it serves one request at a
  time under a lock and the others wait (with --interrupt_requests False; its default instead cuts off a streaming
  request when the next one arrives).

`--baseline DIR` also serves the qwen-engine of another checkout (e.g. `git worktree add /tmp/base HEAD~1`) in the
same run, and writes the two side by side in a section of their own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import shutil
import tempfile
import time
from pathlib import Path

import httpx
from results import RESULTS, update_section  # benchmarks/results.py, beside this script

SERVERS = ("qwen-engine", "llama-server", "llama-cpp-python")
BASELINE = "qwen-engine (baseline)"
LLAMA_SERVER = Path.home() / ".cache" / "qwen-engine" / "llama-server" / "llama-server"

END_OF_TURN = {"151643": -100, "151644": -100, "151645": -100}  # <|endoftext|>, <|im_start|>, <|im_end|>
TOPICS = ["binary search", "hash tables", "TCP handshakes", "garbage collection", "B-trees", "regular expressions",
          "unicode normalisation", "virtual memory", "consensus protocols", "bloom filters", "public-key cryptography",
          "compilers", "database indexes", "floating point", "the actor model", "vector clocks", "page caches",
          "load balancers", "JIT compilation", "CRDTs"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(kind: str, args: argparse.Namespace, port: int) -> tuple[subprocess.Popen, str]:
    threads, model = str(args.threads), str(args.model)
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    if args.baseline:  # each engine with a fresh cache of its own (run.py's engine_env says why)
        env["QWEN_ENGINE_CACHE"] = str(args.cache / kind.replace(" ", "-"))
    if kind == BASELINE:
        env["PYTHONPATH"] = str(args.baseline)
    if kind in ("qwen-engine", BASELINE):
        command = [sys.executable, "-m", "qwen_engine.cli", "serve", "--model", model, "--port", str(port),
                   "--threads", threads, "--served-model-name", "bench", "--kv-cache-gb", "1"]
    elif kind == "llama-server":
        slots = max(args.concurrency)  # each slot gets 1024 tokens of context: prompt and reply fit
        command = [str(args.llama_server), "--model", model, "--port", str(port), "--host", "127.0.0.1",
                   "--threads", threads, "--threads-batch", threads, "--parallel", str(slots),
                   "--ctx-size", str(1024 * slots), "--alias", "bench"]
    else:
        command = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--port", str(port),
                   "--n_threads", threads, "--n_threads_batch", threads, "--n_ctx", "8192",
                   "--model_alias", "bench", "--host", "127.0.0.1", "--interrupt_requests", "False"]
    log = tempfile.TemporaryFile()  # a pipe nobody reads would fill up and stall the server's logging
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise SystemExit(f"{kind} server exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{kind} server did not start in 300 s")


async def one(http: httpx.AsyncClient, url: str, index: int, max_tokens: int) -> tuple[float, int, float]:
    """(time to first token, tokens, end) of one streaming request."""
    body = {"model": "bench", "messages": [{"role": "user", "content": f"Explain {TOPICS[index % len(TOPICS)]} in detail."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "logit_bias": END_OF_TURN,
            "stream_options": {"include_usage": True}}
    started, first, tokens, chunks = time.perf_counter(), None, 0, 0
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                chunks += 1
                first = first if first is not None else time.perf_counter() - started
    # llama-cpp-python's server sends no usage when streaming: there, one content chunk is one token
    return first or float("nan"), tokens or chunks, time.perf_counter()


async def round_of(url: str, concurrency: int, max_tokens: int, offset: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=1800) as http:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(http, url, offset + i, max_tokens) for i in range(concurrency)))
    wall = max(end for _, _, end in results) - started
    tokens = sum(count for _, count, _ in results)
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall,
            "median_ttft_s": statistics.median(ttft for ttft, _, _ in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the default model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--llama-server", type=Path, default=LLAMA_SERVER, help=f"llama.cpp's server binary ({LLAMA_SERVER})")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout whose qwen-engine is served alongside")
    args = parser.parse_args()
    if "llama-server" in args.servers and not os.access(args.llama_server, os.X_OK):
        raise SystemExit(f"no llama-server at {args.llama_server}: build it with benchmarks/build_llama_server.sh, "
                         "or leave it out with --servers qwen-engine llama-cpp-python")
    if args.model is None:
        from qwen_engine.default_model import default_model_path

        args.model = default_model_path()
    runs: dict[str, dict[int, list[dict[str, float]]]] = {}
    if args.baseline:
        args.cache = Path(tempfile.mkdtemp(prefix="qwen-bench-"))
    for kind in args.servers + ([BASELINE] if args.baseline else []):
        process, url = start(kind, args, free_port())
        try:
            asyncio.run(round_of(url, 2, 8, 100))  # warm-up: first-call costs stay out of the figures
            runs[kind] = {}
            for concurrency in args.concurrency:
                runs[kind][concurrency] = [asyncio.run(round_of(url, concurrency, args.max_tokens, r * concurrency))
                                           for r in range(args.rounds)]
                print(kind, concurrency, runs[kind][concurrency], flush=True)
        finally:
            process.terminate()
            process.wait(timeout=60)
    if args.baseline:
        shutil.rmtree(args.cache, ignore_errors=True)
        write_baseline(args, runs)
    if set(SERVERS) <= set(args.servers):  # the side-by-side section needs every server
        write(args, {kind: rows for kind, rows in runs.items() if kind != BASELINE})


def write_baseline(args: argparse.Namespace, runs: dict[str, dict[int, list[dict[str, float]]]]) -> None:
    median = lambda rows, key: statistics.median(row[key] for row in rows)  # noqa: E731
    revision = subprocess.run(["git", "-C", str(args.baseline), "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True).stdout.strip()[:100]
    lines = [
        "## qwen serve against a baseline checkout", "",
        f"Produced by `python benchmarks/serve.py --rounds {args.rounds} --servers qwen-engine --baseline …` on "
        f"{time.strftime('%Y-%m-%d')}.", "",
        f"- Machine: {platform.processor() or platform.machine()}; {args.threads} threads per server; baseline: "
        f"{revision or args.baseline}",
        f"- Workload: as in the serving section ({args.max_tokens} tokens a request); the two servers one after the "
        "other in the same run; medians of the rounds.", "",
        "| concurrency | this checkout tok/s | baseline tok/s | this ÷ baseline | median TTFT (s), this / baseline |",
        "|---|---|---|---|---|",
    ]
    ours, base = runs["qwen-engine"], runs[BASELINE]
    for concurrency in args.concurrency:
        a, b = median(ours[concurrency], "tok_s"), median(base[concurrency], "tok_s")
        lines.append(f"| {concurrency} | {a:.1f} | {b:.1f} | {a / b:.3f} | {median(ours[concurrency], 'median_ttft_s'):.2f} / "
                     f"{median(base[concurrency], 'median_ttft_s'):.2f} |")
    lines += ["", "```", json.dumps(runs, indent=1), "```", ""]
    update_section("serving-baseline", "\n".join(lines), args.output)


def write(args: argparse.Namespace, runs: dict[str, dict[int, list[dict[str, float]]]]) -> None:
    median = lambda rows, key: statistics.median(row[key] for row in rows)  # noqa: E731
    lines = [
        "## Serving (issue 5)", "",
        f"Produced by `python benchmarks/serve.py --rounds {args.rounds}` on {time.strftime('%Y-%m-%d')}.", "",
        f"- Machine: {platform.processor() or platform.machine()}; {args.threads} threads per server; Python {platform.python_version()}",
        f"- Workload: the default GGUF; streaming chat requests started together, {args.max_tokens} tokens each "
        "(end-of-turn tokens banned through logit_bias), greedy; medians of the rounds. Throughput is all generated "
        "tokens over the wall time of the round, prefill included.",
        f"- llama-server: llama.cpp's own server (from the sources llama-cpp-python vendors), {max(args.concurrency)} "
        "parallel slots, continuous batching. llama-cpp-python: `python -m llama_cpp.server`, which serves one "
        "request at a time (it has no parallel slots); the others queue.", "",
        "| server | concurrency | tokens/s (all requests) | median time to first token (s) |", "|---|---|---|---|",
    ]
    for kind, by_concurrency in runs.items():
        for concurrency, rows in by_concurrency.items():
            lines.append(f"| {kind} | {concurrency} | {median(rows, 'tok_s'):.1f} | {median(rows, 'median_ttft_s'):.2f} |")
    if "qwen-engine" in runs:
        ours = runs["qwen-engine"]
        low, high = min(ours), max(ours)
        lines += ["", f"qwen-engine at {high} concurrent ÷ at {low}: "
                  f"{median(ours[high], 'tok_s') / median(ours[low], 'tok_s'):.2f}× (target ≥ 4×)"]
        for peer, target in (("llama-server", " (target ≥ 1.5×)"), ("llama-cpp-python", "")):
            if high in runs.get(peer, {}):
                lines.append(f"qwen-engine ÷ {peer} at {high} concurrent: "
                             f"{median(ours[high], 'tok_s') / median(runs[peer][high], 'tok_s'):.2f}×{target}")
    lines += ["", "### Every round", "", "```", json.dumps(runs, indent=1), "```", ""]
    update_section("serving", "\n".join(lines), args.output)


if __name__ == "__main__":
    main()
