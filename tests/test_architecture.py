"""The layering in docs/architecture.md is enforced, not hoped for.

``pyproject.toml`` declares the import-linter contracts (the layers, top to bottom, and the foundation
modules that import no layer); this test runs them as part of ``make test``, so an upward import fails
here with the offending chain instead of silently rotting the layering again.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

def _lint(config: Path) -> tuple[int, str]:
    import subprocess

    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))"
    proc = subprocess.run([sys.executable, "-c", code, str(config)], cwd=REPO, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_layer_contracts_are_kept():
    rc, out = _lint(REPO / "pyproject.toml")
    assert rc == 0, out
    assert "broken" in out and " 0 broken" in out, out


def test_the_contract_catches_an_upward_import(tmp_path):
    """The same contract with two layers swapped must break: proof that the check reads real imports
    (a contract naming no existing module, or a linter that finds no imports, would pass anything)."""
    text = (REPO / "pyproject.toml").read_text()
    start = text.index("[tool.importlinter]")
    config = text[start:]
    swapped = re.sub(r'"dapt\.data",\n(\s*)"dapt\.masking \| dapt\.modeling",', r'"dapt.masking | dapt.modeling",\n\1"dapt.data",', config)
    assert swapped != config, "the layers list changed: update this test's swap"
    (tmp_path / "pyproject.toml").write_text(swapped)
    rc, out = _lint(tmp_path / "pyproject.toml")
    assert rc != 0 and "BROKEN" in out and "dapt.data" in out, out


def test_the_foundation_contract_catches_a_layer_import(tmp_path):
    """A module that imports a layer, listed as foundation, must break the second contract."""
    text = (REPO / "pyproject.toml").read_text()
    config = text[text.index("[tool.importlinter]"):]
    widened = config.replace('source_modules = [\n', 'source_modules = [\n    "dapt.data.datamodule",\n', 1)
    assert widened != config
    (tmp_path / "pyproject.toml").write_text(widened)
    rc, out = _lint(tmp_path / "pyproject.toml")
    assert rc != 0 and "BROKEN" in out and "dapt.data.datamodule" in out, out

