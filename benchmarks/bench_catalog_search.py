"""catalog.search over stac-geoparquet snapshots of 10k, 100k and 1M items, and over a STAC API (rustac's
server) of 2k and 20k items: time and driver peak memory.

    python benchmarks/bench_catalog_search.py [--sizes 10000 100000 1000000] [--api-sizes 2000 20000]
        [--only snapshot|api] [--out benchmarks/results/catalog_search.json]

API: ``rustac serve`` (tests/stac_server.py) over an ItemCollection of Sentinel-1-GRD-like items (VV and VH
assets, the properties a Planetary Computer item has, ~2.5 KB of JSON each), searched whole in pages of
API_PAGE; the frozen snapshot is written page by page (search.freeze). Its baseline, in the same run: the
former path, every item that passes kept in a list and converted at the end. ``--only`` runs one part and
keeps the other's results from the existing output file.

Each snapshot is generated (tests/stac_snapshots.py: Sentinel-1-like items over Europe through 2024, one
folder per month, row groups of 10,000 items sorted by latitude). The selection is one month (March) and an
AOI around (6 E, 52 N) sized per snapshot so that every size selects about the same number of items: the
driver's memory must follow the selection, not the snapshot.

Each measurement runs in a fresh process that imports everything first, then runs the search; the peak RSS
(``VmHWM``) after the imports and at the end give the search's own peak. The baseline, in the same run:
reading the whole snapshot with ``pyarrow.parquet.read_table`` and filtering it in memory, what a reader
without pushdown does.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 250  # items selected at every size
API_PAGE = 250  # items per page of the API search
AREA = 40.0 * 35.0  # deg^2 of the item centres (tests/stac_snapshots.EUROPE)
SIDE = 2.0  # item side, degrees

CHILD = r"""
import json, sys, time
sys.path[:0] = [{repo!r}, {tests!r}]
import pyarrow as pa, pyarrow.compute as pc, pyarrow.dataset as ds, pyarrow.parquet as pq
import shapely, stac_geoparquet.arrow
from sarlang_ray import search
from sarlang_ray.config import SearchSection
mode, folder, bbox, run_dir = {mode!r}, {folder!r}, {bbox!r}, {run_dir!r}
when = ("2024-03-01T00:00:00Z", "2024-03-31T23:59:59.999999Z")
def hwm():  # peak RSS of this process image in KiB (VmHWM: unlike ru_maxrss, not inherited from the parent)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
base = hwm()
t0 = time.perf_counter()
if mode == "api":
    uri, counts = search.freeze(SearchSection(source=folder, page_size={page}), run_dir)
    n = counts["items"]
    extra = {{"pages": counts["pages"]}}
elif mode == "api_whole":  # the former API path: every passing item in a list, converted at the end
    q = SearchSection(source=folder, page_size={page})
    stats = {{}}
    found = [it for it in search.api_items(q, None, stats) if search._keep(it, q, None, None, None)]
    table = stac_geoparquet.arrow.parse_stac_items_to_arrow(found).read_all()
    pq.write_table(table, run_dir + ".parquet")
    n = len(found)
    extra = {{"pages": stats["pages"]}}
elif mode == "search":
    uri, counts = search.freeze(SearchSection(source=folder, bbox=bbox, datetime="/".join(when)), run_dir)
    n = counts["items"]
    extra = {{k: counts[k] for k in ("files", "files_read", "row_groups", "row_groups_read")}}
else:  # the whole snapshot in memory, then filtered
    table = pq.read_table(folder, partitioning=None)
    w, s, e, nn = bbox
    b = table.column("bbox").combine_chunks()
    keep = pc.and_(pc.and_(pc.less_equal(b.field("xmin"), e), pc.greater_equal(b.field("xmax"), w)),
                   pc.and_(pc.less_equal(b.field("ymin"), nn), pc.greater_equal(b.field("ymax"), s)))
    t = table.column("datetime")
    first, last = (
        pa.scalar(pa.scalar(d[:-1]).cast(pa.timestamp("us")).value, pa.timestamp("us", tz="UTC"))
        for d in when
    )
    keep = pc.and_(keep, pc.and_(pc.greater_equal(t, first), pc.less_equal(t, last)))
    sel = table.filter(keep)
    n = len(list(stac_geoparquet.arrow.stac_table_to_items(sel)))
    extra = {{}}
