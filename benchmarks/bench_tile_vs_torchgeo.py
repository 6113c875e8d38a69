"""`sarlang tile` against TorchGeo and a one-process floor, on identical work; the refined Lee filter's
cost; pixels decoded for a coarse level of a COG with overviews.

    .venv/bin/python benchmarks/bench_tile_vs_torchgeo.py  # -> benchmarks/results/tile_vs_torchgeo.json

The archive (made by this script): two 8192 x 8192 float32 linear-intensity GeoTIFFs, 1 m, deflate,
512-px internal tiles. The work per tile, the same for everyone: read a 512 x 512 window at native
resolution, convert to dB, stretch the 2-98 % percentiles to uint8, encode a PNG (zlib level 6):

* floor: one Python process, rasterio windowed reads + numpy + Pillow, nothing else;
* TorchGeo: ``RasterDataset`` + ``GridGeoSampler`` + ``DataLoader(num_workers=2)``, the same per-tile work
  as the dataset's ``transforms`` (in the workers). TorchGeo needs torchvision, which does not load beside
  the project's CPU torch, so it runs in its own virtual environment (``benchmarks/work/torchgeo-venv``,
  created here when missing: torch 2.14.1 + torchvision 0.29.1 + torchgeo, about 6 GB);
* sarlang: the tile stage (``sarlang_ray.stages.tile``: chunks as Ray tasks on the node's 2 CPUs), speckle
  filter off, on a Ray started beforehand (``ray.init`` reported apart). It also writes the tiles table
  (footprints, statistics, Parquet shards), which the others do not. "stage" is the stage's wall time
  (worker start-up and the tail included), "steady" the rate while both workers are busy; the first run of
  the session is also reported apart ("cold": Ray's workers import the tile code then).

* ``floor_fast`` and ``torchgeo_fast``: the same two with the percentiles and the PNG done the tile stage's
  way (``sar.percentiles``, exact by histogram selection; ``tiling.encode_png``, libpng + zlib-ng with the
  Paeth row filter), so the ratios to them show what the pipeline itself adds.

Methods alternate, ``--repeats`` times each; the best run of each counts and every run is recorded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np
import rasterio
from affine import Affine
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / "benchmarks" / "work" / "torchgeo-venv"
SIZE, TILE = 8192, 512

TORCHGEO_SCRIPT = r"""
import io, json, sys, time
import numpy as np
from PIL import Image
from torch.utils.data import DataLoader
from torchgeo.datasets import RasterDataset
from torchgeo.samplers import GridGeoSampler


class Scenes(RasterDataset):
    filename_glob = "*.tif"
    is_image = True


def work(sample):  # the per-tile work of every method: dB, 2-98 % stretch, PNG
    x = sample["image"].numpy()[0].astype(np.float32)
    db = 10 * np.log10(np.maximum(x, 1e-10))
    if FAST:  # the same work by the tile stage's implementations: exact percentiles by selection
        lo, hi = sar.percentiles(db.ravel(), [2, 98])
    else:
        lo, hi = np.percentile(db, [2, 98])
    img = (np.clip((db - lo) / max(hi - lo, 1e-6), 0, 1) * 255).round().astype(np.uint8)
    if FAST:
        # the tile stage's encoder settings (tiling.encode_png: libpng + zlib-ng, Paeth row filter)
        return {"png_bytes": len(imagecodecs.png_encode(img, level=6, filter=imagecodecs.PNG.FILTER.PAETH))}
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=6)
    return {"png_bytes": len(buf.getvalue())}


def first(batch):
    return batch


FAST = len(sys.argv) > 3 and sys.argv[3] == "fast"
if FAST:
    import imagecodecs
    from sarlang_ray import sar  # the repository is on PYTHONPATH

