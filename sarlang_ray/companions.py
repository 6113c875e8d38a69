"""Companions found, not named: optical twins by space-time search, land cover and labels from global layers.

The regex rules of the catalog (``catalog.optical_rule``, ``catalog.landcover_rule``) pair files by path.
Archives that users bring have no such pairing, so this module finds a scene's companions by where and
when it was acquired:

* **optical twins** (:class:`TwinFinder`): ``catalog.optical`` names a STAC source (static catalog,
  collection or ItemCollection JSON, a stac-geoparquet file, or a STAC API URL through pystac-client).
  Candidates intersect the scene footprint and were acquired within ``catalog.time_window_days``; each
  gets the score ``overlap - time_weight * gap_days / window - cloud_weight * cloud / 100`` (overlap: the
  fraction of the scene footprint the item covers, measured in the scene's tile CRS; cloud: the item's
  ``eo:cloud_cover`` in percent, 100 when it has none) and the highest score wins, ties broken by item id.
* **land cover** (:class:`LandcoverLayer`): ``catalog.landcover`` is one raster or VRT, a folder of tiles,
  or a STAC file of tiles. The tiles a scene needs are those whose bounds meet its footprint; several are
  mosaicked by a VRT written per scene (the XML of ``gdalbuildvrt``, written from the tiles' rasterio
  metadata because GDAL's Python bindings are not a dependency).
* **labels** (:class:`LabelLayer`): ``catalog.labels`` is one GeoParquet file or a folder of them (hive
  partitions or many files). Its files' extents come from their footers (the GeoParquet ``bbox`` of the
  file, else the row-group statistics of the covering ``bbox`` column), and each scene reads only the
  files whose extent meets its footprint, and in them only the row groups whose ``bbox`` statistics do
  (pyarrow dataset filters on ``bbox.xmin`` ...), so a layer far larger than memory is never read whole.

Nothing here knows Ray or the run folder; the catalog and align stages call it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from xml.sax.saxutils import escape

import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from pyproj import CRS, Transformer
from shapely import STRtree
from shapely.geometry import box, shape
from shapely.ops import transform as shapely_transform

from sarlang_ray import io, stac
from sarlang_ray.config import CatalogSection, catalog_problems

GEOTIFF_SUFFIXES = (".tif", ".tiff", ".vrt")

# ---------------------------------------------------------------- checks


def check(cfg: CatalogSection) -> None:
    """The catalog keys' checks (:func:`sarlang_ray.config.catalog_problems`, which ``load_config`` runs), for
    a section built without it.

    Raises:
        ValueError: a key out of range, with the key named.
    """
    problems = catalog_problems(cfg)
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))


# ---------------------------------------------------------------- time

_NAME_TIME = re.compile(r"(?<!\d)(\d{8})T(\d{6})(?!\d)")
TIME_TAGS = ("ACQUISITION_DATETIME", "ACQUISITION_START_TIME", "DATETIME")


def parse_time(text: str | None) -> dt.datetime | None:
    """An ISO 8601 time (``Z`` or an offset; naive times are UTC) as an aware datetime, or None."""
    if not text:
        return None
    try:
        value = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def iso(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def acquired_from_file(tags: dict[str, str], name: str) -> str | None:
    """A SAR file's acquisition time as ISO 8601 UTC: a tag (``ACQUISITION_DATETIME``,
    ``ACQUISITION_START_TIME`` or ``DATETIME``, ISO 8601), else a ``YYYYMMDDTHHMMSS`` token of the file
    name (Sentinel-1, OPERA); None when neither says."""
    upper = {k.upper(): v for k, v in tags.items()}
    for key in TIME_TAGS:
        when = parse_time(upper.get(key))
        if when is not None:
            return iso(when)
    m = _NAME_TIME.search(name)
    if m:
        try:
            return iso(
                dt.datetime.strptime(m.group(1) + m.group(2), "%Y%m%d%H%M%S").replace(tzinfo=dt.timezone.utc)
            )
        except ValueError:
            return None
    return None


# ---------------------------------------------------------------- optical twins


@dataclass(frozen=True)
class OpticalItem:
    """One candidate optical scene: a STAC item's image asset with what ranking needs."""

    item_id: str
    uri: str  # absolute uri of the image asset
    geometry: Any  # shapely geometry, EPSG:4326
    when: dt.datetime | None
    cloud: float | None  # eo:cloud_cover, percent


