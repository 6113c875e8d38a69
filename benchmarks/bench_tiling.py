"""Tiling throughput (the tile stage's Ray tasks, a Ray Data actor pool, a plain single-process loop) and peak
memory (1x vs 4x archive).

    .venv/bin/python benchmarks/bench_tiling.py            # writes benchmarks/results/tiling.json

Throughput: the same chunks go through the same read -> preprocess -> encode -> write code
(``TileChunk``), in a plain loop in this process, as Ray tasks on pooled workers (``map_tasks``, what the tile
stage runs) and on a Ray Data actor pool with one actor per core (``map_items``, what the tile stage ran
before). Ray's start-up (``ray.init``) is timed separately; "overall" includes worker start-up and the
tail, "steady state" is measured while every worker is busy (see ``steady_state_rate``). Each method runs
``--repeats`` times, alternating, and the fastest run of each counts. Tasks run twice per repeat: "cold"
right after the actor pool (whose actors took the node's idle worker processes with them, so Ray starts
and warms new ones, as after any actor stage), then warm.

Memory: catalog + tile + align of the demo archive and of one 4x larger, each on a fresh local Ray; the
proportional set size (PSS, so shared pages count once) of every Ray process plus the driver is sampled
every 0.25 s and the peak of the sum is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from peak_memory import PeakMemory, ray_processes

from sarlang_ray import pipeline, tiling
from sarlang_ray.config import load_config
from sarlang_ray.stages.execution import map_items, map_tasks

REPO = Path(__file__).resolve().parents[1]


def _config(work: Path, name: str, *overrides: str):
    return load_config(
        str(REPO / "workflows" / "demo.yaml"),
        [
            f"run.run_dir={work / name / 'run'}",
            f"synth.out_dir={work / name / 'archive'}",
            "ray.progress=false",
            *overrides,
        ],
    )


def steady_state_rate(manifest: list[dict]) -> float:
    """Tiles/s while every worker is busy: from the last worker's first start to the first worker's last
    finish; chunks straddling the window count in proportion to their overlap with it."""
    by_worker: dict[int, list[dict]] = {}
    for m in manifest:
        by_worker.setdefault(m["worker"], []).append(m)
    t_a = max(min(m["started_at"] for m in ms) for ms in by_worker.values())
    t_b = min(max(m["finished_at"] for m in ms) for ms in by_worker.values())
    tiles = 0.0
    for m in manifest:
        overlap = min(m["finished_at"], t_b) - max(m["started_at"], t_a)
        if overlap > 0:
            tiles += m["written"] * overlap / (m["finished_at"] - m["started_at"])
    return tiles / (t_b - t_a)


def throughput(work: Path, scale: int, tile_size: int, repeats: int) -> dict:
    import ray

    cfg = _config(work, "throughput", f"synth.scale={scale}", f"tile.tile_size={tile_size}")
    for stage in ("synth", "catalog"):
        pipeline.run(cfg, [stage])  # catalog starts a Ray; shut it down so the timings below start clean
    ray.shutdown()
    chunks = [c for s in pipeline.read_scenes(cfg.run.run_dir) for c in tiling.plan_chunks(s, cfg.tile)]
    loop_dir, ray_dir = work / "throughput" / "loop", work / "throughput" / "ray"

    t0 = time.perf_counter()
    ray.init(
        num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    init_s = time.perf_counter() - t0

    loop_runs, ray_runs, task_runs, cold_runs = [], [], [], []
    for _ in range(repeats):  # alternate, so slow phases of a shared machine hit every method
        shutil.rmtree(loop_dir, ignore_errors=True)
        worker = tiling.TileChunk(cfg.tile, str(loop_dir))  # same chunks, same code, same shard writes
        t0 = time.perf_counter()
        loop_manifest = [worker(c) for c in chunks]
        loop_runs.append(time.perf_counter() - t0)
        n_tiles = sum(m["written"] for m in loop_manifest)

        shutil.rmtree(ray_dir, ignore_errors=True)
        t0 = time.time()
        manifest = map_items(chunks, tiling.TileChunk, (cfg.tile, str(ray_dir)), None, 1.0)
        ray_runs.append((time.time() - t0, steady_state_rate(manifest), len({m["worker"] for m in manifest})))
        assert sum(m["written"] for m in manifest) == n_tiles

        # right after the actor pool (it took the idle workers with it), then again
        for cold in (
            True,
            False,
        ):
            shutil.rmtree(ray_dir, ignore_errors=True)
            t0 = time.time()
            manifest = map_tasks(chunks, tiling.TileChunk, (cfg.tile, str(ray_dir)))
            (cold_runs if cold else task_runs).append(
                (time.time() - t0, steady_state_rate(manifest), len({m["worker"] for m in manifest}))
            )
            assert sum(m["written"] for m in manifest) == n_tiles
    ray.shutdown()
    loop_s = min(loop_runs)
    ray_s, steady_rate, workers = min(ray_runs)
    task_s, task_steady, task_workers = min(task_runs)
    return {
        "tiles": n_tiles,
        "chunks": len(chunks),
        "tile_size": tile_size,
        "archive_scale": scale,
        "repeats": repeats,
        "loop_seconds": round(loop_s, 2),
        "loop_tiles_per_s": round(n_tiles / loop_s, 1),
        "loop_seconds_all": [round(x, 2) for x in loop_runs],
        "ray_init_seconds": round(init_s, 2),
        "ray_seconds_after_init": round(ray_s, 2),
        "ray_seconds_all": [round(x[0], 2) for x in ray_runs],
        "ray_workers": workers,
        "ray_tiles_per_s_overall": round(n_tiles / ray_s, 1),
        "ray_tiles_per_s_steady": round(steady_rate, 1),
        "speedup_overall": round(loop_s / ray_s, 2),
        "speedup_steady": round(steady_rate / (n_tiles / loop_s), 2),
        "speedup_including_init": round(loop_s / (ray_s + init_s), 2),
        "tasks_seconds_after_init": round(task_s, 2),
        "tasks_seconds_all": [round(x[0], 2) for x in task_runs],
        "tasks_workers": task_workers,
        "tasks_tiles_per_s_overall": round(n_tiles / task_s, 1),
        "tasks_cold_seconds_all": [round(x[0], 2) for x in cold_runs],
        "tasks_tiles_per_s_cold": round(n_tiles / min(cold_runs)[0], 1),
        "tasks_tiles_per_s_steady": round(task_steady, 1),
        "tasks_speedup_overall": round(loop_s / task_s, 2),
        "tasks_speedup_steady": round(task_steady / (n_tiles / loop_s), 2),
        "tasks_speedup_including_init": round(loop_s / (task_s + init_s), 2),
    }


def memory(work: Path) -> dict:
    import ray

    out = {}
    for scale in (1, 4):
        cfg = _config(work, f"memory{scale}", f"synth.scale={scale}")
        pipeline.run(cfg, ["synth"])
        ray.shutdown()
        with PeakMemory(ray_processes) as mem:
            summary = pipeline.run(cfg, ["catalog", "tile", "align"])
            ray.shutdown()
        out[f"scale{scale}"] = {
            "tiles": summary["stages"]["align"]["written"],
            "peak_pss_mib": round(mem.peak_pss / 2**20, 1),
            "seconds": summary["wall_seconds"],
        }
    out["peak_ratio_4x_over_1x"] = round(out["scale4"]["peak_pss_mib"] / out["scale1"]["peak_pss_mib"], 3)
    out["tiles_ratio"] = round(out["scale4"]["tiles"] / out["scale1"]["tiles"], 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scale", type=int, default=7, help="archive copies for the throughput run (7: >2000 tiles)"
    )
    parser.add_argument("--tile-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each method; the fastest counts")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "tiling.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sarlang-bench-"))
    try:
        result = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": sys.version.split()[0],
                "platform": platform.platform(),
            },
            "throughput": throughput(work, args.scale, args.tile_size, args.repeats),
            "memory": memory(work),
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
