"""Export planning (splits + leakage report) at 10k, 100k and 1M synthetic tiles, 1 and 16 revisits: the
driver's peak memory and time per tile of both planners, ``export.planner=workers`` (Ray tasks from block
aggregates, the default) and ``driver`` (one descriptor per tile in the driver, the reference; run up to
``--driver-max`` tiles). With ``--export``, the whole export stage instead (``stages.export._body``: planning
on the workers, leakage report, the shards' actor pool writing PNGs, Parquet and parts, the assembly of the
LLaMA-Factory / SARLANG-1M / Parquet files, numbered shards by Ray tasks above ``--shard-records``, manifest,
card) on full synthetic shards.

    .venv/bin/python benchmarks/bench_scale_plan.py      # -> benchmarks/results/scale_plan.json
    .venv/bin/python benchmarks/bench_scale_plan.py --sizes 10000 100000 --revisits 1
    .venv/bin/python benchmarks/bench_scale_plan.py --export --sizes 10000 100000 --code "what ran"

Rows are merged into the results file: a row replaces an earlier one of the same stage, planner, revisits,
size and ``--code`` (the label of the code that ran), so earlier rows stay for comparison.

The generator writes what the planner reads of the align and annotate shards (``export.split_inputs``: tile
id, scene, region, footprint, CRS, label objects; tile id and ``qc_passed``), in shards of 256 tiles: scenes
of 16 x 16 tiles of 1.28 km (128 px at 10 m) on a grid of places 30 km apart, each footprint a 33-vertex
lon/lat polygon as the tile stage writes it; ~10 label ids per tile, most shared with a neighbour (objects
crossing tile edges), and one long object (a road) along every row of tiles of a scene. ``revisits`` scenes
cover each place (other dates: the same ground, other scene ids), as a Sentinel-1 archive revisits its tracks.
Each size and planner runs in a fresh process (the workers' planner on a local Ray of 2 CPUs started before
the measurement); peak RSS is the driver process's ``resource.getrusage`` less its RSS before planning (Ray's
worker processes hold the tasks' memory, not the driver).
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


def tiny_png() -> bytes:
    """An 8 x 8 grey PNG (a real image the card's mosaic can decode; every tile gets the same bytes)."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(buf, format="PNG")
    return buf.getvalue()


def pairs_of(tile_id: str, scene: str, objects: list[dict]) -> list[dict]:
    """Two QC-passed pairs per tile as the annotate stage writes them: a concise caption and a counting
    VQA."""
    n = sum(o["class"] == "building" for o in objects)
    base = {
        "tile_id": tile_id,
        "scene_id": scene,
        "gsd_m": 10.0,
        "backend": "template",
        "qc_passed": True,
        "qc_reasons": [],
    }
    return [
        {
            **base,
            "pair_id": f"{tile_id}#0",
            "kind": "caption_concise",
            "application": "image description",
            "question_type": "caption",
            "question": "Describe the image briefly.",
            "answer": f"A SAR image with {n} buildings and a road.",
        },
        {
            **base,
            "pair_id": f"{tile_id}#1",
            "kind": "vqa",
            "application": "object counting",
            "question_type": "counting",
            "question": "How many buildings are there?",
            "answer": str(n),
        },
    ]


def generate(run_dir: Path, n_tiles: int, revisits: int, full: bool = False) -> int:
    """Synthetic align and annotate shards of about ``n_tiles`` tiles; returns the number written. ``full``:
    with what the export's shards read too (an 8 x 8 PNG per tile, GSD, width; two pairs per tile), so the
    whole export (planning, shards, assembly) runs on them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely
    from pyproj import Transformer

    from sarlang_ray.tables import ANNOTATION_SCHEMA, OBJECT_TYPE

    per_scene = TILES_PER_SIDE * TILES_PER_SIDE
    n_places = max(1, n_tiles // (per_scene * revisits))
    objects_type = pa.list_(pa.struct([("class", pa.string()), ("label_id", pa.string())]))
    schema = pa.schema(
        [
            ("tile_id", pa.string()),
            ("scene_id", pa.string()),
            ("region", pa.string()),
            ("footprint", pa.binary()),
            ("crs", pa.string()),
            ("objects", objects_type),
        ]
    )
    if full:  # the tiles table's object type (the card draws the boxes), and the PNGs
        schema = pa.schema(
            [f if f.name != "objects" else pa.field("objects", pa.list_(OBJECT_TYPE)) for f in schema]
        )
        schema = (
            schema.append(pa.field("gsd_m", pa.float64()))
            .append(pa.field("width", pa.int32()))
            .append(pa.field("sar_png", pa.binary()))
            .append(pa.field("landcover", pa.map_(pa.string(), pa.float32())))
            .append(pa.field("optical_png", pa.binary()))
        )
        png = tiny_png()
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
                xs = np.concatenate(
                    [
                        left + t * TILE_M,
                        np.full(8, left + TILE_M),
                        left + TILE_M - t * TILE_M,
                        np.full(8, left),
                    ]
                )
                ys = np.concatenate(
                    [np.full(8, top), top - t * TILE_M, np.full(8, top - TILE_M), top - TILE_M + t * TILE_M]
                )
                lon, lat = to_geo.transform(xs, ys)
                ring = list(zip(lon, lat)) + [(lon[0], lat[0])]  # 33 vertices, as the tile stage's footprints
                labels = {f"p{place}/b{r}_{c}_{k}" for k in range(6)}  # buildings of this tile
                # objects across its left and right edges
                labels |= {f"p{place}/e{r}_{c + d}" for d in (0, 1)}
                labels |= {f"p{place}/s{r + d}_{c}" for d in (0, 1)}  # and across its top and bottom edges
                labels.add(f"p{place}/road{r}")  # a road along the whole row: long (16 tiles, 20 km)
                rows.append(
                    (
                        r,
                        c,
                        shapely.to_wkb(shapely.Polygon(ring)),
                        [
                            {"class": "road" if "road" in i else "building", "label_id": i}
                            for i in sorted(labels)
                        ],
                    )
                )
        for visit in range(revisits):
            scene = f"s1_p{place:06d}_v{visit:02d}"
            tiles = [
                {
                    "tile_id": f"{scene}_10m_r{r:04d}_c{c:04d}",
                    "scene_id": scene,
                    "region": f"place{place}",
                    "footprint": wkb,
                    "crs": crs,
                    "objects": objs,
                }
                for r, c, wkb, objs in rows
            ]
            if full:
                for t in tiles:
                    t.update(
                        gsd_m=10.0,
                        width=128,
                        sar_png=png,
                        optical_png=png,
                        landcover=[("built-up", 0.4), ("grassland", 0.6)],
                        objects=[
                            {
                                **o,
                                "bbox_xyxy": [1.0, 1.0, 5.0, 5.0],
                                "polygon": None,
                                "area_px": 16.0,
                                "angle_deg": 0.0,
                                "visible_fraction": 1.0,
                            }
                            for o in t["objects"]
                        ],
                    )
            for stage in ("align", "annotate"):
                (run_dir / stage / "shards" / scene).mkdir(parents=True, exist_ok=True)
            pq.write_table(
                pa.Table.from_pylist(tiles, schema=schema),
                run_dir / "align" / "shards" / scene / "10m-00000.parquet",
            )
            ann = (
                pa.Table.from_pylist(
                    [p for t in tiles for p in pairs_of(t["tile_id"], scene, t["objects"])],
                    schema=ANNOTATION_SCHEMA,
                )
                if full
                else pa.table({"tile_id": [t["tile_id"] for t in tiles], "qc_passed": [True] * len(tiles)})
            )
            pq.write_table(ann, run_dir / "annotate" / "shards" / scene / "10m-00000.parquet")
            written += len(tiles)
    return written


def measure(run_dir: Path, planner: str) -> dict:
    from sarlang_ray import export
    from sarlang_ray.config import load_config

    cfg = load_config(
        str(REPO / "workflows" / "demo.yaml"), [f"run.run_dir={run_dir}", f"export.planner={planner}"]
    )
    if planner == "workers":
        import ray

        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
        )
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    items, counts = export.plan(cfg)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "planner": planner,
        "tiles": counts["planned"],
        "written": counts["written"],
        "work_items": len(items),
        "leak_free": counts["leakage"]["leak_free"],
        "clipped_objects": counts["leakage"]["clipped_objects"],
        "blocks": counts["leakage"].get("blocks"),
        "seconds": round(seconds, 2),
        "us_per_tile": round(1e6 * seconds / max(1, counts["planned"]), 1),
        "peak_rss_mb": round(peak / 1024, 1),
        "peak_rss_growth_mb": round((peak - rss0) / 1024, 1),
    }


def measure_export(run_dir: Path, shard_records: int) -> dict:
    """The whole export stage's work (``stages.export._body``: split planning on the workers, leakage report,
    every tiles shard exported by the actor pool, the assembly of the LLaMA-Factory / SARLANG-1M JSON and CSV
    and Parquet files (numbered shards by Ray tasks above ``shard_records``), manifest, dataset_info, card) on
    the full synthetic shards: the driver's peak memory and time per tile, planning's share of the time."""
    import ray

    from sarlang_ray import export
    from sarlang_ray.config import load_config
    from sarlang_ray.stages import export as export_stage

    cfg = load_config(
        str(REPO / "workflows" / "demo.yaml"),
        [f"run.run_dir={run_dir}", "export.planner=workers", f"export.shard_records={shard_records}"],
    )
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    planned, plan = {}, export.plan

    def timed_plan(c):
        t = time.perf_counter()
        items, counts = plan(c)
        planned.update(seconds=time.perf_counter() - t, counts=counts)
        return items, counts

    export.plan = timed_plan
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    counts = export_stage._body(cfg)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = run_dir / "export"
    manifest = json.loads((out / "manifest.json").read_text())
    files = [f for entry in manifest["files"].values() for f in entry.get("files", [])]
    leakage = json.loads((out / "leakage.json").read_text())
    n = planned["counts"]["planned"]
    return {
        "planner": "workers",
        "stage": "export (plan + leakage + shards + assembly)",
        "tiles": n,
        "written": counts["written"],
        "pairs": sum(v["pairs"] for v in counts["splits"].values()),
        "shards": counts["shards"],
        "shard_records": shard_records,
        "sharded_files": sorted(k for k, v in manifest["files"].items() if v.get("sharded")),
        "assembled_files": len(files),
        "png_prefixes": len({p.parent for p in (out / "sarlang1m" / "SAR_images").rglob("*.png")}),
        "leak_free": leakage["leak_free"],
        "blocks": leakage.get("blocks"),
        "seconds": round(seconds, 2),
        "plan_seconds": round(planned["seconds"], 2),
        "us_per_tile": round(1e6 * seconds / max(1, n), 1),
        "peak_rss_mb": round(peak / 1024, 1),
        "peak_rss_growth_mb": round((peak - rss0) / 1024, 1),
    }


def ratios_of(runs: list[dict]) -> dict:
    """Largest vs smallest run of each (stage, planner, revisits, code): peak RSS, its growth, time per
    tile."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(
            (r.get("stage", "plan"), r["planner"], r["revisits"], r.get("code", "")), []
        ).append(r)
    out = {}
    for (stage, planner, revisits, code), mine in groups.items():
        mine = sorted(mine, key=lambda r: r["tiles"])
        if len(mine) > 1:
            name = f"{stage}, {planner}, {revisits} revisits: {mine[-1]['tiles']} vs {mine[0]['tiles']} tiles"
            out[name + (f" ({code})" if code else "")] = {
                "peak_rss": round(mine[-1]["peak_rss_mb"] / mine[0]["peak_rss_mb"], 2),
                "peak_rss_growth": round(
                    mine[-1]["peak_rss_growth_mb"] / max(0.1, mine[0]["peak_rss_growth_mb"]), 2
                ),
                "us_per_tile": round(mine[-1]["us_per_tile"] / mine[0]["us_per_tile"], 2),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--revisits", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--planners", nargs="+", default=["workers", "driver"])
    parser.add_argument(
        "--driver-max", type=int, default=100_000, help="largest size the driver's planner runs at"
    )
    parser.add_argument(
        "--export", action="store_true", help="the whole export stage (assembly included), workers' planner"
    )
    parser.add_argument(
        "--shard-records", type=int, default=100_000, help="export.shard_records of --export runs"
    )
    parser.add_argument(
        "--code",
        default="",
        help="what code the rows ran (kept with them; rows of the same "
        "stage, planner, revisits, size and code replace earlier ones in the results file)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the generated shards in benchmarks/work/ and "
        "reuse those of an earlier --keep run of the same size (generating 1M tiles takes ~10 min)",
    )
    parser.add_argument(
        "--add",
        help="a file of rows (JSON lines) printed by --measure runs started by hand, with "
        "their revisits and generated counts: merged into the results like the rows of a run",
    )
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--planner", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.measure:
        row = (
            measure_export(Path(ns.measure), ns.shard_records)
            if ns.export
            else measure(Path(ns.measure), ns.planner)
        )
        print(json.dumps(row))
        return
    if ns.add:
        save(
            [
                {**json.loads(line), **({"code": ns.code} if ns.code else {})}
                for line in Path(ns.add).read_text().splitlines()
                if line.strip()
            ]
        )
        return
    runs = []
    for revisits in ns.revisits:
        for n in ns.sizes:
            run_dir = WORK / f"n{n}-r{revisits}{'-full' if ns.export else ''}" / "run"
            stamp = run_dir.parent / "generated.json"
            if ns.keep and stamp.exists():
                made = json.loads(stamp.read_text())["generated"]
                shutil.rmtree(run_dir / "export", ignore_errors=True)  # an earlier measurement's
            else:
                shutil.rmtree(run_dir.parent, ignore_errors=True)
                t0 = time.perf_counter()
                made = generate(run_dir, n, revisits, full=ns.export)
                print(
                    f"generated {made} tiles ({revisits} revisits) in {time.perf_counter() - t0:.0f} s",
                    flush=True,
                )
                stamp.write_text(json.dumps({"generated": made}))
            for planner in ["workers"] if ns.export else ns.planners:
                if planner == "driver" and n > ns.driver_max:
                    continue
                args = ["--export", "--shard-records", str(ns.shard_records)] if ns.export else []
                done = subprocess.run(
                    [sys.executable, __file__, "--measure", str(run_dir), "--planner", planner, *args],
                    capture_output=True,
                    text=True,
                    check=False,
                    env={**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"},
                )
                # one failed measurement (say Ray not starting on a loaded machine) loses no other
                if done.returncode:
                    print(
                        f"{n} tiles, {revisits} revisits, {planner}: failed\n{done.stderr[-3000:]}",
                        flush=True,
                    )
                    continue
                row = {
                    "revisits": revisits,
                    "generated": made,
                    **json.loads(done.stdout.strip().splitlines()[-1]),
                }
                runs.append({**row, "code": ns.code} if ns.code else row)
                print(runs[-1], flush=True)
                save(runs[-1:])  # each row as it comes
                shutil.rmtree(run_dir / "export", ignore_errors=True)
            if not ns.keep:
                shutil.rmtree(run_dir.parent, ignore_errors=True)
    print(json.dumps(json.loads(RESULT.read_text())["largest_vs_smallest"], indent=2))


def save(runs: list[dict]) -> None:
    """Merge rows into the results file (a row replaces one of the same stage, planner, revisits, size and
    code) and recompute the largest-vs-smallest ratios."""
    old = json.loads(RESULT.read_text()) if RESULT.exists() else {}

    def same(r):
        return (r.get("stage", "plan"), r["planner"], r["revisits"], r["generated"], r.get("code", ""))

    mine = {same(r) for r in runs}
    runs = [r for r in old.get("runs", []) if same(r) not in mine] + runs
    result = {
        **old,
        "benchmark": "export planning (geographic splits + leakage report; planner on the workers vs in "
        "the driver) and the whole export stage (planning + leakage + shards + assembly, rows with a stage)",
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, shared with other jobs)",
        "runs": runs,
        "largest_vs_smallest": {**old.get("largest_vs_smallest", {}), **ratios_of(runs)},
    }
    RESULT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