@dataclass
class Twin:
    """The chosen twin of one scene and its scores (what the scenes table records)."""

    item: OpticalItem
    overlap: float
    gap_days: float | None
    score: float


TWIN_COLUMNS = (
    ("optical_source", pa.string()),  # rule (regex), search (STAC), or null (no twin)
    ("optical_items", pa.list_(pa.string())),  # STAC item id(s) of the twin
    ("optical_datetime", pa.string()),  # the twin's acquisition time (ISO 8601)
    ("optical_gap_days", pa.float64()),  # |twin time - scene time| in days (null: a time is unknown)
    ("optical_overlap", pa.float64()),  # fraction of the scene footprint the twin covers
    ("optical_cloud", pa.float64()),  # the twin's eo:cloud_cover in percent (null: not published)
    ("optical_score", pa.float64()),  # the ranking score (docs/catalog.md)
    ("optical_reason", pa.string()),  # why a scene has no twin
    ("landcover_tiles", pa.int64()),  # land-cover tiles the scene's VRT mosaics (null: one raster / rule)
)


def _optical_asset(item_assets: dict[str, Any], wanted: str | None) -> tuple[str, str] | None:
    """(key, href) of the image asset: the named key (case-insensitive), else the GeoTIFF asset with the
    ``visual`` role, else the first GeoTIFF ``data`` asset by key."""

    def href_of(asset) -> str:
        return asset["href"] if isinstance(asset, dict) else asset.href

    def roles_of(asset) -> list[str]:
        return list((asset.get("roles") if isinstance(asset, dict) else asset.roles) or [])

    def is_tiff(asset) -> bool:
        media = (asset.get("type") if isinstance(asset, dict) else asset.media_type) or ""
        if media:
            return media.split(";")[0].strip().lower() in stac.GEOTIFF_MEDIA_TYPES
        return PurePosixPath(href_of(asset).split("?")[0]).suffix.lower() in GEOTIFF_SUFFIXES

    if wanted is not None:
        for key in sorted(item_assets):
            if key.lower() == wanted.lower():
                return key, href_of(item_assets[key])
        return None
    tiffs = [(k, a) for k, a in sorted(item_assets.items()) if is_tiff(a)]
    for role in ("visual", "data"):
        for key, asset in tiffs:
            if role in roles_of(asset):
                return key, href_of(asset)
    return (tiffs[0][0], href_of(tiffs[0][1])) if tiffs else None


def _item_time(props: dict[str, Any]) -> dt.datetime | None:
    return parse_time(props.get("datetime") or props.get("start_datetime"))


def _cloud(props: dict[str, Any]) -> float | None:
    value = props.get("eo:cloud_cover")
    return None if value is None else float(value)


def _static_dicts(source: str) -> Iterator[tuple[dict, str] | dict]:
    """The item dicts of a static STAC file or a stac-geoparquet file, one at a time, with the href their
    asset hrefs resolve against; error rows (dicts with ``item``) for links that cannot be read."""
    if source.lower().endswith((".parquet", ".geoparquet")):
        import stac_geoparquet.arrow

        fs, path = io.filesystem(source)
        with fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
                for d in stac_geoparquet.arrow.stac_table_to_items(pa.Table.from_batches([batch])):
                    yield d, source
        return
    for entry in stac.iter_items(source, "catalog"):
        if isinstance(entry, dict):
            yield entry
        else:
            item, href = entry
            yield item.to_dict(include_self_link=False, transform_hrefs=False), href


