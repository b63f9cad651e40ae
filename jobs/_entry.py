"""Shared entry point of the job scripts: run one ``ribfrac-ray`` subcommand.

``ray job submit --working-dir .`` uploads the repository and starts the script
from a copy of it, so the copy's root goes on ``sys.path`` before the package is
imported. Ray puts the same copy on the workers' path.
"""

from __future__ import annotations

import sys
from pathlib import Path


def run(command: str) -> None:
    """Run ``ribfrac-ray <command> <arguments of this process>`` and exit with its code."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ribfrac_ray.cli import main

    raise SystemExit(main([command, *sys.argv[1:]]))
