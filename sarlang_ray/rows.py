"""The rows the stages pass around, as TypedDicts: a scene (the catalog's scenes table), a chunk (a tile
stage's unit of work), a tile (the tile stage's table; aligned: the tiles table align writes), the columns of
an aligned tile that annotate and export read (``TileKey``, ``LabelledTile``, ``AnnotateTileRow``) and a pair
(the annotations table).

Where they are used: scene and chunk rows by ``tiling`` and ``stages.tile``, tile rows by ``align``, aligned
tiles by ``viz``, the projections by the annotate backends (``template``, ``hf``, ``openai``, ``vllm``),
``annotate.visibility``, ``annotate.stage`` and ``export.image_path``.

They are the Arrow schemas (``tables.py``, ``catalog.SCENES_SCHEMA``) as the type checker sees them, so a
function that takes ``scene: SceneRow`` says which row it wants and mypy checks the keys it reads.
``tests/test_rows.py`` compares every TypedDict with its schema, key by key and type by type, so the two
cannot drift. A column is ``X | None`` where its rows can hold null (Arrow columns all may; these are the ones
the stages leave null).
"""

from __future__ import annotations

from typing import TypedDict

import typing_extensions

SceneRow = TypedDict(
    "SceneRow",
    {
        # tables.SCENES_SCHEMA: the contract's columns
        "scene_id": str,
        "sar_uri": str,
        "optical_uri": str | None,
        "landcover_uri": str | None,
        "crs": str,
        "tile_crs": str,
        "transform": list[float],
        "width": int,
        "height": int,
        "gsd_m": float,
        "rotated": bool,
        "band": int,
        "nodata": float | None,
        "dtype": str,
        "units": str,
        "units_source": str | None,
        "sensor": str | None,
        "polarisation": str | None,
        "region": str | None,
        "valid_fraction": float,
        "footprint": bytes,
        "stac_item": str | None,
        "stac_asset": str | None,
        "datetime": str | None,
        "platform": str | None,
        "instrument_mode": str | None,
        "stac_properties": str | None,
        # companions.TWIN_COLUMNS: how the scene's optical twin and land cover were found
        "optical_source": str | None,
        "optical_items": list[str] | None,
        "optical_datetime": str | None,
        "optical_gap_days": float | None,
        "optical_overlap": float | None,
        "optical_cloud": float | None,
        "optical_score": float | None,
        "optical_reason": str | None,
        "landcover_tiles": int | None,
        # catalog.PRODUCT_COLUMNS: what a product (Sentinel-1 SAFE, GCP-referenced file) adds
        "bands": str | None,
        "polarisations": str | None,
        "product_type": str | None,
        "georef": str | None,
        "gcps": str | None,
        "gcp_method": str | None,
        "tile_bounds": list[float] | None,
        "relief_m": float | None,
        "relief_flag": bool | None,
        "calibration": str | None,
        "noise_removed": bool | None,
        "noise_schema": str | None,
        "pass_direction": str | None,
        "proj_mismatch": str | None,
        "scale_factor": float | None,
    },
)


class ChunkRow(TypedDict):
    """A tile stage's unit of work (``tiling.plan_chunks``): windows ``start`` to ``stop`` of one scene at one
    GSD; a descriptor, no pixels. ``scene_json`` is the scene row without its footprint, as JSON."""

    scene_id: str
    gsd_m: float
    chunk: int
    start: int
    stop: int
    scene_json: str
    block: list[int]  # [first row, first column, columns] of the windows planned (tile.aoi)


class BandStats(TypedDict):
    """One polarisation of a tile (tables.TILES_SCHEMA ``bands``)."""

    polarisation: str
    nodata_fraction: float
    noise_clipped: int | None
    db_mean: float | None
    db_std: float | None
    db_p02: float | None
    db_p98: float | None
    stretch_db: list[float] | None  # null when the PNG does not show this polarisation


class TileRow(TypedDict):
    """A row of the tile stage's table (tables.TILES_SCHEMA)."""

    tile_id: str
    scene_id: str
    gsd_m: float
    row: int
    col: int
    crs: str
    transform: list[float]
    width: int
    height: int
    bounds: list[float]
    footprint: bytes
    sar_png: bytes
    nodata_fraction: float
    db_mean: float | None
    db_std: float | None
    db_p02: float | None
    db_p98: float | None
    stretch_db: list[float] | None
    sensor: str | None
    polarisation: str | None
    region: str | None
    native_gsd_m: float
    bands: list[BandStats]


# an object of a tile (tables.OBJECT_TYPE); "class" is a keyword, hence the functional form
ObjectRow = TypedDict(
    "ObjectRow",
    {
        "class": str,
        "bbox_xyxy": list[float],
        "polygon": bytes,
        "area_px": float,
        "angle_deg": float,
        "visible_fraction": float,
        "label_id": str | None,
    },
)


class AlignedTileRow(TileRow):
    """A row of the tiles table align writes (tables.ALIGNED_SCHEMA): a tile with its objects, land cover and
    optical twin."""

    optical_png: bytes | None
    objects: list[ObjectRow]
    landcover: list[tuple[str, float]] | None  # an Arrow map reads back as (class, fraction) pairs
    landcover_valid_fraction: float | None


# What a stage reads of an aligned tile: projections of AlignedTileRow, each a superset of the one before, so
# an AlignedTileRow (or an AnnotateTileRow) is accepted where a TileKey or a LabelledTile is asked for.
class TileKey(TypedDict):
    """What names a tile and places its image (``export.image_path``): its id, scene and GSD."""

    tile_id: str
    scene_id: str
    gsd_m: float


class LabelledTile(TileKey):
    """A tile's labels without its images: what the template annotator and ``visibility.view`` read, and all
    that evaluate's template oracle reads of the tiles table (``tables.ANNOTATE_TILE_COLUMNS`` without the
    PNGs)."""

    width: int
    objects: list[ObjectRow]
    landcover: list[tuple[str, float]] | None


class AnnotateTileRow(LabelledTile):
    """What an annotate backend gets (``annotate(tile)``, ``annotate_many(tiles)``): the columns of the tiles
    table the annotate stage reads, ``tables.ANNOTATE_TILE_COLUMNS``."""

    sar_png: bytes
    optical_png: bytes | None


class TileScale(typing_extensions.TypedDict, total=False):
    """What the consistency check reads of a tile (``consistency.contradictions``, ``qc.qc_tile``): its GSD
    (None or absent: unknown, e.g. an imported release; the ``unresolvable`` rule is then skipped) and its
    width in pixels (absent: region boxes are not checked). Read-only keys, so any tile row above is one, and
    so is ``{"gsd_m": None}``."""

    gsd_m: typing_extensions.ReadOnly[float | None]
    width: typing_extensions.ReadOnly[int | None]


class PairRow(TypedDict):
    """A row of the annotations table (tables.ANNOTATION_SCHEMA): one caption or QA pair of a tile."""

    pair_id: str
    tile_id: str
    scene_id: str
    gsd_m: float
    kind: str
    application: str | None
    question_type: str | None
    question: str
    answer: str
    backend: str
    qc_passed: bool
    qc_reasons: list[str]