def read_static_items(source: str, asset: str | None, keep=None) -> tuple[list[OpticalItem], list[str], dict]:
    """The items of a static STAC file (catalog, collection, ItemCollection) or a stac-geoparquet file as
    optical candidates, read one at a time, and what was skipped: the ids of items without an image asset or
    geometry, and the hrefs of item links that could not be read.

    ``keep(item) -> bool | None``: the candidates a caller can use (True), those it needs only the footprint
    of (None: ``counts["pruned_geometries"]``) and those it cannot use at all (False); all are kept without
    it. Returns (items, skipped, counts): ``usable``, the items with an image asset and a geometry, pruned or
    not."""
    out: list[OpticalItem] = []
    skipped: list[str] = []
    shadows: list = []
    usable = 0
    from pystac.utils import make_absolute_href

    for entry in _static_dicts(source):
        if not isinstance(entry, tuple):
            skipped.append(entry["item"])
            continue
        d, base = entry
        found = _optical_asset(d.get("assets") or {}, asset)
        geometry = d.get("geometry")
        if found is None or geometry is None:
            skipped.append(d["id"])
            continue
        usable += 1
        props = d.get("properties") or {}
        item = OpticalItem(d["id"], "", shape(geometry), _item_time(props), _cloud(props))
        verdict = True if keep is None else keep(item)
        if verdict is None:
            shadows.append(item.geometry)
        elif verdict:
            out.append(
                dataclasses.replace(
                    item, uri=stac._local(make_absolute_href(found[1], base, start_is_dir=False))
                )
            )
    return sorted(out, key=lambda i: i.item_id), skipped, {"usable": usable, "pruned_geometries": shadows}


class TwinFinder:
    """Ranks the optical candidates of one scene and picks its twin (see the module docstring).

    ``scenes``: the scenes the finder will be asked about (a page of the catalog). Only the candidates that
    can be chosen for one of them are kept: a footprint meeting the page's extent and a time within
    ``catalog.time_window_days`` of the page's scenes; of those that meet the extent but not the time, only
    the footprint (so a scene whose candidates are all too far in time still says ``outside_time_window``)."""

    def __init__(self, cfg: CatalogSection, source: str, scenes: list[dict] | None = None):
        self.cfg = cfg
        self.source = source
        self.api = source.startswith(("http://", "https://")) and not source.lower().endswith(
            (".json", ".geojson", ".parquet", ".geoparquet")
        )
        self.items: list[OpticalItem] = []
        self.skipped: list[str] = []
        self.usable = 0
        self.out_of_time = STRtree([])
        if not self.api:
            if not io.exists(source):
                raise FileNotFoundError(
                    f"catalog.optical={cfg.optical!r}: {source} does not exist. Point it at a STAC "
                    "catalog/collection/ItemCollection JSON, a stac-geoparquet file or a STAC API URL."
                )
            self.items, self.skipped, counts = read_static_items(
                source, cfg.optical_asset, self._pruner(scenes)
            )
            self.usable = counts["usable"]
            self.tree = STRtree([i.geometry for i in self.items])
            self.out_of_time = STRtree(counts["pruned_geometries"])

    def _pruner(self, scenes: list[dict] | None):
        """``keep`` of :func:`read_static_items` for a page of scenes, or None (keep everything)."""
        if not scenes:
            return None
        footprints = [shapely.from_wkb(s["footprint"]) for s in scenes]
        extent = (
            shapely.union_all(footprints)
            if len(footprints) < 256
            else shapely.box(*shapely.total_bounds(footprints))
        )
        parsed = [parse_time(s.get("datetime")) for s in scenes]
        times = [t for t in parsed if t is not None]
        window = dt.timedelta(days=self.cfg.time_window_days)
        # an item within the window of a scene without a time is any item: no pruning by time then
        span = None if len(times) < len(parsed) else (min(times) - window, max(times) + window)
        shapely.prepare(extent)

        def keep(item: OpticalItem) -> bool | None:
            if not shapely.intersects(extent, item.geometry):
                return False
            if span is not None and item.when is not None and not span[0] <= item.when <= span[1]:
                return None
            return True

        return keep

    def _search_api(self, footprint, when: dt.datetime | None) -> list[OpticalItem]:
        try:
            from pystac_client import Client
        except ImportError:  # pragma: no cover - optional dependency
            raise ImportError(
                "catalog.optical is a STAC API URL: install pystac-client "
                "(pip install 'sarlang-ray[stac-api]')"
            ) from None
        window = dt.timedelta(days=self.cfg.time_window_days)
        search = Client.open(self.source).search(
            intersects=shapely.geometry.mapping(footprint),
            collections=self.cfg.optical_collections,
            datetime=None if when is None else [when - window, when + window],
            max_items=500,
        )
        out = []
        for item in search.items():
            found = _optical_asset(item.assets, self.cfg.optical_asset)
            if found is not None and item.geometry is not None:
                out.append(
                    OpticalItem(
                        item.id,
                        found[1],
                        shape(item.geometry),
                        _item_time(item.properties),
                        _cloud(item.properties),
                    )
                )
        return out

    def candidates(self, footprint) -> list[OpticalItem]:
        if self.api:
            return []
        return [self.items[i] for i in sorted(self.tree.query(footprint, predicate="intersects").tolist())]

    def choose(self, footprint, when: dt.datetime | None, tile_crs: str) -> tuple[Twin | None, str | None]:
        """The best candidate for a scene, or (None, reason): ``no_candidate`` (nothing meets the footprint),
        ``outside_time_window`` (nothing within the window), ``overlap_below_min``."""
        found = self._search_api(footprint, when) if self.api else self.candidates(footprint)
        if not found:
            pruned = not self.api and len(self.out_of_time.query(footprint, predicate="intersects"))
            return None, "outside_time_window" if pruned else "no_candidate"
        window = self.cfg.time_window_days
        to_tile = Transformer.from_crs("EPSG:4326", tile_crs, always_xy=True).transform
        scene_area = shapely_transform(to_tile, footprint)
        ranked: list[tuple[float, str, Twin]] = []
        in_time = False
        for item in found:
            gap = (
                None
                if when is None or item.when is None
                else abs((item.when - when).total_seconds()) / 86400.0
            )
            if gap is not None and gap > window:
                continue
            in_time = True
            covered = shapely_transform(to_tile, item.geometry).intersection(scene_area).area
            overlap = min(1.0, covered / scene_area.area) if scene_area.area > 0 else 0.0
            if overlap < self.cfg.min_overlap or overlap <= 0:
                continue
            score = twin_score(
                overlap, gap, item.cloud, window, self.cfg.twin_time_weight, self.cfg.twin_cloud_weight
            )
            ranked.append((-round(score, 9), item.item_id, Twin(item, overlap, gap, score)))
        if not ranked:
            return None, ("overlap_below_min" if in_time else "outside_time_window")
        return min(ranked, key=lambda r: (r[0], r[1]))[2], None


