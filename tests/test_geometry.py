"""Geometry of the tiles table, checked against independent computations from the raw archive."""

from __future__ import annotations

import io
import math
from collections import defaultdict

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from PIL import Image
from pyproj import Transformer

from sarlang_ray import pipeline


@pytest.fixture(scope="module")
def tiles(demo_run):
    cfg, _ = demo_run
    return pipeline.read_tiles(cfg.run.run_dir).to_pylist()


@pytest.fixture(scope="module")
def labels_4326(demo_run):
    """label_id -> polygon in EPSG:4326, read straight from the archive's label files."""
    cfg, _ = demo_run
    out = {}
    for path in sorted(__import__("glob").glob(f"{cfg.synth.out_dir}/labels/*.parquet")):
        gdf = gpd.read_parquet(path)
        assert gdf.crs.to_epsg() == 4326
        for i, g in enumerate(gdf.geometry):
            out[f"labels/{path.rsplit('/', 1)[-1]}#feature={i}"] = g
    return out


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _expected_box(poly, tile) -> tuple[float, float, float, float]:
    """Pixel box of a lon/lat polygon in a tile, by plain PROJ + arithmetic (no shapely affine)."""
    to_tile = Transformer.from_crs(4326, tile["crs"], always_xy=True)
    lon, lat = np.asarray(poly.exterior.coords).T
    x, y = to_tile.transform(lon, lat)
    a, _, c, _, e, f = tile["transform"]
    cols, rows = (np.asarray(x) - c) / a, (np.asarray(y) - f) / e
    return cols.min(), rows.min(), cols.max(), rows.max()


def test_every_gsd_of_the_pyramid_is_present(demo_run, tiles):
    gsds = {t["gsd_m"] for t in tiles}
    assert gsds == {0.5, 1.0, 2.0, 5.0, 10.0}


def test_fully_visible_objects_land_within_one_pixel_at_every_gsd(tiles, labels_4326):
    checked = defaultdict(int)
    for tile in tiles:
        for obj in tile["objects"]:
            if obj["visible_fraction"] < 0.999:
                continue
            exp = _expected_box(labels_4326[obj["label_id"]], tile)
            assert np.allclose(obj["bbox_xyxy"], exp, atol=1.0), (
                tile["tile_id"],
                obj["class"],
                obj["bbox_xyxy"],
                exp,
            )
            checked[tile["gsd_m"]] += 1
    assert set(checked) == {0.5, 1.0, 2.0, 5.0, 10.0} and min(checked.values()) >= 10, checked


def test_a_known_ship_is_in_the_right_tile_and_bright_in_sar_and_optical(demo_run, tiles, labels_4326):
    """For every ship: the tile that must contain its centre (from the scene's own geotransform) lists it."""
    cfg, _ = demo_run
    by_id = {t["tile_id"]: t for t in tiles}
    scenes = {s["scene_id"]: s for s in pipeline.read_scenes(cfg.run.run_dir)}
    found = 0
    for scene in scenes.values():
        with rasterio.open(scene["sar_uri"]) as src:
            x0, y0, crs = src.transform.c, src.transform.f, src.crs
        to_scene = Transformer.from_crs(4326, crs, always_xy=True)
        for label_id, poly in labels_4326.items():
            cx, cy = to_scene.transform(poly.centroid.x, poly.centroid.y)
            for gsd in (0.5, 1.0, 2.0, 5.0, 10.0):
                if gsd < scene["gsd_m"]:
                    continue
                step = cfg.tile.tile_size * gsd
                col, row = math.floor((cx - x0) / step), math.floor((y0 - cy) / step)
                tid = (
                    f"{scene['scene_id']}_{gsd:g}m_r{row:04d}_c{col:04d}".replace(".", "p", 1)
                    if gsd < 1
                    else f"{scene['scene_id']}_{gsd:g}m_r{row:04d}_c{col:04d}"
                )
                tile = by_id.get(tid)
                if tile is None:
                    continue
                objs = [o for o in tile["objects"] if o["label_id"] == label_id]
                if not objs or objs[0]["class"] != "ship" or objs[0]["visible_fraction"] < 0.999:
                    continue
                # numpy floats
                x_0, y_0, x_1, y_1 = (int(round(v)) for v in objs[0]["bbox_xyxy"])  # noqa: RUF046
                sar = _png(tile["sar_png"])
                opt = _png(tile["optical_png"]).astype(int)
                assert sar[y_0 : y_1 + 1, x_0 : x_1 + 1].max() >= 250, tid  # bright target in SAR
                box_rgb = opt[y_0 : y_1 + 1, x_0 : x_1 + 1].reshape(-1, 3)
                # the (white/red) ship shows against blue water (red 28) too
                assert box_rgb[:, 0].max() > 70, tid
                found += 1
    assert found >= 20


