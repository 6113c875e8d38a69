"""Peak memory of a group of processes, sampled in a thread while a benchmark runs (psutil)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable

import psutil


class PeakMemory:
    """Samples the summed RSS and PSS of ``processes()`` every ``interval`` seconds while the ``with`` block
    runs; the peaks are ``peak_rss`` and ``peak_pss`` (bytes). A process that ends between listing and
    sampling is skipped."""

    def __init__(self, processes: Callable[[], Iterable[psutil.Process]], interval: float = 0.25):
        self.processes, self.interval = processes, interval
        self.peak_rss, self.peak_pss, self._stop = 0, 0, threading.Event()

    def _sample(self) -> tuple[int, int]:
        rss = pss = 0
        for p in self.processes():
            try:
                info = p.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return rss, pss

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = self._sample()
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def process_tree() -> Callable[[], list[psutil.Process]]:
    """This process and all its descendants (the Ray it started), listed anew at each sample."""
    root = psutil.Process()
    return lambda: [root, *root.children(recursive=True)]


RAY_MARKERS = ("ray::", "raylet", "gcs_server", "ray/_private", "ray/dashboard", "ray/autoscaler")


def ray_processes() -> list[psutil.Process]:
    """This process and every Ray process of the machine (workers, raylet, GCS, dashboard, autoscaler)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.pid == os.getpid() or any(m in cmd for m in RAY_MARKERS):
            out.append(p)
    return out
