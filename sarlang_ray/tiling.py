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

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import imagecodecs
import numpy as np
import pyarrow as pa
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.env import set_gdal_config
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window

from sarlang_ray import io, safe, sar
from sarlang_ray.catalog import outline_4326
from sarlang_ray.config import TileSection
from sarlang_ray.errors import error_row
from sarlang_ray.gcps import Georef
from sarlang_ray.rows import ChunkRow, SceneRow
from sarlang_ray.tables import TILES_SCHEMA, existing_shard, write_errors

STAGE = "tile"
EPS = 1e-6


def gsd_tag(gsd: float) -> str:
    """Path-safe GSD label: 0.5 -> '0p5m', 10 -> '10m'."""
    return f"{gsd:g}".replace(".", "p") + "m"


def tile_id_for(scene_id: str, gsd: float, row: int, col: int) -> str:
    return f"{scene_id}_{gsd_tag(gsd)}_r{row:04d}_c{col:04d}"


def pyramid_for(scene: SceneRow, cfg: TileSection) -> list[float]:
    """Target GSDs of a scene: those of the pyramid not finer than native (+ native if configured)."""
    native = scene["gsd_m"]
    gsds = [g for g in cfg.gsds_m if g >= native * (1 - 1e-3)]
    if cfg.include_native and not any(abs(g - native) < native * 1e-3 for g in gsds):
        gsds.append(native)
    return sorted({round(g, 6) for g in gsds})


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


def scene_bounds(scene: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of a scene's pixel grid in its ``tile_crs``, whatever its orientation:
    the min / max over the four corners (a south-up or east-west flipped grid's origin (c, f) is not its
    upper-left corner), reprojected with densified edges when the tile CRS is another."""
    if scene.get("georef") == "gcps":  # the GCP footprint's bounds in the tile CRS, computed by the catalog
        return tuple(scene["tile_bounds"])
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
        left, bottom, right, top = transform_bounds(
            scene["crs"], scene["tile_crs"], left, bottom, right, top, densify_pts=21
        )
    return left, bottom, right, top


def grid_for(scene: SceneRow, gsd: float, cfg: TileSection) -> Grid:
    """The north-up grid anchored at the upper-left corner of the scene's bounds in its tile CRS. For a
    north-up scene tiled in its own CRS that corner is the transform's origin, so at the native GSD tile
    pixels are the scene's pixels; a mirrored (south-up, east-west flipped) one is anchored at the same
    corner of its bounds, so its tile pixels are its own pixels mirrored back."""
    left, bottom, right, top = scene_bounds(scene)
    x0, y0 = left, top
    width_m = right - left
    height_m = top - bottom
    t = Affine(*scene["transform"]) if scene.get("transform") else None
    if t is not None and scene["tile_crs"] == scene["crs"] and t.b == 0 and t.d == 0:
        width_m, height_m = scene["width"] * abs(t.a), scene["height"] * abs(t.e)  # no cancellation error

    def count(extent_m: float) -> int:
        px = extent_m / gsd
        return max(1, math.ceil((px - cfg.tile_size) / cfg.step() - EPS) + 1) if px > cfg.tile_size else 1

    return Grid(scene["tile_crs"], gsd, x0, y0, count(height_m), count(width_m), cfg.tile_size, cfg.step())


def aoi_windows(grid: Grid, aoi: list[float] | None) -> tuple[int, int, int, int]:
    """The rows [r0, r1) and columns [c0, c1) of a grid's windows that intersect a lon/lat box (all of them
    without one; an empty range when the box misses the scene)."""
    if aoi is None:
        return 0, grid.n_rows, 0, grid.n_cols
    left, bottom, right, top = transform_bounds("EPSG:4326", grid.crs, *aoi, densify_pts=21)
    step = grid.stride * grid.gsd
    extent = grid.tile_size * grid.gsd
    c0 = max(0, math.floor((left - grid.x0 - extent) / step) + 1)
    c1 = min(grid.n_cols, math.ceil((right - grid.x0) / step))
    r0 = max(0, math.floor((grid.y0 - top - extent) / step) + 1)
    r1 = min(grid.n_rows, math.ceil((grid.y0 - bottom) / step))
    return r0, max(r0, r1), c0, max(c0, c1)


def plan_chunks(scene: SceneRow, cfg: TileSection) -> list[ChunkRow]:
    """Chunk descriptors for one scene: small rows for Ray Data (no pixels). With ``tile.aoi`` only the
    windows that intersect it are planned; a chunk's windows are numbered row by row over that block."""
    out: list[ChunkRow] = []
    scene_json = json.dumps({k: v for k, v in scene.items() if k != "footprint"})
    for gsd in pyramid_for(scene, cfg):
        grid = grid_for(scene, gsd, cfg)
        r0, r1, c0, c1 = aoi_windows(grid, cfg.aoi)
        n = (r1 - r0) * (c1 - c0)
        for chunk, start in enumerate(range(0, n, cfg.tiles_per_shard)):
            out.append(
                {
                    "scene_id": scene["scene_id"],
                    "gsd_m": gsd,
                    "chunk": chunk,
                    "start": start,
                    "stop": min(start + cfg.tiles_per_shard, n),
                    "scene_json": scene_json,
                    "block": [r0, c0, c1 - c0],
                }
            )
    return out


