"""Static STAC catalogs and ItemCollections as archives: which GeoTIFFs they list as SAR scenes.

Public SAR archives publish scenes as STAC: a static catalog (``catalog.json`` or ``collection.json``
linking child catalogs and items) or an ItemCollection (a GeoJSON FeatureCollection of items, what a
STAC API search returns). Point ``catalog.archive`` at such a file, local or ``s3://``, and the catalog
stage inspects each item's SAR assets as it would the files of a folder.

Which assets are SAR scenes: the keys in ``catalog.stac_assets`` (case-insensitive: ``vv``, ``VH``...),
or, when that is null, every asset with the ``data`` role (or no roles) and a GeoTIFF media type (or,
without a media type, a ``.tif``/``.tiff`` href); thumbnails, previews and metadata are never picked.
Relative hrefs are resolved against the item's own location (the ItemCollection file for items
without a ``self`` link). The item's id, datetime, platform and ``sar:*`` fields travel with the scene.

Everything here runs in the driver and only reads JSON; rasters are opened by the catalog workers.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import pystac
from pystac.utils import make_absolute_href

from sarlang_ray import io
from sarlang_ray.errors import error_row

SUFFIXES = (".json", ".geojson")
GEOTIFF_MEDIA_TYPES = ("image/tiff", "image/geotiff", "image/vnd.stac.geotiff")
# item properties copied onto the scene's own columns (everything else stays in stac_properties)
_PLATFORM_KEYS = ("platform", "constellation")


class FsspecStacIO(pystac.StacIO):
    """pystac reads and writes through fsspec, so catalogs on s3:// (or any fsspec URL) work like local
    ones."""

    def read_text(self, source: Any, *args: Any, **kwargs: Any) -> str:
        return io.read_bytes(_local(str(os.fspath(source)))).decode("utf-8")

    def write_text(self, dest: Any, txt: str, *args: Any, **kwargs: Any) -> None:
        io.write_bytes_atomic(_local(str(os.fspath(dest))), txt.encode("utf-8"))


@dataclass
class Candidate:
    """One SAR asset of one item: the raster to inspect and the item metadata that goes with it."""

    uri: str  # absolute uri of the raster
    item_id: str
    item_href: str  # where the item came from (its own file, or the ItemCollection file)
    asset: str  # asset key
    href: str  # the asset href as written in the item (relative or absolute)
    properties: dict[str, Any] = field(default_factory=dict)  # the item's properties
    # extension fields of the asset (sar:polarizations)
    asset_fields: dict[str, Any] = field(default_factory=dict)
    # the polarisations of one item as one scene: {polarisation, uri, band, asset, calibration, noise} per
    # asset (calibration / noise: the item's Sentinel-1 calibration and noise XML assets of that polarisation)
    bands: list[dict[str, Any]] | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> Candidate:
        return cls(**json.loads(text))


def is_stac(archive: str) -> bool:
    """Whether ``catalog.archive`` names a STAC file (catalog, collection, item or ItemCollection)."""
    return archive.lower().endswith(SUFFIXES)


def root_of(archive: str) -> str:
    """The folder a STAC file sits in: the base of relative paths (and scene ids), like a folder archive."""
    return archive.rsplit("/", 1)[0] if "/" in archive else "."


def _local(uri: str) -> str:
    """``file://`` URLs as plain paths (what a folder scan produces, so scene ids agree)."""
    return uri.removeprefix("file://")


def resolve(href: str, base: str) -> str:
    """An asset href as a uri: absolute ones (a URL, or a local path, even in an item served over HTTP) as
    they are, relative ones against ``base`` (the item's location)."""
    if "://" in href or href.startswith("/"):
        return _local(href)
    return _local(make_absolute_href(href, base, start_is_dir=False))


def read_items(archive: str, stage: str) -> tuple[list[tuple[pystac.Item, str]], list[dict]]:
    """Every item of a STAC file with the href its relative asset hrefs resolve against, and an error row
    for every item or child link that cannot be read (a broken link rejects that branch, not the archive).

    Raises:
        FileNotFoundError: the STAC file itself does not exist.
        ValueError: it is JSON but not STAC.
    """
    if not io.exists(archive):
        raise FileNotFoundError(f"STAC file {archive} does not exist; check catalog.archive")
    stac_io = FsspecStacIO()
    doc = json.loads(io.read_bytes(archive))
    kind = doc.get("type") if isinstance(doc, dict) else None
    if kind == "FeatureCollection":
        collection = pystac.ItemCollection.from_dict(doc, preserve_dict=False)
        return [(item, item.get_self_href() or archive) for item in collection], []
    if kind == "Feature":
        return [(pystac.Item.from_dict(doc, href=archive, preserve_dict=False), archive)], []
    if kind not in ("Catalog", "Collection"):
        raise ValueError(
            f"{archive} is not STAC: its type is {kind!r}, expected Catalog, Collection, Feature "
            "(an item) or FeatureCollection (an ItemCollection). Point catalog.archive at a folder "
            "or at the catalog.json / items file."
        )
    root = pystac.read_file(archive, stac_io=stac_io)
    items: list[tuple[pystac.Item, str]] = []
    errors: list[dict] = []
    _walk(root, root, items, errors, set(), stage)  # type: ignore[arg-type]
    return items, errors


