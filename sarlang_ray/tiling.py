"""tile: scenes -> tile windows per target GSD -> resampled reads -> SAR preprocessing -> PNG shards.

The unit of work is a *chunk*: up to ``tile.tiles_per_shard`` consecutive windows of one scene at one
GSD. A Ray Data actor pool turns each chunk into one Parquet shard with a deterministic name
(``tile/shards/<scene_id>/<gsd>-<chunk>.parquet``), written atomically. So:

* memory is bounded (one window's source pixels at a time per worker, one shard of PNGs);
* a re-run skips chunks whose shard exists (resume), and a finished stage is a no-op;
* the same config gives byte-identical shards.

Geometry. Tiles are cut on a north-up grid in the scene's ``tile_crs`` (its own CRS when projected in
metres with a scale factor within 1 % of 1, the local UTM zone otherwise). The grid starts at the
upper-left corner of the bounds of the scene's pixel grid in the tile CRS: for a north-up scene that is
the transform's origin, so at the native GSD tile pixels coincide with scene pixels; a south-up or
east-west flipped scene's origin is another corner, and its tile pixels are its own pixels mirrored back
north-up; rotated and reprojected scenes use the bounds of their (densified) outline. Each window is
filled by GDAL's warper from the source pixels that cover it, in linear intensity, with ``average``
resampling when the tile is coarser than the scene: averaging happens on intensity whatever the file's
units. Windows reaching past the scene are padded with nodata, so with ``stride == tile_size`` the tiles
cover the scene without gaps.
"""

from __future__ import annotations

import io as _io
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import rasterio
from affine import Affine
from PIL import Image
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window

from sarlang_ray import io, sar
from sarlang_ray.catalog import outline_4326
from sarlang_ray.config import TileSection
from sarlang_ray.errors import error_row, errors_table
from sarlang_ray.tables import TILES_SCHEMA, existing_shard

STAGE = "tile"
EPS = 1e-6


def gsd_tag(gsd: float) -> str:
    """Path-safe GSD label: 0.5 -> '0p5m', 10 -> '10m'."""
    return f"{gsd:g}".replace(".", "p") + "m"


def tile_id_for(scene_id: str, gsd: float, row: int, col: int) -> str:
    return f"{scene_id}_{gsd_tag(gsd)}_r{row:04d}_c{col:04d}"


def pyramid_for(scene: dict, cfg: TileSection) -> list[float]:
    """Target GSDs of a scene: those of the pyramid not finer than native (+ native if configured)."""
    native = scene["gsd_m"]
    gsds = [g for g in cfg.gsds_m if g >= native * (1 - 1e-3)]
    if cfg.include_native and not any(abs(g - native) < native * 1e-3 for g in gsds):
        gsds.append(native)
    return sorted(set(round(g, 6) for g in gsds))


@dataclass(frozen=True)
class Grid:
    """The north-up window grid of one scene at one GSD, in ``crs``."""

    crs: str
    gsd: float
    x0: float  # left of column 0
    y0: float  # top of row 0
    n_rows: int
    n_cols: int
    tile_size: int
    stride: int

    def window_transform(self, row: int, col: int) -> Affine:
        step = self.stride * self.gsd
        return Affine(self.gsd, 0.0, self.x0 + col * step, 0.0, -self.gsd, self.y0 - row * step)

    @property
    def n_windows(self) -> int:
        return self.n_rows * self.n_cols


