"""A global label layer of millions of features costs the align stage no more memory than the demo's labels.

    .venv/bin/python benchmarks/bench_labels.py            # writes benchmarks/results/labels_5m.json

The layer: ``--features`` (default 5,000,000) generated building footprints as a hive-partitioned
GeoParquet folder (``region=<i>/part.parquet``, a covering ``bbox`` column, row groups of 10,000 features
sorted by latitude), written chunk by chunk (``--chunk`` features at a time, so generating it needs the
memory of one chunk), plus the demo's own labels (``region=demo``) with OSM-style attributes
(``building=yes`` or ``kind=<class>``) mapped by ``catalog.labels_class_map``. One generated region is a
ring around each demo city, 0.2 to 0.5 degrees from its centre, so the footprint bounds of the demo's
scenes also meet files full of features that lie outside them (row-group pruning is what keeps those
out); the other regions are spread over the Americas.

The runs: ``catalog -> tile -> align`` of the demo, once with its labels (``catalog.labels_glob``, the
default) and once with the layer (``catalog.labels``), each in a fresh subprocess with its own local Ray.
Memory: the resident set size (RSS) and proportional set size (PSS: shared pages counted once) of that
subprocess and every process below it (GCS, raylet, its workers: all the Ray processes of that run),
summed and sampled every 0.25 s; the peak of the sum is reported. Results: every tile's objects (class,
pixel box, object id), land cover and optical twin must be equal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import PeakMemory, process_tree

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
CLASS_MAP = {
    "building": "building",
    "kind=ship": "ship",
    "kind=road": "road",
    "kind=harbour": "harbour",
    "kind=storage tank": "storage tank",
    "kind=aircraft": "aircraft",
    "kind=car": "car",
    "kind=bridge": "bridge",
}


def generate_layer(out: Path, archive: Path, features: int, chunk: int, seed: int = 0) -> dict:
    """Write the layer (see the module docstring); returns its size."""
    import geopandas as gpd
    import numpy as np
    import pandas as pd
    import shapely

    from sarlang_ray.synth import CITIES

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    n_chunks = -(-features // chunk)
    written = 0
    for i in range(n_chunks):
        n = min(chunk, features - written)
        if i == 0:  # rings around the demo cities: in the scenes' bounds' neighbourhood, never inside them
            city = rng.integers(0, len(CITIES), n)
            lon0 = np.array([c.lon for c in CITIES])[city]
            lat0 = np.array([c.lat for c in CITIES])[city]
            r, a = rng.uniform(0.2, 0.5, n), rng.uniform(0, 2 * np.pi, n)
            x, y = lon0 + r * np.cos(a), lat0 + r * np.sin(a)
        else:  # regions of 4 x 4 degrees over the Americas
            cx, cy = -120 + (i % 20) * 5.0, -40 + (i // 20) * 5.0
            x, y = cx + rng.uniform(0, 4, n), cy + rng.uniform(0, 4, n)
        w, h = rng.uniform(5e-5, 3e-4, n), rng.uniform(5e-5, 3e-4, n)
        order = np.lexsort((x, y))  # row groups of nearby features: their bbox statistics prune
        x, y, w, h = x[order], y[order], w[order], h[order]
        gdf = gpd.GeoDataFrame(
            {"building": np.full(n, "yes"), "object_id": [f"gen-{i}-{k}" for k in range(n)]},
            geometry=shapely.box(x, y, x + w, y + h),
            crs=4326,
        )
        (out / f"region={i:03d}").mkdir()
        gdf.to_parquet(
            out / f"region={i:03d}" / "part.parquet", write_covering_bbox=True, row_group_size=10_000
        )
        written += n
    demo = pd.concat(
        [gpd.read_parquet(p) for p in sorted((archive / "labels").glob("*.parquet"))], ignore_index=True
    )
    demo = gpd.GeoDataFrame(demo, crs=4326)
    demo["building"] = np.where(demo["class"] == "building", "yes", None)
    demo["kind"] = demo["class"]
    (out / "region=demo").mkdir()
    demo.drop(columns=["class", "city"]).to_parquet(
        out / "region=demo" / "part.parquet", write_covering_bbox=True, row_group_size=10_000
    )
    files = sorted(out.rglob("*.parquet"))
    return {
        "generated_features": written,
        "demo_features": len(demo),
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
    }


def start_ray(attempts: int = 12) -> None:
    """The local Ray the pipeline would start (runner.init_ray), retried: on a loaded machine Ray's fixed
    30 s node start-up limit can pass. The pipeline then uses it as it is, so the Ray Data settings it
    would have made are made here too."""
    import psutil
    import ray

    for attempt in range(attempts):
        try:
            ray.init(
                address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False
            )
            break
        except Exception:  # Ray raises a bare Exception for a start-up timeout
            ray.shutdown()
            for child in psutil.Process().children(recursive=True):  # what the failed start left running
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            if attempt == attempts - 1:
                raise
            time.sleep(10)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True


def run_variant(work: Path, variant: str, layer: Path | None, result: Path) -> None:
    """One catalog -> tile -> align run, memory sampled (called in a fresh subprocess)."""
    from sarlang_ray import pipeline
    from sarlang_ray.config import load_config

    overrides = [
        f"run.run_dir={work / ('run_' + variant)}",
        f"synth.out_dir={work / 'archive'}",
        f"catalog.archive={work / 'archive'}",
        "run.stages=[catalog,tile,align]",
        "ray.progress=false",
    ]
    if layer is not None:
        overrides += [
            f"catalog.labels={layer}",
            "catalog.labels_id_column=object_id",
            "catalog.labels_class_map=" + json.dumps(CLASS_MAP),
        ]
    cfg = load_config(str(REPO / "workflows" / "demo.yaml"), overrides)
    t0 = time.time()
    with PeakMemory(process_tree()) as mem:
        start_ray()
        summary = pipeline.run(cfg)
    result.write_text(
        json.dumps(
            {
                "seconds": round(time.time() - t0, 1),
                "peak_rss_bytes": mem.peak_rss,
                "peak_pss_bytes": mem.peak_pss,
                "align": summary["stages"]["align"],
            },
            default=str,
        )
    )


def compare(work: Path) -> dict:
    """Every tile of the two runs: objects (by object id), land cover and optical twin equal."""
    import geopandas as gpd

    from sarlang_ray import pipeline

    demo_ids = {}
    for p in sorted((work / "archive" / "labels").glob("*.parquet")):
        for i, oid in enumerate(gpd.read_parquet(p)["object_id"]):
            demo_ids[f"labels/{p.name}#feature={i}"] = oid
    cols = ["tile_id", "objects", "landcover", "optical_png"]
    a = {t["tile_id"]: t for t in pipeline.read_tiles(str(work / "run_glob"), columns=cols).to_pylist()}
    b = {t["tile_id"]: t for t in pipeline.read_tiles(str(work / "run_layer"), columns=cols).to_pylist()}
    differing, objects = [], 0
    for tid in sorted(set(a) | set(b)):
        if tid not in a or tid not in b:
            differing.append(tid)
            continue
        oa = sorted((demo_ids[o["label_id"]], o["class"], tuple(o["bbox_xyxy"])) for o in a[tid]["objects"])
        ob = sorted((o["label_id"], o["class"], tuple(o["bbox_xyxy"])) for o in b[tid]["objects"])
        objects += len(oa)
        if (
            oa != ob
            or a[tid]["landcover"] != b[tid]["landcover"]
            or a[tid]["optical_png"] != b[tid]["optical_png"]
        ):
            differing.append(tid)
    return {"tiles": len(a), "objects": objects, "tiles_differing": len(differing), "equal": not differing}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=5_000_000)
    parser.add_argument("--chunk", type=int, default=100_000)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "labels_5m.json"))
    parser.add_argument("--variant", choices=["glob", "layer"], help=argparse.SUPPRESS)  # internal: one run
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_labels_"))
    if args.variant:
        run_variant(
            work,
            args.variant,
            work / "layer" if args.variant == "layer" else None,
            work / f"result_{args.variant}.json",
        )
        return 0
    from sarlang_ray.config import load_config
    from sarlang_ray.synth import write_archive

    try:
        if (
            work / "layer_stats.json"
        ).exists():  # a --work folder of an earlier, interrupted run: reuse its layer
            layer = json.loads((work / "layer_stats.json").read_text())
        else:
            cfg = load_config(str(REPO / "workflows" / "demo.yaml"), [f"synth.out_dir={work / 'archive'}"])
            write_archive(cfg.synth, cfg.run.seed)
            t0 = time.time()
            layer = generate_layer(work / "layer", work / "archive", args.features, args.chunk)
            layer["seconds"] = round(time.time() - t0, 1)
            (work / "layer_stats.json").write_text(json.dumps(layer))
        runs = {}
        for variant in ("glob", "layer"):
            for _attempt in range(5):  # on a loaded machine, Ray's 30 s node start-up limit can pass: retry
                shutil.rmtree(work / f"run_{variant}", ignore_errors=True)  # a fresh run, never a resumed one
                done = subprocess.run(
                    [sys.executable, __file__, "--work", str(work), "--variant", variant], check=False
                )
                if done.returncode == 0:
                    break
                time.sleep(20)
            else:
                raise RuntimeError(f"the {variant} run failed 5 times; see its output above")
            runs[variant] = json.loads((work / f"result_{variant}.json").read_text())
        equal = compare(work)
        ratio_rss = runs["layer"]["peak_rss_bytes"] / runs["glob"]["peak_rss_bytes"]
        ratio_pss = runs["layer"]["peak_pss_bytes"] / runs["glob"]["peak_pss_bytes"]
        result = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "layer": layer,
            "runs": {
                k: {
                    "seconds": v["seconds"],
                    "peak_rss_mib": round(v["peak_rss_bytes"] / 2**20, 1),
                    "peak_pss_mib": round(v["peak_pss_bytes"] / 2**20, 1),
                    "labels": v["align"]["labels"],
                }
                for k, v in runs.items()
            },
            "peak_rss_ratio_layer_over_demo": round(ratio_rss, 3),
            "peak_pss_ratio_layer_over_demo": round(ratio_pss, 3),
            "within_1_25x": ratio_rss <= 1.25 and ratio_pss <= 1.25,
            "results": equal,
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0 if result["within_1_25x"] and equal["equal"] else 1
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
