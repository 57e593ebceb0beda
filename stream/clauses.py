"""Splitting streamed text into clauses, so speech can start before a sentence ends.

Speech sounds natural when synthesized a clause at a time, and the first clause
of an answer is ready long before its sentence is. A clause ends at sentence
punctuation followed by a space, or at a comma, semicolon, colon or dash after
at least ``min_words`` words (so "Yes, " does not become its own clause).
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*(?=\s)")
_CLAUSE_END = re.compile(r"[,;:—]+(?=\s)|\s[-–]\s")


class ClauseChunker:
    """Feed text as it streams in; get back each clause as soon as it is complete."""

    def __init__(self, min_words: int = 3, max_chars: int = 200) -> None:
        self.min_words = min_words
        self.max_chars = max_chars
        self._buffer = ""

    def feed(self, text: str) -> list[str]:
        """Add ``text``; return the clauses it completed, in order."""
        self._buffer += text
        clauses = []
        while (end := self._next_end()) is not None:
            clause, self._buffer = self._buffer[:end].strip(), self._buffer[end:].lstrip()
            if clause:
                clauses.append(clause)
        return clauses

    def flush(self) -> list[str]:
        """The text still buffered, as a last clause (at the end of the input)."""
        rest, self._buffer = self._buffer.strip(), ""
        return [rest] if rest else []

    @property
    def pending(self) -> str:
        return self._buffer

    def _next_end(self) -> int | None:
        sentence = _SENTENCE_END.search(self._buffer)
        if sentence is not None:
            candidates = [sentence.end()]
        else:
            candidates = []
        for match in _CLAUSE_END.finditer(self._buffer):
            if len(self._buffer[: match.start()].split()) >= self.min_words:
                candidates.append(match.end())
                break
        if candidates:
            return min(candidates)
        if len(self._buffer) > self.max_chars:
            space = self._buffer.rfind(" ", 0, self.max_chars)
            return space if space > 0 else self.max_chars
        return None
