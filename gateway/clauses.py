"""Cutting an answer that streams in token by token into pieces of speech.

Speech can start long before the first sentence is complete: the first piece
of an answer is short, and each later piece is synthesized while the one
before it plays, so later pieces may be longer (longer pieces have better
prosody). :class:`SpeechChunker` decides where the cuts go; nothing else in
edgestream cuts text for speech (the TTS worker speaks each piece it is given
as one unit).

The rule, for piece ``k`` (counting from 0):

- A sentence end always cuts, and whether a full stop ends a sentence is
  decided by sentencex (Wikimedia's rule-based segmenter, no model to
  download): no cut after "Dr.", "e.g.", "p.m." or initials; "12.3", "3:30"
  and "1,000" never cut because a cut needs whitespace after the punctuation.
- Piece 0 also ends at the first clause punctuation (``, ; : —`` and a spaced
  dash) or once it has ``first_words`` words, at a word boundary, whichever
  comes first: synthesis starts after a handful of tokens.
- Piece ``k >= 1`` ends at clause punctuation once it has at least
  ``first_words * 2 ** (k - 1)`` words, and without punctuation at twice that.
- No piece is longer than ``max_chars`` (cut at the last space before it).

Cost: every decision looks at the text since the last cut, which is at most
``max_chars`` plus one token, and each possible sentence end is judged once,
so feeding ``n`` characters costs O(n) however the text is shaped (8,000
dots are 40 hard cuts, not a backtracking search).
"""

from __future__ import annotations

import re

import sentencex

_PUNCTUATION_THEN_SPACE = re.compile(r"(?:[.!?…]+|[,;:—])[\"'”’)\]]*(?=\s)|\s[-–](?=\s)")
"""A possible cut: punctuation (then closing quotes or brackets) followed by whitespace,
or a dash with spaces around it. A run of one character class, so it cannot backtrack."""
_SENTENCE_PUNCTUATION = frozenset(".!?…")
_WORD = re.compile(r"\S+")
_MARKUP = re.compile(r"[*_#`~]+")
"""Markdown a small LLM sometimes writes: a voice reads it as symbols, so it is dropped."""


def speakable(text: str) -> str:
    """``text`` without the markup characters a voice would read out."""
    return _MARKUP.sub("", text)


class SpeechChunker:
    """Feed text as it streams in; get back each piece of speech as soon as it is complete."""

    def __init__(self, first_words: int = 4, max_chars: int = 200, language: str = "en") -> None:
        if first_words < 1:
            raise ValueError("first_words must be at least 1")
        self.first_words = first_words
        self.max_chars = max_chars
        self.language = language
        self.pieces = 0
        """Pieces cut so far."""
        self._buffer = ""
        self._verdicts: dict[int, bool] = {}
        """Sentence-end verdicts by position in the buffer, until the next cut."""

    @property
    def pending(self) -> str:
        """Text fed and not yet cut."""
        return self._buffer

    def feed(self, text: str) -> list[str]:
        """Add ``text``; return the pieces it completed, in order."""
        self._buffer += speakable(text)
        pieces = []
        while (end := self._next_cut()) is not None:
            piece, self._buffer = self._buffer[:end].strip(), self._buffer[end:].lstrip()
            self._verdicts.clear()
            if piece:
                pieces.append(piece)
                self.pieces += 1
        return pieces

    def flush(self) -> list[str]:
        """The text still buffered, as the last piece (at the end of the answer)."""
        rest, self._buffer = self._buffer.strip(), ""
        self._verdicts.clear()
        if rest:
            self.pieces += 1
            return [rest]
        return []

    def _min_words(self) -> int:
        """Words a piece needs before clause punctuation may end it (piece 0: any)."""
        return 0 if self.pieces == 0 else self.first_words * 2 ** min(self.pieces - 1, 8)

    def _max_words(self) -> int:
        """Words after which a piece without punctuation is cut at a word boundary."""
        return self.first_words if self.pieces == 0 else 2 * self._min_words()

    def _next_cut(self) -> int | None:
        """Where the next piece ends in the buffer, or ``None`` if it is not complete yet."""
        text = self._buffer.lstrip()
        offset = len(self._buffer) - len(text)
        # The text is cut only at whitespace, so only words followed by some are complete.
        complete = [w for w in _WORD.finditer(text) if w.end() < len(text)]
        limit = self._max_words()
        word_cut = self._word_cut(complete, limit) if len(complete) >= limit else None
        for match in _PUNCTUATION_THEN_SPACE.finditer(text):
            end = match.end()
            if word_cut is not None and end > word_cut:
                break  # the word count comes first
            words_before = sum(1 for w in complete if w.end() <= end)
            if words_before == 0:
                continue
            if match.group().lstrip()[0] in _SENTENCE_PUNCTUATION:
                verdict = self._ends_sentence(text, offset + end, complete)
                if verdict is None:
                    break  # the next word decides: wait for it (unless the word count cuts here)
                if verdict:
                    return offset + end
            elif words_before >= max(1, self._min_words()):
                return offset + end
        if word_cut is not None:
            return offset + word_cut
        if len(text) > self.max_chars:
            space = text.rfind(" ", 0, self.max_chars)
            return offset + (space if space > 0 else self.max_chars)
        return None

    def _ends_sentence(self, text: str, at: int, complete: list[re.Match[str]]) -> bool | None:
        """Whether the punctuation ending at ``at`` (in the buffer) ends a sentence; ``None``: not yet known.

        sentencex decides, seeing the text up to the end of the next word (so
        "Dr." followed by "Smith" is no end), and only once that word is
        complete, so the verdict never depends on how the stream was split.
        Each verdict is kept until the next cut: every candidate is judged once.
        """
        if at in self._verdicts:
            return self._verdicts[at]
        end = at - (len(self._buffer) - len(text))
        following = next((w for w in complete if w.start() >= end), None)
        if following is None:
            return None
        head = text[: following.end()]
        first = next(iter(sentencex.segment(self.language, head)), head)
        verdict = self._verdicts[at] = len(first.rstrip()) == len(text[:end].rstrip())
        return verdict

    @staticmethod
    def _word_cut(complete: list[re.Match[str]], limit: int) -> int | None:
        """The end of word ``limit`` or, if that word ends in a full stop (an abbreviation or
        an initial, since it was no sentence end), of the first later word that does not."""
        for word in complete[limit - 1 :]:
            if not word.group().endswith("."):
                return word.end()
        return None
