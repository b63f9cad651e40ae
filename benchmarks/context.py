"""Settings shared by every benchmark section."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.data import DataSize


@dataclass(frozen=True)
class Context:
    """Data and output folders, data size and repetition count of one benchmark run."""

    size: DataSize
    data_dir: Path
    results_dir: Path
    log_path: Path
    repetitions: int
    official: Path | None = None

    def scratch(self, name: str) -> Path:
        """Return a folder for one section's outputs under the results folder."""
        folder = self.results_dir / "scratch" / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder
