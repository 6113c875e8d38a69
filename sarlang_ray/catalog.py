"""catalog: scan an archive (local or s3://) into the scenes table, one row per usable SAR scene.

Each SAR file is inspected on a Ray Data worker: georeferencing, GSD in metres, footprint in EPSG:4326,
units, sensor, polarisation, and a cheap decimated read that proves the pixels are readable and not all
nodata. Files that cannot be used go to the errors table with the reason and what to do.

Geotransforms that are not north-up -- rotated or sheared (the Umbra GEC file, for one), south-up
(positive y pixel size) or flipped east-west -- are kept and *warped north-up per tile*
(``catalog.rotated: warp``, the default; the scene row says ``rotated: true``): tiles are cut on a
north-up grid over the pixel grid's true bounds and filled by GDAL's warper, so the rest of the pipeline
only ever sees north-up tiles with a plain affine. Set ``catalog.rotated: reject`` to send such scenes to
the errors table instead.

GSD is measured on the WGS 84 ellipsoid (geodesic length of a pixel step at the scene centre) for every
CRS, and decides the tile CRS: a projected CRS in metres whose map metres are within 1 % of ground metres
at the scene (UTM) is kept, anything else (geographic, feet, Web Mercator away from the equator) is tiled
in its UTM zone. ``gsd_m`` is the pixel size in metres of the tile CRS, hence the ground GSD within 1 %.

The archive is a folder (SAR files found by ``catalog.sar_glob``) or a STAC file, a static catalog or an
ItemCollection (SAR files are the items' assets, see :mod:`sarlang_ray.stac`); either way the same
inspection runs on every file, and STAC items add their id, datetime, platform and ``sar:*`` fields.

Companions: a scene's optical twin and land-cover raster come from the regex rules
(``catalog.optical_rule``, ``catalog.landcover_rule``) where they match, else from a search
(:func:`assign_companions`, :mod:`sarlang_ray.companions`): the best optical item of the STAC source
``catalog.optical`` and the tiles of the land-cover layer ``catalog.landcover`` under its footprint.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import rasterio
import shapely
from pyproj import CRS, Geod
from rasterio.enums import ColorInterp, Resampling
from rasterio.warp import transform as warp_transform
from shapely.geometry import Polygon

from sarlang_ray import companions, io, safe, search, stac, tables
from sarlang_ray.config import CatalogSection
from sarlang_ray.errors import ItemError, error_row
from sarlang_ray.gcps import Georef, to_lists

STAGE = "catalog"
# Header sanity limits, checked before any pixel is read: a header can claim any size, and GDAL reads a
# whole block (tile or strip) at a time, so a lying header would otherwise make a worker allocate it.
MAX_SIDE_PX = 2**20  # 1,048,576 px a side: ~15x a Sentinel-1 IW SLC swath
MAX_BLOCK_BYTES = 2**28  # 256 MiB per block (a GeoTIFF tile or strip)
_POLARISATIONS = ("VV", "VH", "HH", "HV")
_SENSORS = (
    (re.compile(r"(^|[^a-z])s1[ab]?([^a-z]|$)|sentinel-?1|opera_l2_rtc-s1", re.IGNORECASE), "Sentinel-1"),
    (re.compile(r"umbra", re.IGNORECASE), "Umbra"),
    (re.compile(r"capella", re.IGNORECASE), "Capella"),
    (re.compile(r"iceye", re.IGNORECASE), "ICEYE"),
    (re.compile(r"gf-?3|gaofen", re.IGNORECASE), "Gaofen-3"),
    (re.compile(r"tsx|terrasar", re.IGNORECASE), "TerraSAR-X"),
)


def archive_root(archive: str) -> str:
    """The folder SAR paths are relative to: the archive folder, or the folder of a STAC file (so a
    catalog.json at the root of an archive gives the same scene ids as scanning that folder)."""
    return stac.root_of(archive) if stac.is_stac(archive) else archive


def _check_sources(cfg: CatalogSection) -> None:
    """What both listings check before listing: the companion settings, and that a land-cover file named
    exists."""
    companions.check(cfg)
    landcover = resolve_landcover(cfg)
    if landcover is not None and not io.exists(landcover):
        raise FileNotFoundError(
            f"catalog.landcover={cfg.landcover!r}: {landcover} does not exist (relative paths are "
            f"relative to the archive {archive_root(cfg.archive)}). Fix the path or set "
            "catalog.landcover=null."
        )


def list_scenes(cfg: CatalogSection, snapshot: str | None = None) -> tuple[list[dict], list[dict]]:
    """What to inspect: rows ``{"uri", "stac"}`` (``stac``: the item's metadata as JSON, or None for a
    folder archive), sorted by uri, and error rows for STAC items that name no usable SAR asset.
    ``snapshot``: the frozen items of ``catalog.search`` (:func:`search.freeze`), read instead of the archive.

    Raises:
        FileNotFoundError: nothing to inspect (no file matches the globs, or the STAC file lists no items), or
            ``catalog.landcover`` names a file that does not exist.
    """
    _check_sources(cfg)
    if snapshot is not None:
        import pystac

        pairs = []
        for d in search.read_items(snapshot):
            item = pystac.Item.from_dict(d, preserve_dict=False)
            pairs.append((item, item.get_self_href() or snapshot))
        found, errors = stac.candidates_from_items(
            pairs, [], snapshot, cfg.stac_assets, STAGE, cfg.group_polarisations
        )
        return sorted(
            ({"uri": c.uri, "stac": c.to_json(), "product": None, "bands": c.bands} for c in found),
            key=lambda r: r["uri"],
        ), errors
    if stac.is_stac(cfg.archive):
        found, errors = stac.candidates(cfg.archive, cfg.stac_assets, STAGE, cfg.group_polarisations)
        if not found and not errors:
            raise FileNotFoundError(f"the STAC file {cfg.archive} lists no items; check catalog.archive")
        return sorted(
            ({"uri": c.uri, "stac": c.to_json(), "product": None, "bands": c.bands} for c in found),
            key=lambda r: r["uri"],
        ), errors
    # a SAFE folder, its manifest.safe or a SAFE zip is a product; files inside a .SAFE folder belong to it
    matched = {u for pattern in cfg.sar_glob for u in io.glob(cfg.archive, pattern)}
    products = sorted({_product_root(u) for u in matched if safe.is_product(u)})
    uris = sorted(u for u in matched if ".safe/" not in u.lower() and not safe.is_product(u))
    if not uris and not products:
        raise FileNotFoundError(
            f"no SAR scenes match {cfg.sar_glob!r} under {cfg.archive}; "
            "check catalog.archive and catalog.sar_glob"
        )
    rows: list[dict[str, Any]] = [
        {"uri": p, "stac": None, "product": "safe", "bands": None} for p in products
    ]
    masks = {u for u in uris if _MASK_FILE.search(u)} if cfg.group_polarisations else set()
    for group in (
        polarisation_groups(sorted(set(uris) - masks)) if cfg.group_polarisations else [[u] for u in uris]
    ):
        # an OPERA burst's layover/shadow mask (..._mask.tif beside ..._VV.tif): its non-zero pixels become
        # nodata
        folder, _, name = group[0].rpartition("/")
        mask = _POL_TOKEN.sub("mask", name) if len(_POL_TOKEN.findall(name)) == 1 else None
        mask = f"{folder}/{mask}" if mask and f"{folder}/{mask}" in masks else None
        masks.discard(mask)
        rows.append(
            {
                "uri": group[0],
                "stac": None,
                "product": None,
                "bands": [{"uri": u, "mask": mask} for u in group] if len(group) > 1 or mask else None,
            }
        )
    # masks of nothing
    rows += [{"uri": m, "stac": None, "product": None, "bands": None} for m in sorted(masks)]
    return sorted(rows, key=lambda r: r["uri"]), []


_POL_TOKEN = re.compile(r"(?<![A-Za-z])(VV|VH|HH|HV)(?![A-Za-z])")
_MASK_FILE = re.compile(r"[_-]mask\.tiff?$", re.IGNORECASE)  # OPERA RTC-S1's layover/shadow layer


def _product_root(uri: str) -> str:
    """A SAFE product's uri: the .SAFE folder of a manifest.safe, else the path itself (a zip)."""
    return uri[: -len("/manifest.safe")] if uri.lower().endswith("/manifest.safe") else uri


