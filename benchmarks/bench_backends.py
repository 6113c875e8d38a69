"""Tasks vs an actor pool for the stages whose rows hold no model (issue 29: one execution model).

    .venv/bin/python benchmarks/bench_backends.py [--factor 16] [--reps 2]
    # -> benchmarks/results/backends.json

The demo's data stages run once up to tile; its tile shards are then copied ``--factor`` times
(``<scene>/<name>-cK``: the same pixels under new shard names), so align and annotate (template backend) get
``factor`` x the demo's items (hundreds of shards) of the demo's real work each. Then, alternating the order
(align: tasks then actors, annotate: actors then tasks; the next repetition the other way round), align and
annotate are run on each back-end of ``execution.map`` (``SARLANG_MAP_BACKEND``, which overrides what a stage
declares; benchmarks only) with ``run.force=true``: the stage time (its ``_SUCCESS.json`` ``seconds``), and
the driver's peak RSS while it ran (sampled every 0.1 s), on one local Ray of the machine's CPUs.

The machine is shared with other jobs while this runs (other sessions' tests and benchmarks): the alternation
and the per-repetition numbers are there so a reader can see the noise; compare the two back-ends within a
repetition.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
RESULT = REPO / "benchmarks" / "results" / "backends.json"


def replicate(run_dir: Path, factor: int) -> int:
    """Copies of every tile shard (and of its errors file, when it has one) under new shard names; the shard
    count."""
    root = run_dir / "tile" / "shards"
    originals = sorted(root.glob("*/*.parquet"))
    for shard in originals:
        for k in range(1, factor):
            shutil.copyfile(shard, shard.with_name(f"{shard.stem}-c{k}.parquet"))
    errors = run_dir / "tile" / "errors"
    for err in sorted(errors.glob("*/*.parquet")) if errors.exists() else []:
        for k in range(1, factor):
            shutil.copyfile(err, err.with_name(f"{err.stem}-c{k}.parquet"))
    return len(list(root.glob("*/*.parquet")))


def measure(stage: str, cfg, backend: str) -> dict:
    from peak_memory import PeakMemory

    from sarlang_ray.stages.stage import registry

    os.environ["SARLANG_MAP_BACKEND"] = backend
    driver = psutil.Process()
    with PeakMemory(lambda: [driver], interval=0.1) as peak:
        t0 = time.time()
        counts = registry()[stage].run(cfg)
        wall = time.time() - t0
    del os.environ["SARLANG_MAP_BACKEND"]
    return {
        "stage": stage,
        "backend": backend,
        "stage_s": counts["seconds"],
        "wall_s": round(wall, 2),
        "driver_peak_rss_mib": round(peak.peak_rss / 2**20, 1),
        "shards": counts["shards"],
        "written": counts["written"],
    }


def write(meta: dict, runs: list[dict]) -> dict:
    summary = {}
    for stage in ("align", "annotate"):
        per = {b: [r for r in runs if r["stage"] == stage and r["backend"] == b] for b in ("tasks", "actors")}
        if not all(per.values()):
            continue
        summary[stage] = {
            b: {
                "stage_s_median": statistics.median(r["stage_s"] for r in rs),
                "driver_peak_rss_mib_max": max(r["driver_peak_rss_mib"] for r in rs),
            }
            for b, rs in per.items()
        }
        summary[stage]["actors_over_tasks_time"] = round(
            summary[stage]["actors"]["stage_s_median"] / summary[stage]["tasks"]["stage_s_median"], 2
        )
    result = {**meta, "runs": runs, "summary": summary}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--factor", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    from conftest import demo_config

    from sarlang_ray import pipeline
    from sarlang_ray.stages.cluster import ensure_ray

    work = Path(tempfile.mkdtemp(prefix="sarlang-bench-backends-"))
    try:
        base = demo_config(work / "run", "run.stages=[synth,catalog,tile]")
        t0 = time.time()
        pipeline.run(base)
        demo_shards = len(list((work / "run" / "tile" / "shards").glob("*/*.parquet")))
        shards = replicate(work / "run", args.factor)
        print(
            f"demo up to tile: {time.time() - t0:.0f} s, {demo_shards} shards x {args.factor} = {shards}",
            flush=True,
        )
        cfg = demo_config(work / "run", "run.force=true")
        ensure_ray(cfg)
        runs = []
        import ray

        meta = {
            "benchmark": "execution.map back-ends: Ray tasks on pooled workers vs a Ray Data actor pool",
            "machine": f"{platform.node()} ({os.cpu_count()} CPUs), shared with other jobs while it ran",
            "ray_cpus": ray.cluster_resources().get("CPU"),
            "demo_shards": demo_shards,
            "factor": args.factor,
            "shards": shards,
            "reps": args.reps,
        }
        for rep in range(args.reps):
            # align's output is the same on either back-end (annotate reads whichever ran last); the order
            # alternates within a repetition and between repetitions
            first, second = ("tasks", "actors") if rep % 2 == 0 else ("actors", "tasks")
            for stage, backend in (
                ("align", first),
                ("align", second),
                ("annotate", second),
                ("annotate", first),
            ):
                row = {"rep": rep, **measure(stage, cfg, backend)}
                runs.append(row)
                print(json.dumps(row), flush=True)
                write(meta, runs)  # what has run so far, should a later run not finish
        print(json.dumps(write(meta, runs)["summary"], indent=1))
    finally:
        from sarlang_ray.stages.cluster import stop_local_ray

        stop_local_ray()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