def window_of(chunk: ChunkRow, grid: Grid, i: int) -> tuple[int, int]:
    """Row and column of the i-th window of a chunk's block (the whole grid for chunks without one)."""
    r0, c0, n_cols = chunk.get("block") or (0, 0, grid.n_cols)
    return r0 + i // n_cols, c0 + i % n_cols


def scene_bands(scene: Mapping[str, Any]) -> list[dict]:
    """A scene's bands (one per polarisation, co-polarisation first): ``{polarisation, uri, band, ...}``."""
    bands = json.loads(scene["bands"]) if scene.get("bands") else []
    return bands or [
        {
            "polarisation": scene.get("polarisation") or "unknown",
            "uri": scene["sar_uri"],
            "band": scene["band"],
        }
    ]


class MissingBand(ValueError):
    """tile.bands names a polarisation the scene does not have."""


_CO, _CROSS = ("VV", "HH"), ("VH", "HV")


def png_selection(bands: list[dict], mode: str) -> tuple[str, list[int]]:
    """What the PNG holds: ``("grey", [i])`` or ``("composite", [co, cross])``, indexes into ``bands``.
    ``auto``: the first band (the co-polarisation of a dual-pol scene); ``composite`` on a single-pol
    scene: grey."""
    pols = [b["polarisation"] for b in bands]
    if mode == "auto":
        return "grey", [0]
    if mode == "composite":
        co = next((i for i, p in enumerate(pols) if p in _CO), None)
        cross = next((i for i, p in enumerate(pols) if p in _CROSS), None)
        if co is None or cross is None:
            return "grey", [0]
        return "composite", [co, cross]
    if mode not in pols:
        raise MissingBand(
            f"tile.bands={mode} but the scene has {'+'.join(pols)}; set tile.bands=auto or one of {pols}"
        )
    return "grey", [pols.index(mode)]


def shard_name(scene_id: str, gsd: float, chunk: int) -> str:
    return f"{scene_id}/{gsd_tag(gsd)}-{chunk:05d}.parquet"


# PNG row filter: Paeth for every row. libpng's default tries all five filters on every row and keeps the
# smallest; on SAR tiles that costs a third of the encoding for under 1 % of the size (docs/tile.md).
PNG_FILTER = imagecodecs.PNG.FILTER.PAETH


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    """A PNG (8-bit grey or RGB) at zlib ``compress_level``, by libpng with zlib-ng (imagecodecs), rows
    filtered with Paeth: the same pixels Pillow would write, in about 55 % of its time on a speckled tile."""
    # imagecodecs' stub returns bytes | bytearray for every call; it is a bytearray only when out= is given
    return imagecodecs.png_encode(  # type: ignore[return-value]
        np.ascontiguousarray(array), level=compress_level, filter=PNG_FILTER
    )


