"""Side-by-side benchmark: qwen-engine, transformers (bfloat16) and llama.cpp (llama-cpp-python) on the default GGUF.

Every measurement runs in a fresh process (so load time and peak RSS are each engine's own), the engines
alternate over several rounds (so drift on a noisy machine hits all of them alike), and its section of RESULTS.md
reports medians and ratios. The workload is the same for all: a random-token prompt (seeded) for prefill, greedy
decoding that ignores end-of-sequence, and perplexity on benchmarks/data/corpus.md with llama-perplexity's method.

    pip install -e ".[bench]"   (llama-cpp-python builds from source; see the README for the CMAKE_ARGS used here)
    python benchmarks/run.py --rounds 3

`--baseline DIR` also runs the qwen-engine of another checkout (e.g. `git worktree add /tmp/base HEAD~1`) in the
same rounds, and writes the two side by side in a section of their own; `--engines` picks the engines.

`--classes native=DIR avx2=DIR` compares per CPU class instead: this engine capped to each class (QWEN_ENGINE_CPU;
`native` is uncapped) against the llama-cpp-python installed in DIR (`pip install --target DIR`) built for that
class, all in the same alternating rounds, with perplexity per class; RESULTS.md's "by CPU class" section says how
each llama.cpp was built.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before any heavy import: "start to first token" counts imports too

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from harness import machine, peak_rss_mb  # noqa: E402  (benchmarks/harness.py, beside this script)
from results import RESULTS, update_section  # noqa: E402

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "data" / "corpus.md"
ENGINES = ("qwen-engine", "transformers-bf16", "llama.cpp")
METRICS = ("start_to_first_token_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb")


def worker_qwen(args: argparse.Namespace) -> dict:
    from qwen_engine.bench import run_bench

    result = run_bench(args.model, args.prompt_tokens, args.gen_tokens, started=STARTED, quant=args.quant)
    return result.as_dict()


def worker_transformers(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    from qwen_engine.bench import bench_prompt

    path = Path(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16)
    model.eval()
    load_s = time.perf_counter() - STARTED
    with torch.inference_mode():
        model(torch.tensor([bench_prompt(model.config.vocab_size, 8, seed=1)]))
        first = time.perf_counter() - STARTED
        prompt = torch.tensor([bench_prompt(model.config.vocab_size, args.prompt_tokens)])
        t0 = time.perf_counter()
        model(prompt, logits_to_keep=1)  # as generate() prefills: logits for the last position only, like the others
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, do_sample=False)
        total_s = time.perf_counter() - t0
    generated = out.shape[1] - prompt.shape[1]
    # generate() includes its own prefill: subtract the one measured above.
    return {"load_s": load_s, "start_to_first_token_s": first, "prefill_tok_s": args.prompt_tokens / prefill_s,
            "decode_tok_s": (generated - 1) / max(total_s - prefill_s, 1e-9), "peak_rss_mb": peak_rss_mb()}


def worker_llama(args: argparse.Namespace) -> dict:
    import llama_cpp
    import numpy as np

    from qwen_engine.bench import bench_prompt

    # n_batch = n_ctx: the Python wrapper keeps one row of scores per batch position.
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=2048, n_threads=args.threads, n_batch=2048, verbose=False)
    load_s = time.perf_counter() - STARTED
    vocab = llm.n_vocab()
    llm.eval(bench_prompt(vocab, 8, seed=1))
    first = time.perf_counter() - STARTED
    llm.reset()
    prompt = bench_prompt(vocab, args.prompt_tokens)
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t0
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter()
    for _ in range(args.gen_tokens - 1):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    decode_s = time.perf_counter() - t0
    return {"load_s": load_s, "start_to_first_token_s": first, "prefill_tok_s": args.prompt_tokens / prefill_s,
            "decode_tok_s": (args.gen_tokens - 1) / decode_s, "peak_rss_mb": peak_rss_mb(),
            "version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode().strip()}


def perplexity_qwen(args: argparse.Namespace) -> dict:
    from qwen_engine import load
    from qwen_engine.engine.perplexity import perplexity, scored_from

    model = load(args.model, quant=args.quant, dtype=args.dtype)
    ids = model.tokenizer.encode(CORPUS.read_text(encoding="utf-8"))
    if args.decode_path:  # every scored token through a decoding step, as generation computes it
        def logits_of(chunk: list[int]):
            return model.stepwise_logits(chunk, scored_from(len(chunk)) + 1)
    else:
        logits_of = model.logits
    result = perplexity(logits_of, ids, args.context, args.max_chunks)
    return {"perplexity": result.perplexity, "tokens_scored": result.tokens_scored, "quant": model.quant}


def perplexity_llama(args: argparse.Namespace) -> dict:
    import llama_cpp
    import torch

    from qwen_engine import load
    from qwen_engine.engine.perplexity import perplexity

    # The same token ids for both engines: this engine's tokenizer (identical ids to transformers', tested).
    ids = load(args.model, quant="none").tokenizer.encode(CORPUS.read_text(encoding="utf-8"))
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=args.context, n_threads=args.threads, n_batch=args.context,
                          logits_all=True, verbose=False)

    def logits_of(chunk: list[int]) -> torch.Tensor:
        llm.reset()
        llm.eval(chunk)
        return torch.from_numpy(llm.scores[: len(chunk)].copy())

    result = perplexity(logits_of, ids, args.context, args.max_chunks)
    return {"perplexity": result.perplexity, "tokens_scored": result.tokens_scored}


def worker_pytorch(args: argparse.Namespace) -> dict:
    """A process that only imports torch (main() did): the floor of this engine's start and memory."""
    return {"start_to_first_token_s": time.perf_counter() - STARTED, "peak_rss_mb": peak_rss_mb()}


