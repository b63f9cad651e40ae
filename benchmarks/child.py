"""Run one benchmark function in a fresh Python process and return its result.

A fresh process per measurement keeps the peak RSS of one tool apart from the
others and from the driver. ``run_in_child("benchmarks.evaluation:evaluate_with_ribfrac_ray",
{...}, log_path)`` starts ``python -m benchmarks.child``, which imports the module, calls
the function with the keyword arguments, adds the process's own peak RSS
(``peak_rss_mb``, from ``getrusage``) and writes the result as JSON.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parent.parent
# Lines of a failed child's log shown in the error.
LOG_TAIL_LINES = 40


class ChildError(RuntimeError):
    """A benchmark child process exited with an error or did not write its result."""


def run_in_child(target: str, kwargs: dict[str, Any], log_path: Path, timeout_s: float = 1800,
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    """Call ``module:function(**kwargs)`` in a new process; its output is appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ribfrac-bench-") as folder:
        result_path = Path(folder) / "result.json"
        command = [sys.executable, "-m", "benchmarks.child", target, json.dumps(kwargs), str(result_path)]
        with log_path.open("a") as log:
            log.write(f"\n==== {target} {json.dumps(kwargs)}\n")
            log.flush()
            completed = subprocess.run(command, cwd=REPOSITORY, stdout=log, stderr=subprocess.STDOUT,
                                       timeout=timeout_s, env={**os.environ, **(env or {})})
        if completed.returncode != 0 or not result_path.is_file():
            tail = "\n".join(log_path.read_text().splitlines()[-LOG_TAIL_LINES:])
            raise ChildError(f"{target} failed with exit code {completed.returncode}; "
                             f"last lines of {log_path}:\n{tail}")
        return json.loads(result_path.read_text())


def main() -> None:
    target, kwargs_json, result_path = sys.argv[1:4]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(**json.loads(kwargs_json))
    # ru_maxrss is in KiB on Linux.
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