def source_window(
    src_transform: Affine, src_crs, dst_transform: Affine, dst_crs, size: int, pad: int = 2
) -> Window:
    """The window of source pixels that covers a destination tile (any rotation, any CRS)."""
    left, top = dst_transform.c, dst_transform.f
    right, bottom = dst_transform @ (size, size)
    if str(src_crs) != str(dst_crs):
        left, bottom, right, top = transform_bounds(
            dst_crs, src_crs, left, bottom, right, top, densify_pts=21
        )
    inv = ~src_transform
    cols, rows = zip(*(inv @ (x, y) for x, y in ((left, top), (right, top), (right, bottom), (left, bottom))))
    c0, c1 = math.floor(min(cols)) - pad, math.ceil(max(cols)) + pad
    r0, r1 = math.floor(min(rows)) - pad, math.ceil(max(rows)) + pad
    return Window(c0, r0, c1 - c0, r1 - r0)


def _inside(win: Window, src) -> Window | None:
    """The part of a pixel window inside the raster, or None."""
    try:
        inter = win.intersection(Window(0, 0, src.width, src.height))
    except Exception:  # noqa: BLE001 - rasterio raises WindowError when they do not intersect
        return None
    return inter if inter.width > 0 and inter.height > 0 else None


def _read_float(src, band: int | list[int], window: Window, to_float, stats: dict | None) -> np.ndarray:
    """The pixels of a window (inside the raster) as float32, nodata as NaN, converted by ``to_float``;
    ``stats["pixels_read"]`` counts the pixels decoded. A list of bands gives a (bands, rows, cols) array."""
    block = src.read(band, window=window, masked=True)
    if stats is not None:
        stats["pixels_read"] = stats.get("pixels_read", 0) + block.size
    return to_float(block) if to_float else block.astype(np.float32).filled(np.nan)


def warp_window(
    src,
    band: int | list[int],
    dst_transform: Affine,
    dst_crs: str,
    size: int,
    resampling: Resampling,
    to_float=None,
    stats: dict | None = None,
) -> np.ndarray | None:
    """Read the source pixels under a tile and warp them onto the tile grid, as float32 with NaN nodata.

    ``band``: one band (a (size, size) array back), or a list of bands warped in one pass ((bands, size,
    size)): the transformer and the source window are computed once, and each band keeps its own nodata
    (``UNIFIED_SRC_NODATA=NO``), so every band equals its own one-band warp. ``to_float`` converts the raw
    block (masked array) before resampling, e.g. dB -> linear intensity; by default the values are kept as
    they are. ``stats["pixels_read"]`` counts the source pixels decoded. Returns None when the tile does not
    overlap the raster at all.
    """
    inter = _inside(source_window(src.transform, src.crs, dst_transform, dst_crs, size), src)
    if inter is None:
        return None
    data = _read_float(src, band, inter, to_float, stats)
    dst = np.full(data.shape[:-2] + (size, size), np.nan, dtype=np.float32)
    reproject(
        data,
        dst,
        src_transform=src.window_transform(inter),
        src_crs=src.crs,
        src_nodata=np.nan,
        dst_transform=dst_transform,
        dst_crs=dst_crs,
        dst_nodata=np.nan,
        resampling=resampling,
        UNIFIED_SRC_NODATA="NO",
    )
    return dst


def pixel_window(src, dst_transform: Affine, dst_crs: str, size: int) -> Window | None:
    """The window of ``src`` pixels that *is* the tile, when the tile grid is the raster's own pixel grid
    (same CRS, north-up, same pixel size, origin on a pixel corner): then a plain windowed read gives
    exactly what the warper would (nearest neighbour onto identical pixels). None otherwise."""
    t = src.transform
    if str(src.crs) != str(dst_crs) or t.b != 0 or t.d != 0 or t.a <= 0 or t.e >= 0:
        return None
    if not (
        math.isclose(dst_transform.a, t.a, rel_tol=1e-9) and math.isclose(dst_transform.e, t.e, rel_tol=1e-9)
    ):
        return None
    col, row = (dst_transform.c - t.c) / t.a, (dst_transform.f - t.f) / t.e
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    return Window(round(col), round(row), size, size)


