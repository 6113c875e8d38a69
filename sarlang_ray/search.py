"""SAR scenes by search: ``catalog.search`` asks a STAC API (pystac-client) or reads a stac-geoparquet
snapshot (pyarrow dataset filters on the GeoParquet 1.1 bbox covering columns) and freezes what it found
into the run folder before anything is inspected.

The frozen snapshot, ``<run_dir>/search/items-<key>.parquet`` (stac-geoparquet), is named by a hash of the
search keys (:func:`search_key`): a rerun with the same keys reads it instead of asking again, whatever
else changed in the catalog section, and a changed key makes a new one. The catalog stage's fingerprint
holds the search keys (they are part of ``catalog``), so a changed search also re-catalogs. A run is
reproducible from its own snapshot: point ``catalog.search.source`` of another run at that file.

Selection, the same for both kinds of source:

* collections, an AOI (``bbox`` in lon/lat, or ``aoi``: a vector file in any CRS, reprojected to
  EPSG:4326 with geopandas, its features' union) and a ``datetime`` interval (STAC's ``start/end``,
  ``..`` for an open end, both ends inclusive);
* ``filter``: item properties, ``{key: value}`` (equal), ``{key: [a, b]}`` (any of them) or, on a list
  property such as ``sar:polarizations``, ``{key: [VH]}`` (contains all). Sent to an API as CQL2-JSON when
  it conforms to STAC API Filter, and always applied to what comes back (an API without Filter, or a
  snapshot, is filtered here);
* ``max_items``: the first that many items that pass, in the source's order.

A snapshot is read as a pyarrow dataset: the bbox, datetime and collection predicates are pushed down to
Parquet row-group statistics (files and row groups whose statistics cannot match are not read), then the
exact footprint test (shapely) and the property filter run per record batch on what remains, so the
driver holds the selection, never the snapshot.

An API search is frozen as its pages arrive (:func:`_freeze_api`): items that pass go to a spool on disk page
by page and become stac-geoparquet in chunks, so the driver holds a page, never the search.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import shapely
from shapely.geometry import box, mapping

from sarlang_ray import io
from sarlang_ray.config import SearchSection

log = logging.getLogger(__name__)
FOLDER = "search"
_TS = pa.timestamp("us", tz="UTC")


class SearchError(ValueError):
    """The search cannot run as configured (a bad AOI file, an unreachable API, no items); says what to
    fix."""


def is_api(source: str) -> bool:
    """A STAC API (searched page by page) rather than a stac-geoparquet file or folder."""
    return source.startswith(("http://", "https://")) and not source.lower().split("?")[0].endswith(
        (".parquet", ".geoparquet")
    )


def search_key(q: SearchSection) -> str:
    """What the frozen snapshot is made from: every search key but the page size (which changes how the
    items travel, not which), hashed."""
    keys = {k: v for k, v in dataclasses.asdict(q).items() if k != "page_size"}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def snapshot_uri(q: SearchSection, run_dir: str) -> str:
    return io.join(run_dir, FOLDER, f"items-{search_key(q)}.parquet")


# ---------------------------------------------------------------- selection
def aoi_geometry(q: SearchSection):
    """The AOI in EPSG:4326 (a shapely geometry), or None for no AOI.

    Raises:
        SearchError: the AOI file cannot be read, is empty or has no CRS.
    """
    if q.bbox is not None:
        return box(*q.bbox)
    if q.aoi is None:
        return None
    import geopandas as gpd

    try:
        frame = (
            gpd.read_parquet(q.aoi)
            if q.aoi.lower().endswith((".parquet", ".geoparquet"))
            else gpd.read_file(q.aoi)
        )
    except Exception as exc:  # noqa: BLE001 - geopandas/pyogrio raise many classes: one clear SearchError
        raise SearchError(
            f"catalog.search.aoi={q.aoi!r} cannot be read as a vector file ({exc}); give a GeoPackage, "
            "GeoJSON, shapefile or GeoParquet"
        ) from None
    if frame.empty:
        raise SearchError(f"catalog.search.aoi={q.aoi!r} has no features")
    if frame.crs is None:
        raise SearchError(f"catalog.search.aoi={q.aoi!r} has no CRS: set one (ogr2ogr -a_srs EPSG:<code>)")
    return shapely.make_valid(frame.to_crs("EPSG:4326").geometry.union_all())


def _instant(text: str, end: bool) -> dt.datetime | None:
    text = text.strip()
    if text in ("", ".."):
        return None
    when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if len(text) == 10 and end:  # a date as the end of an interval: the whole day
        when += dt.timedelta(days=1) - dt.timedelta(microseconds=1)
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def interval(text: str | None) -> tuple[dt.datetime | None, dt.datetime | None]:
    """A STAC datetime (an instant or ``start/end``, ``..`` open) as inclusive aware bounds."""
    if not text:
        return None, None
    start, _, end = text.partition("/")
    return _instant(start, False), _instant(end if end else start, True)


def property_matches(props: dict[str, Any], flt: dict[str, Any] | None) -> bool:
    """Whether an item's properties pass ``catalog.search.filter`` (see the module docstring)."""
    for key, want in (flt or {}).items():
        have = props.get(key)
        if isinstance(want, (list, tuple)):
            if isinstance(have, (list, tuple)):
                if not {str(w).lower() for w in want} <= {str(h).lower() for h in have}:
                    return False
            elif have is None or str(have).lower() not in {str(w).lower() for w in want}:
                return False
        elif isinstance(have, (list, tuple)):
            if str(want).lower() not in {str(h).lower() for h in have}:
                return False
        elif have is None or (str(have).lower() != str(want).lower() and have != want):
            return False
    return True


