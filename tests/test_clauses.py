"""Cutting a streamed answer into pieces of speech: the rule, then its properties on generated English."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gateway.clauses
from gateway.clauses import SpeechChunker, speakable


def cut(text: str, piece_size: int = 3, **options: int) -> list[str]:
    """``text`` fed ``piece_size`` characters at a time, as tokens stream; every piece, flush included."""
    chunker = SpeechChunker(**options)
    pieces: list[str] = []
    for start in range(0, len(text), piece_size):
        pieces += chunker.feed(text[start : start + piece_size])
    return pieces + chunker.flush()


def test_the_first_piece_ends_after_a_few_words_when_no_punctuation_comes():
    assert cut("The nearest train station is about twelve minutes away.")[0] == "The nearest train station"


def test_the_first_piece_ends_at_the_first_punctuation_if_that_comes_first():
    assert cut("Sure! The capital of France is Paris.")[:2] == ["Sure!", "The capital of France is Paris."]
    assert cut("Well, I think so.")[0] == "Well,"


def test_later_pieces_follow_clause_boundaries_and_grow():
    text = (
        "Here is a joke: why did the robot go on vacation, and why did it take so long to come back, "
        "with all its friends and a suitcase full of batteries and spare parts for the trip? It needed to recharge."
    )
    pieces = cut(text)
    assert pieces[0] == "Here is a joke:"
    words = [len(p.split()) for p in pieces]
    assert words[1] >= 4 and max(words[2:]) > words[1]  # later pieces may be longer
    assert pieces[-1] == "It needed to recharge."
    assert all(p[-1] in ",:?." or len(p.split()) >= 8 for p in pieces[:-1])


@pytest.mark.parametrize(
    "text",
    [
        "Ask Dr. Smith about it tomorrow. Then call me.",
        "The shop opens at 3 p.m. today, so hurry.",
        "It is 12.3 km from here and costs 1,000 yen.",
        "Bring fruit, e.g. apples and pears, to the picnic.",
        "J. R. R. Tolkien wrote The Hobbit in the year before the war started.",
        "The meeting is at 3:30 on the 21st of May.",
    ],
)
def test_no_cut_after_abbreviations_initials_decimals_times_or_ordinals(text):
    pieces = cut(text)
    assert " ".join(pieces) == text
    for piece in pieces[:-1]:
        last = piece.split()[-1]
        assert last not in {"Dr.", "p.m.", "e.g.", "J.", "R."}, pieces
    for token in ("12.3", "1,000", "3:30", "p.m.", "e.g.", "Dr."):
        assert all(token not in p or token in text for p in pieces)


def test_a_sentence_end_waits_for_the_next_word_to_be_sure():
    chunker = SpeechChunker()
    assert chunker.feed("Call Dr.") == []
    assert chunker.feed(" Smith") == []  # "Smith" is not complete yet
    assert chunker.feed(" now.") == []
    assert chunker.feed(" Bye") == []  # is "now." the end? The next word says
    assert chunker.feed(" then") == ["Call Dr. Smith now."]


def test_markup_is_not_read_out():
    assert speakable("**Yes**, use `pip` # now") == "Yes, use pip  now"
    assert cut("**Sure**, here it is.")[0] == "Sure,"


def test_text_without_any_punctuation_is_cut_at_word_boundaries():
    text = " ".join(f"word{n}" for n in range(100))
    pieces = cut(text)
    assert " ".join(pieces) == text
    assert [len(p.split()) for p in pieces[:3]] == [4, 8, 16]  # then max_chars (200) limits them


def test_a_run_of_punctuation_costs_linear_time(monkeypatch):
    """8,000 dots (a TTS worker once spent 23 s on them): hard cuts every ``max_chars``, and the
    segmenter only ever sees the bounded text since the last cut."""
    seen: list[int] = []
    real = gateway.clauses.sentencex.segment
    monkeypatch.setattr(gateway.clauses.sentencex, "segment", lambda lang, text: seen.append(len(text)) or real(lang, text))
    text = "." * 8000 + " Then. And " + "a. " * 2000
    chunker = SpeechChunker(max_chars=200)
    pieces = []
    feeds = 0
    for start in range(0, len(text), 4):
        pieces += chunker.feed(text[start : start + 4])
        feeds += 1
    pieces += chunker.flush()
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")
    assert all(len(p) <= 200 for p in pieces)
    assert max(seen, default=0) <= 200 + 16
    assert len(seen) <= text.count(".")  # each possible sentence end judged at most once


# -- properties, on text made of real words ------------------------------------------------

WORDS = (
    "the nearest train station is about twelve minutes from here and you can walk or take a bus "
    "it was a sunny day when she went to the market to buy fresh bread cheese milk"
).split()
SPECIAL = ["Dr.", "Mr.", "Mrs.", "e.g.", "i.e.", "12.3", "3:30", "1,000", "21st", "3rd", "J.", "U.S.", "p.m.", "km"]
word = st.sampled_from(WORDS) | st.sampled_from(SPECIAL)
punctuation = st.sampled_from(["", "", "", "", ",", ".", "!", "?", ";", ":", " -"])
token = st.tuples(word, punctuation).map("".join)
texts = st.lists(token, min_size=1, max_size=50).map(" ".join)


@settings(max_examples=120, deadline=None)
@given(texts, st.integers(1, 12), st.integers(1, 8))
def test_nothing_is_lost_reordered_or_cut_inside_a_word(text, piece_size, first_words):
    pieces = cut(text, piece_size, first_words=first_words)
    assert " ".join(pieces) == " ".join(text.split())


@settings(max_examples=120, deadline=None)
@given(texts, st.integers(1, 12))
def test_the_cuts_do_not_depend_on_how_the_text_streamed_in(text, piece_size):
    assert cut(text, piece_size) == cut(text, len(text) or 1) == cut(text, 1)


@settings(max_examples=120, deadline=None)
@given(texts, st.integers(1, 8), st.integers(40, 200))
def test_pieces_keep_their_limits(text, first_words, max_chars):
    pieces = cut(text, first_words=first_words, max_chars=max_chars)
    assert all(len(p) <= max_chars for p in pieces)
    if pieces:
        leading_stops = len(re.match(r"((?:\S+\.\s+)*)", pieces[0] + " ").group(1).split())
        assert len(pieces[0].split()) <= first_words + leading_stops + _stops_run(pieces[0], first_words)


def _stops_run(piece: str, first_words: int) -> int:
    """Words ending in a full stop right at the word-count cut (the cut moves past them)."""
    words = piece.split()[first_words - 1 :]
    run = 0
    for w in words:
        if not w.endswith("."):
            break
        run += 1
    return run


@settings(max_examples=200, deadline=None)
@given(texts)
def test_no_piece_ends_on_a_title_or_an_initial(text):
    for piece in cut(text)[:-1]:
        assert piece.split()[-1] not in {"Dr.", "Mr.", "Mrs.", "J."}
