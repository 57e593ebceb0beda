"""Chaos, short: worker processes killed with SIGKILL during live turns, every turn answered.

``edgestream chaos --kills 100`` is the long run; this is the same code with a few kills.
"""

from __future__ import annotations

import json

import pytest

from gateway.harness.chaos import run_chaos, words_heard

pytestmark = pytest.mark.models  # real models or processes of the system: the slow tier


def test_words_heard_counts_the_reference_words_in_the_transcript():
    assert words_heard("What is two plus two?", "what is 2 plus 2") == 0.6
    assert words_heard("Hello there.", "") == 0.0


async def test_no_turn_is_lost_when_workers_are_killed_mid_turn(tmp_path):
    summary = await run_chaos(kills=6, out=tmp_path / "chaos.json", logs_dir=tmp_path / "logs")
    assert summary["lost_turns"] == 0, summary["lost"]
    assert summary["kills"] == 6 and all(n >= 1 for n in summary["kills_by_kind"].values()), summary
    # Each kill made the gateway move a job; none went unnoticed.
    assert sum(summary["failovers"].values()) >= summary["kills"], summary
    assert json.loads((tmp_path / "chaos.json").read_text())["turns"] == summary["turns"]
