"""Row classes for tests/test_tasks.py: Ray workers import them by module name (tests/ is on their path)."""

from __future__ import annotations

import os
import time
from pathlib import Path


class Recorder:
    """Records each construction (one line per instance, with its pid) and each call's pid and times."""

    def __init__(self, log_dir: str, seconds: float = 0.0):
        self.log_dir, self.seconds = Path(log_dir), seconds
        with open(self.log_dir / "constructed.txt", "a") as f:
            f.write(f"{os.getpid()}\n")

    def __call__(self, item: dict) -> dict:
        started = time.time()
        time.sleep(self.seconds)
        if item.get("fail"):
            raise ValueError(f"item {item['i']} is bad on purpose")
        return {"i": item["i"], "pid": os.getpid(), "started_at": started, "finished_at": time.time()}


class Dies:
    """Kills its own worker process when it sees item ``victim``: the first time only (a crashed or OOM-killed
    worker), or on ``every_run`` (an item that crashes whatever runs it: a segfaulting reader, a model load
    that is OOM-killed). Leaves one line per run (its pid) in ``ran-<i>``."""

    def __init__(self, log_dir: str, victim: int, every_run: bool = False):
        self.log_dir, self.victim, self.every_run = Path(log_dir), victim, every_run

    def __call__(self, item: dict) -> dict:
        marker = self.log_dir / f"ran-{item['i']}"
        first = not marker.exists()
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        if item["i"] == self.victim and (first or self.every_run):
            os._exit(1)  # no exception, no cleanup: the process is simply gone
        return {"i": item["i"], "pid": os.getpid()}


class Sleeper:
    """Leaves ``started-<i>`` (its pid), sleeps ``seconds``, then leaves ``done-<i>``: which items ran to
    their end, and where."""

    def __init__(self, log_dir: str, seconds: float):
        self.log_dir, self.seconds = Path(log_dir), seconds

    def __call__(self, item: dict) -> dict:
        (self.log_dir / f"started-{item['i']}").write_text(str(os.getpid()))
        time.sleep(self.seconds)
        (self.log_dir / f"done-{item['i']}").touch()
        return {"i": item["i"]}
