"""The machine a benchmark ran on, and the load other processes put on it meanwhile."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import threading
from pathlib import Path

# Distributions whose versions change the measured figures.
LIBRARIES = (
    "numpy", "scipy", "pandas", "pyarrow", "nibabel", "connected-components-3d",
    "torch", "monai", "ray", "scikit-image",
)


def describe_machine() -> dict[str, str]:
    """Return CPU model, core count, RAM, OS, Python and library versions as strings."""
    versions = []
    for name in LIBRARIES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "ram": f"{_memory_total_gib():.1f} GiB",
        "os": f"{_os_name()}, kernel {platform.release()}",
        "python": platform.python_version(),
        "libraries": ", ".join(versions),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


class LoadMonitor:
    """Samples the 1-minute load average in a background thread while a benchmark runs.

    Use as a context manager; ``summary()`` returns the minimum, mean and maximum
    seen. A load above the core count means other processes competed for the CPUs.
    """

    def __init__(self, interval_s: float = 5.0):
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "LoadMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.interval_s):
                return

    def summary(self) -> dict[str, float]:
        values = self.samples or [os.getloadavg()[0]]
        return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}

