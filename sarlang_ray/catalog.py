"""catalog: scan an archive (local or s3://) into the scenes table, one row per usable SAR scene.

Each SAR file is inspected on a Ray Data worker: georeferencing, GSD in metres, footprint in EPSG:4326,
units, sensor, polarisation, and a cheap decimated read that proves the pixels are readable and not all
nodata. Files that cannot be used go to the errors table with the reason and what to do.

Rotated or sheared geotransforms (the Umbra GEC file, for one) are kept and *warped north-up per tile*
(``catalog.rotated: warp``, the default): tiles are cut on a north-up grid in the scene's CRS and
filled by GDAL's warper, so the rest of the pipeline only ever sees north-up tiles with a plain affine.
Set ``catalog.rotated: reject`` to send such scenes to the errors table instead.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import rasterio
from pyproj import CRS, Geod
from rasterio.enums import ColorInterp, Resampling
from rasterio.warp import transform as warp_transform
from shapely.geometry import Polygon

from sarlang_ray import io
from sarlang_ray.config import CatalogSection
from sarlang_ray.errors import ItemError, error_row

STAGE = "catalog"
_POLARISATIONS = ("VV", "VH", "HH", "HV")
_SENSORS = (
    (re.compile(r"(^|[^a-z])s1[ab]?([^a-z]|$)|sentinel-?1|opera_l2_rtc-s1", re.I), "Sentinel-1"),
    (re.compile(r"umbra", re.I), "Umbra"),
    (re.compile(r"capella", re.I), "Capella"),
    (re.compile(r"iceye", re.I), "ICEYE"),
    (re.compile(r"gf-?3|gaofen", re.I), "Gaofen-3"),
    (re.compile(r"tsx|terrasar", re.I), "TerraSAR-X"),
)


def scene_id_for(uri: str, archive: str) -> str:
    """Stable, path-safe id: the file stem (sanitised, shortened) plus a hash of the relative path."""
    rel = io.relative(uri, archive)
    stem = PurePosixPath(rel).name.rsplit(".", 1)[0].lower()
    stem = re.sub(r"[^a-z0-9]+", "_", stem).strip("_")[:48] or "scene"
    digest = hashlib.sha1(rel.encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def _companion(uri: str, rule: list[str] | None) -> str | None:
    """The optical twin / land-cover raster of a SAR uri, by regex substitution; None if absent."""
    if rule is None:
        return None
    pattern, replacement = rule
    candidate = re.sub(pattern, replacement, uri)
    if candidate == uri or not io.exists(candidate):
        return None
    return candidate


def metric_gsd(src: rasterio.io.DatasetReader) -> tuple[float, float]:
    """Pixel size in metres along the raster's x and y axes (works for rotated transforms)."""
    t = src.transform
    dx, dy = math.hypot(t.a, t.d), math.hypot(t.b, t.e)
    crs = src.crs
    if crs.is_projected:
        factor = crs.linear_units_factor[1]
        return dx * factor, dy * factor
    # geographic: geodesic length of one pixel step at the scene centre
    geod = Geod(ellps="WGS84")
    cx, cy = t @ (src.width / 2, src.height / 2)
    lon, lat = warp_transform(crs, "EPSG:4326", [cx, cx + t.a, cx + t.b], [cy, cy + t.d, cy + t.e])
    _, _, sx = geod.inv(lon[0], lat[0], lon[1], lat[1])
    _, _, sy = geod.inv(lon[0], lat[0], lon[2], lat[2])
    return abs(sx), abs(sy)


def outline_4326(transform, crs, width: int, height: int, densify: int = 16) -> Polygon:
    """The outline of a pixel grid (each side densified into ``densify`` steps) in EPSG:4326 lon/lat."""
    s = np.linspace(0, 1, densify + 1)[:-1]
    cols = np.concatenate([s * width, np.full_like(s, width), (1 - s) * width, np.zeros_like(s)])
    rows = np.concatenate([np.zeros_like(s), s * height, np.full_like(s, height), (1 - s) * height])
    xs, ys = zip(*(transform @ (c, r) for c, r in zip(cols, rows)))
    lon, lat = warp_transform(crs, "EPSG:4326", list(xs), list(ys))
    return Polygon(zip(lon, lat))


