"""The soak run, short: sessions talking through a real gateway process for a while lose no turn."""

from __future__ import annotations

import json

import pytest

from gateway.harness.load_bench import run_soak

pytestmark = pytest.mark.models  # real models or processes of the system: the slow tier


async def test_short_soak_loses_no_turn(tmp_path):
    out = tmp_path / "soak.json"
    summary = await run_soak(sessions=3, seconds=20, sample_every_s=4, clients=1, out=out)
    assert summary["connected"] == 3
    assert summary["lost_turns"] == 0 and summary["client_errors"] == 0, summary
    assert summary["turns_answered"] >= 6  # about one per session per 6.4 s
    timeline = summary["timeline"]
    assert len(timeline) >= 4 and all(sample["rss_mb"] > 50 for sample in timeline)
    assert timeline[-1].get("turns_answered", 0) > timeline[0].get("turns_answered", 0)  # sampled while turns went on
    # What a soak exists for: the gateway's memory settles (measured from the first tenth of the run).
    assert summary["rss_growth_pct"] < 5, [sample["rss_mb"] for sample in timeline]
    assert json.loads(out.read_text())["rss_growth_pct"] == summary["rss_growth_pct"]
