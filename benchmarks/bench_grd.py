"""Sentinel-1 GRD tiles (SAFE zip read in place, GCP warp, calibration, thermal-noise removal) against the
native-COG path, and the geolocation error of the GCP methods side by side.

    .venv/bin/python benchmarks/bench_grd.py        # writes benchmarks/results/grd.json

Data: the real 2021 IW GRDH product of ../shared (real annotation, calibration, noise XML and GCPs)
completed with measurement TIFFs on its real 25931 x 16854 pixel grid (tests/safe_products.py): uint16
DN with gamma-distributed speckle (4 looks) over a block of the swath, bright 6 x 6 px squares centred
on the geolocation-grid nodes inside it. The baseline is a north-up float32 COG in the same UTM zone at
the same GSD with the same speckle, tiled over the same ground box: what the pipeline did before for
GRD data somebody had orthorectified by hand.

Throughput: the same ``TileChunk.process`` (read -> calibrate -> warp -> refined Lee -> dB stretch ->
PNG) in one process, 512 px tiles at the product's native GSD (its 10 m pixel spacing), the fastest of
``--repeats`` runs of each path, alternating. Geolocation: every node target's centroid in the tiles
against the node's own lat/lon from the annotation, per GCP method (tps, polynomial order 3, affine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import rasterio
from affine import Affine
from pyproj import Transformer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import safe_products

from sarlang_ray import catalog, tiling
from sarlang_ray.config import load_config

REAL = REPO.parent / "shared" / "data" / "real_sar"
DN_TARGET = 20000


def speckled_measurement(path: Path, ann, block: tuple[int, int, int, int], targets, rng) -> None:
    """The product's grid: DN 0 (no data) outside ``block`` (rows r0:r1, cols c0:c1), 4-look speckle of mean
    DN^2 = 150^2 inside it, bright squares at ``targets``."""
    from rasterio.control import GroundControlPoint
    from rasterio.windows import Window

    r0, r1, c0, c1 = block
    gcps = [
        GroundControlPoint(row=p["line"], col=p["pixel"], x=p["longitude"], y=p["latitude"], z=p["height"])
        for p in ann.grid
    ]
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=ann.width,
        height=ann.height,
        count=1,
        dtype="uint16",
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
        gcps=gcps,
        crs="EPSG:4326",
    ) as dst:
        for r in range(r0 - r0 % 512, r1, 512):
            h = min(512, ann.height - r)
            rows = np.zeros((h, c1 - c0), np.uint16)
            lo, hi = max(r0, r) - r, min(r1, r + h) - r
            power = rng.gamma(4.0, 150.0**2 / 4.0, size=(hi - lo, c1 - c0))
            rows[lo:hi] = np.clip(np.sqrt(power), 1, 65535).astype(np.uint16)
            for line, pixel in targets:
                a, b = int(line) - 3 - r, int(pixel) - 3 - c0
                if -6 < a < h and 0 <= b:
                    rows[max(a, 0) : max(a + 6, 0), b : b + 6] = DN_TARGET
            dst.write(rows[None], window=Window(c0, r, c1 - c0, h))


def build(work: Path, rng):
    src = REAL / "s1_grd_safe_metadata" / safe_products.PRODUCTS["2021"]
    ann = safe_products.annotation(src)
    lines = sorted({p["line"] for p in ann.grid})
    pixels = sorted({p["pixel"] for p in ann.grid})
    block = (int(lines[3]) - 600, int(lines[5]) + 600, int(pixels[8]) - 600, int(pixels[11]) + 600)
    nodes = [
        p for p in ann.grid if lines[3] <= p["line"] <= lines[5] and pixels[8] <= p["pixel"] <= pixels[11]
    ]
    # the product, with measurement files written by the function above (both polarisations)
    zip_path = safe_products.build_product(REAL, "2021", work / "archive", background=0)
    import shutil
    import zipfile

    tmp = work / "unzipped"
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(tmp)
    safe_dir = next(tmp.glob("*.SAFE"))
    for tif in sorted((safe_dir / "measurement").glob("*.tiff")):
        speckled_measurement(tif, ann, block, [(p["line"], p["pixel"]) for p in nodes], rng)
    zip_path.unlink()
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as out:
        for path in sorted(safe_dir.rglob("*")):
            out.write(path, path.relative_to(tmp).as_posix())
    shutil.rmtree(tmp)
    return zip_path, ann, nodes


def config(work: Path, archive: Path, aoi, *overrides):
    return load_config(
        None,
        [
            f"run.run_dir={work / 'run'}",
            f"catalog.archive={archive}",
            "catalog.optical_rule=null",
            "catalog.landcover_rule=null",
            f"tile.aoi={aoi}",
            "tile.gsds_m=[]",
            "tile.include_native=true",
            "tile.tile_size=512",
            "tile.max_nodata_fraction=1.0",
            *overrides,
        ],
    )


def tile_all(cfg, scene, work: Path):
    worker = tiling.TileChunk(cfg.tile, str(work / "run"))
    chunks = tiling.plan_chunks(scene, cfg.tile)
    rows = []
    start = time.perf_counter()
    for chunk in chunks:
        out, errors = worker.process(chunk)
        assert not errors, errors[:1]
        rows += out
    worker.close()
    return rows, time.perf_counter() - start


def native_cog(work: Path, scene: dict, rng) -> list[Path]:
    """North-up float32 COGs of linear intensity (VV and VH, one scene), same UTM zone and GSD, covering the
    GRD scene's AOI box: the same dual-polarisation work per tile as the GRD product."""
    left, bottom, right, top = scene["_aoi_tile_bounds"]
    gsd = scene["gsd_m"]
    w, h = int((right - left) / gsd) + 1, int((top - bottom) / gsd) + 1
    paths = []
    for pol, mean in (("VV", 0.05), ("VH", 0.01)):
        data = rng.gamma(4.0, mean / 4.0, size=(h, w)).astype(np.float32)
        path = work / "cog" / "sar" / f"native_sigma0_{pol}.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(
            path,
            "w",
            driver="COG",
            width=w,
            height=h,
            count=1,
            dtype="float32",
            crs=scene["tile_crs"],
            transform=Affine(gsd, 0, left, 0, -gsd, top),
            BLOCKSIZE=512,
            compress="deflate",
        ) as dst:
            dst.write(data[None])
        paths.append(path)
    return paths


