"""Scaling of tile + align with archive size: 1x, 4x and 16x the sample archive (time and peak memory).

    .venv/bin/python benchmarks/bench_scale.py        # writes benchmarks/results/scale.json

For each scale: synthesise the archive and catalog it (not timed), then run tile + align on a fresh local
Ray while the summed PSS of every Ray process and the driver is sampled (peak reported). Time should grow
linearly with the number of tiles: we fit ``seconds = fixed + per_tile * tiles`` by least squares over the
three points and report each point's deviation from the fit (target within +-15 %), plus the fixed cost
and the marginal per-tile throughput. Peak memory should stay flat (target <= 1.25x of 1x at 16x):
shards stream through actor pools, nothing holds the archive. The template annotate stage of the same tiles
is timed apart (an input of docs/sizing.md, not part of the fit).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tiling import _config
from peak_memory import PeakMemory, ray_processes

from sarlang_ray import pipeline


def one_scale(work: Path, scale: int, repeats: int, annotate: bool = True) -> dict:
    import ray

    cfg = _config(work, f"scale{scale}", f"synth.scale={scale}")
    pipeline.run(cfg, ["synth", "catalog"])
    ray.shutdown()
    scenes = pipeline.read_scenes(cfg.run.run_dir)
    source = {
        "scenes": len(scenes),
        "sar_megapixels": round(sum(s["width"] * s["height"] for s in scenes) / 1e6, 2),
        "sar_file_mib": round(sum(Path(s["sar_uri"]).stat().st_size for s in scenes) / 2**20, 1),
    }
    runs = []
    for r in range(repeats):
        for stage in ("tile", "align"):  # start both stages from scratch
            shutil.rmtree(Path(cfg.run.run_dir) / stage, ignore_errors=True)
        with PeakMemory(ray_processes) as mem:
            t0 = time.time()
            summary = pipeline.run(cfg, ["tile", "align"])
            seconds = time.time() - t0
            ray.shutdown()
        stages = summary["stages"]
        runs.append(
            {
                "seconds": seconds,
                "ray_init_and_stages": {s: stages[s]["seconds"] for s in ("tile", "align")},
                "peak_pss_mib": mem.peak_pss / 2**20,
                "tiles": stages["align"]["written"],
                "objects": sum(summary["objects_per_class"].values()),
            }
        )
    best = min(runs, key=lambda x: x["seconds"])
    point = {
        "scale": scale,
        "tiles": best["tiles"],
        "objects": best["objects"],
        "seconds": round(best["seconds"], 2),
        "stage_seconds": best["ray_init_and_stages"],
        "peak_pss_mib": round(max(r["peak_pss_mib"] for r in runs), 1),
        "seconds_all": [round(r["seconds"], 2) for r in runs],
        "source": source,
    }
    if annotate:  # template annotation of the same tiles, timed apart (not part of the tile + align fit)
        t0 = time.time()
        stages = pipeline.run(cfg, ["annotate"])["stages"]
        point["annotate"] = {
            "seconds": round(time.time() - t0, 2),
            "stage_seconds": stages["annotate"]["seconds"],
            "tiles": stages["annotate"]["written"],
            "pairs": stages["annotate"]["pairs"]["passed"],
        }
        ray.shutdown()
    return point


def linear_fit(points: list[dict]) -> dict:
    n = len(points)
    xs, ys = [p["tiles"] for p in points], [p["seconds"] for p in points]
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    fixed = my - slope * mx
    dev = [(y - (fixed + slope * x)) / y for x, y in zip(xs, ys)]
    return {
        "fixed_seconds": round(fixed, 2),
        "seconds_per_tile": round(slope, 4),
        "marginal_tiles_per_s": round(1 / slope, 1),
        "deviation_from_fit": [round(d, 3) for d in dev],
        "max_abs_deviation": round(max(abs(d) for d in dev), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-annotate", action="store_true", help="skip timing the template annotate stage")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "scale.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sarlang-scale-"))
    try:
        points = [one_scale(work, int(s), args.repeats, not args.no_annotate) for s in args.scales.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = points[0]
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "points": points,
        "fit": linear_fit(points),
        "memory_ratio_vs_1x": {
            p["scale"]: round(p["peak_pss_mib"] / base["peak_pss_mib"], 3) for p in points
        },
        "tiles_ratio_vs_1x": {p["scale"]: round(p["tiles"] / base["tiles"], 2) for p in points},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
