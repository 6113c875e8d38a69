"""The geographic split on a synthetic archive with revisits and long objects
(benchmarks/bench_scale_plan.py's
generator, small): by brute force, no ground and no label object in two splits, and the ratios kept."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
from pyproj import Transformer
from shapely.ops import transform as reproject

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_scale_plan import generate
from conftest import demo_config

from sarlang_ray import export


def decisions(items: list[dict]) -> tuple[dict[str, str], set[str]]:
    """Tile id -> split and the clipped label ids of a plan's work items, whichever planner made them."""
    split_of, clipped = {}, set()
    for item in items:
        if "decisions" in item:  # planned on the workers: a decisions file per tiles shard
            for row in pq.read_table(item["decisions"]).to_pylist():
                split_of[row["tile_id"]] = row["split"]
                clipped |= set(row["clipped"])
        else:
            split_of |= json.loads(item["splits"])
            clipped |= set(json.loads(item["clipped"]))
    return split_of, clipped


@pytest.mark.parametrize("planner", ["workers", "driver"])
def test_synthetic_revisits_and_long_roads_split_without_leaks(tmp_path, ray_session, planner):
    run = tmp_path / "run"
    n = generate(run, 4 * 256 * 3, revisits=3)  # 4 places seen 3 times: 3,072 tiles
    cfg = demo_config(run, f"export.planner={planner}")
    items, counts = export.plan(cfg)
    assert ("decisions" in items[0]) == (planner == "workers")
    split_of, clipped = decisions(items)
    tiles = pq.read_table(sorted((run / "align" / "shards").rglob("*.parquet"))).to_pylist()
    assert len(tiles) == n == counts["planned"] and len(split_of) == counts["written"] > 0.8 * n
    kept = [t for t in tiles if t["tile_id"] in split_of]
    # ground: every pair of kept tiles closer than buffer_m (in their UTM zone) is in one split; a revisit's
    # tile (the same footprint, another scene) is such a pair
    by_crs = defaultdict(list)
    for t in kept:
        by_crs[t["crs"]].append(t)
    pairs = 0
    for crs, group in by_crs.items():
        to_utm = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
        geoms = np.array([reproject(to_utm.transform, shapely.from_wkb(t["footprint"])) for t in group])
        a, b = shapely.STRtree(geoms).query(geoms, predicate="dwithin", distance=cfg.export.buffer_m)
        pairs += len(a)
        assert all(
            split_of[group[i]["tile_id"]] == split_of[group[j]["tile_id"]]
            for i, j in zip(a.tolist(), b.tolist())
        )
    assert pairs > len(kept) * 3  # revisits and neighbours were compared, not only each tile with itself
    # objects: an id (a clipped one by its part's id) lives in one split; the long roads are the clipped ones
    splits_of_id = defaultdict(set)
    for t in kept:
        s = split_of[t["tile_id"]]
        for o in t["objects"]:
            splits_of_id[f"{o['label_id']}~{s}" if o["label_id"] in clipped else o["label_id"]].add(s)
    assert all(len(v) == 1 for v in splits_of_id.values())
    assert clipped and all("/road" in c for c in clipped)
    assert counts["leakage"]["leak_free"]
    # the ratios, within the tolerance of tests/test_export.py on blocks of places
    shares = {s: sum(v == s for v in split_of.values()) / len(split_of) for s in ("train", "val", "test")}
    assert abs(shares["train"] - 0.7) < 0.15 and all(shares[s] > 0 for s in shares), shares


def test_the_workers_planner_gives_the_drivers_split(tmp_path, ray_session):
    """At small sizes the planner on the workers (block aggregates, groups of neighbouring blocks, a group-by
    on label id) decides as the driver's: the same tiles in the same splits, the same drops and the same
    report."""
    run = tmp_path / "run"
    generate(run, 6 * 256 * 2, revisits=2)
    plans, errors = {}, {}
    for p in ("driver", "workers"):
        plans[p] = export.plan(demo_config(run, f"export.planner={p}"))
        rows = pq.read_table(run / "export" / "errors.parquet").to_pylist()
        errors[p] = sorted((r["item"], r["error_class"], r["message"]) for r in rows)
    (_, old), (_, new) = plans["driver"], plans["workers"]
    assert decisions(plans["workers"][0]) == decisions(plans["driver"][0])
    assert {k: new[k] for k in ("planned", "written", "rejected", "reasons")} == {
        k: old[k] for k in ("planned", "written", "rejected", "reasons")
    }
    assert {k: new["leakage"][k] for k in old["leakage"]} == old["leakage"]
    # the errors table names the same dropped tiles for the same reasons, in the same words
    assert errors["workers"] == errors["driver"] and len(errors["driver"]) == old["rejected"] > 0


def test_neighbouring_blocks_from_arrays_are_those_a_spatial_index_finds():
    """export.neighbour_blocks (cell offsets on block arrays) against shapely's STRtree over the blocks'
    widened bounds, on blocks of tiles of mixed sizes (some reaching well beyond their own block)."""
    from sarlang_ray.splits import grid_centroids

    rng = np.random.default_rng(3)
    # a high latitude: x and y scale apart
    lon0, lat0 = (
        rng.uniform(4.0, 4.3, 3000),
        rng.uniform(60.0, 60.2, 3000),
    )
    size = np.where(rng.random(3000) < 0.05, 0.03, 0.004)  # a few tiles ~1.7-3 km, most ~250 m
    boxes = shapely.box(lon0, lat0, lon0 + size, lat0 + size / 2)
    gx, gy = grid_centroids(list(boxes))
    col, row = np.floor(gx / 2000.0).astype(np.int64), np.floor(gy / 2000.0).astype(np.int64)
    keys = export.block_keys(col, row)
    uniq, inverse = np.unique(keys, return_inverse=True)
    b = shapely.bounds(boxes)
    bounds = np.column_stack(
        [
            np.full(len(uniq), np.inf),
            np.full(len(uniq), np.inf),
            np.full(len(uniq), -np.inf),
            np.full(len(uniq), -np.inf),
        ]
    )
    for i, k in enumerate(inverse):
        bounds[k] = [
            min(bounds[k, 0], b[i, 0]),
            min(bounds[k, 1], b[i, 1]),
            max(bounds[k, 2], b[i, 2]),
            max(bounds[k, 3], b[i, 3]),
        ]
    cols, rows = (uniq >> 32) - (1 << 30), (uniq & 0xFFFFFFFF) - (1 << 31)
    a, c = export.neighbour_blocks(uniq, cols, rows, bounds, 2000.0, 50.0)
    got = set(zip(a.tolist(), c.tolist()))
    # expected: blocks whose bounds, widened by 50 m (generously in degrees at this latitude), intersect
    dlat, dlon = 50 / 110_574.0, 50 / (110_574.0 * np.cos(np.radians(bounds[:, 3])))
    blocks = shapely.box(*bounds.T)
    wide = shapely.box(bounds[:, 0] - dlon, bounds[:, 1] - dlat, bounds[:, 2] + dlon, bounds[:, 3] + dlat)
    s, d = shapely.STRtree(blocks).query(wide, predicate="intersects")
    expected = {(min(i, j), max(i, j)) for i, j in zip(s.tolist(), d.tolist()) if i != j}
    assert got == expected and len(expected) > len(uniq)