def node_errors(rows, scene, nodes) -> list[float]:
    import io as _io

    from PIL import Image

    to_tile = Transformer.from_crs("EPSG:4326", scene["tile_crs"], always_xy=True)
    centres = np.array([to_tile.transform(p["longitude"], p["latitude"]) for p in nodes])
    sums = np.zeros((len(nodes), 3))
    for t in rows:
        img = np.asarray(Image.open(_io.BytesIO(t["sar_png"]))).astype(float)
        # fixed stretch from 0 dB: speckle (about -13 dB) is 0, targets (+30 dB) bright
        r, c = np.nonzero(img > 0)
        if not r.size:
            continue
        # back to linear intensity: partial pixels weigh what they hold
        weight = 10 ** (img[r, c] / 255 * 40 / 10)
        xs, ys = Affine(*t["transform"]) * (c + 0.5, r + 0.5)
        d = np.hypot(xs[:, None] - centres[:, 0], ys[:, None] - centres[:, 1])
        near = np.argmin(d, axis=1)
        keep = d[np.arange(len(near)), near] < 1000
        for i in range(len(nodes)):
            sel = keep & (near == i)
            sums[i] += [(weight[sel] * xs[sel]).sum(), (weight[sel] * ys[sel]).sum(), weight[sel].sum()]
    found = sums[:, :2] / np.maximum(sums[:, 2:], 1)
    return [float(np.hypot(*(f - c))) for f, c, s in zip(found, centres, sums[:, 2]) if s > 0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "grd.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        zip_path, _ann, nodes = build(work, rng)
        build_s = time.perf_counter() - t0
        lon = [p["longitude"] for p in nodes]
        lat = [p["latitude"] for p in nodes]
        aoi = [min(lon) + 0.005, min(lat) + 0.005, max(lon) - 0.005, max(lat) - 0.005]
        results: dict = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "product": zip_path.name,
            "build_seconds": round(build_s, 1),
            "aoi": aoi,
            "node_targets": len(nodes),
        }
        scenes, timings, rows_by = {}, {}, {}
        for method in ("tps", "polynomial", "affine"):
            cfg = config(work, zip_path.parent, aoi, f"catalog.gcp_method={method}")
            scenes[method] = catalog.inspect_product(str(zip_path), cfg.catalog)
        scene = scenes["tps"]
        from rasterio.warp import transform_bounds

        scene["_aoi_tile_bounds"] = transform_bounds("EPSG:4326", scene["tile_crs"], *aoi)
        cogs = native_cog(work, scene, rng)
        cog_cfg = config(work, cogs[0].parent.parent, aoi, "catalog.sar_glob=[sar/*.tif]")
        cog_scene = catalog.inspect_group([{"uri": str(p)} for p in cogs], cog_cfg.catalog)
        plans = {
            "grd_tps": (config(work, zip_path.parent, aoi), scenes["tps"]),
            "grd_polynomial3": (
                config(work, zip_path.parent, aoi, "catalog.gcp_method=polynomial"),
                scenes["polynomial"],
            ),
            "grd_affine": (config(work, zip_path.parent, aoi, "catalog.gcp_method=affine"), scenes["affine"]),
            "native_cog": (cog_cfg, cog_scene),
        }
        for _ in range(args.repeats):
            for name, (cfg, sc) in plans.items():
                rows, seconds = tile_all(cfg, sc, work)
                timings.setdefault(name, []).append(seconds)
                rows_by[name] = rows
        throughput = {}
        for name, secs in timings.items():
            n = len(rows_by[name])
            throughput[name] = {
                "tiles": n,
                "seconds_all": [round(s, 2) for s in secs],
                "tiles_per_s": round(n / min(secs), 2),
            }
        for name in ("grd_tps", "grd_polynomial3", "grd_affine"):
            throughput[name]["vs_native_cog"] = round(
                throughput[name]["tiles_per_s"] / throughput["native_cog"]["tiles_per_s"], 3
            )
        results["throughput"] = throughput
        results["tile"] = {
            "size_px": 512,
            "gsd_m": round(scene["gsd_m"], 3),
            "speckle": "refined_lee",
            "calibration": scene["calibration"],
            "noise_removed": scene["noise_removed"],
        }
        geoloc = {}
        sharp = [
            "tile.speckle.filter=none",
            "tile.stretch.mode=fixed",
            "tile.stretch.db_min=0",
            "tile.stretch.db_max=40",
        ]
        for name, method in (("grd_tps", "tps"), ("grd_polynomial3", "polynomial"), ("grd_affine", "affine")):
            cfg = config(work, zip_path.parent, aoi, f"catalog.gcp_method={method}", *sharp)
            rows, _ = tile_all(cfg, scenes[method], work)
            errors = node_errors(rows, scene, nodes)
            geoloc[name] = {
                "targets_found": len(errors),
                "median_m": round(statistics.median(errors), 2),
                "max_m": round(max(errors), 2),
                "rms_m": round(float(np.sqrt(np.mean(np.square(errors)))), 2),
                "median_px": round(statistics.median(errors) / scene["gsd_m"], 3),
            }
        results["geolocation_at_grid_nodes"] = {
            "how": "native GSD, nearest, no speckle filter, fixed stretch 0-40 dB: "
            "linear-weighted centroid of each 6 x 6 px target vs its node's lat/lon",
            **geoloc,
        }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