def footprint_4326(src: rasterio.io.DatasetReader) -> Polygon:
    """A raster's outline in EPSG:4326 lon/lat."""
    return outline_4326(src.transform, src.crs, src.width, src.height)


def tile_crs_for(crs: CRS, footprint: Polygon) -> str:
    """CRS in which tiles are cut: the scene's own if projected, else the UTM zone of its centre."""
    if crs.is_projected and abs(crs.linear_units_factor[1] - 1.0) < 1e-9:
        return crs.to_string()
    from pyproj.aoi import AreaOfInterest
    from pyproj.database import query_utm_crs_info

    c = footprint.centroid
    info = query_utm_crs_info(
        datum_name="WGS 84", area_of_interest=AreaOfInterest(c.x, c.y, c.x, c.y)
    )
    return f"EPSG:{info[0].code}"


def _detect_units(src: rasterio.io.DatasetReader, band: int, sample: np.ndarray, uri: str, cfg: CatalogSection) -> tuple[str, str]:
    """SAR units and how they were decided: config, metadata, file name, then the values themselves."""
    if cfg.units != "auto":
        return cfg.units, "config"
    tags = {k.upper(): v for k, v in {**src.tags(), **src.tags(band)}.items()}
    declared = (tags.get("UNITS") or src.units[band - 1] or "").lower()
    for token, units in (("db", "db"), ("decibel", "db"), ("amplitude", "amplitude"), ("intensity", "intensity"),
                         ("power", "intensity"), ("linear", "intensity"), ("gamma0", "intensity"), ("sigma0", "intensity")):
        if token in declared:
            return units, "metadata"
    name = PurePosixPath(uri).name.lower()
    if re.search(r"(^|[^a-z])db([^a-z]|$)", name):
        return "db", "file name"
    if re.search(r"(^|[^a-z])(amp|amplitude)([^a-z]|$)", name):
        return "amplitude", "file name"
    if np.dtype(src.dtypes[band - 1]).kind in "ui":
        return "amplitude", "integer dtype (detected amplitude products are integer)"
    finite = sample[np.isfinite(sample)]
    if finite.size and (finite < 0).mean() > 0.01:
        return "db", "negative values"
    return "intensity", "non-negative float values"


