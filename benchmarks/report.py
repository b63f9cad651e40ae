"""Result rows of the benchmarks, the console table and the Markdown page."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MET, MISSED, INFO, SKIPPED = "met", "missed", "", "skipped"


@dataclass
class Row:
    """One measured figure, its baseline, their ratio and the target it is checked against."""

    measure: str
    ours: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    status: str = INFO


@dataclass
class Section:
    """The results of one comparison, with the notes a reader needs to judge them."""

    key: str
    title: str
    baseline_name: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    finished: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


def seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 100 else f"{value:.0f} s"


def megabytes(value: float) -> str:
    return f"{value:.0f} MB"


def ratio(value: float, unit: str = "x") -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}{unit}" if value < 10 else f"{value:.1f}{unit}"


def check(condition: bool) -> str:
    return MET if condition else MISSED


def format_console(sections: list[Section]) -> str:
    """Format every section as one plain-text table."""
    header = ("measure", "ribfrac-ray", "baseline", "ratio", "target", "result")
    lines = []
    for section in sections:
        rows = [header] + [(r.measure, r.ours, r.baseline, r.ratio, r.target, r.status) for r in section.rows]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines.append(f"== {section.title} (baseline: {section.baseline_name})")
        for row in rows:
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        for note in section.notes:
            lines.append(f"   note: {note}")
        lines.append("")
    return "\n".join(lines)


def format_markdown(sections: list[Section], machine: dict[str, str], command: str, size_text: str,
                    gpu_note: str) -> str:
    """Format the results page: command, machine, then one table per comparison."""
    lines = [
        "# Benchmarks",
        "",
        "Speed and memory of ribfrac-ray against the tools and code that users know, measured side by side",
        "on one machine. Regenerate this page with:",
        "",
        "```bash",
        command,
        "```",
        "",
        "The evaluation comparison needs a clone of the official evaluator",
        "(`git clone https://github.com/M3DV/RibFrac-Challenge`, passed as `--official`) and scikit-image",
        "(`pip install scikit-image`), which that evaluator imports; without `--official` it is skipped with a",
        "message. `--quick` runs every comparison on small phantoms to check the scripts and writes",
        "`benchmarks/results/benchmarks-quick.md` instead of this page; `--only SECTION ...` runs some sections.",
        "Raw figures go to `benchmarks/results/results-realistic.json` and the child processes' output to",
        "`benchmarks/results/log-realistic.txt`.",
        "",
        f"Data: seeded phantom scans of {size_text} (int16 images, uint8 labels, gzip-compressed NIfTI),",
        "written by `ribfrac_ray.phantoms.make_phantoms` and cached under `benchmarks/results/`.",
        "MB means 10^6 bytes. Peak memory is the resident set size (RSS) high-water mark of the process.",
        "A ratio above 1 means ribfrac-ray is faster, except in memory rows, where it is ribfrac-ray's",
        "share of the baseline.",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
    ]
    for key in ("cpu", "cores", "ram", "os", "python", "libraries"):
        lines.append(f"| {key} | {machine.get(key, '')} |")
    loads = [section.load for section in sections if section.load]
    load = {"min": min(item["min"] for item in loads), "max": max(item["max"] for item in loads),
            "mean": sum(item["mean"] for item in loads) / len(loads)} if loads else {}
    lines.append(f"| load average while the sections ran | {_load_text(load)} |")
    lines.append(f"| time of the sections, added up | {sum(s.seconds for s in sections) / 60:.1f} min |")
    lines.append("")
    highest = load.get("max", 0.0)
    # The benchmarks themselves keep up to about 2 processes busy, so only a load
    # well above the core count means that other processes competed.
    if highest > 1.5 * float(machine.get("cores", "1")):
        lines.append(
            f"The 1-minute load average reached {highest:.1f} on {machine.get('cores')} cores, so other "
            "processes competed for the CPUs while the benchmarks ran, and absolute times are longer than on an "
            "idle machine. Each comparison interleaves with its baseline or runs right after it, so ratios are "
            "more reliable than absolute times."
        )
        lines.append("")
    lines.append(f"GPU: {gpu_note}")
    lines.append("")

    for section in sections:
        lines.append(f"## {section.title}")
        lines.append("")
        measured = f"measured {section.finished}, " if section.finished else ""
        lines.append(f"Baseline: {section.baseline_name}. Section time {section.seconds / 60:.1f} min "
                     f"({measured}load average {_load_text(section.load)}).")
        lines.append("")
        lines.append("| measure | ribfrac-ray | baseline | ratio | target | result |")
        lines.append("| --- | ---: | ---: | ---: | --- | --- |")
        for row in section.rows:
            cells = [row.measure, row.ours, row.baseline, row.ratio, row.target, row.status]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        lines.append("")
        for note in section.notes:
            lines.append(f"- {note}")
        if section.notes:
            lines.append("")
    return "\n".join(lines)


def write_markdown(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _load_text(load: dict[str, float]) -> str:
    if not load:
        return "not sampled"
    return f"{load['min']:.1f} to {load['max']:.1f} (mean {load['mean']:.1f})"
