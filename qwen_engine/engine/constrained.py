"""Constrained decoding for `response_format: {"type": "json_object"}`: every token keeps the output a prefix of a
JSON object, and the sequence ends when the object closes, so a finished output always parses.

A small pushdown automaton reads the output character by character. Its state is an immutable tuple, so trying a
token is feeding its characters to a copy. A token that is not whole UTF-8 (a byte-level piece of a rare character)
is fed byte by byte: such bytes may only stand inside a string, and only as a valid UTF-8 sequence, so the text
decodes whole once the sequence completes. At each step the most likely candidates are tried in order and only
those that keep the output valid stay allowed (a vocabulary-wide scan only when none of the first thousand
does). An output cut short by max_tokens is the one case that can still end unclosed (finish_reason "length"),
as with OpenAI's and vLLM's JSON modes.
"""

from __future__ import annotations

import torch

WHITESPACE = " \t\n\r"
MAX_WHITESPACE_RUN = 16  # a model stuck on newlines would otherwise never close the object
LITERALS = {"t": "true", "f": "false", "n": "null"}
CANDIDATES = (64, 1024)  # how many of the likeliest tokens to try before scanning the whole vocabulary

# States: (mode, stack, aux, whitespace run). mode is one of
#   "start"  before the top-level object     "value"  a value is expected        "key|}"  first key or }
#   "key"    a key is expected (after ,)     ":"      the colon after a key      ",|end"  , or the closing bracket
#   "str"    inside a string (aux: 1 if key) "esc"    after a backslash          "u"      aux: hex digits left (+key)
#   "num"    inside a number (aux: its part) "lit"    inside true/false/null (aux: the rest)   "done"
#   "utf8"   inside a string, within a multi-byte UTF-8 sequence (aux: bytes left, key, the next byte's range)
State = tuple[str, tuple[str, ...], object, int]
START: State = ("start", (), None, 0)


def step(state: State, char: str) -> State | None:
    """The state after `char`, or None when the output would no longer be a JSON object's prefix."""
    mode, stack, aux, run = state
    if mode == "utf8":  # a character cannot come in the middle of another one's bytes
        return None
    if mode == "num":
        after = _number(aux, char)
        if after is not None:
            return ("num", stack, after, 0)
        if aux not in ("int", "zero", "frac", "exp"):
            return None
        return step(_close_value(stack), char)  # the number ended; the character belongs to what follows
    if mode == "lit":
        if char != aux[0]:
            return None
        return ("lit", stack, aux[1:], 0) if len(aux) > 1 else _close_value(stack)
    if mode in ("str", "esc", "u"):
        return _string(mode, stack, aux, char)
    if char in WHITESPACE:
        return None if mode != "done" and run >= MAX_WHITESPACE_RUN else (mode, stack, aux, run + 1)
    if mode == "start":
        return ("key|}", ("{",), None, 0) if char == "{" else None
    if mode == "done":
        return None
    if mode in ("key|}", "key"):
        if char == '"':
            return ("str", stack, 1, 0)
        return _close_value(stack[:-1]) if char == "}" and mode == "key|}" else None
    if mode == ":":
        return ("value", stack, None, 0) if char == ":" else None
    if mode == ",|end":
        if char == ",":
            return ("key", stack, None, 0) if stack[-1] == "{" else ("value", stack, None, 0)
        if char == ("}" if stack[-1] == "{" else "]"):
            return _close_value(stack[:-1])
        return None
    # mode == "value"
    if char == "{":
        return ("key|}", stack + ("{",), None, 0)
    if char == "[":
        return ("value", stack + ("[",), "first", 0)  # aux "first": the array may still close empty
    if char == "]" and aux == "first":
        return _close_value(stack[:-1])
    if char == '"':
        return ("str", stack, 0, 0)
    if char == "-":
        return ("num", stack, "sign", 0)
    if char.isdigit():
        return ("num", stack, "zero" if char == "0" else "int", 0)
    if char in LITERALS:
        return ("lit", stack, LITERALS[char][1:], 0)
    return None


def step_byte(state: State, byte: int) -> State | None:
    """The state after one byte of a token that is not whole UTF-8: ASCII as its character; above that, only bytes
    that continue a valid UTF-8 sequence (RFC 3629: no overlong forms, surrogates or code points past U+10FFFF)
    inside a string."""
    mode, stack, aux, _ = state
    if mode == "utf8":
        left, key, low, high = aux
        if not low <= byte <= high:
            return None
        return ("utf8", stack, (left - 1, key, 0x80, 0xBF), 0) if left > 1 else ("str", stack, key, 0)
    if byte < 0x80:
        return step(state, chr(byte))
    lead = _UTF8_LEADS.get(byte)
    if mode != "str" or lead is None:
        return None
    return ("utf8", stack, (lead[0], aux, lead[1], lead[2]), 0)


