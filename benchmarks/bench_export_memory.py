"""Driver memory of the export stage at 1x and 4x the sample archive: the old serial exporter vs the Ray one.

    .venv/bin/python benchmarks/bench_export_memory.py        # writes benchmarks/results/export_memory.json

The old exporter (``git show <rev>:sarlang_ray/export.py``, loaded as a module of its own) ran every shard in
the driver and kept every LLaMA-Factory record and caption row in memory until the end; the new one exports
each shard on a Ray actor and streams the JSON/CSV files together from per-shard parts. For each archive size
and exporter, a fresh driver process runs the export body alone and reports its peak RSS
(``resource.getrusage``: the high-water mark of the whole process, Arrow buffers included), the RSS it had
before the body (imports done; for the new exporter, Ray started), and, in a second run, the peak of Python
allocations during the body (``tracemalloc``, which slows the body, so its time is not reported).

The 4x archive is the 1x run's align and annotate shards replicated under new scene folders, with new tile,
pair and label ids and footprints moved 0.2 degrees east per copy, so the geographic split sees four times as
many places, not four copies of one. The 1x run (synth -> annotate of workflows/demo.yaml) is made once under
benchmarks/work/export-memory/ (``--base RUN_DIR`` reuses one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import shapely

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work" / "export-memory"
sys.path.insert(0, str(REPO))

from sarlang_ray import io

SHIFT_DEG = 0.2  # east per copy: far more than the 2 km split blocks, so each copy is a place of its own

CHILD = r"""
import json, os, resource, sys, time
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
exporter, run_dir, old_source, trace = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
import importlib.util, shutil, tracemalloc
from sarlang_ray.config import load_config
cfg = load_config(os.path.join(os.getcwd(), "workflows", "demo.yaml"),
                  [f"run.run_dir={run_dir}", "ray.progress=false", "run.force=true"])
if exporter == "old":
    spec = importlib.util.spec_from_file_location("old_export", old_source)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    shutil.rmtree(os.path.join(run_dir, "export"), ignore_errors=True)
    body = old.run_export
else:
    from sarlang_ray.stages import export as stage
    from sarlang_ray.stages.cluster import ensure_ray
    ensure_ray(cfg)  # Ray's own driver state is counted in the RSS before the body
    body = stage.STAGE.run  # run.force=true: clears export/ first, like the old one's rmtree
from sarlang_ray import plots
plots.pyplot()  # both draw the card: import matplotlib before measuring
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
before = rss_mib()
if trace:
    tracemalloc.start()
t0 = time.time()
counts = body(cfg)
seconds = time.time() - t0
py_peak = tracemalloc.get_traced_memory()[1] / 2**20 if trace else None
print(json.dumps({"seconds": round(seconds, 2), "rss_before_mib": round(before, 1),
                  "rss_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "python_peak_mib": None if py_peak is None else round(py_peak, 1),
                  "pairs": sum(s["pairs"] for s in counts["splits"].values()), "tiles": counts["written"]}))
"""


def base_run(base: str | None) -> Path:
    """The 1x run folder (synth -> annotate of the demo), made once."""
    if base:
        return Path(base)
    run = WORK / "x1"
    if not (run / "annotate" / "_SUCCESS.json").exists():
        subprocess.run(
            [
                str(Path(sys.executable).parent / "sarlang"),
                "run",
                str(REPO / "workflows" / "demo.yaml"),
                f"run.run_dir={run}",
                f"synth.out_dir={WORK / 'archive'}",
                "ray.progress=false",
                "run.stages=[synth,catalog,tile,align,annotate]",
            ],
            check=True,
            cwd=REPO,
        )
    return run


def _copy_table(table: pa.Table, copy: int) -> pa.Table:
    """A shard as copy ``copy``: new tile, pair and label ids, footprints moved east."""
    rows = table.to_pylist()
    for r in rows:
        r["tile_id"] = f"{r['tile_id']}-r{copy}"
        if "pair_id" in r:
            r["pair_id"] = f"{r['pair_id']}-r{copy}"
        if r.get("footprint") is not None:
            moved = shapely.transform(
                shapely.from_wkb(r["footprint"]), lambda xy: xy + [SHIFT_DEG * copy, 0.0]
            )
            r["footprint"] = shapely.to_wkb(moved)
        for o in r.get("objects") or []:
            if o["label_id"]:
                o["label_id"] = f"{o['label_id']}-r{copy}"
    return pa.Table.from_pylist(rows, schema=table.schema)


def replicate(src: Path, factor: int) -> Path:
    """A run folder with ``factor`` copies of ``src``'s align and annotate shards (plus what the card
    reads)."""
    dst = WORK / f"x{factor}"
    if (dst / "annotate" / "_SUCCESS.json").exists():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    for stage in ("align", "annotate"):
        root = src / stage / "shards"
        for shard in sorted(root.glob("*/*.parquet")):
            table = io.read_parquet(str(shard))
            for copy in range(factor):
                scene = shard.parent.name if copy == 0 else f"{shard.parent.name}-r{copy}"
                out = dst / stage / "shards" / scene / shard.name
                out.parent.mkdir(parents=True, exist_ok=True)
                if copy == 0:
                    shutil.copy(shard, out)
                else:
                    io.write_parquet_atomic(str(out), _copy_table(table, copy))
    shutil.copytree(src / "catalog", dst / "catalog")
    shutil.copy(src / "annotate" / "qc_report.json", dst / "annotate" / "qc_report.json")
    shutil.copy(src / "annotate" / "_SUCCESS.json", dst / "annotate" / "_SUCCESS.json")  # the last: complete
    return dst


def measure(exporter: str, run: Path, old_source: Path, trace: bool) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, exporter, str(run), str(old_source), "1" if trace else "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"{exporter} export of {run} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--base", help="an existing run folder with align and annotate (default: make one)")
    parser.add_argument("--old-rev", default="HEAD", help="git revision of the serial exporter")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "export_memory.json"))
    args = parser.parse_args()

    WORK.mkdir(parents=True, exist_ok=True)
    old_source = WORK / "old_export.py"
    old_source.write_text(
        subprocess.run(
            ["git", "show", f"{args.old_rev}:sarlang_ray/export.py"],
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    base = base_run(args.base)
    points = []
    for scale in args.scales:
        run = base if scale == 1 else replicate(base, scale)
        for exporter in ("old", "new"):
            plain, traced = (
                measure(exporter, run, old_source, False),
                measure(exporter, run, old_source, True),
            )
            point = {
                "scale": scale,
                "exporter": exporter,
                **plain,
                "python_peak_mib": traced["python_peak_mib"],
                "rss_growth_mib": round(plain["rss_peak_mib"] - plain["rss_before_mib"], 1),
            }
            print(json.dumps(point), flush=True)
            points.append(point)
    by = {(p["scale"], p["exporter"]): p for p in points}
    top = max(args.scales)
    ratios = (
        {
            e: {
                "rss_peak": round(by[(top, e)]["rss_peak_mib"] / by[(1, e)]["rss_peak_mib"], 3),
                "python_peak": round(by[(top, e)]["python_peak_mib"] / by[(1, e)]["python_peak_mib"], 3),
                "pairs": round(by[(top, e)]["pairs"] / by[(1, e)]["pairs"], 2),
            }
            for e in ("old", "new")
        }
        if 1 in args.scales and top > 1
        else {}
    )
    result = {
        "benchmark": "export stage: driver peak memory, old serial exporter vs Ray workers",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
        "old_exporter": f"git {args.old_rev}:sarlang_ray/export.py",
        "points": points,
        f"ratio_{top}x_over_1x": ratios,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