seconds = time.perf_counter() - t0
peak = hwm()
print(json.dumps({{"selected": n, "seconds": round(seconds, 3), "peak_rss_mib": round(peak / 1024, 1),
                  "peak_above_imports_mib": round((peak - base) / 1024, 1), **extra}}))
"""


def aoi_for(n: int) -> list[float]:
    """A square AOI at (6 E, 52 N) that one month of an ``n``-item snapshot meets about TARGET items with."""
    density = n / 12 / AREA  # items per deg^2 per month
    side = max(0.01, math.sqrt(TARGET / density) - SIDE)
    return [6.0 - side / 2, 52.0 - side / 2, 6.0 + side / 2, 52.0 + side / 2]


def measure(mode: str, folder, bbox, run_dir: Path) -> dict:
    code = CHILD.format(
        repo=str(REPO),
        tests=str(REPO / "tests"),
        mode=mode,
        folder=str(folder),
        bbox=bbox,
        run_dir=str(run_dir),
        page=API_PAGE,
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def api_items(n: int, seed: int = 0) -> list[dict]:
    """``n`` Sentinel-1 GRD-like STAC items over Europe through 2024 (the properties and assets a Planetary
    Computer ``sentinel-1-grd`` item carries, hrefs to blob URLs)."""
    import datetime as dt
    import random

    rng = random.Random(seed)
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    out = []
    for i in range(n):
        x, y = rng.uniform(-10, 30), rng.uniform(35, 70)
        ring = [[x, y], [x + SIDE, y + 0.2], [x + SIDE - 0.3, y + SIDE], [x - 0.3, y + SIDE - 0.2], [x, y]]
        when = t0 + dt.timedelta(seconds=rng.uniform(0, 366 * 86400))
        name = f"S1A_IW_GRDH_1SDV_{when:%Y%m%dT%H%M%S}_{i:06d}"
        base = f"https://sentinel1euwest.blob.core.windows.net/s1-grd/GRD/{when:%Y/%m/%d}/IW/DV/{name}"
        assets = {
            pol: {
                "href": f"{base}/measurement/iw-{pol}.tiff",
                "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                "title": f"{pol.upper()}: vertical transmit",
                "roles": ["data"],
            }
            for pol in ("vv", "vh")
        }
        assets["safe-manifest"] = {
            "href": f"{base}/manifest.safe",
            "type": "application/xml",
            "roles": ["metadata"],
        }
        out.append(
            {
                "type": "Feature",
                "stac_version": "1.0.0",
                "id": name,
                "collection": "sentinel-1-grd",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "bbox": [x - 0.3, y, x + SIDE, y + SIDE],
                "links": [],
                "assets": assets,
                "stac_extensions": [
                    "https://stac-extensions.github.io/sar/v1.0.0/schema.json",
                    "https://stac-extensions.github.io/sat/v1.0.0/schema.json",
                ],
                "properties": {
                    "datetime": when.isoformat().replace("+00:00", "Z"),
                    "platform": "SENTINEL-1A",
                    "constellation": "Sentinel-1",
                    "sar:instrument_mode": "IW",
                    "sar:polarizations": ["VV", "VH"],
                    "sar:frequency_band": "C",
                    "sar:center_frequency": 5.405,
                    "sar:product_type": "GRD",
                    "sar:resolution_range": 20,
                    "sar:resolution_azimuth": 22,
                    "sar:pixel_spacing_range": 10,
                    "sar:pixel_spacing_azimuth": 10,
                    "sar:looks_range": 5,
                    "sar:looks_azimuth": 1,
                    "sar:looks_equivalent_number": 4.4,
                    "sat:orbit_state": rng.choice(["ascending", "descending"]),
                    "sat:absolute_orbit": 50000 + i % 9000,
                    "sat:relative_orbit": 1 + i % 175,
                    "s1:datatake_id": str(300000 + i),
                    "s1:product_timeliness": "Fast-24h",
                    "s1:processing_level": "1",
                    "s1:resolution": "high",
                    "s1:instrument_configuration_ID": "7",
                    "s1:total_slices": "20",
                    "s1:slice_number": str(1 + i % 20),
                    "s1:orbit_source": "RESORB",
                    "s1:shape": [25000, 16000],
                    "s1:product_identifier": name,
                    "s1:processing_datetime": when.isoformat().replace("+00:00", "Z"),
                },
            }
        )
    return out


def run_api(sizes: list[int], tmp: str) -> list[dict]:
    from stac_server import RustacServer

    rows = []
    for n in sizes:
        path = Path(tmp) / f"api{n}.json"
        items = api_items(n)
        path.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
        del items
        server = RustacServer(path, Path(tmp) / f"rustac{n}.log").start()
        try:
            found = measure("api", server.url, None, Path(tmp) / f"apirun{n}")
            whole = measure("api_whole", server.url, None, Path(tmp) / f"apiwhole{n}")
        finally:
            server.stop()
        assert found["selected"] == whole["selected"] == n, (found, whole)
        rows.append(
            {
                "items": n,
                "itemcollection_mib": round(path.stat().st_size / 2**20, 1),
                "page_size": API_PAGE,
                "search": found,
                "baseline_whole_list": whole,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--api-sizes", type=int, nargs="+", default=[2_000, 20_000])
    parser.add_argument("--only", choices=["snapshot", "api"])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "catalog_search.json"))
    args = parser.parse_args()
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from stac_snapshots import write_snapshot

    old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    result = dict(old)
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "api":
            rows = []
            for n in args.sizes:
                folder = Path(tmp) / f"snap{n}"
                t0 = time.perf_counter()
                write_snapshot(folder, n)
                made = time.perf_counter() - t0
                bbox = aoi_for(n)
                size = sum(p.stat().st_size for p in folder.rglob("*.parquet"))
                found = measure("search", folder, bbox, Path(tmp) / f"run{n}")
                whole = measure("read_whole", folder, bbox, Path(tmp) / f"whole{n}")
                assert found["selected"] == whole["selected"], (found, whole)
                rows.append(
                    {
                        "items": n,
                        "snapshot_mib": round(size / 2**20, 1),
                        "generate_s": round(made, 1),
                        "aoi": [round(v, 3) for v in bbox],
                        "search": found,
                        "baseline_read_whole": whole,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            small, big = rows[0], rows[-1]
            result.update(
                {
                    "benchmark": "catalog.search over a partitioned stac-geoparquet snapshot (AOI + one "
                    "month)",
                    "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
                    "rows": rows,
                    "peak_ratio_largest_vs_smallest": round(
                        big["search"]["peak_rss_mib"] / small["search"]["peak_rss_mib"], 3
                    ),
                    "baseline_peak_ratio_largest_vs_smallest": round(
                        big["baseline_read_whole"]["peak_rss_mib"]
                        / small["baseline_read_whole"]["peak_rss_mib"],
                        3,
                    ),
                }
            )
        if args.only != "snapshot":
            api = run_api(args.api_sizes, tmp)
            small, big = api[0], api[-1]
            result.update(
                {
                    "api_benchmark": "catalog.search of a whole STAC API collection (rustac serve), frozen "
                    "page by page",
                    "api_rows": api,
                    "api_peak_above_imports_ratio_largest_vs_smallest": round(
                        big["search"]["peak_above_imports_mib"]
                        / max(0.1, small["search"]["peak_above_imports_mib"]),
                        2,
                    ),
                    "api_peak_ratio_largest_vs_smallest": round(
                        big["search"]["peak_rss_mib"] / small["search"]["peak_rss_mib"], 3
                    ),
                    "api_baseline_peak_ratio_largest_vs_smallest": round(
                        big["baseline_whole_list"]["peak_rss_mib"]
                        / small["baseline_whole_list"]["peak_rss_mib"],
                        3,
                    ),
                }
            )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("rows")}, indent=2))


if __name__ == "__main__":
    main()