def twin_score(
    overlap: float,
    gap_days: float | None,
    cloud: float | None,
    window_days: float,
    time_weight: float,
    cloud_weight: float,
) -> float:
    """``overlap - time_weight * gap / window - cloud_weight * cloud / 100``; an unknown gap costs nothing
    (a scene without a time is ranked by space and cloud), an unknown cloud cover counts as 100 %."""
    gap_term = 0.0 if gap_days is None else gap_days / window_days
    cloud_term = 100.0 if cloud is None else min(max(cloud, 0.0), 100.0)
    return overlap - time_weight * gap_term - cloud_weight * cloud_term / 100.0


def no_twin_columns(source: str | None = None, reason: str | None = None) -> dict:
    return {
        "optical_source": source,
        "optical_items": None,
        "optical_datetime": None,
        "optical_gap_days": None,
        "optical_overlap": None,
        "optical_cloud": None,
        "optical_score": None,
        "optical_reason": reason,
    }


def twin_columns(twin: Twin) -> dict:
    return {
        "optical_uri": twin.item.uri,
        "optical_source": "search",
        "optical_items": [twin.item.item_id],
        "optical_datetime": None if twin.item.when is None else iso(twin.item.when),
        "optical_gap_days": twin.gap_days,
        "optical_overlap": twin.overlap,
        "optical_cloud": twin.item.cloud,
        "optical_score": twin.score,
        "optical_reason": None,
    }


# ---------------------------------------------------------------- land cover


@dataclass(frozen=True)
class RasterTile:
    """Header of one land-cover tile: enough to select it by footprint and place it in a VRT."""

    uri: str
    crs: str
    transform: tuple[float, ...]  # 6 terms
    width: int
    height: int
    dtype: str
    nodata: float | None
    block: tuple[int, int]  # (x, y) block size

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        a, _, c, _, e, f = self.transform
        xs, ys = (c, c + a * self.width), (f, f + e * self.height)
        return min(xs), min(ys), max(xs), max(ys)


def _tile_header(uri: str) -> RasterTile:
    with io.open_raster(uri) as src:
        if src.crs is None:
            raise ValueError(
                f"land-cover tile {uri} has no CRS: georeference it (gdal_edit.py -a_srs) or remove it"
            )
        t = src.transform
        if abs(t.b) > 1e-12 or abs(t.d) > 1e-12 or t.a <= 0 or t.e >= 0:
            raise ValueError(
                f"land-cover tile {uri} is not north-up ({tuple(t)[:6]}): warp it north-up (gdalwarp)"
            )
        return RasterTile(
            uri,
            src.crs.to_string(),
            tuple(t)[:6],
            src.width,
            src.height,
            src.dtypes[0],
            src.nodata,
            tuple(src.block_shapes[0][::-1]),
        )


