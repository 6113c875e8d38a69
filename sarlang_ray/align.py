"""align: per tile, the objects in pixel space, land-cover fractions and the optical twin.

Vector labels (GeoParquet or any OGR format, any CRS) are validated once into ``align/labels.parquet``
(EPSG:4326, with a bbox covering column); bad files and bad features go to the errors table. A global
layer (``catalog.labels``: one GeoParquet far larger than memory, or a partitioned folder of them) is
never read whole: :class:`LabelSlicer` reads, per scene, only the files and row groups its footprint
needs and validates those features the same way into ``align/labels/<scene_id>.parquet``. Then each
tile shard of the tile stage becomes one shard of the final **tiles** table, on a Ray Data actor pool:

* objects: labels of the scene's footprint reprojected to the tile CRS, queried with an STRtree per
  scene, clipped to the tile, converted to pixel coordinates (box xyxy, polygon WKB, area, orientation).
  An object is kept if at least ``align.min_visible_fraction`` of its area is inside the tile, or its
  visible part spans at least that fraction of the tile (long objects: roads, bridges, harbours);
* land cover: the land-cover raster warped (nearest) onto the tile grid, as class -> fraction;
* optical: the optical twin warped onto the SAR tile's grid (same footprint, same pixels), as RGB PNG.
"""

from __future__ import annotations

import math
import os
import traceback
from collections import OrderedDict
from typing import Any

import geopandas as gpd
import numpy as np
import pyarrow as pa
import shapely
from affine import Affine
from rasterio._err import CPLE_BaseError
from rasterio.enums import ColorInterp, Resampling
from shapely import STRtree, affinity
from shapely.geometry import box
from shapely.validation import explain_validity

from sarlang_ray import companions, io
from sarlang_ray.catalog import metric_gsd
from sarlang_ray.config import AlignSection
from sarlang_ray.errors import ItemError, error_row, reasons_json
from sarlang_ray.rows import SceneRow, TileRow
from sarlang_ray.tables import (
    ALIGNED_SCHEMA,
    existing_shard,
    geo_schema,
    read_error_rows,
    tiles_counters,
    write_errors,
)
from sarlang_ray.tiling import encode_png, grid_read, resampling_for

STAGE = "align"


# ---------------------------------------------------------------- labels
def prepare_labels(
    uris: list[str], cfg: AlignSection, archive: str = ""
) -> tuple[gpd.GeoDataFrame, list[dict], int]:
    """Read and validate label files. Returns clean labels (EPSG:4326), error rows, features planned.

    ``label_id`` is ``<path relative to the archive>#feature=<row>``, so ids do not depend on where the
    archive is mounted.
    """
    frames, errors, planned = [], [], 0
    for uri in uris:
        rel = io.relative(uri, archive)
        try:
            gdf = gpd.read_parquet(uri) if uri.endswith((".parquet", ".geoparquet")) else gpd.read_file(uri)
        except Exception as exc:  # noqa: BLE001 - geopandas/pyogrio raise many classes: the file's error row
            errors.append(
                error_row(
                    STAGE,
                    uri,
                    "unreadable",
                    f"cannot read labels {uri}: {str(exc).rstrip('.')}. Write them as GeoParquet or GeoJSON.",
                )
            )
            continue
        if gdf.crs is None:
            errors.append(
                error_row(
                    STAGE,
                    uri,
                    "no_crs",
                    f"labels {uri} have no CRS. Set one (gdf.set_crs(...)) and write them again; "
                    "GeoJSON is WGS 84 by definition.",
                )
            )
            continue
        if cfg.class_column not in gdf.columns:
            errors.append(
                error_row(
                    STAGE,
                    uri,
                    "no_class_column",
                    f"labels {uri} have no column {cfg.class_column!r} "
                    f"(columns: {list(gdf.columns)}). Rename it or set align.class_column.",
                )
            )
            continue
        planned += len(gdf)
        frame, bad = clean_labels(
            gdf,
            list(gdf[cfg.class_column]),
            [f"{uri}#feature={i}" for i in range(len(gdf))],
            [f"{rel}#feature={i}" for i in range(len(gdf))],
            cfg,
        )
        errors += bad
        frames.append(frame)
    labels = (
        gpd.GeoDataFrame(pd_concat(frames), crs=4326)
        if frames
        else gpd.GeoDataFrame({"class": [], "label_id": []}, geometry=[], crs=4326)
    )
    return labels, errors, planned