# A UTF-8 lead byte → (continuation bytes, range of the first of them).
_UTF8_LEADS = {
    **{b: (1, 0x80, 0xBF) for b in range(0xC2, 0xE0)},
    0xE0: (2, 0xA0, 0xBF),
    **{b: (2, 0x80, 0xBF) for b in (*range(0xE1, 0xED), 0xEE, 0xEF)},
    0xED: (2, 0x80, 0x9F),
    0xF0: (3, 0x90, 0xBF),
    **{b: (3, 0x80, 0xBF) for b in range(0xF1, 0xF4)},
    0xF4: (3, 0x80, 0x8F),
}


def _close_value(stack: tuple[str, ...]) -> State:
    return ("done", (), None, 0) if not stack else (",|end", stack, None, 0)


def _string(mode: str, stack: tuple[str, ...], aux: object, char: str) -> State | None:
    key = aux if mode != "u" else aux[1]
    if mode == "esc":
        if char == "u":
            return ("u", stack, (4, key), 0)
        return ("str", stack, key, 0) if char in '"\\/bfnrt' else None
    if mode == "u":
        if char not in "0123456789abcdefABCDEF":
            return None
        left = aux[0] - 1
        return ("u", stack, (left, key), 0) if left else ("str", stack, key, 0)
    if char == '"':
        return (":", stack, None, 0) if key else _close_value(stack)
    if char == "\\":
        return ("esc", stack, key, 0)
    return None if ord(char) < 0x20 else ("str", stack, key, 0)


def _number(part: str, char: str) -> str | None:
    """The part of a number after `char` (sign, zero, int, dot, frac, e, esign, exp), or None if it cannot go on."""
    digit = char.isdigit() and char.isascii()
    if part == "sign":
        return ("zero" if char == "0" else "int") if digit else None
    if part in ("int", "zero"):
        if digit and part == "int":
            return "int"
        return "dot" if char == "." else "e" if char in "eE" else None
    if part in ("dot", "frac"):
        return "frac" if digit else ("e" if char in "eE" and part == "frac" else None)
    if part == "e":
        return "esign" if char in "+-" else ("exp" if digit else None)
    if part in ("esign", "exp"):
        return "exp" if digit else None
    return None


class JsonObjectConstraint:
    """Per-sequence state; `allowed(logits)` is the mask of tokens that may come next, `advance` records one."""

    def __init__(self, token_texts: list[str | bytes | None], prefix: str = "") -> None:
        """`prefix`: the start of the object, already written (a forced tool call's name), that the output goes on from."""
        self.token_texts = token_texts  # bytes: not whole UTF-8; None: a token that can never appear (control tokens)
        self.state: State = START
        self._accepted: dict[int, State] = {}  # the tokens the last `allowed` let through, and where each leads
        for char in prefix:
            state = step(self.state, char)
            if state is None:
                raise ValueError(f"{prefix!r} does not start a JSON object")
            self.state = state

    @property
    def done(self) -> bool:
        return self.state[0] == "done"

    def _after(self, text: str | bytes | None) -> State | None:
        if not text:
            return None
        state: State | None = self.state
        advance = step_byte if isinstance(text, bytes) else step
        for unit in text:
            state = advance(state, unit)
            if state is None:
                return None
        return state

    def allowed(self, logits: torch.Tensor) -> torch.Tensor:
        likeliest = torch.topk(logits, min(CANDIDATES[-1], logits.shape[-1])).indices.tolist()
        tried, self._accepted = 0, {}
        for count in (*CANDIDATES, logits.shape[-1]):
            order = likeliest if count <= len(likeliest) else torch.argsort(logits, descending=True).tolist()
            for token in order[tried:count]:
                after = self._after(self.token_texts[token]) if token < len(self.token_texts) else None
                if after is not None:
                    self._accepted[token] = after
            tried = count
            if self._accepted:
                mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                mask[list(self._accepted)] = True
                return mask
        raise RuntimeError("no token continues the JSON output")  # unreachable: a space or a digit always does

    def advance(self, token: int) -> None:
        after = self._accepted.get(token)
        if after is None:  # not chosen through `allowed` (or not a token that fits): computed here
            after = self._after(self.token_texts[token]) if token < len(self.token_texts) else None
        if after is not None:
            self.state = after
        self._accepted = {}


def token_texts(token_bytes: list[bytes], control_ids: frozenset[int]) -> list[str | bytes | None]:
    """Each token's text for the automaton: a string, the raw bytes of a token that is not whole UTF-8, or None for a
    control token."""
    texts: list[str | bytes | None] = []
    for token, raw in enumerate(token_bytes):
        try:
            texts.append(None if token in control_ids else raw.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(raw)
    return texts