def inspect_scene(uri: str, cfg: CatalogSection) -> dict:
    """Inspect one SAR file. Returns a scenes-table row, or raises ItemError with the reason."""
    try:
        src = io.open_raster(uri)
    except Exception as exc:  # rasterio raises several classes for corrupt files
        raise ItemError("unreadable", f"cannot open {uri}: {exc}. The file is corrupt or not a raster: re-download or remove it.") from None
    with src:
        if src.crs is None:
            raise ItemError("no_crs", f"{uri} has no CRS. Georeference it (gdal_edit.py -a_srs EPSG:<code>) or remove it from the archive.")
        if src.transform.is_identity:
            if src.gcps[0]:
                raise ItemError("gcps_only", f"{uri} is georeferenced by GCPs only. Orthorectify it first (gdalwarp) and catalog the result.")
            raise ItemError("no_georeference", f"{uri} has a CRS but no geotransform. Georeference it or remove it.")
        interp = set(src.colorinterp)
        if src.count > 2 or interp & {ColorInterp.red, ColorInterp.green, ColorInterp.blue}:
            raise ItemError(
                "not_sar",
                f"{uri} has {src.count} bands ({', '.join(d or '?' for d in src.descriptions)}); it looks like an optical "
                "or multi-spectral image, not SAR. Move it out of the SAR folder (optical twins are found by catalog.optical_rule).",
            )
        if cfg.band > src.count:
            raise ItemError("bad_band", f"{uri} has {src.count} band(s) but catalog.band={cfg.band}.")
        t = src.transform
        rotated = abs(t.b) > 1e-12 or abs(t.d) > 1e-12
        if rotated and cfg.rotated == "reject":
            raise ItemError("rotated", f"{uri} has a rotated/sheared geotransform {tuple(t)[:6]}. Set catalog.rotated=warp to warp its tiles north-up.")
        try:
            step = max(1, max(src.width, src.height) // 512)
            sample = src.read(cfg.band, out_shape=(max(1, src.height // step), max(1, src.width // step)),
                              resampling=Resampling.nearest, masked=True)
        except Exception as exc:
            raise ItemError("unreadable", f"cannot read pixels of {uri}: {exc}. The file is truncated or corrupt: re-download it.") from None
        values = sample.filled(np.nan).astype(np.float64)
        valid = np.isfinite(values)
        valid_fraction = float(valid.mean()) if values.size else 0.0
        if valid_fraction < cfg.min_valid_fraction:
            raise ItemError("all_nodata", f"{uri}: no valid pixels (all nodata, NaN or inf) in a decimated read. Check the nodata value or remove the scene.")
        units, units_source = _detect_units(src, cfg.band, values, uri, cfg)
        gx, gy = metric_gsd(src)
        footprint = footprint_4326(src)
        if not footprint.is_valid or footprint.area <= 0:
            raise ItemError("bad_footprint", f"{uri}: footprint in EPSG:4326 is degenerate (antimeridian or polar scene?).")
        tags = {k.upper(): v for k, v in src.tags().items()}
        desc = (src.descriptions[cfg.band - 1] or "").upper()
        name = PurePosixPath(uri).name
        polarisation = tags.get("POLARISATION") or (desc if desc in _POLARISATIONS else None)
        if polarisation is None:
            m = re.search(r"(?<![A-Za-z])(VV|VH|HH|HV)(?![A-Za-z])", name)
            polarisation = m.group(1) if m else "unknown"
        sensor = cfg.sensor or tags.get("SENSOR") or next((s for rx, s in _SENSORS if rx.search(uri)), "unknown")
        region = cfg.region or tags.get("REGION") or PurePosixPath(uri).parent.name
        return {
            "scene_id": scene_id_for(uri, cfg.archive),
            "sar_uri": uri,
            "optical_uri": _companion(uri, cfg.optical_rule),
            "landcover_uri": _companion(uri, cfg.landcover_rule),
            "crs": src.crs.to_string(),
            "tile_crs": tile_crs_for(src.crs, footprint),
            "transform": [float(v) for v in tuple(t)[:6]],
            "width": src.width,
            "height": src.height,
            "gsd_m": float(math.sqrt(gx * gy)),
            "rotated": rotated,
            "band": cfg.band,
            "nodata": None if src.nodata is None else float(src.nodata),
            "dtype": src.dtypes[cfg.band - 1],
            "units": units,
            "units_source": units_source,
            "sensor": sensor,
            "polarisation": polarisation,
            "region": region,
            "valid_fraction": valid_fraction,
            "footprint": footprint.wkb,
        }


SCENES_SCHEMA = pa.schema(
    [
        ("scene_id", pa.string()), ("sar_uri", pa.string()), ("optical_uri", pa.string()),
        ("landcover_uri", pa.string()), ("crs", pa.string()), ("tile_crs", pa.string()),
        ("transform", pa.list_(pa.float64())), ("width", pa.int64()), ("height", pa.int64()),
        ("gsd_m", pa.float64()), ("rotated", pa.bool_()), ("band", pa.int64()), ("nodata", pa.float64()),
        ("dtype", pa.string()), ("units", pa.string()), ("units_source", pa.string()), ("sensor", pa.string()),
        ("polarisation", pa.string()), ("region", pa.string()), ("valid_fraction", pa.float64()),
        ("footprint", pa.binary()),
    ]
)


class SceneInspector:
    """Ray Data row function: a SAR uri in, a scene row or an error row out (never raises)."""

    def __init__(self, cfg: CatalogSection):
        self.cfg = cfg

    def __call__(self, row: dict) -> dict:
        uri = row["uri"]
        try:
            return {"scene": inspect_scene(uri, self.cfg), "error": None}
        except ItemError as exc:
            return {"scene": None, "error": error_row(STAGE, uri, exc.error_class, str(exc))}
        except Exception as exc:  # anything unexpected is still recorded, never lost
            return {"scene": None, "error": error_row(STAGE, uri, type(exc).__name__, f"{uri}: {exc}")}
