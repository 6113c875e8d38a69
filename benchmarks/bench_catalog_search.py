"""catalog.search over stac-geoparquet snapshots of 10k, 100k and 1M items: time and driver peak memory.

    python benchmarks/bench_catalog_search.py [--sizes 10000 100000 1000000] [--out benchmarks/results/catalog_search.json]

Each snapshot is generated (tests/stac_snapshots.py: Sentinel-1-like items over Europe through 2024, one folder
per month, row groups of 10,000 items sorted by latitude). The selection is one month (March) and an AOI around
(6 E, 52 N) sized per snapshot so that every size selects about the same number of items: the driver's memory
must follow the selection, not the snapshot.

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
AREA = 40.0 * 35.0  # deg^2 of the item centres (tests/stac_snapshots.EUROPE)
SIDE = 2.0  # item side, degrees

CHILD = r"""
import json, sys, time
sys.path[:0] = [{repo!r}, {tests!r}]
import pyarrow as pa, pyarrow.compute as pc, pyarrow.dataset as ds, pyarrow.parquet as pq, shapely, stac_geoparquet.arrow
from sarlang_ray import search
from sarlang_ray.config import SearchSection
mode, folder, bbox, run_dir = {mode!r}, {folder!r}, {bbox!r}, {run_dir!r}
when = ("2024-03-01T00:00:00Z", "2024-03-31T23:59:59.999999Z")
def hwm():  # peak RSS of this process image in KiB (VmHWM: unlike ru_maxrss, not inherited from the parent)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
base = hwm()
t0 = time.perf_counter()
if mode == "search":
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
    keep = pc.and_(keep, pc.and_(pc.greater_equal(t, pa.scalar(pa.scalar(when[0][:-1]).cast(pa.timestamp("us")).value, pa.timestamp("us", tz="UTC"))),
                                 pc.less_equal(t, pa.scalar(pa.scalar(when[1][:-1]).cast(pa.timestamp("us")).value, pa.timestamp("us", tz="UTC")))))
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


def measure(mode: str, folder: Path, bbox: list[float], run_dir: Path) -> dict:
    code = CHILD.format(repo=str(REPO), tests=str(REPO / "tests"), mode=mode, folder=str(folder), bbox=bbox,
                        run_dir=str(run_dir))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "catalog_search.json"))
    args = parser.parse_args()
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from stac_snapshots import write_snapshot

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
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
            rows.append({"items": n, "snapshot_mib": round(size / 2**20, 1), "generate_s": round(made, 1),
                         "aoi": [round(v, 3) for v in bbox], "search": found, "baseline_read_whole": whole})
            print(json.dumps(rows[-1]), flush=True)
    small, big = rows[0], rows[-1]
    result = {
        "benchmark": "catalog.search over a partitioned stac-geoparquet snapshot (AOI + one month)",
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "rows": rows,
        "peak_ratio_largest_vs_smallest": round(big["search"]["peak_rss_mib"] / small["search"]["peak_rss_mib"], 3),
        "baseline_peak_ratio_largest_vs_smallest": round(
            big["baseline_read_whole"]["peak_rss_mib"] / small["baseline_read_whole"]["peak_rss_mib"], 3),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
