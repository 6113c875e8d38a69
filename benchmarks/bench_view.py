"""`sarlang view` on a run 16x the demo's tiles against the demo itself: wall time and the driver's peak
memory.

The site is written by one Ray task per tiles shard and the driver keeps counters and a bounded sample, so its
memory should not grow with the run (goal: <= 1.25x the demo's). The large run is the demo's own tables copied
``--copies`` times under new scene, tile and pair ids (``x<k>-`` prefixed: every table the viewer reads, so
each copy is a run of its own ground): the same content the demo's pipeline makes, at 16x the tiles and
shards, without re-running the pipeline for minutes. Each `sarlang view` runs as a fresh process with its own
local Ray; the driver's RSS is sampled every 50 ms (benchmarks/peak_memory.py), its Ray workers are not
counted.

Run: python benchmarks/bench_view.py [--run-dir EXISTING_DEMO_RUN] [--copies 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "tests")]
from demo_cli import demo_command
from peak_memory import PeakMemory

ID_COLUMNS = ("tile_id", "scene_id", "pair_id", "item")


def demo_run(run_dir: Path) -> Path:
    """The demo's data stages (what `sarlang view` shows), run once into ``run_dir`` unless already there."""
    if not (run_dir / "export" / "_SUCCESS.json").exists():
        env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
        subprocess.run(
            demo_command(
                run_dir, f"{run_dir}/archive", "run.stages=[synth,catalog,tile,align,annotate,export]"
            ),
            check=True,
            env=env,
        )
    return run_dir


def _prefixed(table: pa.Table, prefix: str) -> pa.Table:
    for name in ID_COLUMNS:
        if name in table.schema.names and pa.types.is_string(table.schema.field(name).type):
            i = table.schema.get_field_index(name)
            table = table.set_column(i, name, pc.binary_join_element_wise(pa.scalar(prefix), table[name], ""))
    return table


def replicate(src: Path, dst: Path, copies: int) -> Path:
    """``copies`` copies of ``src``'s tables under ``dst`` with x<k>- prefixed ids and shard folders."""
    if dst.exists():
        shutil.rmtree(dst)
    for stage in ("align", "annotate", "tile"):
        for sub in ("shards", "errors"):
            for f in sorted((src / stage / sub).glob("*/*.parquet")) if (src / stage / sub).exists() else []:
                t = pq.read_table(f)
                for k in range(copies):
                    out = dst / stage / sub / f"x{k}-{f.parent.name}" / f.name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    pq.write_table(_prefixed(t, f"x{k}-"), out)
    for f in sorted((src / "export" / "parquet").glob("*/*.parquet")):
        t = pq.read_table(f)
        for k in range(copies):
            out = dst / "export" / "parquet" / f.parent.name / f"x{k}-{f.name}"
            out.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(_prefixed(t, f"x{k}-"), out)
    for rel in (
        "export/errors.parquet",
        "catalog/scenes.parquet",
        "align/label_errors.parquet",
        "catalog/errors.parquet",
    ):
        if (src / rel).exists():
            t = pq.read_table(src / rel)
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.concat_tables([_prefixed(t, f"x{k}-") for k in range(copies)]), dst / rel)
    for rel in ("align/_SUCCESS.json", "export/leakage.json", "summary.json"):
        if (src / rel).exists():
            shutil.copy(src / rel, dst / rel)
    return dst


def view(run_dir: Path, out: Path) -> dict:
    """One `sarlang view` in a fresh process: seconds, driver peak RSS, and what it reported."""
    if out.exists():
        shutil.rmtree(out)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "PYTHONPATH": str(REPO),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sarlang_ray", "view", str(run_dir), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    driver = psutil.Process(proc.pid)
    with PeakMemory(lambda: [driver], interval=0.05) as mem:
        output, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(output[-3000:])
    line = [x for x in output.splitlines() if " tiles (" in x][-1]
    return {
        "seconds": round(seconds, 2),
        "driver_peak_rss_mb": round(mem.peak_rss / 2**20, 1),
        "report": line,
        "site_files": sum(1 for _ in out.rglob("*") if _.is_file()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--run-dir", help="a finished demo run (default: run the demo's data stages in a temp folder)"
    )
    ap.add_argument("--copies", type=int, default=16)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "view.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-view-"))
    try:
        small = demo_run(Path(args.run_dir) if args.run_dir else work / "demo")
        big = replicate(small, work / f"x{args.copies}", args.copies)
        runs = {"demo": view(small, work / "site-demo"), f"x{args.copies}": view(big, work / "site-big")}
        runs["demo_again"] = view(small, work / "site-demo")  # the baseline twice: how much two runs differ
        base = min(runs["demo"]["driver_peak_rss_mb"], runs["demo_again"]["driver_peak_rss_mb"])
        big_run = runs[f"x{args.copies}"]
        result = {
            "what": "sarlang view: demo run vs the demo's tables copied --copies times (new ids); fresh "
            "process and "
            "local Ray each; driver RSS sampled every 50 ms",
            "copies": args.copies,
            "runs": runs,
            "cpus": os.cpu_count(),
            "time_ratio": round(
                big_run["seconds"] / min(runs["demo"]["seconds"], runs["demo_again"]["seconds"]), 2
            ),
            "driver_memory_ratio": round(big_run["driver_peak_rss_mb"] / base, 3),
            "memory_goal": 1.25,
        }
        result["memory_goal_met"] = result["driver_memory_ratio"] <= result["memory_goal"]
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
