"""What a client may send on the events channel (gateway/client_messages.py): parsed, or refused with a code."""

from __future__ import annotations

import json

import pytest

from gateway.client_messages import MAX_MESSAGE_BYTES, MAX_QUESTION_CHARS, Ask, BadMessage, Interrupt, parse


def test_a_typed_question_and_an_interrupt_are_understood():
    assert parse(json.dumps({"type": "ask", "text": "  What is the capital of France? "})) == Ask(text="What is the capital of France?")
    assert parse('{"type": "interrupt"}') == Interrupt()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b'{"type": "ask", "text": "hi"}', "malformed_message"),  # binary
        ("not json", "malformed_message"),
        ("[1, 2]", "malformed_message"),
        ('{"type": "offer"}', "unknown_message"),
        ('{"text": "hi"}', "unknown_message"),
        ('{"type": "ask"}', "malformed_message"),
        ('{"type": "ask", "text": 5}', "malformed_message"),
        ('{"type": "ask", "text": "   "}', "malformed_message"),
        ('{"type": "ask", "text": "hi", "voice": "x"}', "malformed_message"),
        ('{"type": "interrupt", "now": true}', "malformed_message"),
        (json.dumps({"type": "ask", "text": "x" * (MAX_QUESTION_CHARS + 1)}), "question_too_long"),
        (json.dumps({"type": "ask", "text": "x" * MAX_MESSAGE_BYTES}), "message_too_large"),
        ("[" * 5000, "malformed_message"),  # nested deeper than the JSON parser recurses
        ("é" * (MAX_MESSAGE_BYTES // 2 + 1), "message_too_large"),  # counted in bytes, not characters
    ],
)
def test_anything_else_is_refused_with_a_code_and_a_sentence(data, code):
    with pytest.raises(BadMessage) as refused:
        parse(data)
    assert refused.value.code == code and refused.value.message