def cql2(flt: dict[str, Any] | None) -> dict | None:
    """``catalog.search.filter`` as CQL2-JSON, for APIs that conform to Filter. A list value is ``a_contains``
    (list properties like ``sar:polarizations``); give scalar alternatives as separate runs or rely on the
    client-side pass, which always runs."""
    if not flt:
        return None
    args = []
    for key, want in flt.items():
        if isinstance(want, (list, tuple)):
            args.append({"op": "a_contains", "args": [{"property": key}, list(want)]})
        else:
            args.append({"op": "=", "args": [{"property": key}, want]})
    return args[0] if len(args) == 1 else {"op": "and", "args": args}


def _item_time(props: dict) -> dt.datetime | None:
    text = props.get("datetime") or props.get("start_datetime")
    return _instant(str(text), False) if text else None


def _keep(item: dict, q: SearchSection, geom, start, end) -> bool:
    """The client-side pass over one item: collections, AOI, datetime and properties."""
    props = item.get("properties") or {}
    if q.collections and item.get("collection") not in q.collections:
        return False
    if geom is not None and (
        item.get("geometry") is None or not shapely.geometry.shape(item["geometry"]).intersects(geom)
    ):
        return False
    when = _item_time(props)
    if (start or end) and when is None:
        return False
    if (start and when < start) or (end and when > end):
        return False
    return property_matches(props, q.filter)


# ---------------------------------------------------------------- sources
def _source(q: SearchSection) -> str:
    """``catalog.search.source``, which a search needs (the config check requires it when search is on)."""
    if q.source is None:
        raise SearchError("catalog.search.source is not set: give a STAC API URL or a stac-geoparquet file.")
    return q.source


def api_items(q: SearchSection, geom, stats: dict) -> Iterator[dict]:
    """Items of a STAC API search, page by page (pystac-client follows the API's next links)."""
    try:
        from pystac_client import Client
        from pystac_client.conformance import ConformanceClasses
    except ImportError:  # pragma: no cover - optional dependency
        raise ImportError(
            "catalog.search.source is a STAC API URL: install pystac-client "
            "(pip install 'sarlang-ray[stac-api]')"
        ) from None
    try:
        client = Client.open(_source(q))
    except Exception as exc:  # noqa: BLE001 - network, HTTP and JSON errors alike: one clear SearchError
        raise SearchError(
            f"catalog.search.source={q.source!r}: cannot open the STAC API ({exc}). Check the URL "
            "(the API's landing page) and the network"
        ) from None
    client.add_conforms_to("ITEM_SEARCH")  # some APIs omit it from conformsTo; search is what is asked
    use_filter = bool(q.filter) and client.conforms_to(ConformanceClasses.FILTER)
    stats["cql2"] = use_filter
    search = client.search(
        collections=q.collections,
        intersects=None if geom is None else mapping(geom),
        datetime=q.datetime,
        limit=q.page_size,
        filter=cql2(q.filter) if use_filter else None,
        filter_lang="cql2-json" if use_filter else None,
    )
    for page in search.pages_as_dicts():
        stats["pages"] = stats.get("pages", 0) + 1
        yield from page.get("features") or []


def _covering(schema: pa.Schema) -> dict[str, list[str]]:
    """The GeoParquet 1.1 bbox covering of the geometry column (``bbox.xmin`` ...), default
    stac-geoparquet's."""
    geo = json.loads((schema.metadata or {}).get(b"geo", b"{}") or b"{}")
    column = geo.get("primary_column", "geometry")
    cover = ((geo.get("columns") or {}).get(column) or {}).get("covering", {}).get("bbox")
    return cover or {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}


