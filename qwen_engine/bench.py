"""`qwen bench`: the numbers that decide whether an engine is fast, measured the way llama-bench does.

The prompt is random token ids (seeded), so no text is needed and every engine sees the same workload.
"""

from __future__ import annotations

import random
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(slots=True)
class BenchResult:
    load_s: float
    start_to_first_token_s: float  # from the call (imports included) to the first generated token
    ttft_s: float  # prefill + first token of the long prompt
    prefill_tok_s: float
    decode_tok_s: float
    prompt_tokens: int
    gen_tokens: int
    peak_rss_mb: float
    quant: str
    dtype: str
    kernels: str  # the native kernel variant in use (cpu.py), "none" where PyTorch's paths run

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def bench_prompt(vocab_size: int, length: int, seed: int = 0) -> list[int]:
    """Random ordinary-token ids (the first 151,643 ids of every Qwen vocabulary are plain BPE tokens)."""
    rng = random.Random(seed)
    return [rng.randrange(min(vocab_size, 151_643)) for _ in range(length)]


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (ru_maxrss is carried across exec, so a process started by a large
    one would report at least its parent's peak), else ru_maxrss where there is no /proc."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_bench(
    model: str | Path = "default",
    prompt_tokens: int = 660,
    gen_tokens: int = 128,
    *,
    started: float | None = None,
    **load_options: object,
) -> BenchResult:
    from .kernels import cpu_kernels  # (here, not above: bench_prompt stays free of torch for a peer engine's worker)
    from .llm import load

    started = time.perf_counter() if started is None else started
    m = load(model, **load_options)
    greedy = {"temperature": 0.0, "repetition_penalty": 1.0, "ignore_eos": True}
    m.generate(bench_prompt(m.config.vocab_size, 8, seed=1), max_tokens=1, **greedy)  # also warms the kernels up
    start_to_first_token = time.perf_counter() - started
    result = m.generate(bench_prompt(m.config.vocab_size, prompt_tokens), max_tokens=gen_tokens, **greedy)
    timings = result.timings
    return BenchResult(
        load_s=m.load_s,
        start_to_first_token_s=start_to_first_token,
        ttft_s=timings.ttft_s,
        prefill_tok_s=prompt_tokens / timings.prefill_s,
        decode_tok_s=timings.decode_tok_s,
        prompt_tokens=prompt_tokens,
        gen_tokens=len(result.token_ids),
        peak_rss_mb=peak_rss_mb(),
        quant=m.quant,
        dtype=str(m.dtype).removeprefix("torch."),
        kernels="none" if cpu_kernels() is None or m.device.type != "cpu" else cpu_kernels().variant,
    )
