"""Ctrl-C of `sarlang run` mid-tile, again and again, on a loaded machine: does every run end cleanly?

    .venv/bin/python benchmarks/stress_interrupt.py --runs 8 --load 2   # writes
benchmarks/results/interrupt_stress.json

Each run is `sarlang run` of the demo workflow at the size of ``tests/test_faults.py`` (its own local Ray),
with ``--load`` busy-loop processes beside it; SIGINT goes to its process group (as Ctrl-C in a terminal)
the moment tile has written its first shard. Per run: when the signal went, the exit code, whether the
output ends in ``KeyboardInterrupt`` (the interrupt handled as such) or holds a Ray ``Check failed`` (the
driver aborted by Ray's core worker, which runs no exit hook), and which processes the run started are
still alive 30 s after it ended. Too slow and too random for a test (a failure in 2 runs of 6 before the
fix): ``tests/test_faults.py`` holds the deterministic cases.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from demo_cli import demo_command

SMALL = [
    "tile.gsds_m=[1.0,5.0]",
    "tile.tile_size=128",
    "tile.tiles_per_shard=4",
    "annotate.concurrency=1",
    "ray.num_cpus=2",
    "ray.progress=false",
    "run.stages=[synth,catalog,tile,align,annotate]",
]


def _alive(p: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    return False


def one_run(work: Path, archive: Path, index: int) -> dict:
    run_dir = work / f"run{index}"
    shards = run_dir / "tile" / "shards"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = demo_command(run_dir, archive, *SMALL)
    log = work / f"run{index}.log"
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
    tree: dict[int, psutil.Process] = {}
    signalled = None
    try:
        driver = psutil.Process(proc.pid)
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                tree.update((p.pid, p) for p in driver.children(recursive=True))
            if any(shards.glob("*/*.parquet")):
                with contextlib.suppress(psutil.Error):
                    tree.update((p.pid, p) for p in driver.children(recursive=True))
                os.killpg(proc.pid, signal.SIGINT)
                signalled = round(time.time() - t0, 2)
                break
            time.sleep(0.02)
        rc = proc.wait(timeout=120)
        deadline = time.time() + 30
        while (left := [p for p in tree.values() if _alive(p)]) and time.time() < deadline:
            time.sleep(0.1)
        text = log.read_text()
        return {
            "signal_at_s": signalled,
            "rc": rc,
            "keyboard_interrupt": "KeyboardInterrupt" in text,
            "ray_check_failed": "Check failed" in text,
            "left_after_30s": [f"{p.pid} {p.name()}" for p in left if _alive(p)],
        }
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in tree.values():
            if _alive(p):
                with contextlib.suppress(psutil.Error):
                    p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--load", type=int, default=2, help="busy-loop processes beside each run")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "interrupt_stress.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sarlang-interrupt-"))
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    runs = []
    try:
        for i in range(args.runs):
            runs.append(one_run(work, work / "archive", i))
            print(i, runs[-1], flush=True)
    finally:
        for b in burners:
            b.kill()
    clean = sum(
        r["keyboard_interrupt"] and not r["ray_check_failed"] and not r["left_after_30s"] for r in runs
    )
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.node()} {os.cpu_count()} CPUs",
        "load_processes": args.load,
        "runs": runs,
        "clean_runs": clean,
        "of": len(runs),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{clean} of {len(runs)} runs ended cleanly -> {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if clean == len(runs) else 1)


if __name__ == "__main__":
    main()