WORLDCOVER = {
    10: "tree cover",
    20: "shrubland",
    30: "grassland",
    40: "cropland",
    50: "built-up",
    60: "bare or sparse vegetation",
    70: "snow and ice",
    80: "water",
    90: "herbaceous wetland",
    95: "mangroves",
    100: "moss and lichen",
}
LANDCOVER_PRESETS = {"worldcover": WORLDCOVER}


def landcover_classes(classes: dict[int, str], preset: str | None) -> dict[int, str]:
    """The land-cover legend: a shipped preset (``worldcover``) or the configured code -> name table.

    Raises:
        ValueError: an unknown preset.
    """
    if preset is None:
        return dict(classes)
    if preset not in LANDCOVER_PRESETS:
        raise ValueError(
            f"align.landcover_preset={preset!r} is not a shipped legend; known: {sorted(LANDCOVER_PRESETS)} "
            "(or set it to null and list the codes in align.landcover_classes)"
        )
    return dict(LANDCOVER_PRESETS[preset])


def is_tiled(uri: str) -> bool:
    """Whether ``catalog.landcover`` names tiles (a folder, or a STAC file) rather than one raster or VRT."""
    if stac.is_stac(uri):
        return True
    fs, path = io.filesystem(uri)
    return bool(fs.isdir(path))


class LandcoverLayer:
    """``catalog.landcover`` resolved: one raster (every scene gets it) or an index of tiles."""

    def __init__(self, uri: str, cfg: CatalogSection):
        self.uri = uri
        self.tiles: list[RasterTile] = []
        if stac.is_stac(uri):
            items, _ = stac.read_items(uri, "catalog")
            from pystac.utils import make_absolute_href

            uris = []
            for item, base in sorted(items, key=lambda pair: pair[0].id):
                for _key, asset in stac.sar_assets(item, None):  # GeoTIFF data assets
                    uris.append(stac._local(make_absolute_href(asset.href, base, start_is_dir=False)))
        else:  # a folder of tiles
            uris = sorted({u for pattern in cfg.landcover_glob for u in io.glob(uri, pattern)})
        if not uris:
            raise FileNotFoundError(
                f"catalog.landcover={cfg.landcover!r}: no land-cover tile found in {uri} (patterns "
                f"{cfg.landcover_glob}). Check catalog.landcover and catalog.landcover_glob."
            )
        self.tiles = [_tile_header(u) for u in uris]
        crss = {t.crs for t in self.tiles}
        if len(crss) > 1:
            raise ValueError(
                f"land-cover tiles of {uri} are in {len(crss)} CRSs ({sorted(crss)[:3]}): a VRT mosaics one "
                "CRS. Reproject them to one (gdalwarp -t_srs) or keep one CRS per catalog.landcover."
            )
        self.crs = next(iter(crss))
        self.tree = STRtree([box(*t.bounds) for t in self.tiles])

    def tiles_for(self, footprint) -> list[RasterTile]:
        """The tiles whose bounds meet a scene footprint (EPSG:4326), sorted by uri."""
        to_layer = Transformer.from_crs("EPSG:4326", self.crs, always_xy=True).transform
        area = shapely_transform(to_layer, shapely.segmentize(footprint, 0.01))
        hits = self.tree.query(area, predicate="intersects").tolist()
        return sorted((self.tiles[i] for i in hits), key=lambda t: t.uri)


