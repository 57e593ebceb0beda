"""``edgestream attack`` against a live system: a real spoken turn is answered under each attack.

Three cheap attacks of the red-team set (each finding also has its own test
beside the code it is about); the figures (``/healthz`` p99, RSS) are the
command's to report, not this test's to judge.
"""

from __future__ import annotations

import json

import pytest

from gateway.harness.attack import ATTACKS, run_attacks
from stream.config import GatewaySettings

pytestmark = pytest.mark.models  # real models or processes of the system: the slow tier


def test_every_finding_has_an_attack():
    assert {a.finding for a in ATTACKS.values()} == set(range(1, 11))


async def test_under_attack_a_real_turn_is_answered_and_nothing_is_left_broken(tmp_path):
    summary = await run_attacks(["tts-dots", "dead-microphones", "signaling"], tmp_path / "attack.json")
    rows = {row["attack"]: row for row in summary["attacks"]}
    assert list(rows) == ["tts-dots", "dead-microphones", "signaling"]
    for row in rows.values():
        assert row["answered"] and not row["errors"], row
        assert row["all_running"] and "attack_error" not in row["observed"], row
        assert row["healthz_samples"] > 0 and not row["healthz_failures"], row
    assert set(rows["tts-dots"]["observed"]["jobs"]) <= {"complete", "limit"}
    assert rows["dead-microphones"]["observed"]["sessions_still_connected"] == 2
    signaling = rows["signaling"]["observed"]
    most = GatewaySettings().max_pending_signaling
    assert signaling["idle_accepted"] <= most and signaling["idle_accepted"] + signaling["idle_refused"] == 1500
    assert set(signaling["replies"]) <= {"malformed", "bad_offer"} and set(signaling["http"]) <= {404, 405}
    assert signaling["flood_answered_rate_limited"] == 1
    assert json.loads((tmp_path / "attack.json").read_text())["attacks"][0]["attack"] == "tts-dots"
