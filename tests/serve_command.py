"""`qwen serve` as a user starts it: a subprocess on a free port, for the tests that need the real command."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai


class ServeCommand:
    """`qwen serve` in a subprocess, on a free port, up and answering /health."""

    def __init__(self, model: str | Path, *options: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.command = [sys.executable, "-m", "qwen_engine.cli", "serve", "--model", str(model), "--port", str(self.port),
                        *options]
        self.process = subprocess.Popen(self.command, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError(f"qwen serve did not come up: {self.process.stderr.read() if self.process.poll() is not None else 'timeout'}")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0)

    def rss_bytes(self) -> int:
        status = open(f"/proc/{self.process.pid}/status").read()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
