"""The ``dapt`` command: ``dapt <subcommand> [args]``.

``train`` and ``finetune`` are Hydra applications (overrides, ``-m`` sweeps, ``--help``); the
other subcommands are plain argparse tools. Errors caused by the user's input are printed as one line
(``error: ...``) with exit status 2 instead of a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable

from dapt.errors import DaptError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("dapt.commands.train:main", "domain-adaptive pretraining run (Hydra: overrides, -m sweeps)"),
    "finetune": ("dapt.commands.finetune:main", "fine-tune one downstream task on any checkpoint (Hydra)"),
    "doctor": ("dapt.commands.doctor:main", "diagnose a corpus before training, or a finished run or sweep (ranked findings, doctor.json)"),
    "study": ("dapt.commands.study:main", "run a paper reproduction / ablation study (all arms, resumable) and write its table"),
    "compare": ("dapt.commands.compare:main", "compare runs: table, CSV/Markdown, plots"),
    "masking-stats": ("dapt.commands.masking_stats:main", "compute and cache PMI n-grams / salient domain terms"),
}
HYDRA_COMMANDS = ("train", "finetune")  # Hydra applications read sys.argv themselves


# Process environment the CLI starts with; a value the user exported wins. glibc's allocator by
# default hands every freed block above 128 KB-32 MB back to the kernel and re-faults it in zeroed
# on the next step (a page fault per page, every step); with these thresholds freed tensors stay in
# the heap and are reused (RSS stays at its high-water mark instead). The step-time difference is the
# "glibc default allocator thresholds" lever of `make bench` (experiments/throughput/README.md).
# glibc reads GLIBC_TUNABLES only when a process starts, hence the one-time re-exec below.
RUNTIME_ENV: dict[str, str] = {
    "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296",
}


def _restart_with_runtime_env(argv: list[str]) -> None:
    """Re-exec ``python -m dapt.cli <argv>`` once with ``RUNTIME_ENV`` set (glibc Linux only).

    Skipped when every variable is already set (also by the user), when torch is already loaded
    (dapt.cli imported by another program), off glibc, or with ``DAPT_NO_REEXEC=1``.
    """
    if os.environ.get("DAPT_NO_REEXEC") == "1" or "torch" in sys.modules:
        return
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return
    except (AttributeError, ValueError, OSError):
        return
    missing = {k: v for k, v in RUNTIME_ENV.items() if k not in os.environ}
    if not missing:
        return
    os.environ.update(missing)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, "-m", "dapt.cli", *argv])
    except OSError:  # cannot restart: run on with the default allocator settings
        for key in missing:
            os.environ.pop(key, None)


def _load(target: str) -> Callable[..., Any]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _usage() -> str:
    lines = ["usage: dapt <command> [args]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "e.g. dapt train model=tiny trainer.max_steps=20   |   dapt train --help"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        _restart_with_runtime_env(sys.argv[1:])
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"error: unknown command '{command}'\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = SUBCOMMANDS[command]
    sys.argv = [f"dapt {command}", *rest]
    try:
        func = _load(target)
        result = func() if command in HYDRA_COMMANDS else func(rest)
    except DaptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
