"""The chat page (issue 16): how fast `qwen serve` answers `/` and how much the browser downloads on the first load.

Starts the real `qwen serve` with the default model on 127.0.0.1, then times `--requests` sequential GETs of `/`
(one keep-alive connection, gzip accepted, as a browser asks) and of the page's script, and sums the compressed
sizes of what the first load fetches (index.html and the assets it names). Medians and the 95th percentile go to the
web-page section of RESULTS.md.

    python benchmarks/webui.py
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from harness import machine  # (benchmarks/harness.py, beside this script)
from results import RESULTS, update_section


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "qwen_engine.cli", "serve", "--port", str(port),
                                "--kv-cache-gb", "0.1"], stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("qwen serve did not come up")


def timed(client: httpx.Client, path: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        response = client.get(path)
        response.read()
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.status_code
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    process, base = start_server()
    try:
        with httpx.Client(base_url=base, headers={"accept-encoding": "gzip"}) as client:
            index = client.get("/")
            assets = re.findall(r'(?:src|href)="(/assets/[^"]+)"', index.text)
            sizes = {"/": int(index.headers.get("content-length", len(index.content)))}
            for path in assets:
                sizes[path] = int(client.get(path).headers["content-length"])
            timed(client, "/", 20)  # warm-up
            page = timed(client, "/", args.requests)
            script = timed(client, "/assets/app.js", args.requests)
    finally:
        process.kill()
        process.wait()
    p95 = lambda values: sorted(values)[int(0.95 * (len(values) - 1))]  # noqa: E731
    lines = [
        "## The chat page (issue 16)", "",
        f"Produced by `python benchmarks/webui.py` on {time.strftime('%Y-%m-%d')}.", "",
        f"- Machine: {machine()}",
        f"- `qwen serve` with the default model on 127.0.0.1; {args.requests} sequential GETs on one keep-alive "
        "connection (httpx, gzip accepted) after 20 to warm up; times from request to the last byte read.", "",
        "| | median (ms) | 95th percentile (ms) |", "|---|---|---|",
        f"| GET / | {statistics.median(page):.2f} | {p95(page):.2f} |",
        f"| GET /assets/app.js | {statistics.median(script):.2f} | {p95(script):.2f} |", "",
        "First load, as served (gzip): " + ", ".join(f"`{path}` {size / 1000:.1f} KB" for path, size in sizes.items())
        + f"; {sum(sizes.values()) / 1000:.1f} KB in all (KaTeX's fonts load only when a reply shows math).", "",
    ]
    text = "\n".join(lines)
    update_section("webui", text, args.output)
    print(text)


if __name__ == "__main__":
    main()
