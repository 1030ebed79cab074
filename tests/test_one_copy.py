"""One copy of each small rule (issue 13, item 4): atomic writes, Hydra composition, the MFU formula,
the sample standard deviation and the cache folder each live in one function, and these tests fail
when a second hand-written copy appears in dapt/ or experiments/. Plus tests that the one copy works.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from dapt.config import REPO_ROOT

SCANNED = ("dapt", "experiments")
# Where each rule may be written out: (path relative to the repo, enclosing function or None for the module).
ATOMIC_WRITES = {("dapt/io.py", None)}
COMPOSE = {("dapt/config.py", "hydra_config_dir"), ("dapt/config.py", "compose_config")}
STD = {("dapt/sample_stats.py", "sample_std")}
MFU = {("dapt/modeling/flops.py", "mfu")}
# dapt/reporting works on pandas tables and takes column spreads with pandas' own Series.std
# (the same n - 1 rule, applied to a DataFrame column); it is not a second hand-written copy.
STD_EXEMPT_DIRS = ("dapt/reporting/",)


def _sources() -> list[tuple[str, ast.Module]]:
    out = []
    for top in SCANNED:
        for path in sorted((REPO_ROOT / top).rglob("*.py")):
            out.append((path.relative_to(REPO_ROOT).as_posix(), ast.parse(path.read_text(encoding="utf-8"))))
    return out


def _with_functions(tree: ast.Module):
    """(node, name of the innermost enclosing function or None) for every node of ``tree``."""
    stack: list[tuple[ast.AST, str | None]] = [(tree, None)]
    while stack:
        node, func = stack.pop()
        yield node, func
        inner = node.name if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


def _called_name(node: ast.Call) -> str | None:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _idents(node: ast.AST) -> list[str]:
    return [n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node) if isinstance(n, (ast.Name, ast.Attribute))]


def _where(allowed: set[tuple[str, str | None]], path: str, func: str | None) -> bool:
    return any(path == p and (f is None or f == func) for p, f in allowed)


def _offences(check) -> list[str]:
    found = []
    for path, tree in _sources():
        for node, func in _with_functions(tree):
            why = check(path, node, func)
            if why:
                found.append(f"{path}:{getattr(node, 'lineno', '?')} ({func or 'module'}): {why}")
    return found


def test_atomic_writes_only_in_dapt_io():
    def check(path, node, func):
        if isinstance(node, ast.Call) and _called_name(node) in ("replace", "rename") and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "os" and not _where(ATOMIC_WRITES, path, func):
            return f"os.{_called_name(node)}: write through dapt.io (atomic_write_file / _text / _json, atomic_save_dir)"
        return None

    assert not _offences(check), "\n".join(_offences(check))


def test_hydra_composition_only_in_dapt_config():
    def check(path, node, func):
        if isinstance(node, ast.Call) and _called_name(node) in ("compose", "initialize_config_dir", "initialize") \
                and not _where(COMPOSE, path, func):
            return f"{_called_name(node)}(): use dapt.config.compose_config (or hydra_config_dir for the config loader)"
        return None

    assert not _offences(check), "\n".join(_offences(check))


def test_sample_std_only_in_one_helper():
    def check(path, node, func):
        if path.startswith(STD_EXEMPT_DIRS) or _where(STD, path, func):
            return None
        if isinstance(node, ast.Call):
            name = _called_name(node)
            if name in ("stdev", "pstdev"):
                return f"{name}(): use dapt.sample_stats.sample_std"
            if any(k.arg == "ddof" for k in node.keywords):
                return f"{name}(ddof=...): use dapt.sample_stats.sample_std"
        return None

    assert not _offences(check), "\n".join(_offences(check))


def test_mfu_formula_only_in_flops_mfu():
    """A division whose numerator multiplies by a FLOP count and whose denominator holds a peak is
    the MFU formula; it belongs in dapt.modeling.flops.mfu."""

    def check(path, node, func):
        if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)) or _where(MFU, path, func):
            return None
        numerator_multiplies = any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mult) for n in ast.walk(node.left))
        flops_above = any("flop" in i.lower() or i == "fpt" for i in _idents(node.left))
        peak_below = any("peak" in i.lower() for i in _idents(node.right))
        if numerator_multiplies and flops_above and peak_below:
            return "MFU computed by hand: call dapt.modeling.flops.mfu"
        return None

    assert not _offences(check), "\n".join(_offences(check))


def test_the_scans_catch_a_copy(tmp_path, monkeypatch):
    """The checks above are not vacuous: each one flags a planted copy."""
    import tests.test_one_copy as me

    planted = tmp_path / "dapt"
    planted.mkdir()
    (planted / "copy.py").write_text(
        "import os, statistics\n"
        "from hydra import compose\n"
        "def f(tmp, path, xs, tokens_per_s, flops_per_token, peak_flops):\n"
        "    os.replace(tmp, path)\n"
        "    compose(config_name='train')\n"
        "    statistics.stdev(xs)\n"
        "    return tokens_per_s * flops_per_token / peak_flops\n"
    )
    monkeypatch.setattr(me, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(me, "SCANNED", ("dapt",))
    for test in (test_atomic_writes_only_in_dapt_io, test_hydra_composition_only_in_dapt_config,
                 test_sample_std_only_in_one_helper, test_mfu_formula_only_in_flops_mfu):
        with pytest.raises(AssertionError, match="copy.py"):
            test()


# ----------------------------------------------------------------------------- the one copies work

def test_compose_config_applies_overrides_and_extra_names():
    from dapt.config import compose_config

    cfg = compose_config(["seed=7", "optimizer.lr=0.002"])
    assert cfg.seed == 7 and cfg.optimizer.lr == 0.002
    again = compose_config(["seed=8"], return_hydra_config=True)  # twice in one process
    assert again.seed == 8 and "hydra" in again
    finetune = compose_config(["task=scierc"], config_name="finetune")
    assert finetune.task.name == "scierc" and "domain" not in finetune.task  # the task's domain key is gone (item 6)


def test_mfu_is_the_rate_over_the_peaks_and_is_not_clamped():
    from dapt.modeling.flops import mfu

    assert mfu(1000.0, 1e6, 1e10) == pytest.approx(0.1)
    assert mfu(1000.0, 1e6, 1e10, n_peaks=4) == pytest.approx(0.025)
    assert mfu(1000.0, 1e6, 1e8) == pytest.approx(10.0)  # above 1: the caller decides (ThroughputMeter drops it)
    assert math.isnan(mfu(1000.0, 1e6, 0.0)) and math.isnan(mfu(1000.0, 1e6, 1e10, n_peaks=0))


def test_throughput_meter_uses_the_one_formula(monkeypatch):
    from dapt.modeling import callbacks, flops

    calls = []
    real = flops.mfu
    monkeypatch.setattr(flops, "mfu", lambda *a: calls.append(a) or real(*a))
    meter = callbacks.ThroughputMeter(flops_per_token=1e6, peak_flops=1e10)
    meter.measured_tokens, meter.measured_time = 1000, 1.0
    assert meter.mfu == pytest.approx(0.1) and calls == [(1000.0, 1e6, 1e10, 1)]


def test_sample_std():
    import statistics

    import numpy as np

    from dapt.evaluation.stats import paired_comparison, summarize
    from dapt.sample_stats import sample_std

    assert sample_std([0.7, 0.72, 0.75]) == pytest.approx(statistics.stdev([0.7, 0.72, 0.75]))
    # A constant sample has no spread, exactly: numpy's mean of three 0.7s is off in the last bit, and a
    # ~1e-16 "spread" would send identical per-seed differences to a t-test on constants.
    assert sample_std([0.7, 0.7, 0.7]) == 0.0 and summarize([0.7, 0.7, 0.7])["std"] == 0.0
    same = paired_comparison([0.0] * 3, [0.1] * 3)
    assert same["delta_std"] == 0.0 and same["p_value"] is None and "significant" not in same["verdict"]
    # The realistic case: the same +0.01 on every seed, whose float differences disagree in the last bits.
    shifted = paired_comparison([0.684, 0.700, 0.675], [0.694, 0.710, 0.685])
    assert shifted["delta_std"] == 0.0 and shifted["p_value"] is None and "no variance" in shifted["verdict"]
    real = paired_comparison([0.684, 0.700, 0.675], [0.694, 0.712, 0.683])  # a real spread is kept
    assert real["delta_std"] == pytest.approx(0.002) and real["p_value"] is not None
    assert sample_std(np.arange(10.0)) == pytest.approx(np.arange(10.0).std(ddof=1))
    assert sample_std([0.5]) == 0.0 and sample_std([]) == 0.0


def test_peak_cache_lives_in_the_one_cache_dir(tmp_path, monkeypatch):
    from dapt.config import default_cache_dir
    from dapt.modeling import flops

    monkeypatch.setenv("DAPT_CACHE_DIR", str(tmp_path / "cache"))
    assert flops._cache_dir() == Path(default_cache_dir()) == tmp_path / "cache"
    monkeypatch.delenv("DAPT_CACHE_DIR")
    assert flops._cache_dir() == Path.home() / ".cache" / "dapt"


def test_atomic_write_file_replaces_or_keeps_the_old_file(tmp_path):
    import torch

    from dapt.io import atomic_write_file

    target = tmp_path / "sub" / "ckpt.pt"
    atomic_write_file(target, lambda tmp: torch.save({"step": 1}, tmp))
    assert torch.load(target)["step"] == 1

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half a checkpoint")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write_file(target, broken)
    assert torch.load(target)["step"] == 1  # the old file is intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["ckpt.pt"]  # no temporary left behind