def _walk(
    cat: pystac.Catalog, root: pystac.Catalog, items: list, errors: list, seen: set[str], stage: str
) -> None:
    """Depth-first over item and child links; a link that cannot be resolved is one error row."""
    for entry in _iter_walk(cat, root, seen, stage):
        (errors if isinstance(entry, dict) else items).append(entry)


def _iter_walk(
    cat: pystac.Catalog, root: pystac.Catalog, seen: set[str], stage: str
) -> Iterator[tuple | dict]:
    """:func:`_walk` as a generator: ``(item, base)`` pairs and error rows as the links are followed. A link
    is set back to its href once followed, so the catalog does not keep what it has yielded (the hrefs of the
    links followed stay, in ``seen``)."""
    for rel in (pystac.RelType.ITEM, pystac.RelType.CHILD):
        for link in cat.get_links(rel):
            href = link.get_absolute_href() or link.href
            if href in seen:
                continue
            seen.add(href)
            try:
                target = link.resolve_stac_object(root=root).target
            # missing file, bad JSON, not STAC: pystac raises several classes
            except Exception as exc:  # noqa: BLE001
                yield error_row(
                    stage,
                    href,
                    "stac_unreadable",
                    f"{rel} link {link.href!r} of {cat.get_self_href()} cannot be read ({exc}). "
                    "Fix or remove the link in the catalog.",
                )
                continue
            if isinstance(target, pystac.Item):
                yield target, target.get_self_href() or href
            elif isinstance(target, pystac.Catalog):
                yield from _iter_walk(target, root, seen, stage)
            link.target = href


def iter_items(archive: str, stage: str) -> Iterator[tuple | dict]:
    """:func:`read_items` one item at a time: ``(item, base)`` pairs and error rows, in the same order. An
    ItemCollection is parsed item by item (ijson), a static catalog walked link by link, so the driver holds
    one item (and the catalogs above it), not the file's items.

    Raises:
        FileNotFoundError: the STAC file itself does not exist.
        ValueError: it is JSON but not STAC.
    """
    import ijson

    if not io.exists(archive):
        raise FileNotFoundError(f"STAC file {archive} does not exist; check catalog.archive")
    fs, path = io.filesystem(archive)
    kind = None
    with fs.open(path, "rb") as f:  # the top-level type, or a features array: an ItemCollection
        for prefix, event, value in ijson.parse(f):
            if prefix == "type" and event == "string":
                kind = value
                break
            if prefix == "features" and event == "start_array":
                kind = "FeatureCollection"
                break
    if kind != "FeatureCollection":
        if kind not in ("Catalog", "Collection", "Feature"):
            raise ValueError(
                f"{archive} is not STAC: its type is {kind!r}, expected Catalog, Collection, Feature "
                "(an item) or FeatureCollection (an ItemCollection). Point catalog.archive at a folder "
                "or at the catalog.json / items file."
            )
        if kind == "Feature":
            yield from read_items(archive, stage)[0]
            return
        root = pystac.read_file(archive, stac_io=FsspecStacIO())
        yield from _iter_walk(root, root, set(), stage)  # type: ignore[arg-type]
        return
    with fs.open(path, "rb") as f:
        for d in ijson.items(f, "features.item", use_float=True):
            item = pystac.Item.from_dict(d, preserve_dict=False)
            yield item, item.get_self_href() or archive


def _is_geotiff(asset: pystac.Asset) -> bool:
    if asset.roles and "data" not in asset.roles:
        return False
    if asset.media_type:
        return asset.media_type.split(";")[0].strip().lower() in GEOTIFF_MEDIA_TYPES
    return PurePosixPath(asset.href.split("?")[0]).suffix.lower() in (".tif", ".tiff")


def sar_assets(item: pystac.Item, keys: list[str] | None) -> list[tuple[str, pystac.Asset]]:
    """The item's SAR assets, sorted by key: the named ones (case-insensitive) or the GeoTIFF data assets."""
    if keys is not None:
        wanted = {k.lower() for k in keys}
        return sorted((k, a) for k, a in item.assets.items() if k.lower() in wanted)
    return sorted((k, a) for k, a in item.assets.items() if _is_geotiff(a))


_XML_ASSET = re.compile(r"(?:^|[-_])(calibration|noise|product)[-_](vv|vh|hh|hv)$", re.IGNORECASE)


def lut_assets(item: pystac.Item, base: str) -> dict[tuple[str, str], str]:
    """An item's Sentinel-1 calibration, noise and product annotation XML assets (the Planetary Computer's
    ``schema-calibration-vv``, ``schema-noise-vh``, ``schema-product-vv``...) as {(kind, POL): absolute
    uri}."""
    out = {}
    for key, asset in item.assets.items():
        m = _XML_ASSET.search(key)
        if m:
            out[(m.group(1).lower(), m.group(2).upper())] = resolve(asset.href, base)
    return out


