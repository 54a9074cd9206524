"""Text released while tokens stream out: what a stop string or a tool-call tag may still claim is held back.

Used by the engine (stop strings) and by the server's tool-call parser (the `<tool_call>` tag).
"""

from __future__ import annotations


def held_back(text: str, markers: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that begins one of `markers` (and may still grow into it)."""
    hold = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), hold, -1):
            if text.endswith(marker[:n]):
                hold = n
                break
    return hold


class StopStringFilter:
    """Holds back text that might still turn into a stop string; reports where one completes."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            released, self.pending = self.pending[: min(hits)], ""
            return released, True
        released = self.pending[: len(self.pending) - held_back(self.pending, self.stops)]
        self.pending = self.pending[len(released):]
        return released, False

    def flush(self) -> str:
        released, self.pending = self.pending, ""
        return released

    def close(self, text: str) -> tuple[str, bool]:
        """The end of the output: `text` pushed, then whatever was held back unless a stop string completed."""
        released, hit = self.push(text)
        return (released, True) if hit else (released + self.flush(), False)