def clean_labels(
    gdf: gpd.GeoDataFrame, classes: list, items: list[str], ids: list[str], cfg: AlignSection
) -> tuple[gpd.GeoDataFrame, list[dict]]:
    """Validate features (a GeoDataFrame with a CRS) one by one: the usable ones as EPSG:4326 labels
    (``class``, ``label_id``, geometry), an error row (item ``items[i]``) for each of the others: empty,
    not a polygon, no class, invalid (repaired with ``align.invalid_geometry=repair``), not a place on
    Earth."""
    errors, keep, geoms = [], [], list(gdf.geometry)
    for i, (geom, cls) in enumerate(zip(geoms, classes)):
        item = items[i]
        if geom is None or geom.is_empty:
            errors.append(
                error_row(STAGE, item, "empty_geometry", f"{item}: empty geometry. Remove the feature.")
            )
        elif geom.geom_type not in ("Polygon", "MultiPolygon"):
            errors.append(
                error_row(
                    STAGE,
                    item,
                    "not_polygon",
                    f"{item}: {geom.geom_type}; labels must be polygons (buffer points/lines first).",
                )
            )
        elif not isinstance(cls, str) or not cls.strip():
            errors.append(
                error_row(
                    STAGE,
                    item,
                    "no_class",
                    f"{item}: missing class name in column {cfg.class_column!r}. Fill it in or remove the "
                    "feature.",
                )
            )
        elif not geom.is_valid:
            reason = explain_validity(geom)
            if cfg.invalid_geometry == "repair":
                repaired = shapely.make_valid(geom)
                polys = [
                    g
                    for g in getattr(repaired, "geoms", [repaired])
                    if g.geom_type in ("Polygon", "MultiPolygon")
                ]
                if polys and shapely.union_all(polys).area > 0:
                    geoms[i] = shapely.union_all(polys)
                    keep.append(i)
                    continue
            errors.append(
                error_row(
                    STAGE,
                    item,
                    "invalid_geometry",
                    f"{item}: invalid polygon ({reason}). "
                    "Fix it (shapely.make_valid) or set align.invalid_geometry=repair.",
                )
            )
        else:
            keep.append(i)
    frame = gpd.GeoDataFrame(
        {"class": [classes[i].strip() for i in keep], "label_id": [ids[i] for i in keep]},
        geometry=[geoms[i] for i in keep],
        crs=gdf.crs,
    ).to_crs(4326)
    placed = _placeable(frame)
    for i in np.flatnonzero(~placed).tolist():
        item = items[keep[i]]
        errors.append(
            error_row(
                STAGE,
                item,
                "bad_coordinates",
                f"{item}: in {gdf.crs.to_string()} this polygon lands at "
                f"lon/lat bounds {tuple(round(v, 3) for v in frame.geometry.iloc[i].bounds)}, not a place "
                "on Earth, or it crosses the antimeridian. Check the file's CRS (coordinates written in "
                "another CRS than declared?) and split polygons at 180 degrees.",
            )
        )
    return frame[placed], errors


