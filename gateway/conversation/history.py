"""What the conversation remembers, and the prompt it gives the LLM (pure).

The prompt is built so that the LLM worker's cache covers all but the newest
turn: the system prompt first (each worker instance evaluated it at load),
then the history, then the question, and the camera's text after it, in the
user message (in the system prompt it would change the prefix every turn;
before the question it would spoil the prefix the worker evaluated from the
partial transcripts while the person spoke).

The history is trimmed in blocks, not one turn at a time: a window sliding by
one turn would change the prompt right after the system message on every
turn, and the worker would re-evaluate the whole history each time. When
full it keeps only the newest half; the turn after such a trim would still
re-evaluate the kept half (seconds on a small box), so the conversation
sends the worker the trimmed prompt to evaluate ahead (``LlmParams.prefill``)
as soon as the answer that trims it is complete, while it plays
(:meth:`History.context_if_trimmed`).
"""

from __future__ import annotations

from stream.protocol.jobs import ChatMessage, VisionResult


def with_camera_context(question: str, seen: VisionResult | None) -> str:
    """The question as the LLM gets it: what was said, then what the camera shows."""
    if seen is None or not (seen.text or seen.description):
        return question
    context = f" (The camera shows: {seen.description})" if seen.description else ""
    context += f' (Text visible in the camera: "{seen.text}")' if seen.text else ""
    return question + context


class History:
    def __init__(self, system_prompt: str, max_turns: int) -> None:
        self.system = ChatMessage(role="system", content=system_prompt)
        self.max_turns = max_turns
        self.messages: list[ChatMessage] = []
        """User and assistant messages, oldest first."""

    def prompt(self, question: str) -> list[ChatMessage]:
        """System prompt, history, and the question."""
        return [self.system, *self.messages, ChatMessage(role="user", content=question)]

    def remember(self, question: str, answer: str) -> bool:
        """Add a turn; return whether the history was trimmed (the prompt's prefix changed)."""
        self.messages, trimmed = self._with(question, answer)
        return trimmed

    def context_if_trimmed(self, question: str, answer: str) -> list[ChatMessage] | None:
        """What the next prompt would start with once this turn is remembered, if that trims
        the history; ``None`` if it would not. (The conversation has the trimmed context
        evaluated as soon as the answer's text is complete, not when it has been heard.)"""
        messages, trimmed = self._with(question, answer)
        return [self.system, *messages] if trimmed else None

    def _with(self, question: str, answer: str) -> tuple[list[ChatMessage], bool]:
        messages = [*self.messages, ChatMessage(role="user", content=question), ChatMessage(role="assistant", content=answer)]
        if len(messages) <= 2 * self.max_turns:
            return messages, False
        keep = self.max_turns // 2
        return (messages[-2 * keep :] if keep else []), True

    def context(self) -> list[ChatMessage]:
        """What the next prompt starts with (for a prefill)."""
        return [self.system, *self.messages]

    def new_chars(self) -> int:
        """Characters of the next prompt the worker that answered last has not evaluated: the last answer."""
        return len(self.messages[-1].content) if self.messages else 0
