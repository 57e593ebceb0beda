"""The long protocol fuzz command, run short: it reaches both outcomes and reports what is not a ProtocolError."""

from __future__ import annotations

import json

from gateway.harness import fuzz
from stream.protocol import Connection


def test_short_fuzz_run_finds_no_crash(tmp_path):
    report = fuzz.run_fuzz(20_000, seed=7, out=tmp_path / "fuzz.json")
    assert report["crashes"] == 0, report["crash_kinds"]
    assert report["accepted"] > 100 and report["refused"] > 10_000  # mutations reach the state checks, not only the parser
    assert json.loads((tmp_path / "fuzz.json").read_text())["frames"] == 20_000


def test_a_crash_is_reported_with_its_input(tmp_path, monkeypatch):
    fed: set[bytes] = set()

    def broken(self, data):
        fed.add(bytes(data))
        raise KeyError("a bug")

    monkeypatch.setattr(Connection, "receive_binary", broken)
    report = fuzz.run_fuzz(400, seed=1, out=tmp_path / "fuzz.json")
    assert report["crashes"] == 200  # every binary frame (half of them)
    assert sorted(report["crash_kinds"]) == ["KeyError in binary on client", "KeyError in binary on worker"]
    for entry in report["crash_kinds"].values():
        assert entry["count"] == 100 and "a bug" in entry["traceback"]
        assert bytes.fromhex(entry["input_hex"]) in fed  # the input reported is one that crashed, byte for byte
