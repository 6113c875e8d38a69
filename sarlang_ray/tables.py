"""The run folder's tables: their schemas, where their shards live, and how to read them.

Every stage writes under one run folder (local or ``s3://``). This module knows the layout and the
schemas and nothing of Ray or of how a table is made, so stages, notebooks and tools read results
through it without importing the orchestrator:

* ``catalog/scenes.parquet``: the **scenes** table (one row per usable SAR scene);
* ``tile/shards/<scene>/<gsd>-<chunk>.parquet``: tiles before alignment;
* ``align/shards/...``: the **tiles** table (tiles + objects, land cover, optical twin);
* ``annotate/shards/...``: the **annotations** table (pairs, QC-rejected ones included);
* ``<stage>/errors/...`` and ``catalog/errors.parquet``, ``align/label_errors.parquet``: the errors table. A
  chunk (``<stage>/errors/<shard>``, ``annotate/findings/<shard>.json``,
  ``align/label_errors/<scene>.parquet``)
writes its
  side file only when it has rows: a missing one means none (:func:`write_errors`, :func:`read_error_rows`).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa

from sarlang_ray import io
from sarlang_ray.errors import errors_table

SCENES_SCHEMA = pa.schema(
    [
        ("scene_id", pa.string()),
        ("sar_uri", pa.string()),
        ("optical_uri", pa.string()),
        ("landcover_uri", pa.string()),
        ("crs", pa.string()),
        ("tile_crs", pa.string()),
        ("transform", pa.list_(pa.float64())),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("gsd_m", pa.float64()),
        ("rotated", pa.bool_()),
        ("band", pa.int64()),
        ("nodata", pa.float64()),
        ("dtype", pa.string()),
        ("units", pa.string()),
        ("units_source", pa.string()),
        ("sensor", pa.string()),
        ("polarisation", pa.string()),
        ("region", pa.string()),
        ("valid_fraction", pa.float64()),
        ("footprint", pa.binary()),
        # STAC archives only (null for folders): the item, its asset key, acquisition time (ISO 8601 as
        # published), platform, SAR instrument mode, and all item properties as JSON
        ("stac_item", pa.string()),
        ("stac_asset", pa.string()),
        ("datetime", pa.string()),
        ("platform", pa.string()),
        ("instrument_mode", pa.string()),
        ("stac_properties", pa.string()),
    ]
)

TILES_SCHEMA = pa.schema(
    [
        ("tile_id", pa.string()),
        ("scene_id", pa.string()),
        ("gsd_m", pa.float64()),
        ("row", pa.int32()),
        ("col", pa.int32()),
        ("crs", pa.string()),
        ("transform", pa.list_(pa.float64())),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bounds", pa.list_(pa.float64())),
        ("footprint", pa.binary()),
        ("sar_png", pa.binary()),
        ("nodata_fraction", pa.float32()),
        ("db_mean", pa.float32()),
        ("db_std", pa.float32()),
        ("db_p02", pa.float32()),
        ("db_p98", pa.float32()),
        ("stretch_db", pa.list_(pa.float32())),
        ("sensor", pa.string()),
        ("polarisation", pa.string()),
        ("region", pa.string()),
        ("native_gsd_m", pa.float64()),
        # every polarisation of the scene on this tile (the PNG shows `polarisation`: one of them or a
        # composite); noise_clipped: pixels thermal-noise removal took to catalog.noise_floor_db; stretch_db:
        # null if not shown
        (
            "bands",
            pa.list_(
                pa.struct(
                    [
                        ("polarisation", pa.string()),
                        ("nodata_fraction", pa.float32()),
                        ("noise_clipped", pa.int64()),
                        ("db_mean", pa.float32()),
                        ("db_std", pa.float32()),
                        ("db_p02", pa.float32()),
                        ("db_p98", pa.float32()),
                        ("stretch_db", pa.list_(pa.float32())),
                    ]
                )
            ),
        ),
    ]
)

OBJECT_TYPE = pa.struct(
    [
        ("class", pa.string()),
        # pixel coordinates: x right, y down, origin top-left corner
        (
            "bbox_xyxy",
            pa.list_(pa.float32(), 4),
        ),
        ("polygon", pa.binary()),  # WKB polygon in pixel coordinates
        ("area_px", pa.float32()),
        ("angle_deg", pa.float32()),  # long axis, counter-clockwise from the image x axis, in [0, 180)
        ("visible_fraction", pa.float32()),
        ("label_id", pa.string()),
    ]
)
ALIGNED_SCHEMA = (
    TILES_SCHEMA.append(pa.field("optical_png", pa.binary()))
    .append(pa.field("objects", pa.list_(OBJECT_TYPE)))
    .append(pa.field("landcover", pa.map_(pa.string(), pa.float32())))
    .append(pa.field("landcover_valid_fraction", pa.float32()))
)

ANNOTATION_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("tile_id", pa.string()),
        ("scene_id", pa.string()),
        ("gsd_m", pa.float64()),
        ("kind", pa.string()),
        ("application", pa.string()),
        ("question_type", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("backend", pa.string()),
        ("qc_passed", pa.bool_()),
        ("qc_reasons", pa.list_(pa.string())),
    ]
)
# the tiles-table columns an annotator (or the template oracle) needs
ANNOTATE_TILE_COLUMNS = [
    "tile_id",
    "scene_id",
    "gsd_m",
    "width",
    "objects",
    "landcover",
    "sar_png",
    "optical_png",
]

GEO_METADATA: dict[str, Any] = {
    "version": "1.1.0",
    "primary_column": "footprint",
    "columns": {
        "footprint": {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": None, "edges": "planar"}
    },
}


def geo_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with GeoParquet metadata: ``footprint`` is the primary geometry, WKB in EPSG:4326."""
    from pyproj import CRS

    geo = dict(GEO_METADATA)
    geo["columns"] = {
        "footprint": {**GEO_METADATA["columns"]["footprint"], "crs": CRS.from_epsg(4326).to_json_dict()}
    }
    return schema.with_metadata({b"geo": json.dumps(geo).encode()})