def vrt_xml(tiles: list[RasterTile]) -> str:
    """A GDAL VRT mosaic of north-up tiles of one CRS, as ``gdalbuildvrt`` writes it: the union of their
    bounds at the finest tile's pixel size, one ``ComplexSource`` per tile (its nodata transparent, so
    neighbours' edges do not overwrite each other with nodata), tiles in uri order.

    Raises:
        ValueError: tiles of different data types.
    """
    dtypes = {t.dtype for t in tiles}
    if len(dtypes) > 1:
        raise ValueError(
            f"land-cover tiles have different data types {sorted(dtypes)}: "
            f"{[t.uri for t in tiles]}. Convert them to one (gdal_translate -ot)."
        )
    a = min(t.transform[0] for t in tiles)
    e = -min(-t.transform[4] for t in tiles)
    left = min(t.bounds[0] for t in tiles)
    top = max(t.bounds[3] for t in tiles)
    right = max(t.bounds[2] for t in tiles)
    bottom = min(t.bounds[1] for t in tiles)
    width = round((right - left) / a)
    height = round((bottom - top) / e)
    gdal_type = {
        "uint8": "Byte",
        "int8": "Int8",
        "uint16": "UInt16",
        "int16": "Int16",
        "uint32": "UInt32",
        "int32": "Int32",
        "float32": "Float32",
        "float64": "Float64",
    }[tiles[0].dtype]
    nodata = tiles[0].nodata
    wkt = CRS.from_user_input(tiles[0].crs).to_wkt()
    sources = []
    for t in tiles:
        x_off = (t.bounds[0] - left) / a
        y_off = (t.bounds[3] - top) / e
        x_size = (t.bounds[2] - t.bounds[0]) / a
        y_size = (t.bounds[3] - t.bounds[1]) / -e
        nd = "" if t.nodata is None else f"<NODATA>{t.nodata:g}</NODATA>"
        path = _gdal_path(t.uri)
        sources.append(
            f'    <ComplexSource>\n      <SourceFilename relativeToVRT="0">{escape(path)}</SourceFilename>\n'
            f"      <SourceBand>1</SourceBand>\n"
            f'      <SourceProperties RasterXSize="{t.width}" RasterYSize="{t.height}" '
            f'DataType="{gdal_type}" '
            f'BlockXSize="{t.block[0]}" BlockYSize="{t.block[1]}" />\n'
            f'      <SrcRect xOff="0" yOff="0" xSize="{t.width}" ySize="{t.height}" />\n'
            f'      <DstRect xOff="{x_off:.10g}" yOff="{y_off:.10g}" xSize="{x_size:.10g}" '
            f'ySize="{y_size:.10g}" />\n'
            f"      {nd}\n    </ComplexSource>"
        )
    nodata_el = "" if nodata is None else f"    <NoDataValue>{nodata:g}</NoDataValue>\n"
    return (
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">\n'
        f"  <SRS>{escape(wkt)}</SRS>\n"
        f"  <GeoTransform>{left!r}, {a!r}, 0.0, {top!r}, 0.0, {e!r}</GeoTransform>\n"
        f'  <VRTRasterBand dataType="{gdal_type}" band="1">\n{nodata_el}'
        + "\n".join(sources)
        + "\n  </VRTRasterBand>\n</VRTDataset>\n"
    )


def _gdal_path(uri: str) -> str:
    """A uri as GDAL opens it from inside a VRT: local paths absolute, ``s3://`` as ``/vsis3/``,
    ``http(s)://`` as ``/vsicurl/``."""
    if uri.startswith("s3://"):
        return "/vsis3/" + uri[len("s3://") :]
    if uri.startswith(("http://", "https://")):
        return "/vsicurl/" + uri
    if uri.startswith("gs://"):
        return "/vsigs/" + uri[len("gs://") :]
    return os.path.abspath(uri)


# ---------------------------------------------------------------- labels (global vector layers)


@dataclass(frozen=True)
class LabelFile:
    uri: str
    bbox: tuple[float, float, float, float] | None  # extent in the layer CRS (None: unknown, always read)