WORKERS = {
    "qwen-engine": worker_qwen, "transformers-bf16": worker_transformers, "llama.cpp": worker_llama,
    "ppl:qwen-engine": perplexity_qwen, "ppl:llama.cpp": perplexity_llama, "pytorch": worker_pytorch,
}


BASELINE = "qwen-engine (baseline)"


def engine_env(checkout: Path | None, cache: Path) -> dict[str, str]:
    """The environment of a qwen-engine compared with another: `checkout`'s code (None: this one's), and a fresh
    cache of its own. Two engines cannot share the converted-weights cache (it keeps one version per model), and
    both converting in the same run keeps them alike: where an older converted file happened to lie in memory moved
    decoding by up to 10% either way, more than the code under test did."""
    import os

    env = {**os.environ, "QWEN_ENGINE_CACHE": str(cache)}
    return env | ({"PYTHONPATH": str(checkout)} if checkout is not None else {})


# (MKL, which PyTorch calls for some products, takes AMX on an AMX CPU unless told otherwise: AVX512_E3 is AVX-512
# with VNNI and BF16, the level below AMX's E4)
TORCH_CAPS = {
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "MKL_ENABLE_INSTRUCTIONS": "AVX512_E3"},
    "avx2_vnni": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2_VNNI", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def class_env(args: argparse.Namespace, job: str) -> tuple[str, dict[str, str]]:
    """A job of `--classes` ("qwen-engine@avx2", "ppl:llama.cpp@native"): its worker and environment. qwen-engine is
    capped to the class; llama.cpp is the llama-cpp-python built for it."""
    import os

    worker, _, cpu_class = job.partition("@")
    env = {key: value for key, value in os.environ.items() if key != "QWEN_ENGINE_CPU"}
    if worker.endswith("llama.cpp"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.classes[cpu_class], env.get("PYTHONPATH")]))
    elif cpu_class != "native":
        # PyTorch's own kernels (attention, oneDNN) capped to the class too, as on a CPU of that class
        env |= {"QWEN_ENGINE_CPU": cpu_class, **TORCH_CAPS.get(cpu_class, {})}
    return worker, env