class LabelSlicer:
    """Ray Data row function: one scene's slice of a global label layer (``catalog.labels``), validated.

    Reads only the layer files whose extent meets the scene footprint's bounds, and in them only the row
    groups (and rows) whose covering ``bbox`` meets it; maps classes from the layer's attributes
    (``catalog.labels_class_map``); validates as :func:`clean_labels`. Writes the usable labels (EPSG:4326,
    covering bbox) to ``<out>/labels/<scene_id>.parquet`` and the error rows to
    ``<out>/label_errors/<scene_id>.parquet``; returns counts and the files the scan opened.
    """

    def __init__(
        self,
        layer: companions.LabelLayer,
        class_map: dict[str, str] | None,
        id_column: str | None,
        cfg: AlignSection,
        out: str,
    ):
        self.layer, self.class_map, self.id_column, self.cfg, self.out = layer, class_map, id_column, cfg, out

    def __call__(self, row: dict) -> dict:
        scene_id = row["scene_id"]
        bbox = self.layer.bbox_of(shapely.from_wkb(row["footprint"]))
        columns = companions.class_columns(self.class_map, self.cfg.class_column)
        if self.id_column:
            columns.append(self.id_column)
        table, files = self.layer.read(bbox, columns)
        geometry = (
            gpd.GeoSeries.from_wkb(
                table.column(self.layer.geometry_column).to_numpy(zero_copy_only=False), crs=self.layer.crs
            )
            if files
            else gpd.GeoSeries([], crs=self.layer.crs)
        )
        # no covering column: the row groups were not filtered, the rows are
        if files and not self.layer.covering:
            inside = geometry.intersects(box(*bbox)).to_numpy()
            table, geometry = table.filter(pa.array(inside)), geometry[inside].reset_index(drop=True)
        classes = companions.map_classes(table, self.class_map, self.cfg.class_column) if files else []
        mapped = [i for i, c in enumerate(classes) if c is not None]
        ids = companions.feature_ids(table, self.layer.geometry_column, self.id_column) if files else []
        gdf = gpd.GeoDataFrame(geometry=geometry.iloc[mapped].reset_index(drop=True), crs=self.layer.crs)
        labels, errors = clean_labels(
            gdf,
            [classes[i] for i in mapped],
            [f"{self.layer.root}#{ids[i]}" for i in mapped],
            [ids[i] for i in mapped],
            self.cfg,
        )
        labels = labels.reset_index(drop=True)
        fs, path = io.filesystem(io.join(self.out, "labels", f"{scene_id}.parquet"))
        io.makedirs(io.join(self.out, "labels"))
        labels.to_parquet(path, filesystem=fs, write_covering_bbox=True)
        # only when it has rows
        write_errors(io.join(self.out, "label_errors", f"{scene_id}.parquet"), errors)
        return {
            "scene_id": scene_id,
            "files": files,
            "read": table.num_rows,
            "unmapped": table.num_rows - len(mapped),
            "planned": len(mapped),
            "written": len(labels),
            "rejected": len(errors),
        }


def _placeable(labels: gpd.GeoDataFrame) -> np.ndarray:
    """Which lon/lat polygons are real places: finite, within [-180, 180] x [-90, 90], and not wrapped
    round the globe (a polygon spanning more than 180 degrees of longitude crossed the antimeridian)."""
    b = labels.geometry.bounds.to_numpy(dtype=np.float64).reshape(-1, 4)
    with np.errstate(invalid="ignore"):
        return (
            np.isfinite(b).all(axis=1)
            & (b[:, 0] >= -180)
            & (b[:, 2] <= 180)
            & (b[:, 1] >= -90)
            & (b[:, 3] <= 90)
            & (b[:, 2] - b[:, 0] <= 180)
        )