@dataclass
class LabelLayer:
    """A GeoParquet label layer: its files with their extents, its CRS, geometry and covering columns."""

    root: str
    files: list[LabelFile]
    crs: str
    geometry_column: str
    covering: dict[str, list[str]] | None  # {"xmin": ["bbox", "xmin"], ...} (GeoParquet 1.1 covering)
    hive: bool = False
    schema_names: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, uri: str) -> LabelLayer:
        """Index a layer from its footers only (no feature is read).

        Raises:
            FileNotFoundError: no Parquet file at ``uri``.
            ValueError: the files are not GeoParquet (no ``geo`` metadata).
        """
        if uri.lower().endswith((".parquet", ".geoparquet")):
            uris = [uri] if io.exists(uri) else []
        else:
            uris = io.glob(uri, "**/*.parquet") if io.exists(uri) else []
        if not uris:
            raise FileNotFoundError(
                f"catalog.labels={uri!r}: no GeoParquet file there. Point it at a .parquet file or a "
                "folder of them (hive partitions or many files)."
            )
        files: list[LabelFile] = []
        geo0: dict | None = None
        names: list[str] = []
        for u in uris:
            fs, path = io.filesystem(u)
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
                names = names or pq.ParquetFile(f).schema_arrow.names
            raw = (meta.metadata or {}).get(b"geo")
            if raw is None:
                raise ValueError(
                    f"{u} has no GeoParquet 'geo' metadata: write the layer with geopandas "
                    "(to_parquet(..., write_covering_bbox=True)) or gpq/ogr2ogr -f Parquet."
                )
            geo = json.loads(raw)
            geo0 = geo0 or geo
            files.append(LabelFile(u, _file_bbox(meta, geo)))
        assert geo0 is not None  # uris is not empty and each file's geo metadata was read
        column = geo0["primary_column"]
        col_meta = geo0["columns"][column]
        crs_value = col_meta.get("crs", "OGC:CRS84")
        crs = "EPSG:4326" if crs_value is None else CRS.from_user_input(crs_value).to_string()
        covering = (col_meta.get("covering") or {}).get("bbox")
        hive = any("=" in part for f in files for part in io.relative(f.uri, uri).split("/")[:-1])
        return cls(uri, files, crs, column, covering, hive, names)

    def columns(self) -> set[str]:
        """Attribute columns: the files' own and the hive partition keys (``key=value`` folders)."""
        keys = {
            part.split("=", 1)[0]
            for f in self.files
            for part in io.relative(f.uri, self.root).split("/")[:-1]
            if "=" in part
        }
        return set(self.schema_names) | keys

    def check(self, class_map: dict[str, str] | None, class_column: str, id_column: str | None) -> None:
        """Refuse keys naming columns the layer lacks.

        Raises:
            ValueError: naming the key, the missing columns and the layer's columns.
        """
        have = self.columns()
        wanted = {
            "catalog.labels_class_map" if class_map is not None else "align.class_column": class_columns(
                class_map, class_column
            )
        }
        if id_column is not None:
            wanted["catalog.labels_id_column"] = [id_column]
        for key, cols in wanted.items():
            missing = sorted(set(cols) - have)
            # a class map may name columns only some layers have; none is an error
            if missing == sorted(set(cols)):
                raise ValueError(
                    f"{key} names columns {missing} that the layer {self.root} does not have (its columns: "
                    f"{sorted(have)}). Fix {key}."
                )

    def bbox_of(self, footprint) -> tuple[float, float, float, float]:
        """A scene footprint's (EPSG:4326) bounds in the layer CRS."""
        if CRS.from_user_input(self.crs).equals(CRS.from_epsg(4326)) or self.crs == "OGC:CRS84":
            return footprint.bounds
        from rasterio.warp import transform_bounds

        return transform_bounds("EPSG:4326", self.crs, *footprint.bounds, densify_pts=21)

    def files_for(self, bbox: tuple[float, float, float, float]) -> list[str]:
        """Files whose extent meets ``bbox`` (layer CRS), and files of unknown extent."""
        x0, y0, x1, y1 = bbox
        return [
            f.uri
            for f in self.files
            if f.bbox is None or not (f.bbox[0] > x1 or f.bbox[2] < x0 or f.bbox[1] > y1 or f.bbox[3] < y0)
        ]

    def read(self, bbox: tuple[float, float, float, float], columns: list[str]) -> tuple[pa.Table, list[str]]:
        """Features whose covering bbox meets ``bbox`` (all features of the files met, when the layer has
        no covering column), with ``columns`` and the geometry; and the files the scan opened."""
        import pyarrow.dataset as pads  # here: it imports pandas, which the tile actors do not need

        uris = self.files_for(bbox)
        if not uris:
            return pa.table({}), []
        fs, _ = io.filesystem(uris[0])
        paths = [io.filesystem(u)[1] for u in uris]
        partitioning = None
        if self.hive:
            partitioning = pads.partitioning(flavor="hive")
        root_path = io.filesystem(self.root)[1]
        options = {
            "format": "parquet",
            "filesystem": fs,
            "partitioning": partitioning,
            "partition_base_dir": root_path if self.hive else None,
        }
        dataset = pads.dataset(paths, **options)
        # files of one layer may have different columns (an attribute only some regions have): the dataset's
        # schema is the first file's, so unify them (footers of the files met only), partition keys kept
        physical = [fragment.physical_schema for fragment in dataset.get_fragments()]
        keys = pa.schema([f for f in dataset.schema if all(f.name not in s.names for s in physical)])
        dataset = pads.dataset(
            paths, schema=pa.unify_schemas([*physical, keys], promote_options="permissive"), **options
        )
        wanted = [self.geometry_column] + [
            c for c in columns if c in dataset.schema.names and c != self.geometry_column
        ]
        expr = None
        if self.covering:
            x0, y0, x1, y1 = bbox
            col = {k: pads.field(*v) for k, v in self.covering.items()}
            expr = (col["xmin"] <= x1) & (col["xmax"] >= x0) & (col["ymin"] <= y1) & (col["ymax"] >= y0)
        table = dataset.to_table(columns=wanted, filter=expr)
        return table, list(dataset.files)