def snapshot_dataset(source: str) -> ds.Dataset:
    """A stac-geoparquet file or folder (any depth of partition folders, local or s3://) as one dataset;
    the schemas of its files unified (partitions may carry different property columns)."""
    fs, path = io.filesystem(source)
    if not fs.exists(path):
        raise SearchError(
            f"catalog.search.source={source!r} does not exist: point it at a stac-geoparquet file or "
            "a folder of them"
        )
    arrow_fs = pa.fs.PyFileSystem(pa.fs.FSSpecHandler(fs)) if io.is_remote(source) else None
    dataset = ds.dataset(path, format="parquet", filesystem=arrow_fs, exclude_invalid_files=False)
    schemas = (
        [pq.read_schema(f, filesystem=arrow_fs) for f in dataset.files] if len(dataset.files) > 1 else []
    )
    if len(set(map(str, schemas))) > 1:
        dataset = ds.dataset(
            path,
            format="parquet",
            filesystem=arrow_fs,
            schema=pa.unify_schemas(schemas, promote_options="permissive"),
        )
    return dataset


def pushdown(schema: pa.Schema, q: SearchSection, geom, start, end):
    """The predicates a pyarrow scan pushes to row-group statistics: AOI bbox on the covering columns,
    datetime, collections. Coarse on purpose: the exact tests run after."""
    expr = None

    def both(e):
        return e if expr is None else expr & e

    if geom is not None:
        cover = _covering(schema)
        w, s, e, n = geom.bounds
        expr = both(
            (ds.field(*cover["xmin"]) <= e)
            & (ds.field(*cover["xmax"]) >= w)
            & (ds.field(*cover["ymin"]) <= n)
            & (ds.field(*cover["ymax"]) >= s)
        )
    if "datetime" in schema.names and (start or end):
        kind = schema.field("datetime").type
        if start:
            expr = both(ds.field("datetime") >= pa.scalar(start.astimezone(dt.timezone.utc), _TS).cast(kind))
        if end:
            expr = both(ds.field("datetime") <= pa.scalar(end.astimezone(dt.timezone.utc), _TS).cast(kind))
    if q.collections and "collection" in schema.names:
        expr = both(ds.field("collection").isin(q.collections))
    return expr


def snapshot_batches(q: SearchSection, geom, stats: dict, batch_size: int = 8192) -> Iterator[pa.Table]:
    """The selected rows of a stac-geoparquet snapshot, one table per record batch (arrow, never dicts of
    the rows a predicate rejected)."""
    dataset = snapshot_dataset(_source(q))
    start, end = interval(q.datetime)
    expr = pushdown(dataset.schema, q, geom, start, end)
    stats.update(
        files=len(dataset.files), files_read=0, row_groups=0, row_groups_read=0, rows_matched_pushdown=0
    )
    for fragment in dataset.get_fragments(filter=expr):
        stats["row_groups"] += fragment.num_row_groups
        # the row groups whose statistics can match: the only ones read
        # one row group at a time, also without a filter (a whole file would be decoded ahead)
        groups = fragment.split_by_row_group(expr, schema=dataset.schema)
        stats["row_groups_read"] += len(groups)
        stats["files_read"] += bool(groups)
        for group in groups:
            # little read-ahead: pyarrow's default (16 batches) would decode a whole small snapshot at once
            yield from _selected(
                group.to_batches(
                    filter=expr,
                    schema=dataset.schema,
                    batch_size=batch_size,
                    batch_readahead=2,
                    fragment_readahead=1,
                ),
                q,
                geom,
                stats,
            )


def _selected(batches, q: SearchSection, geom, stats: dict) -> Iterator[pa.Table]:
    """The exact tests on batches the pushdown let through: footprint (shapely) and properties."""
    for batch in batches:
        stats["rows_matched_pushdown"] += batch.num_rows
        if not batch.num_rows:
            continue
        keep = pa.array([True] * batch.num_rows)
        if geom is not None:  # the exact test on the footprints the bbox let through
            shapes = shapely.from_wkb(batch.column("geometry").to_numpy(zero_copy_only=False))
            keep = pa.array(shapely.intersects(shapes, geom))
        for key, want in (q.filter or {}).items():
            column = batch.column(key).to_pylist() if key in batch.schema.names else [None] * batch.num_rows
            keep = pc.and_(keep, pa.array([property_matches({key: v}, {key: want}) for v in column]))
        table = pa.Table.from_batches([batch]).filter(keep)
        if table.num_rows:
            yield table


