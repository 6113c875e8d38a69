"""What ``sarlang run`` shows a person: a line when a stage starts, a progress bar while it runs, its counts
when it ends, then the summary; everything else (Ray Data's bars and INFO lines, worker logs, Tune's trial
tables) goes to a log file in the run folder, named at the start.

Ray writes to the process's file descriptors 1 and 2 (its workers' lines come back through the driver), not
only through Python's ``sys.stdout``, so the capture is at the descriptor level: both are pointed at a pipe
whose reader thread appends every line to the log and passes the warning and error lines to the terminal, once
each (a line that differs only by process ids, numbers or times is the same line). ``-v`` turns the capture
off.

The progress bar polls the run folder: the shards a stage has written against the shards of the stage it reads
(align, annotate, export map shards one to one), the prediction files of evaluate against its trials; stages
whose total is not on disk before they end (catalog, tile, train) show a count and the elapsed time. It draws
only on a terminal; a log or CI output gets the start and end lines alone.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from typing import TYPE_CHECKING

from sarlang_ray import io

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

# warning and error lines of the captured output worth a person's attention (Ray's deprecation notes are not)
ALERT = re.compile(r"\b(ERROR|CRITICAL|WARNING|Traceback)\b|\b\w+Error: ")
IGNORED = re.compile(r"DeprecationWarning|is deprecated|Untokenizable|worker processes have been started")
MAX_ALERTS = 12
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _normalised(line: str) -> str:
    line = ANSI.sub("", line)
    line = re.sub(r"^\S+ \S+\s+(?=[A-Z]+ )", "", line)  # a log record's date and time
    line = re.sub(r"\((?:[\w.]+ )?pid=\d+(?:, ip=[\d.]+)?\)", "", line)
    return re.sub(r"\d+", "N", line).strip()


class Capture:
    """Send fds 1 and 2 to ``log_path``, echoing warning/error lines once to the terminal (see the module
    doc)."""

    def __init__(self, log_path: str):
        self.log_path = log_path
        self.terminal = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        self._saved = (os.dup(1), os.dup(2))
        self._seen: set[str] = set()
        self.alerts = 0
        self.suppressed = 0
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        self._log = open(self.log_path, "ab", buffering=0)
        read, write = os.pipe()
        self._read = read
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        self._thread = threading.Thread(target=self._pump, name="sarlang-log", daemon=True)
        self._thread.start()
        return self

    def _pump(self) -> None:
        with os.fdopen(self._read, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                self._log.write(chunk)
                pending += chunk
                *lines, pending = re.split(rb"[\r\n]", pending)
                for raw in lines:
                    self._alert(raw.decode("utf-8", "replace"))

    def _alert(self, line: str) -> None:
        if not ALERT.search(line) or IGNORED.search(line):
            return
        key = _normalised(line)
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
            if self.alerts >= MAX_ALERTS:
                self.suppressed += 1
                return
            self.alerts += 1
            self.write(ANSI.sub("", line).strip()[:300])

    def write(self, text: str, end: str = "\n") -> None:
        self.terminal.write(text + end)
        self.terminal.flush()

    def __exit__(self, *exc) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)  # closes the pipe's last writers: the reader sees the end and stops
        os.dup2(self._saved[1], 2)
        self._thread.join(timeout=10)
        self._log.close()
        if self.suppressed:
            self.write(f"({self.suppressed} more warning/error lines in {self.log_path})")
        for fd in self._saved:
            os.close(fd)


def _count(root: str, pattern: str) -> int:
    try:
        return len(io.glob(root, pattern)) if io.exists(root) else 0
    except OSError:
        return 0


def _shards(run_dir: str, stage: str) -> int:
    return _count(io.join(run_dir, stage, "shards"), "*/*.parquet")


def _total_of(run_dir: str, stage: str, cfg) -> int | None:
    """The items a stage will do (its input's shards, or the evaluate trials), or None where the files do not
    say: fixed while the stage runs, so listed once per stage, not once per tick of the bar."""
    inputs = {"align": "tile", "annotate": "align", "export": "annotate"}
    if stage in inputs:
        return _shards(run_dir, inputs[stage])
    if stage == "evaluate":
        ev = cfg.evaluate
        return len(ev.models) * len(ev.images) * max(1, len(getattr(ev, "prompts", None) or [None]))
    return None


def _done_of(run_dir: str, stage: str) -> int:
    """The items a running stage has written so far, from the files under the run folder."""
    if stage in ("tile", "align", "annotate"):
        return _shards(run_dir, stage)
    if stage == "export":
        return _count(io.join(run_dir, "export", "objects"), "*.parquet")
    if stage == "evaluate":
        return _count(io.join(run_dir, "evaluate", "predictions"), "*.parquet")
    if stage == "catalog":
        return 1 if io.exists(io.join(run_dir, "catalog", "scenes.parquet")) else 0
    return 0


class Console:
    """Stage lines and progress bars on ``out`` (the real terminal while a Capture holds fds 1 and 2)."""

    def __init__(self, cfg, out, tty: bool | None = None, interval_s: float = 0.5):
        self.cfg, self.out = cfg, out
        self.tty = out.isatty() if tty is None else tty
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def stage_started(self, name: str, index: int, total: int) -> None:
        self.line(f"[{index}/{total}] {name} ...")
        if self.tty:
            self._stop.clear()
            self._thread = threading.Thread(target=self._bar, args=(name, time.time()), daemon=True)
            self._thread.start()

    def _bar(self, name: str, t0: float) -> None:
        total = _total_of(self.cfg.run.run_dir, name, self.cfg)
        while not self._stop.wait(self.interval_s):
            done = _done_of(self.cfg.run.run_dir, name)
            elapsed = time.time() - t0
            rate = done / elapsed if elapsed > 0 else 0.0
            if total:
                width = 24
                filled = min(width, int(width * done / total))
                eta = f"ETA {max(0.0, (total - done) / rate):.0f} s" if rate > 0 and done < total else ""
                text = (
                    f"  {name:9s} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {rate:.1f}/s {eta}"
                )
            else:
                text = f"  {name:9s} {done} written, {elapsed:.0f} s"
            self.out.write("\r" + text[:110].ljust(110))
            self.out.flush()

    def stop(self) -> None:
        """End the running bar (a stage ended or failed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self.out.write("\r" + " " * 110 + "\r")
            self.out.flush()

    def stage_done(self, name: str, counts: dict) -> None:
        self.stop()
        self.line("  " + stage_counts(name, counts))


def stage_counts(name: str, c: dict) -> str:
    """One line of a finished stage's counts (its ``_SUCCESS.json``)."""
    parts = [f"{name} done in {c.get('seconds', '-')} s"]
    if "planned" in c:
        parts.append(f"planned {c['planned']} = written {c['written']} + rejected {c['rejected']}")
    if name == "export" and "splits" in c:
        parts.append(", ".join(f"{s} {v['tiles']} tiles/{v['pairs']} pairs" for s, v in c["splits"].items()))
    if name == "train" and "val_loss_after" in c:
        parts.append(f"held-out loss {c['val_loss_before']:.3f} -> {c['val_loss_after']:.3f}")
    if name == "evaluate" and "trials" in c:
        parts.append(f"{c['trials']} trials, {c.get('failed', 0)} failed")
    return "; ".join(parts)
