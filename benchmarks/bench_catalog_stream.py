"""The streaming catalog at 10,000 and 100,000 scenes (catalog.search's snapshot): time and driver peak
memory.

    python benchmarks/bench_catalog_stream.py [--sizes 10000 100000] [--baseline-size 10000]
        [--out benchmarks/results/catalog_stream.json]

Each size is a stac-geoparquet snapshot of N items, each naming its own file: a symbolic link to one of the 30
real OPERA RTC-S1 VV crops of ../shared/data/real_sar (100 x 100 px COGs), so every scene is really opened,
checked and read by the catalog. The catalog stage runs in a fresh process (its own local Ray, 2 CPUs); the
driver's peak RSS is its VmHWM at the end (the Ray workers are other processes), the time is the stage's.
Also, in the same run, at ``--baseline-size``: the same items as one ItemCollection JSON through
``catalog.archive``, which streams too since the catalog has one code path (parsed item by item with ijson);
before, that was the whole listing held in the driver (506 MiB at 10k, results of an earlier run in the docs).

``--driver-only``: the same driver (listing, pages through the object store, Ray tasks, merge of the parts,
duplicate check) at the same sizes, but each task writes a copy of one really inspected page (scene ids made
unique) instead of inspecting its rasters: the driver's memory at a size the 2 shared cores of this machine
cannot inspect in the time there is. A measurement of the driver, not of the catalog (rows ``driver_only``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL_SAR = REPO.parent / "shared" / "data" / "real_sar"

CHILD = r"""
import json, sys, time
sys.path[:0] = [{repo!r}]
from sarlang_ray import pipeline
from sarlang_ray.config import load_config
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
cfg = load_config(None, {overrides!r})
TEMPLATE = {template!r}
if TEMPLATE:  # --driver-only: each task writes a copy of one really inspected page
    import pyarrow as pa
    import ray
    from sarlang_ray import catalog, io
    from sarlang_ray.errors import errors_table

    def copy_page(cfg, run_dir, index, page):
        rows, listing_errors = page
        table = io.read_parquet(TEMPLATE).slice(0, len(rows))
        table = table.set_column(table.schema.get_field_index("scene_id"), "scene_id",
                                 pa.array([f"p{{index}}-{{i}}" for i in range(table.num_rows)]))
        parts = io.join(run_dir, "catalog", "parts")
        io.write_parquet_atomic(io.join(parts, f"scenes-{{index:06d}}.parquet"), table)
        io.write_parquet_atomic(io.join(parts, f"errors-{{index:06d}}.parquet"), errors_table(listing_errors))
        return {{"planned": len(rows) + len(listing_errors), "written": table.num_rows,
                "rejected": len(listing_errors), "reasons": {{}}, "companions": {{}}, "proj_mismatches": 0,
                "relief_flagged": 0, "node": ray.get_runtime_context().get_node_id()}}

    catalog.inspect_page = copy_page
t0 = time.perf_counter()
summary = pipeline.run(cfg)
seconds = time.perf_counter() - t0
c = summary["stages"]["catalog"]
print(json.dumps({{"seconds": round(seconds, 1), "stage_seconds": c.get("seconds"), "written": c["written"],
                  "rejected": c["rejected"], "pages": c.get("pages"),
                  "driver_peak_rss_mib": round(hwm() / 1024, 1)}}))