def spawn(args: argparse.Namespace, job: str, **extra: str) -> dict:
    """Run a worker in a fresh process; the baseline's is the qwen-engine worker on the --baseline checkout's code."""
    env = None
    if args.baseline and job in (BASELINE, "qwen-engine"):
        env = engine_env(args.baseline if job == BASELINE else None, args.cache / job.replace(" ", "-"))
        job = "qwen-engine"
    elif "@" in job:
        job, env = class_env(args, job)
    command = [sys.executable, __file__, "--worker", job, "--model", args.model, "--prompt-tokens", str(args.prompt_tokens),
               "--gen-tokens", str(args.gen_tokens), "--threads", str(args.threads), "--context", str(args.context)]
    for key, value in extra.items():
        command += [f"--{key.replace('_', '-')}"] + ([] if value is True else [value])
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compile_bytecode(args: argparse.Namespace) -> None:
    """Byte-compile the engines' packages once, as installing one does (pip writes the .pyc files); otherwise, where
    PYTHONDONTWRITEBYTECODE is set, as it is here, each fresh process compiles qwen_engine's sources again (0.1 s of
    its start)."""
    import compileall
    import importlib.util

    packages = [Path(importlib.util.find_spec("qwen_engine").origin).parent]
    if args.baseline:
        packages.append(args.baseline / "qwen_engine")
    for package in packages:
        compileall.compile_dir(package, quiet=1)


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:  # (llama-cpp-python of --classes lies elsewhere: its workers report it)
            return "not in this environment"

    names = ("qwen-engine", "torch", "transformers", "llama_cpp_python")
    return ", ".join(f"{name} {installed(name)}" for name in names)


def alternating_rounds(args: argparse.Namespace, engines: list[str]) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Every engine once a round, in fresh processes, the order reversed every other round (ABBA: no engine always
    runs first); each engine's runs and their medians."""
    runs: dict[str, list[dict]] = {engine: [] for engine in engines}
    for round_ in range(args.rounds):
        for engine in engines if round_ % 2 == 0 else engines[::-1]:
            runs[engine].append(spawn(args, engine))
            print(f"round {round_ + 1}: {engine} {runs[engine][-1]}", file=sys.stderr)
    medians = {engine: {m: statistics.median(r[m] for r in results) for m in METRICS} for engine, results in runs.items()}
    return runs, medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=660)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=len(__import__("os").sched_getaffinity(0)))
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--quant", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--skip-perplexity", action="store_true")
    parser.add_argument("--decode-path", action="store_true", help="(worker) score through decoding steps")
    parser.add_argument("--max-chunks", type=int, default=None, help="(worker) score at most this many chunks")
    parser.add_argument("--decode-chunks", type=int, default=8,
                        help="chunks scored through decoding steps (slow: one step per token)")
    parser.add_argument("--worker", choices=WORKERS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout whose qwen-engine runs alongside")
    parser.add_argument("--classes", nargs="+", metavar="CLASS=DIR", default=None,
                        help="per CPU class (native, avx512, avx2_vnni, avx2): the llama-cpp-python built for it")
    args = parser.parse_args()
    args.classes = dict(item.split("=", 1) for item in args.classes) if args.classes else None
    args.workload_model = "the default GGUF" if args.model is None else f"`{Path(args.model).name}`"
    if args.model is None:
        from qwen_engine.default_model import default_model_path

        args.model = str(default_model_path(progress=False))
    if args.worker:
        if args.worker != "llama.cpp":  # (llama.cpp's timed process loads no torch: its start and memory are its own)
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(WORKERS[args.worker](args)))
        return

    compile_bytecode(args)
    if args.classes:
        text = by_class(args)
        update_section("engines-by-cpu-class", text, args.output)
        print(text)
        return
    engines = list(args.engines) + ([BASELINE] if args.baseline else [])
    if args.baseline:
        args.cache = Path(tempfile.mkdtemp(prefix="qwen-bench-"))
    # Warm the converted-weights cache once, as a user's second start would find it.
    for engine in {"qwen-engine", BASELINE} & set(engines):
        spawn(args, engine)
    runs, medians = alternating_rounds(args, engines)
    if args.baseline:
        shutil.rmtree(args.cache, ignore_errors=True)
        text = against_baseline(args, medians, runs)
        update_section("engines-baseline", text, args.output)
        print(text)
    if set(ENGINES) - set(args.engines):  # the side-by-side report needs every engine
        return
    quality = {}
    if not args.skip_perplexity:
        quality["qwen-engine"] = spawn(args, "ppl:qwen-engine")
        quality["qwen-engine float32"] = spawn(args, "ppl:qwen-engine", quant="none", dtype="float32")
        quality["llama.cpp"] = spawn(args, "ppl:llama.cpp")
        # Generation computes every token through a decoding step (int8 activations in the block kernel): the same
        # measure on the first chunks, through that path and the others.
        first = str(args.decode_chunks)
        quality["decode path"] = {
            "qwen-engine, decoding steps": spawn(args, "ppl:qwen-engine", decode_path=True, max_chunks=first),
            "qwen-engine, one forward": spawn(args, "ppl:qwen-engine", max_chunks=first),
            "qwen-engine float32": spawn(args, "ppl:qwen-engine", quant="none", dtype="float32", max_chunks=first),
            "llama.cpp": spawn(args, "ppl:llama.cpp", max_chunks=first),
        }
    text = report(args, medians, runs, quality)
    update_section("engines", text, args.output)
    print(text)