# ---------------------------------------------------------------- scenes
def scenes_uri(run_dir: str) -> str:
    return io.join(run_dir, "catalog", "scenes.parquet")


def read_scenes(run_dir: str) -> list[dict]:
    return io.read_parquet(scenes_uri(run_dir)).to_pylist()


# ---------------------------------------------------------------- shards
def shard_root(run_dir: str, stage: str) -> str:
    return io.join(run_dir, stage, "shards")


def shards(run_dir: str, stage: str) -> list[str]:
    """The shard files a sharded stage (tile, align, annotate) has written, sorted; [] when none."""
    root = shard_root(run_dir, stage)
    return io.glob(root, "*/*.parquet") if io.exists(root) else []


def existing_shard(uri: str, planned: int, name: str) -> dict | None:
    """The manifest row of a shard (with a ``tile_id`` column) that an earlier, interrupted run already
    wrote, or None: a resumed stage counts it and writes nothing."""
    if not io.exists(uri):
        return None
    written = io.read_parquet(uri, columns=["tile_id"]).num_rows
    return {
        "shard": name,
        "planned": planned,
        "written": written,
        "rejected": planned - written,
        "skipped": True,
    }


def tiles_table_shards(run_dir: str) -> list[str]:
    """The shards of the **tiles** table (``align/shards/``: the tiles with objects, land cover and optical
    twin; ``tile/shards/`` holds the tile stage's tiles before alignment)."""
    return shards(run_dir, "align")