def scene_bounds(scene: dict) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of a scene's pixel grid in its ``tile_crs``, whatever its orientation:
    the min / max over the four corners (a south-up or east-west flipped grid's origin (c, f) is not its
    upper-left corner), reprojected with densified edges when the tile CRS is another."""
    t = Affine(*scene["transform"])
    w, h = scene["width"], scene["height"]
    if t.b == 0 and t.d == 0:  # axis-aligned (north-up or mirrored): exact pixel edges
        x1, y1 = t.c + t.a * w, t.f + t.e * h
        left, right = min(t.c, x1), max(t.c, x1)
        bottom, top = min(t.f, y1), max(t.f, y1)
    else:
        xs, ys = zip(*(t @ (c, r) for c, r in ((0, 0), (w, 0), (w, h), (0, h))))
        left, bottom, right, top = min(xs), min(ys), max(xs), max(ys)
    if scene["tile_crs"] != scene["crs"]:
        left, bottom, right, top = transform_bounds(scene["crs"], scene["tile_crs"], left, bottom, right, top,
                                                    densify_pts=21)
    return left, bottom, right, top


def grid_for(scene: dict, gsd: float, cfg: TileSection) -> Grid:
    """The north-up grid anchored at the upper-left corner of the scene's bounds in its tile CRS. For a
    north-up scene tiled in its own CRS that corner is the transform's origin, so at the native GSD tile
    pixels are the scene's pixels; a mirrored (south-up, east-west flipped) one is anchored at the same
    corner of its bounds, so its tile pixels are its own pixels mirrored back."""
    left, bottom, right, top = scene_bounds(scene)
    x0, y0 = left, top
    width_m = right - left
    height_m = top - bottom
    t = Affine(*scene["transform"])
    if scene["tile_crs"] == scene["crs"] and t.b == 0 and t.d == 0:
        width_m, height_m = scene["width"] * abs(t.a), scene["height"] * abs(t.e)  # no cancellation error

    def count(extent_m: float) -> int:
        px = extent_m / gsd
        return max(1, math.ceil((px - cfg.tile_size) / cfg.step() - EPS) + 1) if px > cfg.tile_size else 1

    return Grid(scene["tile_crs"], gsd, x0, y0, count(height_m), count(width_m), cfg.tile_size, cfg.step())


def plan_chunks(scene: dict, cfg: TileSection) -> list[dict]:
    """Chunk descriptors for one scene: small rows for Ray Data (no pixels)."""
    out = []
    scene_json = json.dumps({k: v for k, v in scene.items() if k != "footprint"})
    for gsd in pyramid_for(scene, cfg):
        grid = grid_for(scene, gsd, cfg)
        for chunk, start in enumerate(range(0, grid.n_windows, cfg.tiles_per_shard)):
            out.append({
                "scene_id": scene["scene_id"], "gsd_m": gsd, "chunk": chunk, "start": start,
                "stop": min(start + cfg.tiles_per_shard, grid.n_windows), "scene_json": scene_json,
            })
    return out


def shard_name(scene_id: str, gsd: float, chunk: int) -> str:
    return f"{scene_id}/{gsd_tag(gsd)}-{chunk:05d}.parquet"


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    buf = _io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def source_window(src_transform: Affine, src_crs, dst_transform: Affine, dst_crs, size: int, pad: int = 2) -> Window:
    """The window of source pixels that covers a destination tile (any rotation, any CRS)."""
    left, top = dst_transform.c, dst_transform.f
    right, bottom = dst_transform @ (size, size)
    if str(src_crs) != str(dst_crs):
        left, bottom, right, top = transform_bounds(dst_crs, src_crs, left, bottom, right, top, densify_pts=21)
    inv = ~src_transform
    cols, rows = zip(*(inv @ (x, y) for x, y in ((left, top), (right, top), (right, bottom), (left, bottom))))
    c0, c1 = math.floor(min(cols)) - pad, math.ceil(max(cols)) + pad
    r0, r1 = math.floor(min(rows)) - pad, math.ceil(max(rows)) + pad
    return Window(c0, r0, c1 - c0, r1 - r0)


def warp_window(src, band: int, dst_transform: Affine, dst_crs: str, size: int, resampling: Resampling,
                to_float=None) -> np.ndarray | None:
    """Read the source pixels under a tile and warp them onto the tile grid, as float32 with NaN nodata.

    ``to_float`` converts the raw block (masked array) before resampling, e.g. dB -> linear intensity;
    by default the values are kept as they are.
    Returns None when the tile does not overlap the raster at all.
    """
    win = source_window(src.transform, src.crs, dst_transform, dst_crs, size)
    full = Window(0, 0, src.width, src.height)
    try:
        inter = win.intersection(full)
    except Exception:  # rasterio raises WindowError when they do not intersect
        return None
    if inter.width <= 0 or inter.height <= 0:
        return None
    block = src.read(band, window=inter, masked=True)
    data = to_float(block) if to_float else block.astype(np.float32).filled(np.nan)
    dst = np.full((size, size), np.nan, dtype=np.float32)
    reproject(
        data, dst,
        src_transform=src.window_transform(inter), src_crs=src.crs, src_nodata=np.nan,
        dst_transform=dst_transform, dst_crs=dst_crs, dst_nodata=np.nan,
        resampling=resampling,
    )
    return dst


def resampling_for(tile_gsd: float, native_gsd: float, coarser: Resampling = Resampling.average) -> Resampling:
    return coarser if tile_gsd > native_gsd * 1.01 else Resampling.nearest


def _timing(started: float) -> dict:
    """When and where a chunk ran (for throughput measurements; not written to any table)."""
    return {"started_at": started, "finished_at": time.time(), "worker": os.getpid()}


class TileChunk:
    """Ray Data row function (run on an actor pool): one chunk descriptor -> one shard + manifest row."""

    def __init__(self, cfg: TileSection, run_dir: str):
        self.cfg = cfg
        self.shards = io.join(run_dir, STAGE, "shards")
        self.errors = io.join(run_dir, STAGE, "errors")
        self._open: tuple[str, rasterio.io.DatasetReader] | None = None

    def _dataset(self, uri: str):
        if self._open is None or self._open[0] != uri:
            if self._open is not None:
                self._open[1].close()
            self._open = (uri, io.open_raster(uri))
        return self._open[1]

    def __call__(self, chunk: dict) -> dict:
        started = time.time()
        name = shard_name(chunk["scene_id"], chunk["gsd_m"], chunk["chunk"])
        shard_uri = io.join(self.shards, name)
        planned = chunk["stop"] - chunk["start"]
        if (done := existing_shard(shard_uri, planned, name)) is not None:  # an earlier, interrupted run wrote it
            return {**done, **_timing(started)}
        rows, errors = self.process(chunk)
        io.write_parquet_atomic(io.join(self.errors, name), errors_table(errors))
        io.write_parquet_atomic(shard_uri, pa.Table.from_pylist(rows, schema=TILES_SCHEMA))
        return {"shard": name, "planned": planned, "written": len(rows), "rejected": len(errors), "skipped": False,
                **_timing(started)}

    def process(self, chunk: dict) -> tuple[list[dict], list[dict]]:
        """Read, preprocess and encode the windows of a chunk (no writing: the benchmark loop uses this)."""
        scene = json.loads(chunk["scene_json"])
        grid = grid_for(scene, chunk["gsd_m"], self.cfg)
        rows, errors = [], []
        try:
            src = self._dataset(scene["sar_uri"])
        except Exception as exc:
            for i in range(chunk["start"], chunk["stop"]):
                tid = tile_id_for(scene["scene_id"], grid.gsd, i // grid.n_cols, i % grid.n_cols)
                errors.append(error_row(STAGE, tid, "unreadable", f"{scene['sar_uri']}: {exc}. Re-download the scene."))
            return rows, errors
        for i in range(chunk["start"], chunk["stop"]):
            r, c = divmod(i, grid.n_cols)
            tid = tile_id_for(scene["scene_id"], grid.gsd, r, c)
            try:
                row = self.make_tile(src, scene, grid, r, c, tid)
            except Exception as exc:  # a corrupt block loses this tile only, with the reason
                errors.append(error_row(STAGE, tid, "unreadable", f"{scene['sar_uri']} window of {tid}: {exc}. The file is truncated or corrupt: re-download it."))
                continue
            if isinstance(row, str):
                errors.append(error_row(STAGE, tid, "nodata", row))
            else:
                rows.append(row)
        return rows, errors

    def make_tile(self, src, scene: dict, grid: Grid, r: int, c: int, tid: str) -> dict | str:
        """One tile row, or the reason it was dropped."""
        cfg = self.cfg
        size = cfg.tile_size
        t = grid.window_transform(r, c)
        units = scene["units"]

        def to_linear(block: np.ma.MaskedArray) -> np.ndarray:
            return sar.to_intensity(block.astype(np.float32).filled(np.nan), units)

        intensity = warp_window(src, scene["band"], t, grid.crs, size, resampling_for(grid.gsd, scene["gsd_m"]), to_linear)
        if intensity is None:
            intensity = np.full((size, size), np.nan, np.float32)
        invalid = ~np.isfinite(intensity)
        nodata_fraction = float(invalid.mean())
        if nodata_fraction > cfg.max_nodata_fraction:
            return (f"tile {tid} of {scene['sar_uri']}: {nodata_fraction:.0%} of pixels are nodata/NaN/inf "
                    f"(limit tile.max_nodata_fraction={cfg.max_nodata_fraction:.0%}); raise the limit to keep edge tiles.")
        looks_scale = (grid.gsd / scene["gsd_m"]) ** 2
        filtered = sar.despeckle(intensity, cfg.speckle, looks_scale)
        db = sar.to_db(filtered)
        db[invalid] = np.nan
        image, lo, hi = sar.stretch_to_uint8(db, cfg.stretch)
        valid_db = db[~invalid]
        p02, p98 = np.percentile(valid_db, [2, 98])
        return {
            "tile_id": tid, "scene_id": scene["scene_id"], "gsd_m": grid.gsd, "row": r, "col": c,
            "crs": grid.crs, "transform": [float(v) for v in tuple(t)[:6]], "width": size, "height": size,
            "bounds": [t.c, t.f - size * grid.gsd, t.c + size * grid.gsd, t.f],
            "footprint": outline_4326(t, grid.crs, size, size, densify=8).wkb,
            "sar_png": encode_png(image, cfg.png_compress_level),
            "nodata_fraction": nodata_fraction, "db_mean": float(valid_db.mean()), "db_std": float(valid_db.std()),
            "db_p02": float(p02), "db_p98": float(p98), "stretch_db": [lo, hi],
            "sensor": scene["sensor"], "polarisation": scene["polarisation"], "region": scene["region"],
            "native_gsd_m": scene["gsd_m"],
        }
