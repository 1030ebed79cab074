"""``dapt study``: run a paper reproduction or ablation as one command, and generate its table.

    dapt study --help                                   # the studies, their arms and budgets
    dapt study masking_rate                             # run every arm not done yet, then the table
    dapt study masking_rate --dry-run                   # what would run, and each arm's command
    dapt study dont_stop_pretraining model=roberta_base trainer=gpu downstream=paper   # paper scale
    dapt study vocabulary --report --out experiments/vocabulary/results/<date> --readme

Running again after an interruption continues where it stopped (finished arms are reused, an
interrupted arm resumes from its checkpoint). The table (``table.md``, ``downstream.csv``,
``perplexity.csv``, ``table.png``) is written into the study folder after every invocation, from the
arms that have finished.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from dapt.config import REPO_ROOT
from dapt.errors import ConfigError
from dapt.study import report as study_report
from dapt.study import runner
from dapt.study import spec as study_spec


def _compared(s: study_spec.StudySpec) -> str:
    """' (each compared with X)' or ' (a, b compared with Y; the others with X)': which reference each
    arm's paired comparisons use."""
    own: dict[str, list[str]] = {}
    for arm in s.arms:
        if arm.reference and s.reference_of(arm) != s.reference:
            own.setdefault(arm.reference, []).append(arm.name)
    parts = [f"{', '.join(names)} compared with {ref}" for ref, names in own.items()]
    if s.reference:
        parts.append(f"the others with {s.reference}" if own else f"each compared with {s.reference}")
    return f" ({'; '.join(parts)})" if parts else ""


def _epilog() -> str:
    lines = ["studies (conf/study/<name>.yaml):"]
    for name, path in study_spec.available().items():
        try:
            s = study_spec.load(path)
        except ConfigError as exc:
            lines.append(f"  {name:<24} (invalid: {exc})")
            continue
        lines.append(f"  {name:<24} {s.title}")
        lines.append(f"  {'':<24} {len(s.arms)} arms: {', '.join(a.name for a in s.arms)}" + _compared(s))
        if s.wall_time:
            lines.append(f"  {'':<24} budget: {s.wall_time.splitlines()[0]}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dapt study", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog(),
        description="Run every arm of a study (each a `dapt train` run with its control arm and downstream seeds), "
                    "continue an interrupted study, and write its table (Markdown, CSV, PNG) from the run folders.")
    parser.add_argument("study", help="a study name (listed below) or a study YAML file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides added to every arm, e.g. model=roberta_base trainer=gpu downstream=paper")
    parser.add_argument("--out", type=Path, help="the study folder (default: studies/<name>)")
    parser.add_argument("--only", nargs="+", metavar="ARM", help="run only these arms")
    parser.add_argument("--dry-run", action="store_true", help="print each arm's state and command; run nothing")
    parser.add_argument("--report", action="store_true", help="only write the table from the finished arms; run nothing")
    parser.add_argument("--readme", nargs="?", const="", metavar="README",
                        help="also replace the generated table in this README (default: the study's own README)")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    spec = study_spec.load(args.study)
    out = args.out or Path("studies") / spec.name
    extra = list(args.overrides)
    shown = ["dapt study", args.study, *extra] + (["--out", str(args.out)] if args.out else [])
    command = " ".join(shlex.quote(part) if part != "dapt study" else part for part in shown)
    if args.dry_run:
        for arm in spec.arms:
            state = runner.status(out, arm)
            overrides = runner.arm_overrides(spec, arm, out, extra)
            runner.check_arm(spec, arm, overrides)
            print(f"{arm.name}: {state.state}{f' ({state.detail})' if state.detail else ''}")
            print("  dapt train " + " ".join(shlex.quote(o) for o in overrides))
        if spec.wall_time:
            print(f"budget: {spec.wall_time}")
        return 0
    rc = 0
    if not args.report:
        rc = runner.run_study(spec, out, extra, only=args.only)
    report, paths = study_report.write(spec, out, command)
    print(report.markdown)
    print("wrote " + ", ".join(str(p) for p in paths))
    if args.readme is not None:
        readme = Path(args.readme) if args.readme else (REPO_ROOT / spec.readme if spec.readme else None)  # the study's, repo-relative
        if readme is None:
            raise ConfigError(f"study {spec.name} names no README: pass --readme <path>")
        study_report.embed_in_readme(readme, spec, report.markdown)
        print(f"updated the table in {readme}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