# ---------------------------------------------------------------- freezing
def freeze(q: SearchSection, run_dir: str) -> tuple[str, dict]:
    """Run the search once and write its items into the run folder as stac-geoparquet; later calls with the
    same search keys return the frozen file without asking the source. Returns (uri, counts).

    Raises:
        SearchError: the source cannot be searched, or nothing matches (the message gives the keys).
    """
    uri = snapshot_uri(q, run_dir)
    if io.exists(uri):
        return uri, {"snapshot": uri, "items": io.parquet_rows([uri]), "queried": False}
    geom = aoi_geometry(q)
    start, end = interval(q.datetime)
    stats: dict = {}
    cap = q.max_items
    io.makedirs(io.join(run_dir, FOLDER))
    # page by page to a spool on disk, then to Parquet in chunks: the driver holds a page
    if is_api(_source(q)):
        n = _freeze_api(q, geom, start, end, stats, uri)
    else:  # written batch by batch as the scan selects them: the driver holds one batch, not the selection
        written = [0]
        io.write_stream_atomic(uri, _snapshot_chunks(snapshot_batches(q, geom, stats), cap, written))
        n = written[0]
    if not n:
        if io.exists(uri):
            fs, path = io.filesystem(uri)
            fs.rm(path)
        raise SearchError(
            f"catalog.search found no items in {q.source} (collections {q.collections}, bbox {q.bbox}, "
            f"aoi {q.aoi}, datetime {q.datetime}, filter {q.filter}). Widen the search"
        )
    io.write_json_atomic(
        io.join(run_dir, FOLDER, f"items-{search_key(q)}.json"),
        {
            "search": dataclasses.asdict(q),
            "items": n,
            **stats,
            "frozen_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        },
    )
    log.info("catalog.search: %d items frozen into %s", n, uri)
    return uri, {"snapshot": uri, "items": n, "queried": True, **stats}


def _snapshot_chunks(parts: Iterator[pa.Table], cap: int | None, written: list[int]) -> Iterator[bytes]:
    """The bytes of a Parquet file of ``parts`` (at most ``cap`` rows), as a writer produces them, part by
    part; ``written[0]``: the rows written so far."""
    import io as pyio

    buf, writer = pyio.BytesIO(), None

    def drain() -> bytes:
        data = buf.getvalue()
        buf.seek(0)
        buf.truncate()
        return data

    for part in parts:
        if cap is not None:
            part = part.slice(0, cap - written[0])
        if writer is None:
            writer = pq.ParquetWriter(buf, part.schema)
        writer.write_table(part)
        written[0] += part.num_rows
        yield drain()
        if cap is not None and written[0] >= cap:
            break
    if writer is not None:
        writer.close()
        yield drain()


SPOOL_CHUNK = 1024  # items per Arrow batch when the spool of an API search becomes Parquet


def _freeze_api(q: SearchSection, geom, start, end, stats: dict, uri: str) -> int:
    """Write the items of an API search that pass the client-side filter to ``uri`` as stac-geoparquet;
    returns how many. Pages are consumed as pystac-client fetches them: each passing item goes to a local
    NDJSON spool as it arrives, so the driver holds one page, not the search. stac-geoparquet then converts
    the spool in chunks of :data:`SPOOL_CHUNK` items (two passes: the schema common to all items, since pages
    may carry different properties and assets; then the rows, batch by batch through a Parquet writer), and
    the file is copied to the run folder in blocks."""
    import os
    import tempfile

    import stac_geoparquet.arrow

    n, cap = 0, q.max_items
    with tempfile.TemporaryDirectory(prefix="sarlang-search-") as tmp:
        spool = os.path.join(tmp, "items.ndjson")
        with open(spool, "w") as f:
            for item in api_items(q, geom, stats):
                if _keep(item, q, geom, start, end):
                    f.write(json.dumps(item, separators=(",", ":")) + "\n")
                    n += 1
                    if cap is not None and n >= cap:
                        break
        if n:
            parquet = os.path.join(tmp, "items.parquet")
            stac_geoparquet.arrow.to_parquet(
                stac_geoparquet.arrow.parse_stac_ndjson_to_arrow(spool, chunk_size=SPOOL_CHUNK), parquet
            )
            io.write_stream_atomic(uri, _file_blocks(parquet))
    return n


def _file_blocks(path: str, size: int = 8 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(size):
            yield block


def read_items(uri: str) -> Iterator[dict]:
    """The item dicts of a frozen snapshot, batch by batch."""
    import stac_geoparquet.arrow

    fs, path = io.filesystem(uri)
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=8192):
            yield from stac_geoparquet.arrow.stac_table_to_items(pa.Table.from_batches([batch]))
