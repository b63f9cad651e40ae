"""Run the benchmarks, print the table and write the results page.

    python -m benchmarks.run [--official PATH] [--quick] [--only SECTION ...]

Without ``--quick`` the data are realistic RibFrac-sized phantoms and the page
goes to ``docs/benchmarks.md``. With it the data are small and the page goes to
``benchmarks/results/benchmarks-quick.md``, so a check of the scripts never
replaces the recorded results. With ``--only``, the page keeps the other
sections' results of the last run at the same size, from ``results-<size>.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.context import Context
from benchmarks.data import QUICK, REALISTIC, ensure_phantoms
from benchmarks.machine import LoadMonitor, describe_machine
from benchmarks.report import Row, Section, format_console, format_markdown, write_markdown

logger = logging.getLogger("benchmarks")

REPOSITORY = Path(__file__).resolve().parent.parent
SECTIONS = ("evaluation", "preprocessing", "prediction", "training")
GPU_NOTE = "no GPU machine was available for this run, so every figure is for CPUs only."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--official", type=Path, default=None,
                        help="checkout of M3DV/RibFrac-Challenge; without it the official evaluator is skipped")
    parser.add_argument("--quick", action="store_true",
                        help="small phantoms (128 x 128 x 96) and one repetition, to check the scripts")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                        help=f"run only these sections ({', '.join(SECTIONS)})")
    parser.add_argument("--results", type=Path, default=REPOSITORY / "benchmarks" / "results",
                        help="folder for data, logs and raw results (default: benchmarks/results)")
    parser.add_argument("--page", type=Path, default=None,
                        help="results page to write (default: docs/benchmarks.md, or "
                             "benchmarks/results/benchmarks-quick.md with --quick)")
    parser.add_argument("--render", action="store_true",
                        help="rewrite the page from the stored results (results-<size>.json) without measuring")
    parser.add_argument("--repetitions", type=int, default=None,
                        help="official evaluator runs, and scans in the in-process prediction comparison (default: 1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    size = QUICK if args.quick else REALISTIC
    results_dir = args.results.resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    page = args.page or (results_dir / "benchmarks-quick.md" if args.quick else REPOSITORY / "docs" / "benchmarks.md")
    log_path = results_dir / f"log-{size.name}.txt"
    raw_path = results_dir / f"results-{size.name}.json"
    earlier = _earlier_sections(raw_path)

    ran: dict[str, Section] = {}
    if not args.render:
        log_path.write_text("")
        context = Context(
            size=size,
            data_dir=ensure_phantoms(results_dir, size),
            results_dir=results_dir,
            log_path=log_path,
            repetitions=args.repetitions or 1,
            official=args.official.resolve() if args.official else None,
        )
        ran = {name: _run_section(name, context) for name in SECTIONS if name in args.only}

    sections = [ran.get(name) or earlier[name] for name in SECTIONS if name in ran or name in earlier]
    machine = describe_machine()
    print(format_console(sections))
    command = _command_line(args)
    text = format_markdown(sections, machine, command, f"{size.describe()}, {size.n_scans} scans", GPU_NOTE)
    write_markdown(page, text)
    raw_path.write_text(json.dumps({"machine": machine, "sections": [asdict(s) for s in sections]}, indent=1,
                                   default=str))
    print(f"wrote {page} and {raw_path}; child process logs in {log_path}")
    return 0


def _earlier_sections(raw_path: Path) -> dict[str, Section]:
    """Return the sections stored by the last run at this size, by key; empty when there is none."""
    if not raw_path.is_file():
        return {}
    sections = {}
    for values in json.loads(raw_path.read_text()).get("sections", []):
        rows = [Row(**row) for row in values.pop("rows")]
        sections[values["key"]] = Section(**values, rows=rows)
    return sections


def _run_section(name: str, context: Context) -> Section:
    logger.info("running the %s benchmark", name)
    module = importlib.import_module(f"benchmarks.{name}")
    started = time.perf_counter()
    with LoadMonitor() as load:
        section = module.run(context)
    section.seconds = time.perf_counter() - started
    section.load = load.summary()
    section.finished = time.strftime("%Y-%m-%d %H:%M")
    logger.info("%s benchmark done in %.0f s", name, section.seconds)
    return section


def _command_line(args: argparse.Namespace) -> str:
    """Return the command that regenerates the whole page, with the official evaluator (``--only`` left out)."""
    parts = ["python", "-m", "benchmarks.run", "--official", "PATH/TO/RibFrac-Challenge"]
    if args.quick:
        parts.append("--quick")
    if args.repetitions:
        parts += ["--repetitions", str(args.repetitions)]
    return " ".join(shlex.quote(part) if "/" not in part else part for part in parts)


if __name__ == "__main__":
    sys.exit(main())