# The targets of issue 17 per class: (decode, prefill) at least, (start, peak RSS) at most, as multiples of llama.cpp.
# `avx512` is what an AVX-512 CPU without AMX (AMD's Zen 4) runs natively, so native's speed targets hold for it.
CLASS_TARGETS = {
    "native": {"decode_tok_s": 1.2, "prefill_tok_s": 2.5, "start_to_first_token_s": 2.0, "peak_rss_mb": 1.0},
    "avx512": {"decode_tok_s": 1.2, "prefill_tok_s": 2.5},
}
DEFAULT_TARGETS = {"decode_tok_s": 1.2, "prefill_tok_s": 2.0}


def by_class(args: argparse.Namespace) -> str:
    """Every class's qwen-engine and llama.cpp in the same alternating rounds, then perplexity per class."""
    engines = [f"{engine}@{cpu_class}" for cpu_class in args.classes for engine in ("qwen-engine", "llama.cpp")]
    for cpu_class in args.classes:  # warm the converted-weights cache (one layout serves every variant)
        spawn(args, f"qwen-engine@{cpu_class}")
    runs, medians = alternating_rounds(args, engines)
    floor = [spawn(args, "pytorch") for _ in range(args.rounds)]
    runs["pytorch"] = floor
    lines = [
        "## By CPU class: qwen-engine's kernel variants against llama.cpp built for each", "",
        f"Produced by `python benchmarks/run.py {' '.join(sys.argv[1:])}` on "
        f"{time.strftime('%Y-%m-%d')}.", "",
        f"- Machine: {machine()}",
        f"- Software: {versions()}",
        f"- Workload: {args.workload_model}; {args.threads} threads; prefill of a {args.prompt_tokens}-token random prompt; "
        f"greedy decoding of {args.gen_tokens} tokens; medians of {args.rounds} rounds, all engines alternating "
        "(in reverse order every other round), each run a fresh process, qwen-engine from a warm converted-weights cache.",
        "- Each class: qwen-engine with `QWEN_ENGINE_CPU` set to it (`native`: unset) against llama-cpp-python built "
        "for it; what each llama.cpp build reports of itself (`llama_print_system_info`):",
    ]
    for cpu_class in args.classes:
        kernels = runs[f"qwen-engine@{cpu_class}"][0].get("kernels")
        llama = runs[f"llama.cpp@{cpu_class}"][0]
        lines.append(f"  - {cpu_class}: qwen-engine kernels `{kernels}`; llama-cpp-python {llama['version']}, `{llama['system_info']}`")
    lines += ["", "| class | engine | start → first token (s) | prefill (tok/s) | decode (tok/s) | peak RSS (MB) |",
              "|---|---|---|---|---|---|"]
    for engine in engines:
        m = medians[engine]
        lines.append(f"| {engine.partition('@')[2]} | {engine.partition('@')[0]} | {m['start_to_first_token_s']:.2f} | "
                     f"{m['prefill_tok_s']:.0f} | {m['decode_tok_s']:.1f} | {m['peak_rss_mb']:.0f} |")
    lines += ["", "| class | measure | qwen-engine ÷ llama.cpp | target | met |", "|---|---|---|---|---|"]
    for cpu_class in args.classes:
        ours, llama = medians[f"qwen-engine@{cpu_class}"], medians[f"llama.cpp@{cpu_class}"]
        for metric, target in CLASS_TARGETS.get(cpu_class, DEFAULT_TARGETS).items():
            ratio = ours[metric] / llama[metric]
            at_least = metric in ("decode_tok_s", "prefill_tok_s")
            met = ratio >= target if at_least else ratio <= target
            lines.append(f"| {cpu_class} | {metric} | {ratio:.2f}× | {'≥' if at_least else '≤'} {target}× | {'yes' if met else 'no'} |")
    llama = medians[f"llama.cpp@{next(iter(args.classes))}"]
    start, rss = (statistics.median(run[m] for run in floor) for m in ("start_to_first_token_s", "peak_rss_mb"))
    lines += ["", f"PyTorch's floor: a fresh process that only imports torch takes {start:.2f} s and {rss:.0f} MB (medians of "
              f"{len(floor)}), {start / llama['start_to_first_token_s']:.2f}× and {rss / llama['peak_rss_mb']:.2f}× "
              "llama.cpp's whole start → first token and peak RSS above."]
    if not args.skip_perplexity:
        lines += ["", f"Perplexity ({CORPUS.name}, {args.context}-token chunks, second halves scored; the decoding-step "
                  f"column scores the first {args.decode_chunks} chunks one decoding step a token, as generation does):", "",
                  "| class | qwen-engine | llama.cpp | ÷ llama.cpp | ÷ float32 | decoding steps ÷ float32 (same chunks) |",
                  "|---|---|---|---|---|---|"]
        first = str(args.decode_chunks)
        float32 = spawn(args, "ppl:qwen-engine", quant="none", dtype="float32")["perplexity"]
        float32_first = spawn(args, "ppl:qwen-engine", quant="none", dtype="float32", max_chunks=first)["perplexity"]
        for cpu_class in args.classes:
            ours = spawn(args, f"ppl:qwen-engine@{cpu_class}")["perplexity"]
            llama = spawn(args, f"ppl:llama.cpp@{cpu_class}")["perplexity"]
            steps = spawn(args, f"ppl:qwen-engine@{cpu_class}", decode_path=True, max_chunks=first)["perplexity"]
            lines.append(f"| {cpu_class} | {ours:.4f} | {llama:.4f} | {ours / llama - 1:+.2%} | {ours / float32 - 1:+.2%} | "
                         f"{steps / float32_first - 1:+.2%} |")
        lines += ["", f"float32 (PyTorch's path, no kernels): {float32:.4f}; on the first {first} chunks {float32_first:.4f}."]
    lines += ["", "### Every run", "", "```", json.dumps(runs, indent=1), "```", ""]
    return "\n".join(lines)


