"""Clause chunking of streamed text, as the TTS worker (and later the gateway) uses it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from stream.clauses import ClauseChunker


def feed_tokens(text: str, size: int = 3) -> tuple[list[str], list[str]]:
    chunker = ClauseChunker()
    out: list[str] = []
    for start in range(0, len(text), size):
        out += chunker.feed(text[start : start + size])
    return out, chunker.flush()


def test_sentences_and_long_clauses_split_as_soon_as_complete():
    chunker = ClauseChunker()
    assert chunker.feed("Sure, the capital of France") == []
    assert chunker.feed(" is Paris. It") == ["Sure, the capital of France is Paris."]
    assert chunker.feed(" has 2.1 million people, and") == ["It has 2.1 million people,"]
    assert chunker.flush() == ["and"]


def test_decimal_points_and_short_openers_do_not_split():
    clauses, rest = feed_tokens("Yes, it costs 3.50 dollars today! Thanks")
    assert clauses == ["Yes, it costs 3.50 dollars today!"]
    assert rest == ["Thanks"]


def test_text_without_punctuation_is_cut_at_a_space_when_too_long():
    chunker = ClauseChunker(max_chars=20)
    clauses = chunker.feed("one two three four five six seven eight")
    assert clauses and all(len(c) <= 20 for c in clauses)
    assert " ".join(clauses + chunker.flush()) == "one two three four five six seven eight"


@given(st.text(alphabet="abc ,.!?\n", max_size=300), st.integers(1, 9))
def test_no_text_is_lost_or_reordered(text: str, size: int):
    clauses, rest = feed_tokens(text, size)
    assert "".join((clauses + rest)).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")
