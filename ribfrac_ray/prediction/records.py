"""Per-scan records of written predictions, and the submission CSV built from them.

Each finished scan has ``<out_dir>/.ribfrac-ray/<public_id>.json`` with its CSV
rows and the ids of the Ray nodes that ran its detector and segmenter. The record
is written after the NIfTI file, so a scan counts as done only when both exist.
The CSV is rebuilt from all records at the end of every run, so a run that skips
finished scans still writes their rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ribfrac_ray.io.atomic import atomic_write_text

RECORD_FOLDER = ".ribfrac-ray"
CSV_COLUMNS = ("public_id", "label_id", "confidence", "label_code")


def output_path(out_dir: str | Path, public_id: str, suffix: str) -> Path:
    """Return ``out_dir/<public_id><suffix>``; raise ValueError if it would leave ``out_dir``."""
    folder = Path(out_dir).resolve()
    path = (folder / f"{public_id}{suffix}").resolve()
    if path.parent != folder:
        raise ValueError(f"id {public_id!r} would write outside {folder}; rename the input file")
    return path


def record_path(out_dir: str | Path, public_id: str) -> Path:
    return output_path(Path(out_dir) / RECORD_FOLDER, public_id, ".json")


def write_record(out_dir: str | Path, public_id: str, rows: list[list[Any]], node_ids: dict[str, str] | None = None) -> None:
    """Store one scan's CSV rows and its Ray node ids (stage name -> node id) atomically."""
    record = {"public_id": public_id, "rows": rows, "node_ids": node_ids or {}}
    atomic_write_text(record_path(out_dir, public_id), json.dumps(record))


def is_done(out_dir: str | Path, public_id: str) -> bool:
    """True when the scan's mask and its record both exist."""
    return output_path(out_dir, public_id, ".nii.gz").is_file() and record_path(out_dir, public_id).is_file()


def read_record(out_dir: str | Path, public_id: str) -> dict[str, Any]:
    """Load one scan's record: ``public_id``, ``rows`` and ``node_ids``."""
    return json.loads(record_path(out_dir, public_id).read_text())


def read_rows(out_dir: str | Path, public_id: str) -> list[list[Any]]:
    return read_record(out_dir, public_id)["rows"]


def write_submission_csv(path: Path, rows: list[list[Any]]) -> None:
    """Write the ``public_id, label_id, confidence, label_code`` CSV atomically."""
    lines = [",".join(CSV_COLUMNS)]
    lines.extend(f"{pid},{int(label_id)},{float(conf):.6f},{int(code)}" for pid, label_id, conf, code in rows)
    atomic_write_text(path, "\n".join(lines) + "\n")
