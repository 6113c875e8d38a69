"""The row TypedDicts (sarlang_ray/rows.py) are the Arrow schemas of their tables, key by key and type by
type; a chunk row is what tiling.plan_chunks makes. No Ray."""

from __future__ import annotations

import json
import types
import typing

import pyarrow as pa
import pytest
import typing_extensions

from sarlang_ray import catalog, rows, tables, tiling
from sarlang_ray.config import TileSection


def _python(arrow: pa.DataType):
    """The Python type a pyarrow scalar of this type converts to (``as_py``), as a comparable structure."""
    if pa.types.is_string(arrow) or pa.types.is_large_string(arrow):
        return str
    if pa.types.is_binary(arrow) or pa.types.is_large_binary(arrow):
        return bytes
    if pa.types.is_boolean(arrow):
        return bool
    if pa.types.is_integer(arrow):
        return int
    if pa.types.is_floating(arrow):
        return float
    if pa.types.is_map(arrow):  # as_py / to_pylist give a map as a list of (key, value) tuples, not a dict
        return ("list", ("tuple", _python(arrow.key_type), _python(arrow.item_type)))
    if pa.types.is_list(arrow) or pa.types.is_fixed_size_list(arrow) or pa.types.is_large_list(arrow):
        return ("list", _python(arrow.value_type))
    if pa.types.is_struct(arrow):
        return (
            "struct",
            {arrow.field(i).name: _python(arrow.field(i).type) for i in range(arrow.num_fields)},
        )
    raise AssertionError(f"no Python type for {arrow}")


def _shape(hint):
    """A TypedDict annotation as the same structure (None stripped: every Arrow column may be null)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        assert len(args) == 1, hint
        hint = args[0]
    if typing_extensions.is_typeddict(hint):  # get_type_hints of typing_extensions drops ReadOnly
        return ("struct", {k: _shape(v) for k, v in typing_extensions.get_type_hints(hint).items()})
    if typing.get_origin(hint) is list:
        return ("list", _shape(typing.get_args(hint)[0]))
    if typing.get_origin(hint) is tuple:
        return ("tuple", *(_shape(a) for a in typing.get_args(hint)))
    return hint


def _schema_shape(schema: pa.Schema):
    return ("struct", {f.name: _python(f.type) for f in schema})


@pytest.mark.parametrize(
    "row, schema",
    [
        (rows.SceneRow, catalog.SCENES_SCHEMA),
        (rows.TileRow, tables.TILES_SCHEMA),
        (rows.AlignedTileRow, tables.ALIGNED_SCHEMA),
        (rows.PairRow, tables.ANNOTATION_SCHEMA),
    ],
    ids=["scene", "tile", "aligned_tile", "pair"],
)
def test_a_row_typeddict_is_its_arrow_schema(row, schema):
    got, want = _shape(row), _schema_shape(schema)
    assert list(got[1]) == list(want[1]), "the columns differ (or their order)"  # same keys, same order
    wrong = {k: (got[1][k], want[1][k]) for k in want[1] if got[1][k] != want[1][k]}
    assert not wrong, f"TypedDict vs Arrow types differ: {wrong}"


def _projection(schema: pa.Schema, columns: list[str]) -> pa.Schema:
    return pa.schema([schema.field(c) for c in columns])


@pytest.mark.parametrize(
    "row, columns",
    [
        (rows.TileKey, ["tile_id", "scene_id", "gsd_m"]),
        # evaluate's template oracle reads these (the annotate columns without the images)
        (rows.LabelledTile, [c for c in tables.ANNOTATE_TILE_COLUMNS if not c.endswith("_png")]),
        (rows.AnnotateTileRow, tables.ANNOTATE_TILE_COLUMNS),
        (rows.TileScale, ["gsd_m", "width"]),
    ],
    ids=["tile_key", "labelled_tile", "annotate_tile", "tile_scale"],
)
def test_a_projection_typeddict_is_those_columns_of_the_aligned_schema(row, columns):
    got, want = _shape(row), _schema_shape(_projection(tables.ALIGNED_SCHEMA, columns))
    assert list(got[1]) == list(want[1]), "the columns differ (or their order)"
    wrong = {k: (got[1][k], want[1][k]) for k in want[1] if got[1][k] != want[1][k]}
    assert not wrong, f"TypedDict vs Arrow types differ: {wrong}"


def test_the_comparison_bites():
    renamed = typing.TypedDict("Renamed", {"pair_id": str})
    assert _shape(renamed) != _schema_shape(pa.schema([("pair_id", pa.int64())]))
    assert _shape(rows.TileRow) != _schema_shape(tables.ALIGNED_SCHEMA)


def test_a_map_column_reads_back_as_a_list_of_tuples():
    """What _python says of a map (so AlignedTileRow.landcover is a list of pairs, not a dict): the stages
    iterate it as ``for cls, fraction in tile["landcover"]``."""
    schema = pa.schema([tables.ALIGNED_SCHEMA.field("landcover")])
    table = pa.Table.from_pylist([{"landcover": {"water": 0.5}}], schema=schema)
    assert table.to_pylist() == [{"landcover": [("water", 0.5)]}]


def test_a_chunk_row_is_what_plan_chunks_makes():
    scene = {
        "scene_id": "s1",
        "gsd_m": 1.0,
        "crs": "EPSG:32633",
        "tile_crs": "EPSG:32633",
        "transform": [1.0, 0.0, 500000.0, 0.0, -1.0, 4000000.0],
        "width": 300,
        "height": 200,
        "footprint": b"",
        "georef": "transform",
    }
    chunks = tiling.plan_chunks(scene, TileSection(gsds_m=[1.0, 2.0], tile_size=64, tiles_per_shard=4))
    assert chunks
    hints = typing.get_type_hints(rows.ChunkRow)
    for chunk in chunks:
        assert list(chunk) == list(hints)
        for key, value in chunk.items():
            shape = _shape(hints[key])
            if isinstance(shape, tuple):  # list[int]
                assert isinstance(value, list) and all(isinstance(v, shape[1]) for v in value), key
            else:
                assert isinstance(value, shape), (key, value)
        assert json.loads(chunk["scene_json"])["scene_id"] == "s1"