def group_polarisations(cands: list[Candidate], luts: dict[tuple[str, str], str]) -> list[Candidate]:
    """The assets of one item with one distinct polarisation each (VV and VH) as one candidate with bands,
    co-polarisation first; anything else (one asset, unknown or repeated polarisations) as it is."""
    pols = [polarisations(c) for c in cands]
    if len(cands) < 2 or any(len(p) != 1 for p in pols) or len({p[0] for p in pols}) != len(pols):
        return cands
    order = ("VV", "HH", "VH", "HV")
    ranked = sorted(
        zip(cands, (p[0] for p in pols)), key=lambda cp: order.index(cp[1]) if cp[1] in order else 9
    )
    first = ranked[0][0]
    bands = [
        {
            "polarisation": pol,
            "uri": c.uri,
            "band": 1,
            "asset": c.asset,
            "calibration": luts.get(("calibration", pol)),
            "noise": luts.get(("noise", pol)),
            "annotation": luts.get(("product", pol)),
        }
        for c, pol in ranked
    ]
    return [
        Candidate(
            uri=first.uri,
            item_id=first.item_id,
            item_href=first.item_href,
            asset="+".join(c.asset for c, _ in ranked),
            href=first.href,
            properties=first.properties,
            asset_fields=first.asset_fields,
            bands=bands,
        )
    ]


def candidates(
    archive: str, asset_keys: list[str] | None, stage: str, group: bool = True
) -> tuple[list[Candidate], list[dict]]:
    """The SAR assets of a STAC file as inspection candidates, plus error rows for unusable items.

    An item without a SAR asset is rejected (``stac_no_sar_asset``), so planned = written + rejected
    holds per item as well. Two items naming the same raster keep the first (by item id). With ``group``,
    an item's single-polarisation assets (VV, VH) are one candidate (:func:`group_polarisations`).
    """
    items, errors = read_items(archive, stage)
    return candidates_from_items(items, errors, archive, asset_keys, stage, group)


def candidates_from_items(
    items: list[tuple[pystac.Item, str]],
    errors: list[dict],
    archive: str,
    asset_keys: list[str] | None,
    stage: str,
    group: bool = True,
    seen: dict[str, str] | None = None,
) -> tuple[list[Candidate], list[dict]]:
    """:func:`candidates` of items already read (a STAC file's, or a search snapshot's): ``(item, base)``
    pairs, ``base`` the href relative asset hrefs resolve against; ``archive`` names the source in errors.
    ``seen``: the rasters already cataloged (uri -> item id), shared by the pages of one listing."""
    found: list[Candidate] = []
    seen = {} if seen is None else seen
    for item, base in sorted(items, key=lambda pair: pair[0].id):
        assets = sar_assets(item, asset_keys)
        if not assets:
            which = (
                f"named any of {asset_keys}"
                if asset_keys is not None
                else "with a GeoTIFF media type and the data role"
            )
            errors.append(
                error_row(
                    stage,
                    base if base != archive else f"{archive}#{item.id}",
                    "stac_no_sar_asset",
                    f"STAC item {item.id!r} has no asset {which} (its assets: {sorted(item.assets)}). "
                    "Set catalog.stac_assets to the keys of its SAR assets.",
                )
            )
            continue
        mine: list[Candidate] = []
        for key, asset in assets:
            uri = resolve(asset.href, base)
            if uri in seen:
                errors.append(
                    error_row(
                        stage,
                        f"{base}#{key}",
                        "stac_duplicate",
                        f"STAC item {item.id!r} asset {key!r} names {uri}, already cataloged from item "
                        f"{seen[uri]!r}; kept once.",
                    )
                )
                continue
            seen[uri] = item.id
            mine.append(
                Candidate(
                    uri=uri,
                    item_id=item.id,
                    item_href=base,
                    asset=key,
                    href=asset.href,
                    properties=dict(item.properties),
                    asset_fields=dict(asset.extra_fields),
                )
            )
        found += group_polarisations(mine, lut_assets(item, base)) if group else mine
    return found, errors


def platform(props: dict[str, Any]) -> str | None:
    """The item's platform (or constellation) as published, e.g. ``sentinel-1a``."""
    return next((str(props[k]) for k in _PLATFORM_KEYS if props.get(k)), None)


def acquired(props: dict[str, Any]) -> str | None:
    """The item's datetime as published (ISO 8601), or the start of its range when datetime is null."""
    return props.get("datetime") or props.get("start_datetime")


def polarisations(c: Candidate) -> list[str]:
    """Polarisations of this asset: the asset's own ``sar:polarizations``, its key (vv, vh...), then the
    item's."""
    own = c.asset_fields.get("sar:polarizations")
    if own:
        return [str(p).upper() for p in own]
    if c.asset.upper() in ("VV", "VH", "HH", "HV"):
        return [c.asset.upper()]
    return [str(p).upper() for p in c.properties.get("sar:polarizations") or []]