"""


def make_items(folder: Path, n: int) -> list[dict]:
    vv = sorted((REAL_SAR / "opera_rtc_s1_t137_crops").glob("*/*_VV.tif"))
    links = folder / "rasters"
    links.mkdir(parents=True)
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    items = []
    for i in range(n):
        link = links / f"s{i:07d}_VV.tif"
        os.symlink(vv[i % len(vv)], link)
        x, y = (i % 400) * 0.1 - 10, 35 + (i // 400) * 0.1
        geom = {
            "type": "Polygon",
            "coordinates": [[[x, y], [x + 0.1, y], [x + 0.1, y + 0.1], [x, y + 0.1], [x, y]]],
        }
        items.append(
            {
                "type": "Feature",
                "stac_version": "1.0.0",
                "id": f"S1_{i:07d}",
                "collection": "bench",
                "geometry": geom,
                "bbox": [x, y, x + 0.1, y + 0.1],
                "links": [],
                "stac_extensions": [],
                "assets": {
                    "vv": {"href": str(link), "type": "image/tiff; application=geotiff", "roles": ["data"]}
                },
                "properties": {
                    "datetime": (t0 + dt.timedelta(minutes=i)).isoformat(),
                    "platform": "sentinel-1a",
                    "sar:polarizations": ["VV"],
                },
            }
        )
    return items


def make_template(folder: Path, out: str) -> None:
    """One page of the snapshot really inspected (catalog.SceneInspector) and written as a scenes part."""
    sys.path[:0] = [str(REPO)]
    from sarlang_ray import catalog
    from sarlang_ray.config import load_config

    cfg = load_config(None, [f"catalog.archive={folder}"]).catalog
    rows = []
    for page, _ in catalog.listing_pages(cfg, str(folder / "items.parquet"), 64):
        rows += page
        if len(rows) >= 64:
            break
    inspector = catalog.SceneInspector(cfg)
    scenes = [r["scene"] for r in map(inspector, rows[:64]) if r["scene"]]
    scenes, _, _ = catalog.assign_companions(scenes, cfg, str(folder / "vrt"))
    catalog.write_scenes(out, scenes)


def run_stage(overrides: list[str], template: str | None = None) -> dict:
    code = CHILD.format(repo=str(REPO), overrides=overrides, template=template)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"the catalog run failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--baseline-size", type=int, default=10_000)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "catalog_stream.json"))
    parser.add_argument(
        "--driver-only", action="store_true", help="tasks copy one inspected page (see above)"
    )
    args = parser.parse_args()
    import stac_geoparquet.arrow

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted(set(args.sizes) | {args.baseline_size}):
            folder = Path(tmp) / f"n{n}"
            items = make_items(folder, n)
            # row groups of 10,000 items, as published snapshots have (a reader decodes a row group at a time)
            table = stac_geoparquet.arrow.parse_stac_items_to_arrow(items).read_all()
            stac_geoparquet.arrow.to_parquet(table.to_reader(max_chunksize=10_000), folder / "items.parquet")
            del table
            row: dict = {"scenes": n}
            if args.driver_only:
                template = str(folder / "template.parquet")
                make_template(folder, template)
                overrides = [
                    f"run.run_dir={folder / 'run'}",
                    f"catalog.archive={folder}",
                    "run.stages=[catalog]",
                    f"catalog.search.source={folder / 'items.parquet'}",
                    "ray.num_cpus=2",
                    "ray.progress=false",
                ]
                row["driver_only"] = run_stage(overrides, template)
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            if n == args.baseline_size:
                (folder / "items.json").write_text(
                    json.dumps({"type": "FeatureCollection", "features": items})
                )
            del items
            common = ["run.stages=[catalog]", "ray.num_cpus=2", "ray.progress=false"]
            if n in args.sizes:
                row["streaming"] = run_stage(
                    [
                        f"run.run_dir={folder / 'run'}",
                        f"catalog.archive={folder}",
                        f"catalog.search.source={folder / 'items.parquet'}",
                        *common,
                    ]
                )
            if n == args.baseline_size:
                row["item_collection"] = run_stage(
                    [
                        f"run.run_dir={folder / 'run_whole'}",
                        f"catalog.archive={folder / 'items.json'}",
                        *common,
                    ]
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
    kind = "driver_only" if args.driver_only else "streaming"
    streamed = [r for r in rows if kind in r]
    small, big = streamed[0], streamed[-1]
    result = {
        "benchmark": "catalog stage over a search snapshot, streaming (pages -> Ray tasks -> table parts)",
        "note": "run while other jobs shared the 2 cores: times are upper bounds, memory is the driver's own",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "rows": rows,
        "driver_peak_ratio_largest_vs_smallest": round(
            big[kind]["driver_peak_rss_mib"] / small[kind]["driver_peak_rss_mib"], 3
        ),
        "scenes_per_s_largest": round(big["scenes"] / big[kind]["stage_seconds"], 1),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