def read_window(
    src, band: int | list[int], window: Window, size: int, to_float=None, stats: dict | None = None
) -> np.ndarray | None:
    """A tile read straight from the raster's pixels (see :func:`pixel_window`), float32 with NaN nodata
    where the window leaves the raster; the same array :func:`warp_window` would return, for less work
    (a list of bands gives (bands, size, size), as there)."""
    inter = _inside(window, src)
    if inter is None:
        return None
    data = _read_float(src, band, inter, to_float, stats)
    out = np.full(data.shape[:-2] + (size, size), np.nan, dtype=np.float32)
    r0, c0 = int(inter.row_off - window.row_off), int(inter.col_off - window.col_off)
    out[..., r0 : r0 + data.shape[-2], c0 : c0 + data.shape[-1]] = data
    return out


def grid_read(
    src,
    band: int | list[int],
    dst_transform: Affine,
    dst_crs: str,
    size: int,
    resampling: Resampling,
    to_float=None,
    stats: dict | None = None,
) -> np.ndarray | None:
    """:func:`warp_window`'s result by the cheaper exact path: a windowed read when the resampling is nearest
    neighbour and the tile grid is the raster's own pixel grid (:func:`pixel_window`: the native level),
    the warper otherwise. (GDAL's average is not the identity on identical pixels next to nodata, so only
    nearest takes the read; at the native level the stages resample with nearest.) ``stats["direct"]`` /
    ``stats["warp"]`` count the tiles of each path."""
    window = pixel_window(src, dst_transform, dst_crs, size) if resampling == Resampling.nearest else None
    path = "warp" if window is None else "direct"
    if stats is not None:
        stats[path] = stats.get(path, 0) + 1
    if window is None:
        return warp_window(src, band, dst_transform, dst_crs, size, resampling, to_float, stats)
    return read_window(src, band, window, size, to_float, stats)


def overview_for(src, factor: float) -> int | None:
    """The index of the coarsest overview of band 1 whose decimation is at most ``factor`` (an overview
    averages pixels the tile would average anyway), or None when the raster has none that fits."""
    levels = [i for i, f in enumerate(src.overviews(1)) if f <= factor * (1 + 1e-6)]
    return levels[-1] if levels else None


def resampling_for(
    tile_gsd: float, native_gsd: float, coarser: Resampling = Resampling.average
) -> Resampling:
    return coarser if tile_gsd > native_gsd * 1.01 else Resampling.nearest


def _timing(started: float) -> dict:
    """When and where a chunk ran (for throughput measurements; not written to any table)."""
    return {"started_at": started, "finished_at": time.time(), "worker": os.getpid()}


