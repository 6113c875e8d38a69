"""Export planning (splits + leakage report) at 10k, 100k and 1M synthetic tiles, 1 and 16 revisits: the driver's
peak memory and time per tile of both planners, ``export.planner=workers`` (Ray tasks from block aggregates, the
default) and ``driver`` (one descriptor per tile in the driver, the reference; run up to ``--driver-max`` tiles).

    .venv/bin/python benchmarks/bench_scale_plan.py                      # -> benchmarks/results/scale_plan.json
    .venv/bin/python benchmarks/bench_scale_plan.py --sizes 10000 100000 --revisits 1

The generator writes what the planner reads of the align and annotate shards (``export.split_inputs``: tile id,
scene, region, footprint, CRS, label objects; tile id and ``qc_passed``), in shards of 256 tiles: scenes of
16 x 16 tiles of 1.28 km (128 px at 10 m) on a grid of places 30 km apart, each footprint a 33-vertex lon/lat
polygon as the tile stage writes it; ~10 label ids per tile, most shared with a neighbour (objects crossing
tile edges), and one long object (a road) along every row of tiles of a scene. ``revisits`` scenes cover each
place (other dates: the same ground, other scene ids), as a Sentinel-1 archive revisits its tracks. Each size
and planner runs in a fresh process (the workers' planner on a local Ray of 2 CPUs started before the
measurement); peak RSS is the driver process's ``resource.getrusage`` less its RSS before planning (Ray's worker
processes hold the tasks' memory, not the driver).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = REPO / "benchmarks" / "work" / "scale-plan"
RESULT = REPO / "benchmarks" / "results" / "scale_plan.json"
TILES_PER_SIDE = 16  # per scene
TILE_M = 1280.0
PLACE_STEP_DEG = 0.3  # between places (~30 km): far more than a 2 km split block


def generate(run_dir: Path, n_tiles: int, revisits: int) -> int:
    """Synthetic align and annotate shards of about ``n_tiles`` tiles; returns the number written."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely
    from pyproj import Transformer

    per_scene = TILES_PER_SIDE * TILES_PER_SIDE
    n_places = max(1, n_tiles // (per_scene * revisits))
    objects_type = pa.list_(pa.struct([("class", pa.string()), ("label_id", pa.string())]))
    schema = pa.schema([("tile_id", pa.string()), ("scene_id", pa.string()), ("region", pa.string()),
                        ("footprint", pa.binary()), ("crs", pa.string()), ("objects", objects_type)])
    written = 0
    side = int(np.ceil(np.sqrt(n_places)))
    for place in range(n_places):
        lon0, lat0 = 5.0 + (place % side) * PLACE_STEP_DEG, 45.0 + (place // side) * PLACE_STEP_DEG
        zone = int((lon0 + 180) // 6) + 1
        crs = f"EPSG:{32600 + zone}"
        to_utm = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
        to_geo = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
        x0, y0 = to_utm.transform(lon0, lat0)
        rows = []
        for r in range(TILES_PER_SIDE):
            for c in range(TILES_PER_SIDE):
                left, top = x0 + c * TILE_M, y0 - r * TILE_M
                t = np.linspace(0, 1, 9)[:-1]
                xs = np.concatenate([left + t * TILE_M, np.full(8, left + TILE_M), left + TILE_M - t * TILE_M, np.full(8, left)])
                ys = np.concatenate([np.full(8, top), top - t * TILE_M, np.full(8, top - TILE_M), top - TILE_M + t * TILE_M])
                lon, lat = to_geo.transform(xs, ys)
                ring = list(zip(lon, lat)) + [(lon[0], lat[0])]  # 33 vertices, as the tile stage's footprints
                labels = {f"p{place}/b{r}_{c}_{k}" for k in range(6)}  # buildings of this tile
                labels |= {f"p{place}/e{r}_{c + d}" for d in (0, 1)}  # objects across its left and right edges
                labels |= {f"p{place}/s{r + d}_{c}" for d in (0, 1)}  # and across its top and bottom edges
                labels.add(f"p{place}/road{r}")  # a road along the whole row: long (16 tiles, 20 km)
                rows.append((r, c, shapely.to_wkb(shapely.Polygon(ring)),
                             [{"class": "road" if "road" in i else "building", "label_id": i} for i in sorted(labels)]))
        for visit in range(revisits):
            scene = f"s1_p{place:06d}_v{visit:02d}"
            tiles = [{"tile_id": f"{scene}_10m_r{r:04d}_c{c:04d}", "scene_id": scene, "region": f"place{place}",
                      "footprint": wkb, "crs": crs, "objects": objs} for r, c, wkb, objs in rows]
            for stage in ("align", "annotate"):
                (run_dir / stage / "shards" / scene).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(tiles, schema=schema), run_dir / "align" / "shards" / scene / "10m-00000.parquet")
            pq.write_table(pa.table({"tile_id": [t["tile_id"] for t in tiles], "qc_passed": [True] * len(tiles)}),
                           run_dir / "annotate" / "shards" / scene / "10m-00000.parquet")
            written += len(tiles)
    return written


def measure(run_dir: Path, planner: str) -> dict:
    from sarlang_ray import export
    from sarlang_ray.config import load_config

    cfg = load_config(str(REPO / "workflows" / "demo.yaml"), [f"run.run_dir={run_dir}", f"export.planner={planner}"])
    if planner == "workers":
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    items, counts = export.plan(cfg)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"planner": planner, "tiles": counts["planned"], "written": counts["written"], "work_items": len(items),
            "leak_free": counts["leakage"]["leak_free"], "clipped_objects": counts["leakage"]["clipped_objects"],
            "blocks": counts["leakage"].get("blocks"), "seconds": round(seconds, 2),
            "us_per_tile": round(1e6 * seconds / max(1, counts["planned"]), 1),
            "peak_rss_mb": round(peak / 1024, 1), "peak_rss_growth_mb": round((peak - rss0) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--revisits", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--planners", nargs="+", default=["workers", "driver"])
    parser.add_argument("--driver-max", type=int, default=100_000, help="largest size the driver's planner runs at")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--planner", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.measure:
        print(json.dumps(measure(Path(ns.measure), ns.planner)))
        return
    runs = []
    for revisits in ns.revisits:
        for n in ns.sizes:
            run_dir = WORK / f"n{n}-r{revisits}" / "run"
            shutil.rmtree(run_dir.parent, ignore_errors=True)
            t0 = time.perf_counter()
            made = generate(run_dir, n, revisits)
            print(f"generated {made} tiles ({revisits} revisits) in {time.perf_counter() - t0:.0f} s", flush=True)
            for planner in ns.planners:
                if planner == "driver" and n > ns.driver_max:
                    continue
                done = subprocess.run([sys.executable, __file__, "--measure", str(run_dir), "--planner", planner],
                                      capture_output=True, text=True, check=True,
                                      env={**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"})
                runs.append({"revisits": revisits, "generated": made, **json.loads(done.stdout.strip().splitlines()[-1])})
                print(runs[-1], flush=True)
            shutil.rmtree(run_dir.parent, ignore_errors=True)
    ratios = {}
    for planner in ns.planners:
        for revisits in ns.revisits:
            mine = sorted((r for r in runs if r["planner"] == planner and r["revisits"] == revisits), key=lambda r: r["tiles"])
            if len(mine) > 1:
                ratios[f"{planner}, {revisits} revisits: {mine[-1]['tiles']} vs {mine[0]['tiles']} tiles"] = {
                    "peak_rss": round(mine[-1]["peak_rss_mb"] / mine[0]["peak_rss_mb"], 2),
                    "peak_rss_growth": round(mine[-1]["peak_rss_growth_mb"] / max(0.1, mine[0]["peak_rss_growth_mb"]), 2),
                    "us_per_tile": round(mine[-1]["us_per_tile"] / mine[0]["us_per_tile"], 2)}
    result = {"benchmark": "export.plan (geographic splits + leakage report): planner on the workers vs in the driver",
              "machine": f"{platform.node()} ({os.cpu_count()} CPUs, shared with other jobs)", "runs": runs,
              "largest_vs_smallest": ratios}
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