def test_tiles_cover_each_scene_without_gaps(demo_run, tiles):
    """With stride = tile size: windows abut exactly, start at the scene corner and reach past its far
    edge."""
    cfg, _summary = demo_run
    errors = pipeline.read_errors(cfg.run.run_dir).to_pylist()
    dropped = {e["item"] for e in errors if e["stage"] == "tile"}
    scenes = {s["scene_id"]: s for s in pipeline.read_scenes(cfg.run.run_dir)}
    by_level = defaultdict(dict)
    for t in tiles:
        by_level[(t["scene_id"], t["gsd_m"])][(t["row"], t["col"])] = t
    ts = cfg.tile.tile_size
    for (sid, gsd), level in by_level.items():
        s = scenes[sid]
        n_cols = math.ceil(s["width"] * s["gsd_m"] / (ts * gsd) - 1e-9)
        n_rows = math.ceil(s["height"] * s["gsd_m"] / (ts * gsd) - 1e-9)
        for r in range(n_rows):
            for c in range(n_cols):
                tid = f"{sid}_{f'{gsd:g}'.replace('.', 'p')}m_r{r:04d}_c{c:04d}"
                assert (r, c) in level or tid in dropped, f"window {tid} neither written nor rejected"
        for (r, c), t in level.items():
            left, bottom, right, top = t["bounds"]
            assert left == pytest.approx(s["transform"][2] + c * ts * gsd)
            assert top == pytest.approx(s["transform"][5] - r * ts * gsd)
            if (r, c + 1) in level:
                assert level[(r, c + 1)]["bounds"][0] == pytest.approx(right)
            if (r + 1, c) in level:
                assert level[(r + 1, c)]["bounds"][3] == pytest.approx(bottom)
        assert n_cols * ts * gsd >= s["width"] * s["gsd_m"] - 1e-6


def test_optical_twin_shares_the_tile_grid_pixel_for_pixel(tiles):
    """Where the optical twin shows water (blue), the SAR tile is dark: a misregistration would blur this."""
    checked = 0
    for tile in tiles:
        water = dict(tile["landcover"]).get("water", 0)
        if not 0.2 < water < 0.8 or tile["nodata_fraction"] > 0:
            continue
        sar, opt = _png(tile["sar_png"]).astype(float), _png(tile["optical_png"]).astype(int)
        assert opt.shape[:2] == sar.shape
        blue = (opt[..., 2] - opt[..., 0]) > 40
        assert sar[blue].mean() < sar[~blue].mean() - 40, tile["tile_id"]
        checked += 1
    assert checked >= 5


def test_footprints_are_geoparquet(demo_run):
    import pyarrow.parquet as pq

    cfg, _ = demo_run
    shard = pipeline.tiles_table_shards(cfg.run.run_dir)[0]
    gdf = gpd.read_parquet(shard)  # needs valid GeoParquet 'geo' metadata
    assert gdf.crs.to_epsg() == 4326 and gdf.geometry.name == "footprint"
    assert (gdf.geometry.bounds.maxx <= 180).all() and gdf.geometry.is_valid.all()
    assert pq.read_metadata(shard).num_rows <= cfg.tile.tiles_per_shard
