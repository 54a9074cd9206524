"""Qwen2.5's tool calls (qwen-family.md §8.3): the model answers with `<tool_call>{"name": …, "arguments": …}
</tool_call>` blocks, which become OpenAI `tool_calls`, also while streaming.

Small models sometimes answer with the same JSON object alone, bare or in a ```json fence, instead of the tags.
A reply that is nothing but such an object, naming one of the request's tools and carrying arguments, is taken
as a call too (as llama.cpp's server does for models without a dedicated format); anything else stays text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..engine.text import held_back

OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)
BARE = re.compile(r"\s*(?:```(?:json)?\s*)?(\{.*\})\s*(?:```)?\s*", re.S)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _as_call(call: dict[str, Any]) -> dict[str, Any]:
    arguments = call.get("arguments", {})
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call["name"],
                     "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)},
    }


def parse_call(body: str) -> dict[str, Any] | None:
    """An OpenAI tool call from one block's JSON, or None when it is not a call."""
    call = _json(body)
    return _as_call(call) if isinstance(call, dict) and isinstance(call.get("name"), str) else None


def bare_call(text: str, names: frozenset[str]) -> dict[str, Any] | None:
    """The call when the whole reply is one JSON object naming a tool of the request, else None."""
    match = BARE.fullmatch(text)
    raw = None if match is None else _json(match.group(1))
    if not isinstance(raw, dict) or raw.get("name") not in names or "arguments" not in raw:
        return None
    return _as_call(raw)


def split_tool_calls(text: str, names: frozenset[str] = frozenset()) -> tuple[str | None, list[dict[str, Any]]]:
    """(content outside the calls or None, tool calls) from a whole reply."""
    call = None if OPEN in text else bare_call(text, names)
    if call is not None:
        return None, [call]
    calls, kept, end = [], [], 0
    for match in BLOCK.finditer(text):
        call = parse_call(match.group(1))
        if call is None:
            continue
        kept.append(text[end : match.start()])
        end = match.end()
        calls.append(call)
    kept.append(text[end:])
    content = "".join(kept).strip() if calls else text
    return (content or None) if calls else content, calls


@dataclass
class StreamingToolParser:
    """Feeds on text deltas; gives back content deltas and whole tool calls as soon as their block closes. A reply
    that opens with `{` or a fence is held back whole, since it may turn out to be a bare call."""

    names: frozenset[str] = frozenset()
    pending: str = ""
    inside: bool = False
    held: bool | None = None  # undecided until the reply's first visible character
    calls: list[dict[str, Any]] = field(default_factory=list)

    def push(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self.pending += text
        if self.held is None and self.pending.strip():
            self.held = bool(self.names) and self.pending.lstrip()[0] in "{`"
        if self.held is not False:
            return "", []
        content, found = "", []
        while True:
            if self.inside:
                end = self.pending.find(CLOSE)
                if end < 0:
                    return content, found
                call = parse_call(self.pending[:end].strip())
                if call is None:  # not a call after all: it was text
                    content += OPEN + self.pending[: end + len(CLOSE)]
                else:
                    found.append(call)
                    self.calls.append(call)
                self.pending, self.inside = self.pending[end + len(CLOSE) :], False
                continue
            start = self.pending.find(OPEN)
            if start >= 0:
                content += self.pending[:start]
                self.pending, self.inside = self.pending[start + len(OPEN) :], True
                continue
            hold = held_back(self.pending, (OPEN,))
            content += self.pending[: len(self.pending) - hold]
            self.pending = self.pending[len(self.pending) - hold :]
            return content, found

    def flush(self) -> tuple[str, list[dict[str, Any]]]:
        """Text still held at the end (an unclosed block is text), or the bare call a held reply turned out to be."""
        if self.held:
            content, calls = split_tool_calls(self.pending, self.names)
            self.pending, self.held = "", False
            self.calls += calls
            return content or "", calls
        text = (OPEN if self.inside else "") + self.pending
        self.pending, self.inside = "", False
        return text, []
