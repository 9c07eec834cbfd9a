"""Measurement helpers shared by the benchmarks: peak memory of a whole process tree.

Ray runs every actor in its own process (plus raylet, GCS ...), so a peak taken
from the driver alone would under-report by GBs. This samples the summed RSS
of the driver and every descendant in a background thread.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import psutil


def tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


class PeakMemory:
    """Context manager: ``peak_bytes`` of the process tree rooted at ``pid`` while inside."""

    def __init__(self, pid: int | None = None, interval_s: float = 0.05) -> None:
        self.pid = pid or os.getpid()
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_rss(self.pid))
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, tree_rss(self.pid))

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / 1e9