def pd_concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def objects_in_tile(
    labels: gpd.GeoDataFrame, tree: STRtree, transform: Affine, size: int, min_visible: float
) -> list[dict]:
    """Labels (already in the tile CRS) clipped to a north-up tile, in pixel coordinates."""
    a, c, e, f = transform.a, transform.c, transform.e, transform.f
    tile_box = box(c, f + e * size, c + a * size, f)
    to_px = [1 / a, 0, 0, 1 / e, -c / a, -f / e]
    out = []
    geoms = labels.geometry.values
    for i in sorted(tree.query(tile_box, predicate="intersects").tolist()):
        g = geoms[i]
        clipped = g.intersection(tile_box)
        if clipped.is_empty or clipped.area <= 0 or g.area <= 0:
            continue
        px = affinity.affine_transform(clipped, to_px)
        x0, y0, x1, y1 = (round(min(max(v, 0.0), float(size)), 4) for v in px.bounds)  # clip float noise
        visible = clipped.area / g.area
        if visible < min_visible and max(x1 - x0, y1 - y0) / size < min_visible:
            continue
        out.append(
            {
                "class": labels["class"].iat[i],
                "bbox_xyxy": [x0, y0, x1, y1],
                "polygon": shapely.to_wkb(px),
                "area_px": px.area,
                "angle_deg": orientation_deg(px),
                "visible_fraction": min(1.0, visible),
                "label_id": labels["label_id"].iat[i],
            }
        )
    return out


def orientation_deg(poly) -> float:
    """Direction of the long axis of the minimum rotated rectangle, CCW from +x (image y points down)."""
    rect = poly.minimum_rotated_rectangle
    if rect.geom_type != "Polygon":
        return 0.0
    (x0, y0), (x1, y1), (x2, y2) = list(rect.exterior.coords)[:3]
    e1, e2 = (x1 - x0, y1 - y0), (x2 - x1, y2 - y1)
    dx, dy = e1 if math.hypot(*e1) >= math.hypot(*e2) else e2
    return round(math.degrees(math.atan2(-dy, dx)) % 180.0, 3) % 180.0


def landcover_fractions(lc: np.ndarray, classes: dict[int, str]) -> tuple[list[tuple[str, float]], float]:
    """Class -> fraction over pixels of a known class; and the fraction of such pixels in the tile."""
    finite = np.isfinite(lc)
    values = lc[finite].astype(np.int64)
    known = np.isin(values, list(classes))
    n_known = int(known.sum())
    if n_known == 0:
        return [], 0.0
    codes, counts = np.unique(values[known], return_counts=True)
    fractions = {classes[int(k)]: float(n) / n_known for k, n in zip(codes, counts)}
    return sorted(fractions.items()), n_known / lc.size


def optical_band_indexes(src, configured: list[int] | None) -> list[int]:
    if configured:
        return list(configured)
    ci = list(src.colorinterp)
    if all(x in ci for x in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)):
        return [
            ci.index(ColorInterp.red) + 1,
            ci.index(ColorInterp.green) + 1,
            ci.index(ColorInterp.blue) + 1,
        ]
    desc = [d or "" for d in src.descriptions]
    if all(b in desc for b in ("B4", "B3", "B2")):  # Sentinel-2 naming
        return [desc.index("B4") + 1, desc.index("B3") + 1, desc.index("B2") + 1]
    return [1, 2, 3] if src.count >= 3 else [1, 1, 1]


def optical_rgb(src, bands: list[int], transform: Affine, crs: str, size: int, tile_gsd: float) -> np.ndarray:
    """The optical twin on the SAR tile's grid as uint8 RGB (nodata black): read straight from its pixels
    when the tile grid is the twin's own (a twin co-registered at the SAR's resolution, at the native
    level), else warped (:func:`tiling.grid_read`)."""
    native = math.sqrt(np.prod(metric_gsd(src)))
    resampling = resampling_for(tile_gsd, native, Resampling.average)
    if resampling == Resampling.nearest and tile_gsd < native * 0.99:
        resampling = Resampling.bilinear
    channels = grid_read(src, list(bands), transform, crs, size, resampling)  # three bands, one pass
    if channels is None:
        channels = np.full((3, size, size), np.nan, np.float32)
    rgb = np.moveaxis(channels, 0, -1)
    valid = np.isfinite(rgb).all(axis=-1)
    if src.dtypes[0] == "uint8":
        out = np.where(valid[..., None], np.clip(np.rint(rgb), 0, 255), 0)
    elif valid.any():  # reflectances and the like: joint 2-98 % stretch
        lo, hi = np.percentile(rgb[valid], [2, 98])
        out = np.where(valid[..., None], np.clip((rgb - lo) / max(hi - lo, 1e-6), 0, 1) * 255, 0)
    else:
        out = np.zeros_like(rgb)
    return np.rint(out).astype(np.uint8)


