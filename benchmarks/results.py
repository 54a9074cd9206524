"""benchmarks/RESULTS.md holds every benchmark's latest results, one section per script; each script rewrites only
its own section, so running one never drops another's figures. (Benchmarks run one at a time, never together.)"""

from __future__ import annotations

import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nEach section is written by the script it names; rerun that script to refresh it.\n"


def update_section(name: str, text: str, path: Path = RESULTS) -> None:
    """Replace section `name` of `path` (added at the end the first time) with `text`, through a temporary file
    renamed over the old one, so an interrupted write leaves the previous results whole."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    current = path.read_text(encoding="utf-8") if path.exists() else HEADER
    if begin in current and end in current:
        head, _, rest = current.partition(begin)
        _, _, tail = rest.partition(end)
        updated = head + block + tail
    else:
        updated = current.rstrip("\n") + "\n\n" + block + "\n"
    temporary = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        temporary.write_text(updated, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
