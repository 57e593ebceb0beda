"""Config files: the shipped ones load; a bad one fails naming the key and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.config import CONFIG_DIR, ConfigError, load_config


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path):
    config = load_config(path)
    assert config.workers.stt.capacity >= 1


def test_default_config_is_one_box_on_loopback():
    workers = load_config().workers
    all_workers = (workers.stt, workers.llm, workers.tts, workers.vision)
    assert {w.host for w in all_workers} == {"127.0.0.1"}
    assert len({w.port for w in all_workers}) == 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[workers.stt]\ncapacity = 0\n", "workers.stt.capacity: Input should be greater than or equal to 1 (got 0)"),
        ("[workers.llm]\nn_ctx = 'big'\n", "workers.llm.n_ctx: Input should be a valid integer"),
        ("[workers.tts]\nvoice = 'x'\n", "workers.tts.voice: unknown key"),
        ("[workers.robot]\n", "workers.robot: unknown key"),
        ("[workers.stt]\nport = 70000\n", "workers.stt.port: Input should be less than or equal to 65535"),
        ("[workers.stt\ncapacity = 1\n", "invalid TOML"),
        ("[gateway]\nloopback_ice = 'yes'\n", "gateway.loopback_ice: Input should be a valid boolean"),  # not read as true
    ],
)
def test_bad_config_names_key_and_problem(tmp_path: Path, text: str, expected: str):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")
