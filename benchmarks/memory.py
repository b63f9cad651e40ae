"""Resident memory of this process, of its Ray workers, and of child processes (Linux /proc).

All sizes are returned in MB (10^6 bytes), the unit the figures use. The peak
of a process is the kernel's high-water mark ``VmHWM``. Writing ``5`` to
``/proc/self/clear_refs`` resets it to the current RSS (Linux 4.0 and later), so
one process can measure several steps one after another.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

MB = 1e6
# Ray's own helper processes that run as "ray::<name>" but do no work of ours.
RAY_HELPERS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def process_status(pid: int | str = "self") -> dict[str, float]:
    """Return ``rss`` and ``peak`` (VmRSS, VmHWM) of a process in MB; empty if it is gone."""
    values = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return values
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            values["rss"] = int(line.split()[1]) * 1024 / MB
        elif line.startswith("VmHWM:"):
            values["peak"] = int(line.split()[1]) * 1024 / MB
    return values


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS; return False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def descendants(root: int) -> list[int]:
    """Return the ids of every live process below ``root`` in the process tree."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name in brackets may contain spaces, so split after the last ')'.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except OSError:
        return ""


class RayWorkerMonitor:
    """Polls the Ray worker processes below this process and keeps each one's peak RSS.

    A Ray worker's command line is its process title, ``ray::<task or actor>``, which
    changes as it takes work; every title seen is kept. ``baseline`` is the RSS at
    the first sample. For a worker that already ran a task, that is its idle size,
    and for a worker that starts during the run, the bare process before imports.
    Use as a context manager around the measured run.
    """

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.workers: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "RayWorkerMonitor":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        for pid in descendants(os.getpid()):
            title = command_line(pid)
            if not title.startswith("ray::") or title.startswith(RAY_HELPERS):
                continue
            status = process_status(pid)
            if not status:
                continue
            worker = self.workers.setdefault(pid, {"baseline": status["rss"], "peak": 0.0, "titles": []})
            worker["peak"] = max(worker["peak"], status["peak"])
            if title not in worker["titles"]:
                worker["titles"].append(title)

    def busy_workers(self, marker: str) -> list[dict]:
        """Return the workers that ran a task or actor whose title contains ``marker``."""
        return [dict(worker, pid=pid) for pid, worker in self.workers.items()
                if any(marker in title for title in worker["titles"])]
