"""Process lifecycle: nothing of a local Ray outlives the process that started it, however that process
ends; no Ray worker process outlives a cancel half-initialised (:func:`cancel_ends_worker`); Ctrl-C still
interrupts a driver after Ray Tune or Ray Train ran in it (:func:`sigint_kept`).

Ray names a local session after the process that starts it (``<temp dir>/session_<date>_<pid>``) and each
of its processes keeps files open under that session's ``logs/`` from the moment it starts (its inherited
stdout and stderr at first, its own logs later): :func:`end_session` finds them by that and ends them.

Two callers:

* the driver's exit hook (``cluster.stop_local_ray``), after ``ray.shutdown``: on Ray 2.60 a dashboard or
  runtime-env agent that has not yet registered misses its raylet's death (Ctrl-C in a run's first seconds
  kills the whole process group) and stays behind, an orphan of init; ``ray.shutdown`` ends only the
  processes it started itself;
* a watcher process (:func:`watch`, started by :func:`start_watcher` before ``ray.init``), for the deaths
  that run no exit hook: SIGKILL, an out-of-memory kill, or Ray's own core worker aborting the driver
  (a ``RAY_CHECK`` in its task manager when a cancel races a dying worker; it failed one CI run). It holds
  the read end of a pipe whose write end only the driver holds; end of file means the driver is gone.

Only this module's imports (psutil) run in the watcher: it costs one small Python process per driver.

A cancelled Ray task gets a ``KeyboardInterrupt`` wherever it is, and Ray then reuses its worker process
for the next task. Cut short inside a first import (transformers -> torch -> sympy: seconds), that
process keeps half-initialised modules in ``sys.modules`` and every later task there fails to import
(``module 'sympy' has no attribute 'printing'``; ``Could not import module 'AutoProcessor'``): a training
run failed this way in CI when Ray Data cancelled a preprocessing task as a node was lost, and every
retry landed on the broken worker. Tasks that import lazily run inside :func:`cancel_ends_worker`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys

log = logging.getLogger("sarlang")

_WATCHER: subprocess.Popen | None = None


def end_session(pid: int, grace_s: float = 5.0) -> list[int]:
    """End every process of this user holding a file open under the logs of a Ray session started by
    process ``pid`` (SIGTERM, then SIGKILL after ``grace_s``); returns their pids."""
    import psutil

    ours, uid, me = re.compile(rf"/session_[^/]*_{pid}/logs/"), os.getuid(), os.getpid()
    left = []
    for proc in psutil.process_iter(["uids"]):
        try:
            if (
                proc.pid not in (me, pid)
                and proc.info["uids"]
                and proc.info["uids"].real == uid
                and any(ours.search(f.path) for f in proc.open_files())
            ):
                left.append(proc)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if left:
        log.info(
            "ended %d process(es) of the local Ray of process %d: %s",
            len(left),
            pid,
            ", ".join(str(p.pid) for p in left),
        )
    return [p.pid for p in left]


@contextlib.contextmanager
def cancel_ends_worker():
    """Inside a Ray task: a cancel (``KeyboardInterrupt``) ends this worker process at once, so Ray starts a
    clean one instead of reusing a process the interrupt left half-initialised. The task still ends as
    cancelled (Ray reports ``TaskCancelledError`` and does not retry it). Anywhere else (the driver, a
    plain call) the interrupt propagates as usual."""
    try:
        yield
    except KeyboardInterrupt:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().get_task_id() is not None:  # None in a driver
            os._exit(1)
        raise


@contextlib.contextmanager
def sigint_kept():
    """Give back the SIGINT handler the process had once the block ends. Ray Tune's ``Tuner.fit`` and Ray
    Train's ``fit`` install their own (a graceful stop of *their* run) and leave it installed (Ray 2.60):
    after an evaluation or a training run in a notebook or a driver, Ctrl-C of anything else printed "Stop
    signal received ... ending Ray Tune run" and interrupted nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield
        return
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if before is not None:  # None: a handler not installed from Python, which cannot be put back
            signal.signal(signal.SIGINT, before)


def start_watcher() -> subprocess.Popen:
    """Start (once per process) the watcher that ends this process's local Ray sessions when it dies."""
    global _WATCHER
    if _WATCHER is None or _WATCHER.poll() is not None:
        # its own session: the Ctrl-C that reaches the driver's process group does not reach it
        _WATCHER = subprocess.Popen(
            [sys.executable, "-m", "sarlang_ray.reaper", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
    return _WATCHER


def started_local_ray() -> bool:
    """Whether this process started a local Ray (and its watcher)."""
    return _WATCHER is not None


def watch(pid: int) -> None:
    """Wait for the end of file on stdin (the driver ``pid`` has exited, however), then end its sessions."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(4096):
            pass
    end_session(pid)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