def _file_bbox(meta: pq.FileMetaData, geo: dict) -> tuple[float, float, float, float] | None:
    """A file's extent: its GeoParquet ``bbox`` metadata, else the min/max statistics of its covering
    bbox columns over all row groups; None if neither is written."""
    col = geo["columns"][geo["primary_column"]]
    if col.get("bbox") and len(col["bbox"]) == 4:
        x0, y0, x1, y1 = (float(v) for v in col["bbox"])
        return x0, y0, x1, y1
    covering = (col.get("covering") or {}).get("bbox")
    if not covering or meta.num_row_groups == 0:
        return None
    paths = {k: ".".join(v) for k, v in covering.items()}
    index = {meta.schema.column(i).path: i for i in range(meta.num_columns)}
    if not all(p in index for p in paths.values()):
        return None
    lows, highs = [], []
    for rg in range(meta.num_row_groups):
        stats = {k: meta.row_group(rg).column(index[p]).statistics for k, p in paths.items()}
        if any(s is None or not s.has_min_max for s in stats.values()):
            return None
        lows.append((stats["xmin"].min, stats["ymin"].min))
        highs.append((stats["xmax"].max, stats["ymax"].max))
    return (
        min(v[0] for v in lows),
        min(v[1] for v in lows),
        max(v[0] for v in highs),
        max(v[1] for v in highs),
    )


def map_classes(table: pa.Table, class_map: dict[str, str] | None, class_column: str) -> list[str | None]:
    """The class of each feature: from ``class_map`` (``"column=value"`` keys first, then ``"column"``
    keys for any non-empty value, each in the order given), or the value of ``class_column``; None for a
    feature no key matches (left out of the labels, counted as unmapped)."""
    n = table.num_rows
    if class_map is None:
        if class_column not in table.column_names:
            return [None] * n
        return [None if v is None else str(v) for v in table.column(class_column).to_pylist()]
    out: list[str | None] = [None] * n
    exact = [(k.split("=", 1), v) for k, v in class_map.items() if "=" in k]
    anyval = [(k, v) for k, v in class_map.items() if "=" not in k]
    for (column, value), cls in exact:
        if column in table.column_names:
            for i, v in enumerate(table.column(column).to_pylist()):
                if out[i] is None and v is not None and str(v) == value:
                    out[i] = cls
    for column, cls in anyval:
        if column in table.column_names:
            for i, v in enumerate(table.column(column).to_pylist()):
                if out[i] is None and v is not None and str(v).strip() not in ("", "no"):
                    out[i] = cls
    return out


def class_columns(class_map: dict[str, str] | None, class_column: str) -> list[str]:
    """The attribute columns the class mapping reads."""
    if class_map is None:
        return [class_column]
    return sorted({k.split("=", 1)[0] for k in class_map})


def feature_ids(table: pa.Table, geometry_column: str, id_column: str | None) -> list[str]:
    """Stable feature ids, independent of how the layer is split into files: the id column's values, or
    a SHA-1 of the geometry's WKB (16 hex digits)."""
    if id_column is not None and id_column in table.column_names:
        return [str(v) for v in table.column(id_column).to_pylist()]
    return [
        hashlib.sha1(bytes(w) if w is not None else b"").hexdigest()[:16]
        for w in table.column(geometry_column).to_pylist()
    ]