# a file that cannot be read (RasterioIOError, ArrowIOError are OSErrors)
IO_ERRORS = (
    OSError,
    CPLE_BaseError,
)


def failure_reason(exc: Exception, tile: TileRow, scene: SceneRow) -> ItemError:
    """The errors-table reason of a tile that failed to align, by cause: an :class:`ItemError` keeps its own
    class (``nodata``: an empty tile); a file that cannot be read is ``unreadable``, the only case told to
    fetch the file again; anything else is a ``bug`` of sarlang-ray, with where it was raised."""
    tid = tile["tile_id"]
    if isinstance(exc, ItemError):
        return exc
    files = ", ".join(
        f"{k.split('_')[0]} {scene[k]}" for k in ("optical_uri", "landcover_uri") if scene.get(k)
    )
    if isinstance(exc, IO_ERRORS):
        return ItemError(
            "unreadable",
            f"aligning {tid} failed reading a raster of scene {tile['scene_id']} "
            f"({files or 'no companion raster'}): {type(exc).__name__}: {exc}. The file may be "
            "missing, truncated or corrupt: re-download it.",
        )
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" for f in reversed(frames))
    return ItemError(
        "bug",
        f"aligning {tid} raised {type(exc).__name__}: {exc} (at {where}). This is a bug in "
        "sarlang-ray, not a problem with the input files: please report it with this message.",
    )