def tiles_counters(tiles: list[dict]) -> dict:
    """Tiles per GSD and objects per class of some rows of the tiles table, as JSON (a manifest row's ``gsds``
    and ``classes``: the align stage's marker sums them for the run summary)."""
    gsds = Counter(f"{t['gsd_m']:g} m" for t in tiles)
    classes = Counter(o["class"] for t in tiles for o in t["objects"] or [])
    return {
        "gsds": json.dumps(dict(sorted(gsds.items()))),
        "classes": json.dumps(dict(sorted(classes.items()))),
    }


def read_tiles(run_dir: str, columns: list[str] | None = None) -> pa.Table:
    """The final tiles table (all shards). For small runs and tests; pipelines should stream shards."""
    return io.read_parquet(tiles_table_shards(run_dir), columns=columns)


def annotation_shards(run_dir: str) -> list[str]:
    return shards(run_dir, "annotate")


def read_annotations(run_dir: str, columns: list[str] | None = None) -> pa.Table:
    """The annotations table (all shards; QC-rejected pairs included, with ``qc_passed`` false)."""
    return io.read_parquet(annotation_shards(run_dir), columns=columns)


def write_rows_file(uri: str, rows: list[dict], write) -> None:
    """Write a per-chunk side file (an errors table, a findings list) only when it has rows: at 1e8 tiles most
    chunks have none, and an empty file per chunk was half of all files in a run folder (and a read each for
    every reader). A chunk that has none now removes the file an earlier attempt left (a retry that fixed its
    tiles), so what is on disk is always this attempt's rows; readers treat a missing file as no rows."""
    if rows:
        write(uri, rows)
    elif io.exists(uri):
        fs, path = io.filesystem(uri)
        fs.rm(path)


def write_errors(uri: str, rows: list[dict]) -> None:
    """A chunk's errors table (``<stage>/errors/<shard>``), written only when the chunk rejected something."""
    write_rows_file(uri, rows, lambda u, r: io.write_parquet_atomic(u, errors_table(r)))


def read_error_rows(uri: str, columns: list[str] | None = None) -> list[dict]:
    """The rows of a chunk's errors table; [] when the chunk wrote none (it rejected nothing)."""
    return io.read_parquet(uri, columns=columns).to_pylist() if io.exists(uri) else []


def shard_error_reasons(run_dir: str, stage: str, names: list[str]) -> dict[str, int]:
    """Rejects per ``error_class`` in the errors tables of some shards of a sharded stage
    (``<stage>/errors/<name>``; a shard without one rejected nothing)."""
    reasons: Counter = Counter()
    for name in names:
        reasons.update(
            r["error_class"]
            for r in read_error_rows(io.join(run_dir, stage, "errors", name), ["error_class"])
        )
    return dict(sorted(reasons.items()))


# one file per stage; tile, align, annotate: one per chunk too
STAGE_ERROR_FILES = {
    "catalog": ["catalog/errors.parquet"],
    "align": ["align/label_errors.parquet"],
    "export": ["export/errors.parquet"],
}


def error_files(run_dir: str, stage: str | None = None) -> list[str]:
    """The errors files of one stage (or of all), in stage order; chunks that rejected nothing have none."""
    uris = []
    for name in ("catalog", "tile", "align", "annotate", "export") if stage is None else (stage,):
        uris += [u for u in (io.join(run_dir, p) for p in STAGE_ERROR_FILES.get(name, [])) if io.exists(u)]
        root = io.join(run_dir, name, "errors")
        if name in ("tile", "align", "annotate") and io.exists(root):
            uris += io.glob(root, "*/*.parquet")
    return uris


def iter_errors(run_dir: str, stage: str | None = None):
    """The errors table one file at a time (a table each): for a run whose errors are too many to hold at
    once."""
    for uri in error_files(run_dir, stage):
        yield io.read_parquet(uri)


def read_errors(run_dir: str, stage: str | None = None) -> pa.Table:
    """Every stage's rejected items in one table, or one stage's (a chunk that rejected nothing has no file:
    nothing to read)."""
    uris = error_files(run_dir, stage)
    return io.read_parquet(uris) if uris else errors_table([])
