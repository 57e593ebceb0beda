"""The code's own health, checked by the tools CI runs: ruff (lint and format), the import contract, mypy.

Each tool's configuration is in ``pyproject.toml``; a failure prints what the tool said.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param((sys.executable, "-m", "ruff", "check", "."), id="ruff-check"),
        pytest.param((sys.executable, "-m", "ruff", "format", "--check", "."), id="ruff-format"),
        pytest.param((str(BIN / "lint-imports"),), id="import-contract"),
        pytest.param((sys.executable, "-m", "mypy"), id="mypy-protocol"),
    ],
)
def test_tool_passes(argv):
    result = run(*argv)
    assert result.returncode == 0, f"{' '.join(argv)} said:\n{result.stdout}\n{result.stderr}"


def test_the_import_contract_catches_a_product_module_importing_a_harness(tmp_path):
    """The contract is not vacuous: the same config over a tree where the SDK imports a harness is broken."""
    tree = tmp_path / "tree"
    for package in ("stream", "gateway", "workers"):
        (tree / package).mkdir(parents=True)
        (tree / package / "__init__.py").write_text("")
    (tree / "gateway" / "harness").mkdir()
    (tree / "gateway" / "harness" / "__init__.py").write_text("")
    (tree / "stream" / "sdk.py").write_text("import gateway.harness\n")
    import tomllib

    for contract in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]:
        for module in contract["source_modules"]:  # every module a contract names must exist, empty
            path = tree.joinpath(*module.split("."))
            if not path.exists():
                path.with_suffix(".py").write_text("")
    (tree / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    result = subprocess.run([str(BIN / "lint-imports")], cwd=tree, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(tree)})
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout + result.stderr
