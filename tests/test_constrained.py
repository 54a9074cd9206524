"""The JSON-object automaton behind `response_format: json_object` and forced tool calls (engine/constrained.py)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_engine.engine.constrained import START, JsonObjectConstraint, step, token_texts

SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                      max_leaves=12)


def run(text: str):
    state = START
    for char in text:
        state = step(state, char)
        if state is None:
            return None
    return state


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(), VALUES, max_size=5), st.booleans(), st.sampled_from([None, 1]))
def test_every_json_object_is_accepted_and_closes(obj: dict, ascii_only: bool, indent: int | None) -> None:
    text = json.dumps(obj, ensure_ascii=ascii_only, indent=indent)
    state = run(text)
    assert state is not None and state[0] == "done"
    assert all(run(text[:cut])[0] != "done" for cut in range(len(text)))  # no prefix closes early


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40))
def test_what_is_accepted_to_the_end_parses(text: str) -> None:
    state = run(text)
    if state is not None and state[0] == "done":
        assert isinstance(json.loads(text), dict)


def test_tokens_that_are_not_whole_utf8_go_byte_by_byte_inside_strings() -> None:
    pieces = ['{"', "a", '":', ' "', b"\xf0\x9f", b"\x98\x80", b"\xc3", b"\xa9", '"}', b"\x80", b"\xed\xa0\x80", "é", "x"]
    vocabulary = [piece if isinstance(piece, bytes) else piece.encode() for piece in pieces]
    texts = token_texts(vocabulary, frozenset())
    assert texts[4] == b"\xf0\x9f" and texts[11] == "é"  # raw bytes only where the token is not whole UTF-8
    constraint = JsonObjectConstraint(texts)
    uniform = torch.zeros(len(pieces))

    def allowed() -> set[int]:
        return set(torch.nonzero(constraint.allowed(uniform)).flatten().tolist())

    assert 4 not in allowed() and 6 not in allowed()  # no lead byte outside a string
    for token in (0, 1, 2, 3):  # {"a": "
        constraint.advance(token)
    inside = allowed()
    assert {4, 6, 11, 12, 8} <= inside  # lead bytes, whole characters, the closing quote
    assert 5 not in inside and 9 not in inside and 7 not in inside  # no continuation byte without its lead
    assert 10 not in inside  # a surrogate (ED A0 80) is not UTF-8
    constraint.advance(4)  # half of 😀
    assert allowed() == {5, 7, 9}  # continuation bytes only: no quote, character or new lead in the middle
    constraint.advance(5)
    constraint.advance(6)  # half of é
    assert allowed() == {7, 9}  # one continuation byte, then nothing more of the token (98 80 would leave 80 alone)
    constraint.advance(7)
    constraint.advance(8)
    assert constraint.done
    output = b"".join(vocabulary[t] for t in (0, 1, 2, 3, 4, 5, 6, 7, 8)).decode("utf-8")
    assert json.loads(output) == {"a": "😀é"}