class AlignShard:
    """Ray Data row function (actor pool): one tile shard -> one shard of the final tiles table."""

    def __init__(
        self,
        cfg: AlignSection,
        run_dir: str,
        labels_uri: str | None,
        cache_scenes: int = 4,
        labels_dir: str | None = None,
        access: dict | None = None,
    ):
        from sarlang_ray import tiling

        self.cfg = cfg
        if access:  # catalog.sign and S3 access (io.access_of): optical twins and land cover read signed
            io.use_access(**access)
        self.tile_shards = io.join(run_dir, tiling.STAGE, "shards")
        self.out_shards = io.join(run_dir, STAGE, "shards")
        self.out_errors = io.join(run_dir, STAGE, "errors")
        scenes = io.read_parquet(
            io.join(run_dir, "catalog", "scenes.parquet"),
            columns=["scene_id", "optical_uri", "landcover_uri", "footprint", "tile_crs"],
        ).to_pylist()
        self.scenes = {s["scene_id"]: s for s in scenes}
        self.labels_uri = labels_uri
        self.labels_dir = labels_dir  # per-scene slices of a global layer (LabelSlicer)
        self.landcover_classes = companions.landcover_classes(cfg.landcover_classes, cfg.landcover_preset)
        self._labels: OrderedDict[str, tuple[gpd.GeoDataFrame, STRtree]] = OrderedDict()
        self._rasters: OrderedDict[str, Any] = OrderedDict()  # open rasterio datasets (rasterio is untyped)
        self.cache_scenes = cache_scenes
        self.schema = geo_schema(ALIGNED_SCHEMA)

    def _raster(self, uri: str):
        if uri not in self._rasters:
            self._rasters[uri] = io.open_raster(uri)
            if len(self._rasters) > 2 * self.cache_scenes:
                self._rasters.popitem(last=False)[1].close()
        return self._rasters[uri]

    def _scene_labels(self, scene_id: str, crs: str) -> tuple[gpd.GeoDataFrame, STRtree]:
        if scene_id not in self._labels:
            scene = self.scenes[scene_id]
            scene_slice = None if self.labels_dir is None else io.join(self.labels_dir, f"{scene_id}.parquet")
            if scene_slice is not None and io.exists(scene_slice):
                fs, path = io.filesystem(scene_slice)
                gdf = gpd.read_parquet(path, filesystem=fs)
            elif self.labels_uri is None:
                gdf = gpd.GeoDataFrame({"class": [], "label_id": []}, geometry=[], crs=4326)
            else:
                bbox = shapely.from_wkb(scene["footprint"]).bounds
                fs, path = io.filesystem(self.labels_uri)
                gdf = gpd.read_parquet(path, bbox=bbox, filesystem=fs)
            gdf = gdf.to_crs(crs).reset_index(drop=True)
            self._labels[scene_id] = (gdf, STRtree(gdf.geometry.values))
            if len(self._labels) > self.cache_scenes:
                self._labels.popitem(last=False)
        return self._labels[scene_id]

    def __call__(self, row: dict) -> dict:
        name = row["shard"]
        out_uri = io.join(self.out_shards, name)
        tiles = io.read_parquet(io.join(self.tile_shards, name))
        planned = tiles.num_rows
        if (
            done := existing_shard(out_uri, planned, name)
        ) is not None:  # an earlier, interrupted run wrote it
            rows = read_error_rows(io.join(self.out_errors, name), ["error_class"])
            return {
                **done,
                "objects": 0,
                "reasons": reasons_json(rows),
                **tiles_counters(io.read_parquet(out_uri, columns=["gsd_m", "objects"]).to_pylist()),
            }
        out_rows, errors, n_objects = [], [], 0
        for tile in tiles.to_pylist():
            try:
                tile.update(self.align_tile(tile))
            # contained: this tile goes to the errors table with its reason
            except Exception as exc:  # noqa: BLE001
                reason = failure_reason(exc, tile, self.scenes[tile["scene_id"]])
                errors.append(error_row(STAGE, tile["tile_id"], reason.error_class, str(reason)))
                continue
            n_objects += len(tile["objects"])
            out_rows.append(tile)
        write_errors(io.join(self.out_errors, name), errors)  # only when the shard rejected a tile
        io.write_parquet_atomic(out_uri, pa.Table.from_pylist(out_rows, schema=self.schema))
        return {
            "shard": name,
            "planned": planned,
            "written": len(out_rows),
            "rejected": len(errors),
            "objects": n_objects,
            "skipped": False,
            "reasons": reasons_json(errors),
            **tiles_counters(out_rows),
        }

    def align_tile(self, tile: TileRow) -> dict:
        """Objects, land cover and optical twin of one tile.

        Raises:
            ItemError: ``nodata``: the tile has no valid SAR pixel (possible with
                ``tile.max_nodata_fraction=1``): there is nothing to align or describe.
        """
        if (tile.get("nodata_fraction") or 0.0) >= 1.0:
            raise ItemError(
                "nodata",
                f"tile {tile['tile_id']} of scene {tile['scene_id']} has no valid SAR pixel "
                "(all nodata): nothing to align or describe. Set tile.max_nodata_fraction below 1 "
                "to drop such tiles at the tile stage.",
            )
        scene = self.scenes[tile["scene_id"]]
        t = Affine(*tile["transform"])
        size = tile["width"]
        labels, tree = self._scene_labels(tile["scene_id"], tile["crs"])
        out: dict = {"objects": objects_in_tile(labels, tree, t, size, self.cfg.min_visible_fraction)}
        out["landcover"], out["landcover_valid_fraction"] = [], 0.0
        if scene["landcover_uri"]:
            lc = grid_read(self._raster(scene["landcover_uri"]), 1, t, tile["crs"], size, Resampling.nearest)
            if lc is not None:
                out["landcover"], out["landcover_valid_fraction"] = landcover_fractions(
                    lc, self.landcover_classes
                )
        out["optical_png"] = None
        if scene["optical_uri"]:
            src = self._raster(scene["optical_uri"])
            rgb = optical_rgb(
                src, optical_band_indexes(src, self.cfg.optical_bands), t, tile["crs"], size, tile["gsd_m"]
            )
            out["optical_png"] = encode_png(rgb)
        return out