def polarisation_groups(uris: list[str]) -> list[list[str]]:
    """Files of one folder whose names differ only in one polarisation token (``..._VV.tif`` and
    ``..._VH.tif`` of an OPERA burst) as groups, co-polarisation first (VV, HH, VH, HV); every other file
    alone. Two files with the same polarisation and key stay apart."""
    groups: dict[str, dict[str, str]] = {}
    alone: list[list[str]] = []
    for uri in uris:
        folder, _, name = uri.rpartition("/")
        tokens = _POL_TOKEN.findall(name)
        if len(tokens) != 1:
            alone.append([uri])
            continue
        key = f"{folder}/{_POL_TOKEN.sub('{pol}', name)}"
        if tokens[0] in groups.setdefault(key, {}):
            alone.append([uri])
            continue
        groups[key][tokens[0]] = uri
    order = ("VV", "HH", "VH", "HV")
    out = [[members[p] for p in sorted(members, key=order.index)] for members in groups.values()]
    return sorted(out + alone)


def scene_id_for(uri: str, archive: str) -> str:
    """Stable, path-safe id: the file stem (sanitised, shortened) plus a hash of the path relative to
    ``archive`` (the full uri for files outside it)."""
    rel = io.relative(uri, archive)
    stem = PurePosixPath(rel).name.rsplit(".", 1)[0].lower()
    stem = re.sub(r"[^a-z0-9]+", "_", stem).strip("_")[:48] or "scene"
    # file names need not be UTF-8
    digest = hashlib.sha1(rel.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{stem}-{digest}"


def _companion(uri: str, rule: list[str] | None) -> str | None:
    """The optical twin / land-cover raster of a SAR uri, by regex substitution; None if absent."""
    if not rule:
        return None
    pattern, replacement = rule
    candidate = re.sub(pattern, replacement, uri)
    if candidate == uri or not io.exists(candidate):
        return None
    return candidate


def _geod_steps(crs, x: float, y: float, steps: list[tuple[float, float]]) -> list[float]:
    """Geodesic lengths in metres (WGS 84 ellipsoid) from map point (x, y) to (x + dx, y + dy) for each
    step."""
    xs = [x] + [x + dx for dx, _ in steps]
    ys = [y] + [y + dy for _, dy in steps]
    lon, lat = warp_transform(crs, "EPSG:4326", xs, ys)
    geod = Geod(ellps="WGS84")
    return [abs(geod.inv(lon[0], lat[0], lo, la)[2]) for lo, la in zip(lon[1:], lat[1:])]


def metric_gsd(src: rasterio.io.DatasetReader) -> tuple[float, float]:
    """Ground pixel size in metres along the raster's x and y axes, measured on the WGS 84 ellipsoid:
    the geodesic length of one pixel step from the scene centre, for every CRS (projected or not, any
    rotation or mirroring). A projected CRS's map units are not ground metres where its scale factor is
    not 1: Web Mercator at 60 N maps 10 m map pixels to 5 m on the ground."""
    t = src.transform
    cx, cy = t @ (src.width / 2, src.height / 2)
    sx, sy = _geod_steps(src.crs, cx, cy, [(t.a, t.d), (t.b, t.e)])
    return sx, sy


def map_gsd(src: rasterio.io.DatasetReader) -> tuple[float, float] | None:
    """Pixel size along x and y in metres *of the map* (map units x the CRS's linear unit factor), or None
    for a geographic CRS. Equals the ground GSD only where the projection's scale factor is 1."""
    if not src.crs.is_projected:
        return None
    t = src.transform
    factor = src.crs.linear_units_factor[1]
    return math.hypot(t.a, t.d) * factor, math.hypot(t.b, t.e) * factor


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


MAX_SCALE_ERROR = 0.01  # a projected CRS whose map metres differ more from ground metres is not a tile CRS


def scale_error(crs: rasterio.crs.CRS, lon: float, lat: float, step_m: float = 100.0) -> float:
    """How far the map metres of a projected CRS are from ground metres at (lon, lat): the largest
    |map length / geodesic length - 1| of a ``step_m`` step along its x and y axes (0.0004 for UTM on its
    central meridian, 1.0 for Web Mercator at 60 N); NaN where the point cannot be projected."""
    try:
        (x,), (y,) = warp_transform("EPSG:4326", crs, [lon], [lat])
        step = step_m / crs.linear_units_factor[1]
        ground = _geod_steps(crs, x, y, [(step, 0.0), (0.0, step)])
    except Exception:  # noqa: BLE001 - outside the projection's domain
        return math.nan
    if not all(math.isfinite(v) and v > 0 for v in (x, y, *ground)):
        return math.nan
    return max(abs(step_m / g - 1.0) for g in ground)


def tile_crs_for(crs: rasterio.crs.CRS, footprint: Polygon) -> str:
    """CRS in which tiles are cut: the scene's own if it is projected in metres with map metres within
    1 % of ground metres at the scene (UTM: 0.9996 to ~1.001), else the UTM zone of the scene's centre
    (geographic scenes, feet, Web Mercator away from the equator, polar stereographic far from its
    standard parallel); UPS beyond UTM's latitude limits."""
    c = footprint.centroid
    if crs.is_projected and abs(crs.linear_units_factor[1] - 1.0) < 1e-9:
        err = scale_error(crs, c.x, c.y)
        if not err > MAX_SCALE_ERROR:  # NaN (cannot tell): keep the scene's own CRS
            return crs.to_string()
    from pyproj.aoi import AreaOfInterest
    from pyproj.database import query_utm_crs_info

    info = query_utm_crs_info(datum_name="WGS 84", area_of_interest=AreaOfInterest(c.x, c.y, c.x, c.y))
    if not info:  # UTM stops at 84 N and 80 S: the polar caps use UPS North / South
        return "EPSG:32661" if c.y > 0 else "EPSG:32761"
    return f"EPSG:{info[0].code}"


def orientation(t) -> str:
    """How a geotransform lays pixels on the map: ``north-up`` (a > 0, e < 0, no rotation), ``rotated``
    (rotation or shear terms b, d), ``south-up`` (e > 0: row 0 is the southern edge), ``flipped east-west``
    (a < 0: column 0 is the eastern edge) or ``rotated 180 degrees`` (both)."""
    if abs(t.b) > 1e-12 or abs(t.d) > 1e-12:
        return "rotated"
    if t.a > 0 and t.e < 0:
        return "north-up"
    if t.a > 0:
        return "south-up"
    return "flipped east-west" if t.e < 0 else "rotated 180 degrees"


def _detect_units(
    src: rasterio.io.DatasetReader, band: int, sample: np.ndarray, uri: str, cfg: CatalogSection
) -> tuple[str, str]:
    """SAR units and how they were decided: config, metadata, file name, then the values themselves."""
    if cfg.units != "auto":
        return cfg.units, "config"
    tags = {k.upper(): v for k, v in {**src.tags(), **src.tags(band)}.items()}
    declared = (tags.get("UNITS") or src.units[band - 1] or "").lower()
    for token, units in (
        ("db", "db"),
        ("decibel", "db"),
        ("amplitude", "amplitude"),
        ("intensity", "intensity"),
        ("power", "intensity"),
        ("linear", "intensity"),
        ("gamma0", "intensity"),
        ("sigma0", "intensity"),
    ):
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


def _reason(exc: Exception) -> str:
    """An exception's text, with the GDAL error behind rasterio's "Read failed. See previous exception"."""
    cause = exc.__cause__
    text = f"{exc} ({cause})" if cause is not None and str(cause) not in str(exc) else str(exc)
    return text.rstrip(".")


def _check_transform(t, uri: str) -> None:
    """Reject geotransforms that cannot place a pixel: NaN/inf terms, or a zero pixel area."""
    terms = tuple(t)[:6]
    if not all(math.isfinite(v) for v in terms):
        raise ItemError(
            "bad_transform",
            f"{uri} has a non-finite geotransform {terms}. Fix its georeferencing "
            "(gdal_edit.py -a_ullr or -a_gt) or remove it from the archive.",
        )
    if abs(t.a * t.e - t.b * t.d) < 1e-300:
        raise ItemError(
            "bad_transform",
            f"{uri} has a singular geotransform {terms}: a pixel covers zero area, so its "
            "footprint is empty. Fix its georeferencing (gdal_edit.py -a_ullr or -a_gt) or remove it.",
        )


def _check_pixels(src: rasterio.io.DatasetReader, band: int, uri: str) -> None:
    """Reject what the pixels cannot be, from the header alone (before any read)."""
    dtype = src.dtypes[band - 1]
    if dtype.startswith("complex"):
        raise ItemError(
            "complex_sar",
            f"{uri} holds complex ({dtype}) samples: a single-look complex (SLC) product. "
            "Detect it first (amplitude |z|, e.g. gdal_translate with a VRT 'mod' pixel function, or "
            "gdal_calc.py --calc='abs(A)' --type=Float32) and catalog the detected GeoTIFF.",
        )
    if dtype == "int8":
        raise ItemError(
            "unsupported_dtype",
            f"{uri} has signed 8-bit samples (int8): no SAR product is stored that way "
            "(detected amplitude is unsigned, dB is float). Convert it (gdal_translate -ot Float32, then "
            "set catalog.units) or remove it.",
        )
    if src.tags(band, ns="IMAGE_STRUCTURE").get("NBITS") == "1":
        raise ItemError(
            "not_sar", f"{uri} is a 1-bit (boolean) raster: a mask, not SAR. Move it out of the SAR folder."
        )
    if max(src.width, src.height) > MAX_SIDE_PX:
        raise ItemError(
            "too_large",
            f"{uri}: the header claims {src.width} x {src.height} px, more than "
            f"{MAX_SIDE_PX} px a side. A corrupt header, or a mosaic: split it (gdal_translate -srcwin) "
            "into scenes.",
        )
    rows, cols = src.block_shapes[band - 1]
    block_bytes = rows * cols * np.dtype(dtype).itemsize
    if block_bytes > MAX_BLOCK_BYTES:
        raise ItemError(
            "too_large",
            f"{uri}: one {cols} x {rows} px block is {block_bytes / 2**20:.0f} MiB "
            f"(limit {MAX_BLOCK_BYTES // 2**20} MiB); reading any pixel would load it whole. Rewrite it "
            "tiled (gdal_translate -co TILED=YES or -of COG).",
        )


_MASK_VALUES = ({-1, 0, 1}, {0, 255})  # 0/1 masks (-1: "no data" of e.g. Sen1Floods11's labels), 0/255 masks


def _check_not_a_mask(src: rasterio.io.DatasetReader, band: int, sample: np.ma.MaskedArray, uri: str) -> None:
    """Reject an integer raster whose valid (decimated) values are those of a binary mask: at most three
    values within {-1, 0, 1}, or exactly {0, 255}. A water or cloud mask caught by a broad catalog.sar_glob
    would otherwise be tiled as amplitude. Detected integer SAR (8/16-bit amplitude) takes hundreds of
    values."""
    if np.dtype(src.dtypes[band - 1]).kind not in "ui":
        return
    values = set(np.unique(sample.compressed()).tolist())
    if not values or not any(values <= allowed for allowed in _MASK_VALUES) or values == {0} or values == {1}:
        return  # all one value: all_nodata (if nodata) or a degenerate scene, not evidently a mask
    shown = ", ".join(str(v) for v in sorted(values))
    raise ItemError(
        "not_sar",
        f"{uri} holds only the values {{{shown}}} ({src.dtypes[band - 1]}): a mask or label "
        "raster (e.g. a water mask), not SAR. Move it out of the SAR folder or narrow catalog.sar_glob so "
        "it does not match; a land-cover raster belongs in catalog.landcover_rule / catalog.landcover.",
    )


def resolve_landcover(cfg: CatalogSection) -> str | None:
    """``catalog.landcover`` (one land-cover raster for every scene that ``landcover_rule`` finds none for)
    as a uri: relative paths are relative to the archive root (the folder of a STAC file)."""
    return resolve_path(cfg, cfg.landcover) if cfg.landcover else None


def _lut_columns(bands: list[dict], cfg: CatalogSection) -> dict:
    """Radiometry columns (and band records) of GCP-referenced bands that come with calibration / noise XML
    (a Sentinel-1 GRD STAC item): calibrated like a SAFE product; none otherwise."""
    if cfg.calibration == "none" or not bands or not all(b.get("calibration") for b in bands):
        return {}
    noise = cfg.noise_removal and all(b.get("noise") for b in bands)
    for b in bands:
        b["noise"] = b.get("noise") if noise else None
        b["noise_floor_db"] = cfg.noise_floor_db
    annotation = bands[0].get("annotation")
    return {
        "calibration": cfg.calibration,
        "noise_removed": bool(noise),
        "product_type": "GRD",
        "noise_schema": safe.read_noise(bands[0]["noise"]).schema if noise else None,
        "nodata": 0.0,
        "spacing": safe.pixel_spacing(annotation) if annotation else None,
    }


def inspect_scene(uri: str, cfg: CatalogSection, bands: list[dict] | None = None) -> dict:
    """Inspect one SAR file. Returns a scenes-table row, or raises ItemError with the reason. ``bands``:
    the scene's band records when it has several files or LUTs (a STAC item's VV and VH assets)."""
    try:
        src = io.open_raster(uri)
    except (
        io.RemoteRasterError
    ) as exc:  # missing object, unreachable endpoint, refused credentials: its own advice
        raise ItemError("unreadable", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - rasterio raises several classes for corrupt files
        raise ItemError(
            "unreadable",
            f"cannot open {uri}: {_reason(exc)}. The file is corrupt or not a raster: re-download or remove "
            "it.",
        ) from None
    with src:
        # e.g. a Sentinel-1 GRD measurement file (its CRS is the GCPs')
        if src.transform.is_identity and src.gcps[0]:
            bands = bands or [
                {"polarisation": _polarisation_of(src, uri, cfg.band), "uri": uri, "band": cfg.band}
            ]
            return gcp_scene(src, uri, cfg, bands=bands, **_lut_columns(bands, cfg))
        if src.crs is None:
            raise ItemError(
                "no_crs",
                f"{uri} has no CRS. Georeference it (gdal_edit.py -a_srs EPSG:<code>) or remove it from the "
                "archive.",
            )
        if src.transform.is_identity:
            raise ItemError(
                "no_georeference", f"{uri} has a CRS but no geotransform. Georeference it or remove it."
            )
        _check_transform(src.transform, uri)
        interp = set(src.colorinterp)
        if src.count > 2 or interp & {ColorInterp.red, ColorInterp.green, ColorInterp.blue}:
            raise ItemError(
                "not_sar",
                f"{uri} has {src.count} bands ({', '.join(d or '?' for d in src.descriptions)}); it looks "
                "like an optical "
                "or multi-spectral image, not SAR. Move it out of the SAR folder (optical twins are found by "
                "catalog.optical_rule).",
            )
        if cfg.band > src.count:
            raise ItemError(
                "bad_band",
                f"{uri} has {src.count} band(s) but catalog.band={cfg.band}. Set catalog.band "
                "to a band of the file.",
            )
        _check_pixels(src, cfg.band, uri)
        t = src.transform
        orient = orientation(t)
        rotated = orient != "north-up"  # tiles are warped north-up (mirrored pixels included)
        if rotated and cfg.rotated == "reject":
            raise ItemError(
                "rotated",
                f"{uri} is not north-up ({orient} geotransform {tuple(t)[:6]}). Set "
                "catalog.rotated=warp to warp its tiles north-up.",
            )
        try:
            step = max(1, max(src.width, src.height) // 512)
            sample = src.read(
                cfg.band,
                out_shape=(max(1, src.height // step), max(1, src.width // step)),
                resampling=Resampling.nearest,
                masked=True,
            )
        except Exception as exc:  # noqa: BLE001 - rasterio raises several classes for corrupt files
            raise ItemError(
                "unreadable",
                f"cannot read pixels of {uri}: {_reason(exc)}. The file is truncated or corrupt: re-download "
                "it.",
            ) from None
        values = sample.filled(np.nan).astype(np.float64)
        valid = np.isfinite(values)
        valid_fraction = float(valid.mean()) if values.size else 0.0
        if valid_fraction < cfg.min_valid_fraction:
            raise ItemError(
                "all_nodata",
                f"{uri}: no valid pixels (all nodata, NaN or inf) in a decimated read. Check the nodata "
                "value or remove the scene.",
            )
        _check_not_a_mask(src, cfg.band, sample, uri)
        units, units_source = _detect_units(src, cfg.band, values, uri, cfg)
        sidecar = sidecar_calibration(uri) if cfg.calibration != "none" else None
        # a Capella-style amplitude product: DN x scale factor is calibrated amplitude
        if sidecar is not None:
            units, units_source = (
                "amplitude",
                f"sidecar {sidecar['source']}: scale factor {sidecar['scale_factor']:g}",
            )
        footprint = footprint_4326(src)
        lon_span = footprint.bounds[2] - footprint.bounds[0]
        if not footprint.is_valid or footprint.area <= 0 or lon_span > 180:
            # a lon/lat outline that wraps at +-180 degrees is invalid or spans the globe the wrong way round
            raise ItemError(
                "bad_footprint",
                f"{uri}: its footprint in EPSG:4326 is degenerate (lon {footprint.bounds[0]:.3f} "
                f"to {footprint.bounds[2]:.3f}): the scene crosses the antimeridian or contains a pole, "
                "which "
                "the lon/lat footprint cannot represent. Split it at 180 degrees (gdalwarp -te) or leave it "
                "out.",
            )
        tags = {k.upper(): v for k, v in src.tags().items()}
        name = PurePosixPath(uri).name
        polarisation = _polarisation_of(src, uri, cfg.band)
        tile_crs = tile_crs_for(src.crs, footprint)
        # GSD in metres of the tile CRS: the map pixel where tiles are cut in the scene's own CRS (within 1 %
        # of the ground GSD there, by tile_crs_for, and native tiles stay the scene's pixels), else the ground
        # GSD
        # never None there: the CRS is projected
        own = map_gsd(src) if tile_crs == src.crs.to_string() else None
        gx, gy = own if own is not None else metric_gsd(src)
        return {
            **_file_columns(uri, tags, cfg),
            "crs": src.crs.to_string(),
            "tile_crs": tile_crs,
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
            "polarisation": polarisation,
            "valid_fraction": valid_fraction,
            "footprint": footprint.wkb,
            "datetime": companions.acquired_from_file(tags, name),
            **product_columns(
                bands=[{"polarisation": polarisation, "uri": uri, "band": cfg.band}],
                **(
                    {}
                    if sidecar is None
                    else {"scale_factor": sidecar["scale_factor"], "calibration": sidecar["calibration"]}
                ),
            ),
        }


_RADIOMETRY = {"beta_nought": "beta0", "sigma_nought": "sigma0", "gamma_nought": "gamma0"}


def sidecar_calibration(uri: str) -> dict | None:
    """The calibration of a detected amplitude product from its sidecar metadata, where present: Capella's
    ``<stem>_extended.json`` (or ``<stem>.json``) ``collect.image.scale_factor`` (calibrated amplitude = DN x
    scale factor) and ``collect.image.radiometry`` (beta_nought, sigma_nought...). None without one."""
    stem = uri.rsplit(".", 1)[0]
    for candidate in (f"{stem}_extended.json", f"{stem}.json"):
        try:
            href = io.sign_href(candidate)  # beside a signed asset: signed too (catalog.sign)
            if not io.exists(href):
                continue
            image = (json.loads(io.read_bytes(href)).get("collect") or {}).get("image") or {}
        except Exception:  # noqa: BLE001, S112 - an unreadable sidecar is no sidecar: try the next name
            continue
        factor = image.get("scale_factor")
        if isinstance(factor, (int, float)) and factor > 0:
            radiometry = str(image.get("radiometry") or "").lower()
            return {
                "scale_factor": float(factor),
                "calibration": _RADIOMETRY.get(radiometry, radiometry or None),
                "source": PurePosixPath(candidate).name,
            }
    return None


def _file_columns(uri: str, tags: dict, cfg: CatalogSection) -> dict:
    """The columns of a scene row that come from its file's path and tags, whatever its georeferencing: id,
    companions by rule (or the one land-cover raster for every scene), sensor and region."""
    optical = _companion(uri, cfg.optical_rule)
    landcover = _companion(uri, cfg.landcover_rule)
    if (
        landcover is None
        and (single := resolve_landcover(cfg)) is not None
        and not companions.is_tiled(single)
    ):
        # one raster or VRT for every scene; a folder or STAC file of tiles: assign_companions
        landcover = single
    return {
        "scene_id": scene_id_for(uri, archive_root(cfg.archive)),
        "sar_uri": uri,
        "optical_uri": optical,
        "landcover_uri": landcover,
        "sensor": cfg.sensor
        or tags.get("SENSOR")
        or next((s for rx, s in _SENSORS if rx.search(uri)), "unknown"),
        "region": cfg.region or tags.get("REGION") or PurePosixPath(uri).parent.name,
        **companions.no_twin_columns("rule" if optical else None),
        "landcover_tiles": None,
    }


def _polarisation_of(src: rasterio.io.DatasetReader, uri: str, band: int) -> str:
    """A file's polarisation: its POLARISATION tag, the band description, then a token of the file name."""
    tags = {k.upper(): v for k, v in src.tags().items()}
    desc = (src.descriptions[band - 1] or "").upper()
    polarisation = tags.get("POLARISATION") or (desc if desc in _POLARISATIONS else None)
    if polarisation is None:
        m = _POL_TOKEN.search(PurePosixPath(uri).name)
        polarisation = m.group(1) if m else "unknown"
    return polarisation


# columns of how a scene is read: its bands (polarisations), georeferencing and radiometry
PRODUCT_COLUMNS = (
    # JSON list: {polarisation, uri, band, calibration, noise, annotation} per polarisation
    (
        "bands",
        pa.string(),
    ),
    ("polarisations", pa.string()),  # e.g. VV+VH
    ("product_type", pa.string()),  # GRD for Sentinel-1 products, null for files
    ("georef", pa.string()),  # transform (a geotransform) or gcps
    ("gcps", pa.string()),  # JSON [[row, col, x, y, z], ...] (georef=gcps)
    ("gcp_method", pa.string()),  # tps, polynomial<order> or affine
    ("tile_bounds", pa.list_(pa.float64())),  # georef=gcps: bounds of the footprint in the tile CRS
    ("relief_m", pa.float64()),  # spread of the GCP heights
    # relief_m > catalog.max_relief_m and no terrain correction: geolocation weak
    (
        "relief_flag",
        pa.bool_(),
    ),
    ("calibration", pa.string()),  # sigma0 / beta0 / gamma0 from the product's LUTs, none, or null (no LUTs)
    ("noise_removed", pa.bool_()),  # thermal-noise LUTs subtracted
    ("noise_schema", pa.string()),  # ipf2 (noiseVectorList) or ipf3 (range x azimuth)
    ("pass_direction", pa.string()),
    ("proj_mismatch", pa.string()),  # STAC proj:* that disagreed with the file header (JSON), the file won
    # amplitude products with sidecar metadata (Capella): amplitude = DN x this
    (
        "scale_factor",
        pa.float64(),
    ),
)


def product_columns(**values) -> dict:
    """The :data:`PRODUCT_COLUMNS` of a scene row: ``bands`` (a list) and any others given, the rest null."""
    row = dict.fromkeys(name for name, _ in PRODUCT_COLUMNS)
    row["georef"] = "transform"
    row.update(values)
    bands = row["bands"] or []
    row["polarisations"] = "+".join(b["polarisation"] for b in bands) or None
    row["bands"] = json.dumps(bands, sort_keys=True)
    return row


def _sample_windows(src: rasterio.io.DatasetReader, band: int, size: int = 64) -> np.ma.MaskedArray:
    """Nine small windows spread over a raster (3 x 3), for the readability and validity checks of products
    too large to read decimated without overviews (a GRD measurement file: ~800 MB, no overviews)."""
    from rasterio.windows import Window

    parts = []
    for fr in (0.25, 0.5, 0.75):
        for fc in (0.25, 0.5, 0.75):
            r, c = int(src.height * fr), int(src.width * fc)
            parts.append(
                src.read(
                    band,
                    window=Window(c, r, min(size, src.width - c), min(size, src.height - r)),
                    masked=True,
                ).ravel()
            )
    return np.ma.concatenate(parts)


def gcp_scene(
    src: rasterio.io.DatasetReader,
    uri: str,
    cfg: CatalogSection,
    bands: list[dict],
    gcp_list: list[list[float]] | None = None,
    gcp_crs: str | None = None,
    nodata: float | None = None,
    spacing: tuple[float, float] | None = None,
    **columns,
) -> dict:
    """The scene row of a raster georeferenced by GCPs (the file's own, or ``gcp_list`` from an annotation):
    footprint and GSD through the GCP transformer, tiles cut in the UTM zone of the footprint's centre."""
    nodata = columns.pop("nodata", nodata)
    spacing = columns.pop("spacing", None) or spacing
    if gcp_list is None:
        gcp_objs, crs = src.gcps
        gcp_list, gcp_crs = to_lists(gcp_objs), crs.to_string() if crs else "EPSG:4326"
    elif gcp_crs is None:
        raise ValueError(f"{uri}: gcp_list without its gcp_crs")
    georef = Georef(gcp_list, gcp_crs, cfg.gcp_method, cfg.gcp_order)
    _check_pixels(src, bands[0]["band"], uri)
    if len(gcp_list) < 3:
        raise ItemError(
            "bad_gcps",
            f"{uri} has {len(gcp_list)} GCPs; at least 3 are needed to place it. Fix its "
            "georeferencing or remove it.",
        )
    try:
        sample = _sample_windows(src, bands[0]["band"])
    except Exception as exc:  # noqa: BLE001 - rasterio raises several classes for corrupt files
        raise ItemError(
            "unreadable",
            f"cannot read pixels of {uri}: {_reason(exc)}. The file is truncated or corrupt: re-download it.",
        ) from None
    values = sample.filled(np.nan).astype(np.float64)
    if nodata is not None:
        values[values == nodata] = np.nan
    valid_fraction = float(np.isfinite(values).mean()) if values.size else 0.0
    if valid_fraction < cfg.min_valid_fraction:
        raise ItemError(
            "all_nodata", f"{uri}: no valid pixels in nine sample windows. Check the product or remove it."
        )
    footprint = georef.outline_4326(src.width, src.height)
    if not footprint.is_valid or footprint.area <= 0 or footprint.bounds[2] - footprint.bounds[0] > 180:
        raise ItemError(
            "bad_footprint",
            f"{uri}: its GCP footprint is degenerate or crosses the antimeridian "
            f"(lon {footprint.bounds[0]:.3f} to {footprint.bounds[2]:.3f}); split the scene or leave it out.",
        )
    tile_crs = tile_crs_for(CRS.from_user_input(gcp_crs), footprint)
    # the product's own pixel spacing where it states one (10 m for IW GRDH: what "10 m tiles" means to a
    # user); else the geodesic length of a pixel step through the GCPs (10.06-10.08 m on the real IW products)
    gx, gy = spacing or georef.ground_gsd(src.width, src.height)
    from rasterio.warp import transform_geom

    bounds = shapely.geometry.shape(
        transform_geom("EPSG:4326", tile_crs, shapely.geometry.mapping(footprint))
    ).bounds
    relief = georef.relief_m()
    name = PurePosixPath(uri).name
    tags = {k.upper(): v for k, v in src.tags().items()}
    calibrated = columns.get("calibration") not in (None, "none")
    units, units_source = (
        ("intensity", f"calibration {columns['calibration']}")
        if calibrated
        else _detect_units(src, bands[0]["band"], values, uri, cfg)
    )
    method = cfg.gcp_method + (str(cfg.gcp_order) if cfg.gcp_method == "polynomial" else "")
    return {
        **_file_columns(uri, tags, cfg),
        "crs": gcp_crs,
        "tile_crs": tile_crs,
        "transform": None,
        "width": src.width,
        "height": src.height,
        "gsd_m": float(math.sqrt(gx * gy)),
        "rotated": False,
        "band": bands[0]["band"],
        "nodata": nodata if nodata is not None else (None if src.nodata is None else float(src.nodata)),
        "dtype": src.dtypes[bands[0]["band"] - 1],
        "units": units,
        "units_source": units_source,
        "polarisation": "+".join(b["polarisation"] for b in bands),
        "valid_fraction": valid_fraction,
        "footprint": footprint.wkb,
        "datetime": columns.pop("datetime", None) or companions.acquired_from_file(tags, name),
        **product_columns(
            bands=bands,
            georef="gcps",
            gcps=json.dumps(gcp_list),
            gcp_method=method,
            tile_bounds=[float(v) for v in bounds],
            relief_m=relief,
            relief_flag=bool(relief > cfg.max_relief_m),
            **columns,
        ),
    }


def inspect_product(uri: str, cfg: CatalogSection) -> dict:
    """Inspect a Sentinel-1 SAFE product (folder or zip, local or s3://): one scene with all its
    polarisations, georeferenced by the measurement file's GCPs (the annotation's geolocation grid where the
    file has none), calibrated by its LUTs."""
    try:
        product = safe.open_product(uri)
    except safe.SafeError as exc:
        raise ItemError("bad_product", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - zip, XML and fsspec errors alike: the product's error row
        raise ItemError(
            "unreadable", f"cannot read the SAFE product {uri}: {_reason(exc)}. Re-download it."
        ) from None
    if cfg.calibration != "none" and any(b.calibration is None for b in product.bands):
        raise ItemError(
            "no_calibration",
            f"{uri}: no calibration annotation for "
            f"{[b.polarisation for b in product.bands if b.calibration is None]}. Re-download the product, "
            "or set catalog.calibration=none to tile digital numbers.",
        )
    bands = [
        {
            "polarisation": b.polarisation,
            "uri": b.measurement,
            "band": 1,
            "calibration": b.calibration,
            "noise": b.noise if cfg.noise_removal else None,
            "annotation": b.annotation,
            "noise_floor_db": cfg.noise_floor_db,
        }
        for b in product.bands
    ]
    first = product.bands[0]
    try:
        src = io.open_raster(first.measurement)
    except Exception as exc:  # noqa: BLE001 - rasterio raises several classes for corrupt files
        raise ItemError(
            "unreadable",
            f"cannot open the measurement {first.measurement} of {uri}: {_reason(exc)}. "
            "Re-download the product.",
        ) from None
    with src:
        for other in product.bands[1:]:
            with io.open_raster(other.measurement) as o:
                if (o.width, o.height) != (src.width, src.height):
                    raise ItemError(
                        "bad_product",
                        f"{uri}: {other.polarisation} is {o.width} x {o.height} px but "
                        f"{first.polarisation} {src.width} x {src.height}; re-download the product.",
                    )
        gcp_list = gcp_crs = None
        if not src.gcps[0]:  # a measurement re-encoded without its GCPs: the annotation's geolocation grid
            if first.annotation is None:
                raise ItemError(
                    "no_georeference", f"{uri}: the measurement has no GCPs and there is no annotation."
                )
            grid = safe.geolocation_grid(first.annotation)
            gcp_list = [[p["line"], p["pixel"], p["longitude"], p["latitude"], p["height"]] for p in grid]
            gcp_crs = "EPSG:4326"
        noise_schema = None
        if cfg.noise_removal and first.noise:
            noise_schema = safe.read_noise(first.noise).schema
        spacing = safe.pixel_spacing(first.annotation) if first.annotation else None
        return gcp_scene(
            src,
            uri,
            cfg,
            bands,
            gcp_list,
            gcp_crs,
            nodata=0.0,
            spacing=spacing,  # GRD no-data: DN 0
            product_type=product.product_type,
            calibration=cfg.calibration,
            noise_removed=bool(cfg.noise_removal and first.noise),
            noise_schema=noise_schema,
            pass_direction=product.pass_direction,
            datetime=product.start_time,
        )


def inspect_group(bands: list[dict], cfg: CatalogSection) -> dict:
    """One scene of several single-polarisation files on one pixel grid (an OPERA burst's VV and VH, a STAC
    item's polarisation assets): the first (co-polarisation) file is inspected, the others must share its
    grid. ``bands``: ``{uri, polarisation (optional), calibration / noise (optional)}`` per file."""
    bands = [{"band": cfg.band, **b} for b in bands]
    first = bands[0]["uri"]
    scene = inspect_scene(first, cfg, bands=bands)
    records = json.loads(scene["bands"])
    if len(records) == 1:  # a georeferenced file: its record, then the others checked against its grid
        records = [{**bands[0], **records[0]}]
        for b in bands[1:]:
            uri = b["uri"]
            try:
                with io.open_raster(uri) as src:
                    grid = (
                        src.crs.to_string() if src.crs else None,
                        [float(v) for v in tuple(src.transform)[:6]],
                        src.width,
                        src.height,
                    )
                    pol = b.get("polarisation") or _polarisation_of(src, uri, cfg.band)
            except Exception as exc:  # noqa: BLE001 - rasterio raises several classes for corrupt files
                raise ItemError(
                    "unreadable", f"cannot open {uri}: {_reason(exc)}. Re-download or remove it."
                ) from None
            if grid != (scene["crs"], scene["transform"], scene["width"], scene["height"]):
                raise ItemError(
                    "polarisation_grids",
                    f"{uri} is not on the pixel grid of {first} (another CRS, transform "
                    "or size), so they cannot be one scene. Set catalog.group_polarisations=false to "
                    "catalog them as separate scenes.",
                )
            records.append({**b, "polarisation": pol})
    mask = bands[0].get("mask")
    if mask:
        try:
            with io.open_raster(mask) as src:
                grid = (
                    src.crs.to_string() if src.crs else None,
                    [float(v) for v in tuple(src.transform)[:6]],
                    src.width,
                    src.height,
                )
        except Exception as exc:  # noqa: BLE001 - rasterio raises several classes for corrupt files
            raise ItemError(
                "unreadable", f"cannot open the mask {mask}: {_reason(exc)}. Re-download or remove it."
            ) from None
        if grid != (scene["crs"], scene["transform"], scene["width"], scene["height"]):
            raise ItemError(
                "polarisation_grids",
                f"the mask {mask} is not on the pixel grid of {first}. Remove it or "
                "set catalog.group_polarisations=false.",
            )
    records = [{**r, "mask": mask} if mask else {k: v for k, v in r.items() if k != "mask"} for r in records]
    scene["bands"] = json.dumps(records, sort_keys=True)
    scene["polarisations"] = scene["polarisation"] = "+".join(b["polarisation"] for b in records)
    key = _POL_TOKEN.sub("", PurePosixPath(first).name)
    scene["scene_id"] = scene_id_for(f"{first.rsplit('/', 1)[0]}/{key}", archive_root(cfg.archive))
    return scene


_STAC_COLUMNS = ("stac_item", "stac_asset", "datetime", "platform", "instrument_mode", "stac_properties")


def with_stac_metadata(scene: dict, item: stac.Candidate, cfg: CatalogSection) -> dict:
    """A scene row with its STAC item's metadata. Published metadata beats what was guessed from the file
    (tags, name, folder), and ``catalog.sensor`` beats both."""
    props = item.properties
    platform = stac.platform(props)
    published = " ".join(str(props.get(k) or "") for k in ("constellation", "platform"))
    if cfg.sensor is None and platform:
        scene["sensor"] = next((s for rx, s in _SENSORS if rx.search(published)), platform)
    pols = stac.polarisations(item)
    if item.bands is None and len(pols) == 1 and pols[0] in _POLARISATIONS:
        scene["polarisation"] = pols[0]
        scene["polarisations"] = pols[0]
        scene["bands"] = json.dumps(
            [{**b, "polarisation": pols[0]} for b in json.loads(scene["bands"])], sort_keys=True
        )
    scene["proj_mismatch"] = proj_mismatch(props, item.asset_fields, scene)
    mode = props.get("sar:instrument_mode")
    scene.update(
        stac_item=item.item_id,
        stac_asset=item.asset,
        datetime=stac.acquired(props) or scene.get("datetime"),
        platform=platform,
        instrument_mode=None if mode is None else str(mode),
        stac_properties=json.dumps(props, sort_keys=True, default=str),
    )
    return scene


def proj_mismatch(props: dict, asset_fields: dict, scene: Mapping[str, Any]) -> str | None:
    """The STAC projection fields (``proj:shape``, ``proj:transform``, ``proj:epsg`` / ``proj:code``, asset
    fields first) that disagree with the file's header, as JSON ``{field: {"item": ..., "file": ...}}``;
    None when they agree or are absent. The file always wins: catalogues publish made-up values for GRD
    items (a transposed shape, a transform derived from the bounding box of a GCP-referenced file)."""

    def field_(name):
        return asset_fields.get(name, props.get(name))

    found: dict[str, dict[str, Any]] = {}
    shape = field_("proj:shape")
    if shape is not None and [int(v) for v in shape] != [scene["height"], scene["width"]]:
        found["proj:shape"] = {"item": list(shape), "file": [scene["height"], scene["width"]]}
    transform = field_("proj:transform")
    if transform is not None:
        file_t = scene["transform"]
        if file_t is None or not np.allclose(
            [float(v) for v in list(transform)[:6]],
            file_t,
            rtol=0,
            atol=1e-6 * max(1.0, max(abs(v) for v in file_t)),
        ):
            found["proj:transform"] = {
                "item": list(transform)[:6],
                "file": file_t if file_t is not None else f"none: {scene['georef']}",
            }
    code = field_("proj:code") or (f"EPSG:{field_('proj:epsg')}" if field_("proj:epsg") is not None else None)
    if code is not None and scene["crs"] is not None:
        try:
            same = CRS.from_user_input(code) == CRS.from_user_input(scene["crs"])
        except Exception:  # noqa: BLE001 - a code pyproj cannot read is not the file's CRS
            same = False
        if not same or scene.get("georef") == "gcps":
            found["proj:code"] = {
                "item": code,
                "file": scene["crs"] + (" (of the GCPs)" if scene.get("georef") == "gcps" else ""),
            }
    return json.dumps(found, sort_keys=True) if found else None


def _stac_error(uri: str, item: stac.Candidate, exc: ItemError) -> ItemError:
    """A file a STAC item names but that does not exist is the catalog's fault: say which item and href."""
    if exc.error_class == "unreadable" and not io.exists(io.sign_href(uri)):
        return ItemError(
            "stac_bad_href",
            f"STAC item {item.item_id!r} asset {item.asset!r}: {uri} does not exist "
            f"(href {item.href!r} in {item.item_href}, relative hrefs resolve against the item's "
            "location). Fix the href in the catalog or remove the item.",
        )
    return exc


class SceneInspector:
    """Row function of the catalog stage (Ray tasks): a SAR uri in, a scene row or an error row out (never
    raises)."""

    def __init__(self, cfg: CatalogSection):
        self.cfg = cfg
        # catalog.sign and the S3 access of the run, in whichever worker process this runs
        io.use_access(cfg.sign, cfg.s3_anonymous, cfg.s3_requester_pays)

    def __call__(self, row: dict) -> dict:
        uri = row["uri"]
        item = stac.Candidate.from_json(row["stac"]) if row.get("stac") else None
        try:
            if row.get("product") == "safe":
                scene = inspect_product(uri, self.cfg)
            elif row.get("bands"):
                scene = inspect_group(row["bands"], self.cfg)
            else:
                scene = inspect_scene(uri, self.cfg)
            if item is None:
                return {
                    "scene": {**scene, **dict.fromkeys(_STAC_COLUMNS), "datetime": scene["datetime"]},
                    "error": None,
                }
            return {"scene": with_stac_metadata(scene, item, self.cfg), "error": None}
        except ItemError as exc:
            err = exc if item is None else _stac_error(uri, item, exc)
            return {"scene": None, "error": error_row(STAGE, uri, err.error_class, str(err))}
        except Exception as exc:  # noqa: BLE001 - anything unexpected is still recorded, never lost
            return {"scene": None, "error": error_row(STAGE, uri, type(exc).__name__, f"{uri}: {exc}")}


# the scenes table: the contract's columns, and how each scene's companions were found
SCENES_SCHEMA = tables.SCENES_SCHEMA
for _name, _type in (*companions.TWIN_COLUMNS, *PRODUCT_COLUMNS):
    SCENES_SCHEMA = SCENES_SCHEMA.append(pa.field(_name, _type))


def write_scenes(uri: str, scenes: list[dict]) -> None:
    """The scenes table (GeoParquet) with the companion columns of :data:`companions.TWIN_COLUMNS`."""
    table = pa.Table.from_pylist(scenes, schema=SCENES_SCHEMA)
    io.write_parquet_atomic(uri, table.replace_schema_metadata(tables.geo_schema(table.schema).metadata))


def assign_companions(
    scenes: list[dict], cfg: CatalogSection, vrt_dir: str
) -> tuple[list[dict], list[dict], dict]:
    """Optical twins by search and land-cover tiles by footprint for the scenes the rules left without.

    Runs in the driver on scene descriptors. Per-scene land-cover VRTs (scenes on the border of several
    tiles) are written under ``vrt_dir``. Returns the scenes kept, error rows for scenes rejected for
    want of a twin (``catalog.no_twin=reject``), and counts: twins by how they were found and the reason
    of every scene without one, land-cover tiles used.
    """
    errors: list[dict] = []
    counts: dict = {
        "twins": collections.Counter(),
        "no_twin": collections.Counter(),
        "landcover": collections.Counter(),
    }
    finder = None
    if cfg.optical:
        # only the candidates these scenes can use (footprint and time): a page holds its own, not the
        # source's
        finder = companions.TwinFinder(
            cfg, resolve_path(cfg, cfg.optical), scenes=[s for s in scenes if s["optical_uri"] is None]
        )
        counts["optical_items"] = finder.usable
        counts["optical_items_skipped"] = len(finder.skipped)  # no image asset or geometry, or unreadable
    layer = None
    landcover = resolve_landcover(cfg)
    if landcover is not None and companions.is_tiled(landcover):
        layer = companions.LandcoverLayer(landcover, cfg)
        counts["landcover_tiles_indexed"] = len(layer.tiles)
    kept = []
    for scene in scenes:
        footprint = shapely.from_wkb(scene["footprint"])
        if scene["optical_uri"] is None and finder is not None:
            twin, reason = finder.choose(
                footprint, companions.parse_time(scene.get("datetime")), scene["tile_crs"]
            )
            if twin is not None:
                scene.update(companions.twin_columns(twin))
            else:
                scene.update(companions.no_twin_columns(None, reason))
                if cfg.no_twin == "reject":
                    errors.append(
                        error_row(
                            STAGE,
                            scene["sar_uri"],
                            "no_optical_twin",
                            f"{scene['sar_uri']}: no optical twin in {cfg.optical} "
                            f"({(reason or '').replace('_', ' ')}: "
                            f"within {cfg.time_window_days:g} days and covering at least "
                            f"{cfg.min_overlap:.0%} of the footprint). Widen catalog.time_window_days, lower "
                            "catalog.min_overlap, add items, or set catalog.no_twin=keep.",
                        )
                    )
                    counts["no_twin"][reason] += 1
                    continue
        if scene["optical_uri"] is None:
            counts["no_twin"][scene.get("optical_reason") or "no_rule_match"] += 1
        else:
            counts["twins"][scene["optical_source"] or "rule"] += 1
        if scene["landcover_uri"] is None and layer is not None:
            tiles = layer.tiles_for(footprint)
            scene["landcover_tiles"] = len(tiles)
            if len(tiles) == 1:
                scene["landcover_uri"] = tiles[0].uri
            elif tiles:
                uri = io.join(vrt_dir, f"{scene['scene_id']}.vrt")
                io.makedirs(vrt_dir)
                io.write_bytes_atomic(uri, companions.vrt_xml(tiles).encode())
                scene["landcover_uri"] = uri
        counts["landcover"][
            "none"
            if scene["landcover_uri"] is None
            else "tiles"
            if scene.get("landcover_tiles")
            else "raster"
        ] += 1
        kept.append(scene)
    counts = {
        k: dict(sorted(v.items())) if isinstance(v, collections.Counter) else v for k, v in counts.items()
    }
    return kept, errors, counts


def resolve_path(cfg: CatalogSection, path: str) -> str:
    """A companion path: absolute, a URL, or relative to the archive root."""
    if "://" in path or path.startswith("/"):
        return path
    return io.join(archive_root(cfg.archive), path)


# ---------------------------------------------------------------- the streaming catalog (catalog.search)
class SeenDigests:
    """The rasters a paged listing has cataloged, as 8-byte digests of their uris
    (``stac.candidates_from_items``'s
    ``seen``): what the driver keeps per asset to reject an asset named twice across pages. The recent digests
    sit in a small set; every ``TAIL`` of them are sorted into a numpy block, and blocks of equal length merge
    (a log-structured set): 8 bytes a uri, no Python object per uri (a set of ints took ~70 B each, and its
    small objects, interleaved with the pages', kept the allocator's arenas alive)."""

    TAIL = 1 << 14

    def __init__(self) -> None:
        self._tail: set[int] = set()
        self._blocks: list[np.ndarray] = []

    @staticmethod
    def _key(uri: str) -> int:
        return int.from_bytes(
            hashlib.blake2b(uri.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little"
        )

    def __len__(self) -> int:
        return len(self._tail) + sum(len(b) for b in self._blocks)

    def __contains__(self, uri: str) -> bool:
        key = self._key(uri)
        if key in self._tail:
            return True
        key = np.uint64(key)
        for block in self._blocks:
            i = int(np.searchsorted(block, key))
            if i < len(block) and block[i] == key:
                return True
        return False

    def __getitem__(self, uri: str) -> str:
        return "an earlier item of the listing"

    def __setitem__(self, uri: str, item_id: str) -> None:
        self._tail.add(self._key(uri))
        if len(self._tail) >= self.TAIL:
            block = np.sort(np.fromiter(self._tail, dtype=np.uint64, count=len(self._tail)))
            self._tail.clear()
            while self._blocks and len(self._blocks[-1]) <= len(block):
                block = np.union1d(self._blocks.pop(), block)
            self._blocks.append(block)


def page_sizes(page_rows: int) -> Iterator[int]:
    """Rows per page: 4, 8, 16... up to ``page_rows``, then ``page_rows`` on: a small archive still becomes
    several tasks (as many CPUs busy as it has scenes for), a big one pages of ``page_rows``."""
    size = min(4, page_rows)
    while True:
        yield size
        size = min(2 * size, page_rows)


def _paged(
    rows: Iterator[tuple[list[dict], list[dict]]], page_rows: int
) -> Iterator[tuple[list[dict], list[dict]]]:
    """``(rows, errors)`` chunks of any length regrouped into pages of :func:`page_sizes` rows; the error rows
    travel with the page they came with (or the next)."""
    sizes = page_sizes(page_rows)
    size = next(sizes)
    pending: list[dict] = []
    errors: list[dict] = []
    for found, errs in rows:
        pending.extend(found)
        errors.extend(errs)
        while len(pending) >= size:
            yield pending[:size], errors[:]
            del pending[:size]
            errors.clear()
            size = next(sizes)
    while pending or errors:
        yield pending[:size], errors[:]
        del pending[:size]
        errors.clear()


def listing_pages(
    cfg: CatalogSection, snapshot: str | None, page_rows: int
) -> Iterator[tuple[list[dict], list[dict]]]:
    """What :func:`list_scenes` lists, as pages read while they are listed: ``(rows, errors)``, the inspection
    rows of up to ``page_rows`` scenes and the error rows of the listing that came with them. One generator
    for every source: a search snapshot and a STAC file (an ItemCollection parsed item by item, a static
    catalog walked link by link) page their items; a glob lists the archive in key order (s3:// a page of
    1,000 keys at a time) and groups polarisations and masks as soon as nothing later can join them. The
    driver holds a page, the groups still open and 8 bytes per asset (duplicates across pages), never the
    listing.

    Raises:
        FileNotFoundError: as :func:`list_scenes`, once the listing is over (nothing to inspect).
    """
    _check_sources(cfg)
    if snapshot is None and not stac.is_stac(cfg.archive):
        listed = 0
        for page in _paged(_glob_rows(cfg), page_rows):
            listed += len(page[0])
            yield page
        if not listed:
            raise FileNotFoundError(
                f"no SAR scenes match {cfg.sar_glob!r} under {cfg.archive}; "
                "check catalog.archive and catalog.sar_glob"
            )
        return
    source = snapshot or cfg.archive
    entries: Iterable[Any]
    if snapshot is not None:
        import pystac

        entries = (
            (item, item.get_self_href() or snapshot)
            for item in (pystac.Item.from_dict(d, preserve_dict=False) for d in search.read_items(snapshot))
        )
    else:
        entries = stac.iter_items(cfg.archive, STAGE)
    listed = 0
    for page in _paged(_item_rows(cfg, entries, source, page_rows), page_rows):
        listed += len(page[0]) + len(page[1])
        yield page
    if not listed:
        raise FileNotFoundError(f"the STAC file {cfg.archive} lists no items; check catalog.archive")


def snapshot_pages(
    cfg: CatalogSection, snapshot: str, page_rows: int
) -> Iterator[tuple[list[dict], list[dict]]]:
    """The pages of a frozen search snapshot (:func:`listing_pages`)."""
    return listing_pages(cfg, snapshot, page_rows)


def _item_rows(
    cfg: CatalogSection, entries: Iterator, source: str, chunk: int
) -> Iterator[tuple[list[dict], list[dict]]]:
    """STAC entries (``(item, base)`` pairs or error rows) as inspection rows and error rows, ``chunk`` items
    at a time (``stac.candidates_from_items``, duplicates across chunks by digest)."""
    seen = SeenDigests()
    items: list = []
    errors: list[dict] = []

    def flush():
        found, errs = stac.candidates_from_items(
            items, errors, source, cfg.stac_assets, STAGE, cfg.group_polarisations, seen=seen
        )
        items.clear()
        rows = [{"uri": c.uri, "stac": c.to_json(), "product": None, "bands": c.bands} for c in found]
        out = (rows, list(errs))
        errors.clear()
        return out

    for entry in entries:
        if isinstance(entry, dict):
            errors.append(entry)
        else:
            items.append(entry)
        if len(items) >= chunk or len(errors) >= chunk:
            yield flush()
    yield flush()


def _glob_root(cfg: CatalogSection) -> tuple[str, list[re.Pattern]]:
    """The folder under the archive a listing of ``catalog.sar_glob`` starts from (the part of the patterns
    before their first wildcard, common to all), and the patterns as regular expressions over the paths of the
    archive's filesystem (``fsspec.utils.glob_translate``: the matching ``fs.glob`` does)."""
    from fsspec.utils import glob_translate

    _fs, base = io.filesystem(cfg.archive)
    base = os.path.abspath(base) if not io.is_remote(cfg.archive) else base.rstrip("/")
    fixed = []
    for pattern in cfg.sar_glob:
        parts = pattern.split("/")
        stem = []
        for part in parts[:-1]:
            if any(ch in part for ch in "*?["):
                break
            stem.append(part)
        fixed.append(stem)
    common = []
    for level in zip(*fixed):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    root = "/".join([base, *common])
    return root, [re.compile(glob_translate(f"{base}/{p}")) for p in cfg.sar_glob]


def _listed(cfg: CatalogSection, root: str) -> Iterator[str]:
    """Every file under ``root`` (a path of the archive's filesystem), in key order (byte order of the full
    path, what S3 lists in): local folders walked in that order one folder at a time; s3:// listed flat a page
    at a time (s3fs's paginated ``_iterdir``, no listing cache); other filesystems found whole and sorted."""
    fs, _ = io.filesystem(cfg.archive)
    if not io.is_remote(cfg.archive):

        def walk(folder: str) -> Iterator[str]:
            try:
                entries = sorted(
                    ((e.name + "/" if e.is_dir() else e.name), e.path) for e in os.scandir(folder)
                )
            except (FileNotFoundError, NotADirectoryError):
                return
            for name, path in entries:
                if name.endswith("/"):
                    yield from walk(path)
                else:
                    yield path

        yield from walk(root)
        return
    if cfg.archive.startswith(("s3://", "s3a://")):
        from fsspec.asyn import sync

        bucket, key, _ = fs.split_path(root)
        pages = fs._iterdir(bucket, delimiter="", prefix=f"{key}/" if key else "")
        while True:
            try:
                info = sync(fs.loop, pages.__anext__)
            except StopAsyncIteration:
                return
            yield info["name"]
    yield from sorted(fs.find(root))


def _glob_rows(cfg: CatalogSection) -> Iterator[tuple[list[dict], list[dict]]]:
    """The inspection rows of a folder archive as it is listed (:func:`list_scenes`'s rows, in key order).

    A polarisation group (``x_VV.tif``, ``x_VH.tif``) and an OPERA mask (``x_mask.tif``) share the text before
    the polarisation token, and every member sorts at or before the mask's name (``HH`` < ``HV`` < ``VH`` <
    ``VV`` < ``mask``): a group is complete, and leaves, once the listing has passed that name."""
    root, patterns = _glob_root(cfg)
    local = not io.is_remote(cfg.archive)
    protocol = "" if local else cfg.archive.split("://", 1)[0] + "://"
    base = os.path.abspath(io.filesystem(cfg.archive)[1]) if local else None

    def uri_of(path: str) -> str:
        return io.join(cfg.archive, os.path.relpath(path, base)) if local else protocol + path

    def matches(path: str) -> bool:
        return any(p.match(path) for p in patterns)

    products = SeenDigests()
    # open groups: the path of their mask -> [that path, {polarisation: uri}, the mask's uri]
    groups: dict[str, list] = {}
    rows: list[dict] = []

    def close(upto: str | None) -> None:
        for key in [k for k, g in groups.items() if upto is None or g[0] < upto]:
            _, members, mask = groups.pop(key)
            order = ("VV", "HH", "VH", "HV")
            uris = [members[p] for p in sorted(members, key=order.index)]
            rows.append(
                {
                    "uri": uris[0],
                    "stac": None,
                    "product": None,
                    "bands": [{"uri": u, "mask": mask} for u in uris] if len(uris) > 1 or mask else None,
                }
            )

    for path in _listed(cfg, root):
        close(path)
        low = path.lower()
        safe_at = low.find(".safe/")
        # a file inside a .SAFE folder: the folder is a product if a pattern names it or its manifest
        if safe_at >= 0:
            folder = path[: safe_at + len(".safe")]
            if (
                matches(folder) or (low.endswith("/manifest.safe") and matches(path))
            ) and folder not in products:
                products[folder] = folder
                rows.append({"uri": uri_of(folder), "stac": None, "product": "safe", "bands": None})
        elif matches(path):
            uri = uri_of(path)
            if safe.is_product(uri):
                rows.append({"uri": _product_root(uri), "stac": None, "product": "safe", "bands": None})
            elif not cfg.group_polarisations:
                rows.append({"uri": uri, "stac": None, "product": None, "bands": None})
            else:
                folder, _, name = path.rpartition("/")
                tokens = _POL_TOKEN.findall(name)
                # the mask of the open group named after it, else a scene of its own
                if _MASK_FILE.search(name):
                    group = groups.get(path)
                    if group is not None and group[2] is None:
                        group[2] = uri
                    else:
                        rows.append({"uri": uri, "stac": None, "product": None, "bands": None})
                elif len(tokens) != 1:
                    rows.append({"uri": uri, "stac": None, "product": None, "bands": None})
                else:
                    # a group is named by its mask's path (the token replaced by "mask"), the last name of it
                    key = f"{folder}/{_POL_TOKEN.sub('mask', name)}"
                    group = groups.setdefault(key, [key, {}, None])
                    if tokens[0] in group[1]:  # the same polarisation twice: apart, as in the whole listing
                        rows.append({"uri": uri, "stac": None, "product": None, "bands": None})
                    else:
                        group[1][tokens[0]] = uri
        if len(rows) >= 64:
            yield rows[:], []
            rows.clear()
    close(None)
    yield rows, []


def inspect_page(cfg: CatalogSection, run_dir: str, index: int, page: tuple[list[dict], list[dict]]) -> dict:
    """One page of the streaming catalog, on a Ray worker: inspect its rows (``page``: the inspection rows and
    the listing's error rows of that page), find their companions, and write
    ``catalog/parts/scenes-<index>.parquet`` and ``errors-<index>.parquet``. Returns counts only."""
    import ray

    rows, listing_errors = page
    from sarlang_ray.errors import errors_table

    inspector = SceneInspector(cfg)
    results = [inspector(r) for r in rows]
    scenes = sorted((r["scene"] for r in results if r["scene"] is not None), key=lambda s: s["scene_id"])
    errors = list(listing_errors) + [r["error"] for r in results if r["error"] is not None]
    scenes, twin_errors, companion_counts = assign_companions(
        scenes, cfg, io.join(run_dir, STAGE, "landcover")
    )
    errors += twin_errors
    parts = io.join(run_dir, STAGE, "parts")
    write_scenes(io.join(parts, f"scenes-{index:06d}.parquet"), scenes)
    io.write_parquet_atomic(io.join(parts, f"errors-{index:06d}.parquet"), errors_table(errors))
    return {
        "planned": len(rows) + len(listing_errors),
        "written": len(scenes),
        "rejected": len(errors),
        "reasons": dict(collections.Counter(e["error_class"] for e in errors)),
        "companions": companion_counts,
        "proj_mismatches": sum(1 for s in scenes if s.get("proj_mismatch")),
        "relief_flagged": sum(1 for s in scenes if s.get("relief_flag")),
        "node": ray.get_runtime_context().get_node_id(),
    }


def duplicate_ids(scenes_uri: str, n: int) -> list[str]:
    """The scene ids that appear more than once in a scenes table of ``n`` rows, read a row group at a time
    and compared as 8-byte digests (the driver holds 8 bytes a scene, not the ids)."""
    import pyarrow.parquet as pq

    fs, path = io.filesystem(scenes_uri)
    digests = np.empty(n, dtype=np.uint64)
    at = 0
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(columns=["scene_id"], batch_size=8192):
            for sid in batch.column(0).to_pylist():
                digests[at] = SeenDigests._key(sid)
                at += 1
    values, counts = np.unique(digests[:at], return_counts=True)
    if (counts == 1).all():
        return []
    clashes = set(values[counts > 1].tolist())
    # only on failure
    found = io.read_parquet(scenes_uri, columns=["scene_id"]).column("scene_id").to_pylist()
    return sorted({s for s in found if SeenDigests._key(s) in clashes})


# rows per row group of the merged tables: a row group per part (64 rows) made the writer's footer metadata,
# held until the file is closed, grow with the number of pages (~100 KB a part: 155 MB of the driver at 100k
# scenes)
MERGE_ROWS = 4096


def merge_parts(run_dir: str, pages: int) -> None:
    """The parts of the streaming catalog as ``catalog/scenes.parquet`` and ``catalog/errors.parquet``, in
    page order, one part in memory at a time (a Parquet writer streaming row groups to
    :func:`io.write_stream_atomic`); the parts are removed after."""
    import io as pyio

    import pyarrow.parquet as pq

    from sarlang_ray.errors import ERROR_SCHEMA

    parts = io.join(run_dir, STAGE, "parts")
    scenes_schema = SCENES_SCHEMA.with_metadata(tables.geo_schema(SCENES_SCHEMA).metadata)

    def chunks(kind: str, schema: pa.Schema):
        buf = pyio.BytesIO()
        writer = pq.ParquetWriter(buf, schema)
        held: list[pa.Table] = []

        def flush() -> bytes:
            writer.write_table(pa.concat_tables(held), row_group_size=MERGE_ROWS)
            held.clear()
            data = buf.getvalue()
            buf.seek(0)
            buf.truncate()
            return data

        for i in range(pages):
            held.append(io.read_parquet(io.join(parts, f"{kind}-{i:06d}.parquet")).cast(schema))
            if sum(t.num_rows for t in held) >= MERGE_ROWS:
                yield flush()
        if held:
            yield flush()
        writer.close()
        yield buf.getvalue()

    io.write_stream_atomic(tables.scenes_uri(run_dir), chunks("scenes", scenes_schema))
    io.write_stream_atomic(io.join(run_dir, STAGE, "errors.parquet"), chunks("errors", ERROR_SCHEMA))
    fs, path = io.filesystem(parts)
    fs.rm(path, recursive=True)