if __name__ == "__main__":
    root, tile = sys.argv[1], int(sys.argv[2])
    t0 = time.perf_counter()
    ds = Scenes(paths=root, transforms=work)
    sampler = GridGeoSampler(ds, size=tile, stride=tile)
    loader = DataLoader(ds, sampler=sampler, batch_size=None, num_workers=2, collate_fn=first)
    t1 = time.perf_counter()
    n = sum(1 for s in loader if s["png_bytes"] > 0)
    t2 = time.perf_counter()
    print(json.dumps({"tiles": n, "setup_s": t1 - t0, "seconds": t2 - t1}))
"""


def make_archive(root: Path) -> list[Path]:
    """Two speckled scenes with structure (fields, a river, bright points), float32 intensity."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(2):
        path = root / f"scene{k}.tif"
        paths.append(path)
        if path.exists():
            continue
        rng = np.random.default_rng(k)
        profile = {
            "driver": "GTiff",
            "width": SIZE,
            "height": SIZE,
            "count": 1,
            "dtype": "float32",
            "crs": "EPSG:32631",
            "transform": Affine(1.0, 0, 600000 + k * 20000, 0, -1.0, 5800000),
            "tiled": True,
            "blockxsize": 512,
            "blockysize": 512,
            "compress": "deflate",
        }
        with rasterio.open(path, "w", **profile) as dst:
            for r0 in range(0, SIZE, 1024):
                yy, xx = np.mgrid[r0 : r0 + 1024, 0:SIZE]
                sigma0 = (
                    0.05
                    + 0.15 * ((xx // 700 + yy // 500) % 3 == 0)
                    + 0.3 * (np.abs(np.sin(xx / 900) * 800 - (yy % 1600)) < 40)
                )
                sigma0 = np.where(np.abs(xx - 4000 - 600 * np.sin(yy / 1500)) < 120, 0.005, sigma0)
                block = (sigma0 * rng.gamma(4, 0.25, sigma0.shape)).astype(np.float32)
                dst.write(block, 1, window=rasterio.windows.Window(0, r0, SIZE, 1024))
    return paths


def floor(paths: list[Path], fast: bool = False) -> dict:
    """One process: windowed reads, dB, stretch, PNG. ``fast``: the percentiles and the PNG by the tile
    stage's implementations (``sar.percentiles``, libpng + zlib-ng), the floor for the same work done as
    sarlang does it."""
    from sarlang_ray import sar
    from sarlang_ray.tiling import encode_png

    t0, n = time.perf_counter(), 0
    for path in paths:
        with rasterio.open(path) as src:
            for r in range(0, src.height, TILE):
                for c in range(0, src.width, TILE):
                    x = src.read(1, window=rasterio.windows.Window(c, r, TILE, TILE))
                    db = 10 * np.log10(np.maximum(x, 1e-10))
                    lo, hi = sar.percentiles(db.ravel(), [2, 98]) if fast else np.percentile(db, [2, 98])
                    img = (np.clip((db - lo) / max(hi - lo, 1e-6), 0, 1) * 255).round().astype(np.uint8)
                    if fast:
                        encode_png(img, 6)
                    else:
                        buf = io.BytesIO()
                        Image.fromarray(img).save(buf, format="PNG", compress_level=6)
                    n += 1
    seconds = time.perf_counter() - t0
    return {"tiles": n, "seconds": round(seconds, 2), "tiles_per_s": round(n / seconds, 1)}


def torchgeo_python() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        # the fast work imports sarlang_ray.sar
        subprocess.run(
            [
                str(VENV / "bin" / "pip"),
                "install",
                "-q",
                "torch==2.14.1",
                "torchvision==0.29.1",
                "torchgeo",
                "rasterio",
                "pillow",
                "requests",  # torchgeo 0.8.1 imports requests undeclared
                "numba",
                "scipy",
                "imagecodecs",
            ],
            check=True,
        )
    return python


def torchgeo(root: Path, fast: bool = False) -> dict:
    script = VENV.parent / "torchgeo_tiles.py"
    script.write_text(TORCHGEO_SCRIPT)
    proc = subprocess.run(
        [str(torchgeo_python()), str(script), str(root), str(TILE), "fast" if fast else "pillow"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"TorchGeo run failed: {proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["tiles_per_s"] = round(out["tiles"] / out["seconds"], 1)
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def sarlang(work: Path, root: Path, speckle: str, tag: str, tiles_per_shard: int) -> dict:
    from bench_tiling import steady_state_rate

    from sarlang_ray import tables, tiling
    from sarlang_ray.config import load_config
    from sarlang_ray.stages import catalog, tile
    from sarlang_ray.stages.execution import map_tasks

    run_dir = work / f"run-{tag}"
    cfg = load_config(
        None,
        [
            f"run.run_dir={run_dir}",
            f"catalog.archive={root}",
            "catalog.sar_glob=[*.tif]",
            "catalog.units=intensity",
            "tile.gsds_m=[1.0]",
            f"tile.tile_size={TILE}",
            f"tile.speckle.filter={speckle}",
            f"tile.tiles_per_shard={tiles_per_shard}",
            "ray.progress=false",
            "run.stages=[catalog,tile]",
        ],
    )
    if not (run_dir / "catalog" / "_SUCCESS.json").exists():
        catalog.run(cfg)
    shutil.rmtree(run_dir / "tile", ignore_errors=True)
    counts = tile.run(cfg)
    # the same chunks once more, for the manifest's timings (steady state while both actors are busy)
    chunks = [c for s in tables.read_scenes(str(run_dir)) for c in tiling.plan_chunks(s, cfg.tile)]
    shutil.rmtree(run_dir / "tile", ignore_errors=True)
    manifest = map_tasks(chunks, tiling.TileChunk, (cfg.tile, str(run_dir)))
    return {
        "tiles": counts["written"],
        "stage_seconds": counts["seconds"],
        "tiles_per_s_stage": round(counts["written"] / counts["seconds"], 1),
        "tiles_per_s_steady": round(steady_state_rate(manifest), 1),
    }


def overview_pixels(work: Path) -> dict:
    """Pixels decoded for the 10 m level of a 0.5 m COG with overviews, against the pixels written."""
    from rasterio.shutil import copy as rio_copy

    from sarlang_ray.config import load_config
    from sarlang_ray.tiling import TileChunk, grid_for

    n = 8192
    plain, cog = work / "cog-plain.tif", work / "cog.tif"
    if not cog.exists():
        rng = np.random.default_rng(7)
        with rasterio.open(
            plain,
            "w",
            driver="GTiff",
            width=n,
            height=n,
            count=1,
            dtype="float32",
            crs="EPSG:32631",
            transform=Affine(0.5, 0, 600000, 0, -0.5, 5800000),
            tiled=True,
            blockxsize=512,
            blockysize=512,
        ) as dst:
            for r0 in range(0, n, 1024):
                dst.write(
                    (0.1 * rng.gamma(4, 0.25, (1024, n))).astype(np.float32),
                    1,
                    window=rasterio.windows.Window(0, r0, n, 1024),
                )
        rio_copy(plain, cog, driver="COG", RESAMPLING="AVERAGE", OVERVIEWS="AUTO", BLOCKSIZE=256)
    out = {}
    for use in (True, False):
        worker = TileChunk(
            load_config(None, ["tile.tile_size=256", f"tile.use_overviews={str(use).lower()}"]).tile,
            str(work),
        )
        with rasterio.open(cog) as src:
            t = src.transform
            scene = {
                "scene_id": "cog",
                "sar_uri": str(cog),
                "crs": src.crs.to_string(),
                "tile_crs": src.crs.to_string(),
                "transform": list(t)[:6],
                "width": n,
                "height": n,
                "gsd_m": 0.5,
                "band": 1,
                "units": "intensity",
            }
            grid = grid_for(scene, 10.0, worker.cfg)
            t0 = time.perf_counter()
            for r in range(grid.n_rows):
                for c in range(grid.n_cols):
                    worker.read_intensity(src, scene, grid.window_transform(r, c), grid.crs, 256)
            written = grid.n_windows * 256 * 256
            out["overviews" if use else "full_resolution"] = {
                "tiles": grid.n_windows,
                "pixels_written": written,
                "pixels_decoded": worker.stats["pixels_read"],
                "decoded_per_written": round(worker.stats["pixels_read"] / written, 2),
                "seconds": round(time.perf_counter() - t0, 2),
                "overview_factors": src.overviews(1),
            }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--tiles-per-shard", type=int, default=64, help="tile.tiles_per_shard (the stage's default: 64)"
    )
    parser.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "tile_vs_torchgeo"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "tile_vs_torchgeo.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "benchmarks"))
    import ray

    work = Path(args.work)
    root = work / "archive"
    make_archive(root)
    torchgeo_python()
    t0 = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    init_s = time.perf_counter() - t0
    runs: dict[str, list] = {
        "floor": [],
        "floor_fast": [],
        "torchgeo": [],
        "torchgeo_fast": [],
        "sarlang": [],
        "sarlang_refined_lee": [],
    }
    for _ in range(args.repeats):  # alternate, so slow phases of a shared machine hit every method
        runs["floor"].append(floor(sorted(root.glob("*.tif"))))
        runs["floor_fast"].append(floor(sorted(root.glob("*.tif")), fast=True))
        runs["torchgeo"].append(torchgeo(root))
        runs["torchgeo_fast"].append(torchgeo(root, fast=True))
        runs["sarlang"].append(sarlang(work, root, "none", "none", args.tiles_per_shard))
        runs["sarlang_refined_lee"].append(sarlang(work, root, "refined_lee", "lee", args.tiles_per_shard))
    ray.shutdown()
    best = {
        k: max(v, key=lambda r: r.get("tiles_per_s", r.get("tiles_per_s_stage"))) for k, v in runs.items()
    }
    stage, steady = best["sarlang"]["tiles_per_s_stage"], best["sarlang"]["tiles_per_s_steady"]
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "work": f"{2 * (SIZE // TILE) ** 2} tiles of {TILE} px from two {SIZE} px float32 deflate GeoTIFFs "
        "(512 px blocks): "
        "read, dB, 2-98 % stretch, PNG level 6",
        "ray_init_seconds": round(init_s, 2),
        "tiles_per_shard": args.tiles_per_shard,
        "best": best,
        "runs": runs,
        "ratios": {
            "sarlang_stage_over_torchgeo": round(stage / best["torchgeo"]["tiles_per_s"], 2),
            "sarlang_steady_over_torchgeo": round(steady / best["torchgeo"]["tiles_per_s"], 2),
            "sarlang_stage_over_floor": round(stage / best["floor"]["tiles_per_s"], 2),
            "sarlang_steady_over_floor": round(steady / best["floor"]["tiles_per_s"], 2),
            # the same work done the tile stage's way everywhere: what the pipeline itself adds or saves
            "sarlang_stage_over_torchgeo_fast": round(stage / best["torchgeo_fast"]["tiles_per_s"], 2),
            "sarlang_stage_over_floor_fast": round(stage / best["floor_fast"]["tiles_per_s"], 2),
            "sarlang_steady_over_floor_fast": round(steady / best["floor_fast"]["tiles_per_s"], 2),
            "refined_lee_stage_over_filter_off": round(
                best["sarlang_refined_lee"]["tiles_per_s_stage"] / stage, 2
            ),
            # the first tile stage of the session: Ray's workers import the tile code then (once per worker
            # process)
            "sarlang_cold_stage_over_torchgeo": round(
                runs["sarlang"][0]["tiles_per_s_stage"] / best["torchgeo"]["tiles_per_s"], 2
            ),
            "sarlang_cold_stage_over_floor": round(
                runs["sarlang"][0]["tiles_per_s_stage"] / best["floor"]["tiles_per_s"], 2
            ),
        },
        "cog_10m_level_of_0p5m": overview_pixels(work),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("best", "ratios", "cog_10m_level_of_0p5m")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