class TileChunk:
    """Row function of the tile stage (Ray tasks, one instance per worker process): one chunk descriptor ->
    one shard + manifest row."""

    def __init__(self, cfg: TileSection, run_dir: str, access: dict | None = None):
        self.cfg = cfg
        if access:  # catalog.sign and S3 access (io.access_of): every href this worker reads is signed
            io.use_access(**access)
        if cfg.gdal_cache_mb is not None:  # rasterio sets GDAL's block cache in bytes (GDALSetCacheMax64)
            set_gdal_config("GDAL_CACHEMAX", int(cfg.gdal_cache_mb * 2**20))
        self.shards = io.join(run_dir, STAGE, "shards")
        self.errors = io.join(run_dir, STAGE, "errors")
        self._open: dict[
            tuple[str, int | None], rasterio.io.DatasetReader
        ] = {}  # one scene's datasets at a time
        self._keep: set[str] = set()  # the uris of the current scene's bands
        self._georef: dict[str, Georef] = {}  # GCP transformers, per scene
        self._radiometry: dict[
            tuple[str, str], safe.Radiometry
        ] = {}  # calibration / noise LUTs, per scene band
        self.stats: dict = {}  # pixels_read, and tiles per read path (direct, overview, warp)

    def _dataset(self, uri: str, overview: int | None = None):
        """The open dataset of a scene (or of one of its overviews); opening a new scene closes the last's."""
        if (uri, overview) not in self._open:
            keep = self._keep or {uri}
            if any(u not in keep for u, _ in self._open):
                self.close()
            self._open[(uri, overview)] = io.open_raster(uri, overview_level=overview)
        return self._open[(uri, overview)]

    def close(self) -> None:
        for ds in self._open.values():
            ds.close()
        self._open.clear()

    def __call__(self, chunk: ChunkRow) -> dict:
        started = time.time()
        name = shard_name(chunk["scene_id"], chunk["gsd_m"], chunk["chunk"])
        shard_uri = io.join(self.shards, name)
        planned = chunk["stop"] - chunk["start"]
        if (
            done := existing_shard(shard_uri, planned, name)
        ) is not None:  # an earlier, interrupted run wrote it
            return {**done, **_timing(started)}
        rows, errors = self.process(chunk)
        write_errors(io.join(self.errors, name), errors)  # only when the chunk rejected a tile
        io.write_parquet_atomic(shard_uri, pa.Table.from_pylist(rows, schema=TILES_SCHEMA))
        return {
            "shard": name,
            "planned": planned,
            "written": len(rows),
            "rejected": len(errors),
            "skipped": False,
            **_timing(started),
        }

    def process(self, chunk: ChunkRow) -> tuple[list[dict], list[dict]]:
        """Read, preprocess and encode the windows of a chunk (no writing: the benchmark loop uses this)."""
        scene = json.loads(chunk["scene_json"])
        grid = grid_for(scene, chunk["gsd_m"], self.cfg)
        rows: list[dict] = []
        errors: list[dict] = []
        bands = scene_bands(scene)
        self._keep = {u for b in bands for u in (b["uri"], b.get("mask")) if u}
        try:
            src = self._dataset(bands[0]["uri"])
            png_selection(bands, self.cfg.bands)
        # an unopenable scene: each of the chunk's tiles gets an error row
        except Exception as exc:  # noqa: BLE001
            for i in range(chunk["start"], chunk["stop"]):
                tid = tile_id_for(scene["scene_id"], grid.gsd, *window_of(chunk, grid, i))
                if isinstance(exc, MissingBand):
                    errors.append(
                        error_row(STAGE, tid, "missing_polarisation", f"{scene['sar_uri']}: {exc}.")
                    )
                else:
                    errors.append(
                        error_row(
                            STAGE, tid, "unreadable", f"{scene['sar_uri']}: {exc}. Re-download the scene."
                        )
                    )
            return rows, errors
        for i in range(chunk["start"], chunk["stop"]):
            r, c = window_of(chunk, grid, i)
            tid = tile_id_for(scene["scene_id"], grid.gsd, r, c)
            try:
                row = self.make_tile(src, scene, grid, r, c, tid)
            except Exception as exc:  # noqa: BLE001 - a corrupt block loses this tile only, with the reason
                errors.append(
                    error_row(
                        STAGE,
                        tid,
                        "unreadable",
                        f"{scene['sar_uri']} window of {tid}: {exc}. The file is truncated or corrupt: "
                        "re-download it.",
                    )
                )
                continue
            if isinstance(row, str):
                errors.append(error_row(STAGE, tid, "nodata", row))
            else:
                rows.append(row)
        return rows, errors

    def read_intensity(
        self, src, scene: SceneRow, transform: Affine, crs: str, size: int, uri: str | None = None
    ) -> np.ndarray:
        """Linear intensity on a tile grid (NaN nodata) by the cheapest exact path:

        * the tile grid is the scene's own pixel grid (native GSD, north-up, same CRS): a windowed read;
        * a coarser level of a linear-intensity scene with overviews (a COG): the warper averages the
          coarsest overview not coarser than the tile, instead of every full-resolution pixel
          (``tile.use_overviews``); overviews of dB or amplitude files averaged those units, so they are not
        used;
        * anything else (rotated, mirrored, another CRS, no overviews): GDAL's warper from full resolution.
        """
        units = scene["units"]
        scale = np.float32(scene.get("scale_factor") or 1.0)  # sidecar-calibrated amplitude (Capella)

        def to_linear(block: np.ma.MaskedArray) -> np.ndarray:
            values = np.ma.filled(block.astype(np.float32), np.nan)
            return sar.to_intensity(values * scale if scale != 1 else values, units)

        band, gsd, native = scene["band"], transform.a, scene["gsd_m"]
        window = pixel_window(src, transform, crs, size)
        if window is not None:
            path, out = "direct", read_window(src, band, window, size, to_linear, self.stats)
        else:
            overview = None
            if self.cfg.use_overviews and units == "intensity" and gsd > native * 1.01:
                overview = overview_for(src, gsd / native)
            if overview is not None:
                path = "overview"
                out = warp_window(
                    self._dataset(uri or scene["sar_uri"], overview),
                    band,
                    transform,
                    crs,
                    size,
                    Resampling.average,
                    to_linear,
                    self.stats,
                )
            else:
                path = "warp"
                out = warp_window(
                    src, band, transform, crs, size, resampling_for(gsd, native), to_linear, self.stats
                )
        self.stats[path] = self.stats.get(path, 0) + 1
        return np.full((size, size), np.nan, np.float32) if out is None else out

    def filtered_intensity(
        self, src, scene: SceneRow, grid: Grid, t: Affine
    ) -> tuple[np.ndarray, np.ndarray]:
        """A tile's linear intensity before and after the speckle filter. The tile is read with a halo of
        the filter's reach around it, so a tile filtered alone equals the scene filtered whole (no seams)."""
        size, halo = self.cfg.tile_size, sar.despeckle_halo(self.cfg.speckle)
        padded = self.read_intensity(
            src, scene, t @ Affine.translation(-halo, -halo), grid.crs, size + 2 * halo
        )
        looks_scale = (grid.gsd / scene["gsd_m"]) ** 2
        return padded[halo : halo + size, halo : halo + size], sar.despeckle(
            padded, self.cfg.speckle, looks_scale, halo
        )

    def gcp_intensity(
        self,
        scene: Mapping[str, Any],
        bands: list[dict],
        transform: Affine,
        crs: str,
        height: int,
        width: int,
    ) -> tuple[np.ndarray | None, list[int]]:
        """Linear intensity of a GCP-referenced scene's bands on a grid of ``height`` x ``width`` pixels
        ((bands, height, width), NaN nodata), or None when the grid misses the scene, and per band how many
        pixels of the source window thermal-noise removal took to the floor.

        Only the source window under the grid is read (found by inverting the GCP transformer along the
        grid's outline), calibrated with the product's LUTs on that window's lines and pixels, and warped by
        GDAL through the GCPs shifted into the window (``SRC_METHOD=GCP_TPS``, or the polynomial): the same
        mapping as warping the whole product."""
        sid = scene["scene_id"]
        if sid not in self._georef:
            self._georef = {
                sid: Georef(json.loads(scene["gcps"]), scene["crs"], *_method(scene["gcp_method"]))
            }
            self._radiometry = {}
        georef = self._georef[sid]
        sx, sy = np.linspace(0, width, 17), np.linspace(0, height, 9)
        edge = (
            np.concatenate([sx, np.full(9, width), sx[::-1], np.zeros(9)]),
            np.concatenate([np.zeros(17), sy, np.full(17, height), sy[::-1]]),
        )
        # affine maps arrays of points too; its hints say a point
        xs, ys = transform * edge  # type: ignore[operator]
        if str(crs) != str(georef.crs):
            from rasterio.warp import transform as warp_points

            xs, ys = warp_points(crs, georef.crs, list(xs), list(ys))
        rows, cols = georef.rowcol(xs, ys)
        pad = 4 + math.ceil(transform.a / max(scene["gsd_m"], 1e-9))
        c0, r0 = math.floor(np.min(cols)) - pad, math.floor(np.min(rows)) - pad
        win = Window(c0, r0, math.ceil(np.max(cols)) + pad - c0, math.ceil(np.max(rows)) + pad - r0)
        inter = _inside(win, self._dataset(bands[0]["uri"]))
        if inter is None:
            return None, [0] * len(bands)
        data, floored = [], []
        for b in bands:
            src = self._dataset(b["uri"])
            block = src.read(b["band"], window=inter, masked=True)
            self.stats["pixels_read"] = self.stats.get("pixels_read", 0) + block.size
            dn = block.astype(np.float32).filled(np.nan)
            if scene.get("nodata") is not None:
                dn[dn == scene["nodata"]] = np.nan
            if scene.get("calibration") not in (None, "none") or scene.get("noise_removed"):
                key = (sid, b["polarisation"])
                if key not in self._radiometry:
                    self._radiometry[key] = safe.Radiometry.for_band(
                        b,
                        scene.get("calibration") or "none",
                        bool(scene.get("noise_removed")),
                        b.get("noise_floor_db", -40.0),
                    )
                values, low = self._radiometry[key].intensity(dn, int(inter.row_off), int(inter.col_off))
            else:
                values, low = sar.to_intensity(dn, scene["units"]), np.zeros(dn.shape, bool)
            data.append(values)
            floored.append(int(np.count_nonzero(low)))
        stack = np.stack(data)
        dst = np.full((len(stack), height, width), np.nan, dtype=np.float32)
        reproject(
            stack,
            dst,
            src_nodata=np.nan,
            dst_transform=transform,
            dst_crs=crs,
            dst_nodata=np.nan,
            resampling=resampling_for(transform.a, scene["gsd_m"]),
            UNIFIED_SRC_NODATA="NO",
            **georef.warp_options(inter.row_off, inter.col_off),
        )
        self.stats["gcp_warp"] = self.stats.get("gcp_warp", 0) + 1
        return dst, floored

    def band_intensities(
        self, src, scene: SceneRow, bands: list[dict], grid: Grid, t: Affine
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
        """Every band's linear intensity on a tile, before and after the speckle filter (read with the
        filter's halo, as :meth:`filtered_intensity`), and per band the source pixels noise removal took to
        the floor."""
        size, halo = self.cfg.tile_size, sar.despeckle_halo(self.cfg.speckle)
        looks_scale = (grid.gsd / scene["gsd_m"]) ** 2
        inner = np.s_[halo : halo + size, halo : halo + size]
        if scene.get("georef") == "gcps":
            padded, clipped = self.gcp_intensity(
                scene, bands, t @ Affine.translation(-halo, -halo), grid.crs, size + 2 * halo, size + 2 * halo
            )
            if padded is None:
                padded = np.full((len(bands), size + 2 * halo, size + 2 * halo), np.nan, np.float32)
            return (
                [p[inner] for p in padded],
                [sar.despeckle(p, self.cfg.speckle, looks_scale, halo) for p in padded],
                clipped,
            )
        mask = bands[0].get("mask")
        if len(bands) == 1 and not mask:
            raw, filtered = self.filtered_intensity(src, scene, grid, t)
            return [raw], [filtered], [0]
        masked = None
        if mask:  # OPERA's layover/shadow layer: 0 valid; shadow, layover, both and fill become nodata
            layer = grid_read(
                self._dataset(mask),
                1,
                t @ Affine.translation(-halo, -halo),
                grid.crs,
                size + 2 * halo,
                Resampling.nearest,
            )
            masked = np.ones((size + 2 * halo,) * 2, bool) if layer is None else ~(layer == 0)
        raws, filts = [], []
        for b in bands:
            padded = self.read_intensity(
                self._dataset(b["uri"]),
                {**scene, "band": b["band"]},
                t @ Affine.translation(-halo, -halo),
                grid.crs,
                size + 2 * halo,
                uri=b["uri"],
            )
            if masked is not None:
                padded[masked] = np.nan
            raws.append(padded[inner])
            filts.append(sar.despeckle(padded, self.cfg.speckle, looks_scale, halo))
        return raws, filts, [0] * len(bands)

    def make_tile(self, src, scene: SceneRow, grid: Grid, r: int, c: int, tid: str) -> dict | str:
        """One tile row, or the reason it was dropped."""
        cfg = self.cfg
        size = cfg.tile_size
        t = grid.window_transform(r, c)
        bands = scene_bands(scene)
        mode, shown = png_selection(bands, cfg.bands)
        raws, filts, clipped = self.band_intensities(src, scene, bands, grid, t)
        invalid = np.zeros((size, size), bool)
        for i in shown:
            invalid |= ~np.isfinite(raws[i])
        nodata_fraction = float(invalid.mean())
        if nodata_fraction > cfg.max_nodata_fraction:
            return (
                f"tile {tid} of {scene['sar_uri']}: {nodata_fraction:.0%} of pixels are nodata/NaN/inf "
                f"(limit tile.max_nodata_fraction={cfg.max_nodata_fraction:.0%}); raise the limit to keep "
                "edge tiles."
            )
        band_rows, dbs = [], []
        for i, b in enumerate(bands):
            bad = ~np.isfinite(raws[i])
            db = sar.to_db(filts[i])
            db[bad] = np.nan
            dbs.append(db)
            ok = db[~bad]
            if ok.size:
                p02, p98, low, high = sar.percentiles(ok, [2, 98, cfg.stretch.low, cfg.stretch.high])
                stats = {
                    "db_mean": float(ok.mean()),
                    "db_std": float(ok.std()),
                    "db_p02": float(p02),
                    "db_p98": float(p98),
                }
            else:
                low = high = None
                stats = dict.fromkeys(("db_mean", "db_std", "db_p02", "db_p98"), float("nan"))
            band_rows.append(
                {
                    "polarisation": b["polarisation"],
                    "nodata_fraction": float(bad.mean()),
                    "noise_clipped": int(clipped[i]),
                    **stats,
                    "_bounds": (low, high),
                }
            )
        channels, stretches = [], []
        images = (
            [dbs[i] for i in shown]
            if mode == "grey"
            else [dbs[shown[0]], dbs[shown[1]], dbs[shown[0]] - dbs[shown[1]]]
        )
        for k, db in enumerate(images):
            db = db.copy()
            db[invalid] = np.nan
            if k < len(shown):  # a band: its own percentiles (computed above over its valid pixels)
                bounds = band_rows[shown[k]]["_bounds"]
                bounds = None if bounds[0] is None else (float(bounds[0]), float(bounds[1]))
            else:  # the co/cross ratio of a composite
                valid = db[np.isfinite(db)]
                bounds = (
                    tuple(float(v) for v in sar.percentiles(valid, [cfg.stretch.low, cfg.stretch.high]))
                    if valid.size
                    else None
                )
            image, lo, hi = sar.stretch_to_uint8(db, cfg.stretch, bounds=bounds)
            channels.append(image)
            stretches.append([lo, hi])
        for k, i in enumerate(shown):
            band_rows[i]["stretch_db"] = stretches[k]
        for row in band_rows:
            row.pop("_bounds")
            row.setdefault("stretch_db", None)
        first = band_rows[shown[0]]
        image = channels[0] if mode == "grey" else np.dstack(channels)
        label = (
            bands[shown[0]]["polarisation"]
            if mode == "grey"
            else f"{bands[shown[0]]['polarisation']}+{bands[shown[1]]['polarisation']} composite"
        )
        return {
            "tile_id": tid,
            "scene_id": scene["scene_id"],
            "gsd_m": grid.gsd,
            "row": r,
            "col": c,
            "crs": grid.crs,
            "transform": [float(v) for v in tuple(t)[:6]],
            "width": size,
            "height": size,
            "bounds": [t.c, t.f - size * grid.gsd, t.c + size * grid.gsd, t.f],
            "footprint": outline_4326(t, grid.crs, size, size, densify=8).wkb,
            "sar_png": encode_png(image, cfg.png_compress_level),
            "nodata_fraction": nodata_fraction,
            "db_mean": first["db_mean"],
            "db_std": first["db_std"],
            "db_p02": first["db_p02"],
            "db_p98": first["db_p98"],
            "stretch_db": stretches[0],
            "sensor": scene["sensor"],
            "polarisation": label,
            "region": scene["region"],
            "native_gsd_m": scene["gsd_m"],
            "bands": band_rows,
        }


def _method(name: str | None) -> tuple[str, int]:
    """``gcp_method`` of a scene row (tps, polynomial<order>, affine) as (method, order)."""
    name = name or "tps"
    if name.startswith("polynomial"):
        return "polynomial", int(name[len("polynomial") :] or 3)
    return name, 3