def against_baseline(args: argparse.Namespace, medians: dict, runs: dict) -> str:
    ours, base = medians["qwen-engine"], medians[BASELINE]
    revision = subprocess.run(["git", "-C", str(args.baseline), "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True).stdout.strip()[:100]
    lines = [
        "## qwen-engine against a baseline checkout", "",
        f"Produced by `python benchmarks/run.py --rounds {args.rounds} --baseline …` on {time.strftime('%Y-%m-%d')}.", "",
        f"- Machine: {machine()}",
        f"- Baseline: {revision or args.baseline}",
        f"- Workload: as in the side-by-side section ({args.prompt_tokens}-token prompt, {args.gen_tokens} greedy tokens, "
        f"{args.threads} threads); both engines alternate in the same rounds (in reverse order every other round), each run a fresh process; medians.", "",
        "| measure | this checkout | baseline | this ÷ baseline | within 3% or better |", "|---|---|---|---|---|",
    ]
    higher_is_better = {"prefill_tok_s", "decode_tok_s"}
    for metric in METRICS:
        ratio = ours[metric] / base[metric]
        good = ratio >= 0.97 if metric in higher_is_better else ratio <= 1.03
        lines.append(f"| {metric} | {ours[metric]:.2f} | {base[metric]:.2f} | {ratio:.3f} | {'yes' if good else 'no'} |")
    lines += ["", "```", json.dumps(runs, indent=1), "```", ""]
    return "\n".join(lines)


def report(args: argparse.Namespace, medians: dict, runs: dict, quality: dict) -> str:
    ours, tf, llama = medians["qwen-engine"], medians["transformers-bf16"], medians["llama.cpp"]
    quant = runs["qwen-engine"][0].get("quant", "?")
    lines = [
        "## Engines side by side",
        "",
        f"Produced by `python benchmarks/run.py --rounds {args.rounds}` on {time.strftime('%Y-%m-%d')}.",
        "",
        f"- Machine: {machine()}",
        f"- Software: {versions()}",
        f"- Workload: the default GGUF (Qwen2.5-Coder-0.5B-Instruct, Q5_0/Q8_0/Q4_K/Q6_K); {args.threads} threads; "
        f"prefill of a {args.prompt_tokens}-token random prompt; greedy decoding of {args.gen_tokens} tokens; "
        f"medians of {args.rounds} rounds, engines alternating (in reverse order every other round), each run a fresh process. qwen-engine runs its default "
        f"CPU format (bfloat16 activations, `quant={quant}`) from a warm converted-weights cache.",
        "",
        "| engine | start → first token (s) | prefill (tok/s) | decode (tok/s) | peak RSS (MB) |",
        "|---|---|---|---|---|",
    ]
    for engine in ENGINES:
        m = medians[engine]
        lines.append(f"| {engine} | {m['start_to_first_token_s']:.2f} | {m['prefill_tok_s']:.0f} | {m['decode_tok_s']:.1f} | {m['peak_rss_mb']:.0f} |")
    lines += [
        "",
        "### Ratios (qwen-engine ÷ peer; targets of issue 6)",
        "",
        "| measure | vs llama.cpp | vs transformers bf16 | target | met |",
        "|---|---|---|---|---|",
    ]
    checks = [
        ("decode tok/s", ours["decode_tok_s"] / llama["decode_tok_s"], ours["decode_tok_s"] / tf["decode_tok_s"],
         "≥ 1.2 × llama.cpp", ours["decode_tok_s"] >= 1.2 * llama["decode_tok_s"]),
        ("prefill tok/s", ours["prefill_tok_s"] / llama["prefill_tok_s"], ours["prefill_tok_s"] / tf["prefill_tok_s"],
         "≥ 2.5 × llama.cpp and ≥ 1.3 × transformers",
         ours["prefill_tok_s"] >= 2.5 * llama["prefill_tok_s"] and ours["prefill_tok_s"] >= 1.3 * tf["prefill_tok_s"]),
        ("start → first token", ours["start_to_first_token_s"] / llama["start_to_first_token_s"],
         ours["start_to_first_token_s"] / tf["start_to_first_token_s"], "≤ 2 × llama.cpp",
         ours["start_to_first_token_s"] <= 2 * llama["start_to_first_token_s"]),
        ("peak RSS", ours["peak_rss_mb"] / llama["peak_rss_mb"], ours["peak_rss_mb"] / tf["peak_rss_mb"],
         "≤ 1 × llama.cpp", ours["peak_rss_mb"] <= llama["peak_rss_mb"]),
    ]
    for name, vs_llama, vs_tf, target, met in checks:
        lines.append(f"| {name} | {vs_llama:.2f}× | {vs_tf:.2f}× | {target} | {'yes' if met else 'no'} |")
    if quality:
        decode_path = quality.pop("decode path")
        lines += ["", f"### Perplexity ({CORPUS.name}, {args.context}-token chunks, second halves scored)", "",
                  "| engine | perplexity | tokens scored |", "|---|---|---|"]
        for engine, q in quality.items():
            lines.append(f"| {engine} | {q['perplexity']:.4f} | {q['tokens_scored']} |")
        lines += ["", f"The first {args.decode_chunks} chunks, scoring every token through a decoding step as generation "
                  "does (the fused decode path: int8 activations in the block kernel) against one forward per chunk:", "",
                  "| path | perplexity | tokens scored |", "|---|---|---|"]
        for path, q in decode_path.items():
            lines.append(f"| {path} | {q['perplexity']:.4f} | {q['tokens_scored']} |")
        steps = decode_path["qwen-engine, decoding steps"]["perplexity"]
        lines += ["", f"Decoding steps: {steps / decode_path['qwen-engine float32']['perplexity'] - 1:+.2%} against float32, "
                  f"{steps / decode_path['llama.cpp']['perplexity'] - 1:+.2%} against llama.cpp on the same chunks."]
        ours_ppl = quality["qwen-engine"]["perplexity"]
        vs_llama = ours_ppl / quality["llama.cpp"]["perplexity"] - 1
        vs_f32 = ours_ppl / quality["qwen-engine float32"]["perplexity"] - 1
        lines += ["", f"qwen-engine's default format: {vs_llama:+.2%} against llama.cpp, {vs_f32:+.2%} against its own "
                  f"float32 path (target: within ±1% of both: {'met' if abs(vs_llama) <= 0.01 and abs(vs_f32) <= 0.01 else 'not met'})."]
    lines += ["", "### Every run", "", "```", json.dumps(runs, indent=1), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
