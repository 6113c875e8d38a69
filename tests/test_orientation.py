"""Scenes that are not north-up, or whose map metres are not ground metres, tile like any other.

One archive of real GeoTIFFs written here: the same 10 m UTM scene three times (north-up, south-up with a
positive y pixel size, and flipped east-west), and a Web Mercator (EPSG:3857) scene at 60 N with 10 m map
pixels (about 5 m on the ground); bright squares in the pixels where GeoParquet labels (EPSG:4326) put
objects, and one land-cover raster for every scene (``catalog.landcover``). Everything expected is computed
here with PROJ (pyproj ``Transformer``, ``Geod``) or from the EPSG definition of Web Mercator, never with the
pipeline's own functions.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from PIL import Image
from pyproj import Geod, Transformer
from shapely.geometry import Polygon, box

from sarlang_ray import pipeline
from sarlang_ray.config import load_config

SIZE = 256  # scene width and height, px
TILE = 64
UTM = "EPSG:32631"
UTM_ORIGIN = (4.30, 51.90)  # lon/lat of the north-up scene's upper-left corner (UTM 31N, near Rotterdam)
MERC_ORIGIN = (10.70, 60.00)  # Web Mercator scene's upper-left corner (UTM 32N, near Oslo)
# objects as (row, col, side) in the *north-up* pixel grid of each scene: bright squares, labelled
UTM_OBJECTS = [(20, 30, 6), (100, 150, 5), (200, 90, 7)]
MERC_OBJECTS = [(40, 40, 10), (120, 170, 12), (200, 60, 10)]
WATER_EAST_M = 900.0  # land cover: water west of this many metres east of the UTM scene's west edge
# the three layouts of the same UTM pixels: (name, transform, how the north-up array is stored)
A_WGS84, F_WGS84 = 6378137.0, 1 / 298.257223563


def _utm_corner() -> tuple[float, float]:
    x, y = Transformer.from_crs(4326, UTM, always_xy=True).transform(*UTM_ORIGIN)
    return round(x / 10) * 10, round(y / 10) * 10


def _layouts():
    x0, y0 = _utm_corner()
    w = h = SIZE * 10.0
    return [
        ("northup", Affine(10, 0, x0, 0, -10, y0), lambda a: a),
        ("southup", Affine(10, 0, x0, 0, 10, y0 - h), lambda a: a[::-1]),  # row 0 is the southern edge
        ("flipew", Affine(-10, 0, x0 + w, 0, -10, y0), lambda a: a[:, ::-1]),  # column 0 is the eastern edge
    ]


def _merc_transform() -> Affine:
    x, y = Transformer.from_crs(4326, 3857, always_xy=True).transform(*MERC_ORIGIN)
    return Affine(10, 0, round(x / 10) * 10, 0, -10, round(y / 10) * 10)


def _scene_pixels(objects, seed: int) -> np.ndarray:
    data = np.random.default_rng(seed).gamma(4.0, 0.25, (SIZE, SIZE)).astype("float32")  # linear intensity
    for r, c, s in objects:
        data[r : r + s, c : c + s] = 50.0  # +17 dB
    return data


def _box_4326(transform: Affine, crs, r: int, c: int, s: int) -> Polygon:
    """A pixel square of a north-up grid as a lon/lat polygon (densified edges)."""
    t = np.linspace(0, 1, 9)
    cols = np.concatenate([c + s * t, np.full(9, c + s), c + s * t[::-1], np.full(9, c)])
    rows = np.concatenate([np.full(9, r), r + s * t, np.full(9, r + s), r + s * t[::-1]])
    xs, ys = transform @ (cols, rows)
    lon, lat = Transformer.from_crs(crs, 4326, always_xy=True).transform(xs, ys)
    return Polygon(zip(lon, lat))


def _write(path, data, crs, transform, dtype="float32", **kw):
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[1],
        height=data.shape[0],
        count=1,
        dtype=dtype,
        crs=crs,
        transform=transform,
        **kw,
    ) as dst:
        dst.write(data.astype(dtype), 1)


@pytest.fixture(scope="module")
def oriented_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("orientation")
    archive = root / "archive"
    for sub in ("sar", "labels", "landcover"):
        (archive / sub).mkdir(parents=True)
    utm_data = _scene_pixels(UTM_OBJECTS, 1)
    north_up = _layouts()[0][1]
    for name, transform, store in _layouts():
        _write(archive / "sar" / f"{name}_sar.tif", np.ascontiguousarray(store(utm_data)), UTM, transform)
    merc = _merc_transform()
    _write(archive / "sar" / "webmerc60_sar.tif", _scene_pixels(MERC_OBJECTS, 2), "EPSG:3857", merc)
    labels = [("ship", _box_4326(north_up, UTM, *o), f"utm{i}") for i, o in enumerate(UTM_OBJECTS)]
    labels += [
        ("storage tank", _box_4326(merc, "EPSG:3857", *o), f"merc{i}") for i, o in enumerate(MERC_OBJECTS)
    ]
    gpd.GeoDataFrame(
        {"class": [c for c, _, _ in labels], "name": [n for _, _, n in labels]},
        geometry=[g for _, g, _ in labels],
        crs=4326,
    ).to_parquet(archive / "labels" / "objects.parquet")
    # 1 water, 2 built-up
    lc = np.where(np.arange(SIZE)[None, :] * 10.0 < WATER_EAST_M, 1, 2).repeat(SIZE, axis=0)
    _write(archive / "landcover" / "everywhere.tif", lc, UTM, north_up, dtype="uint8")
    cfg = load_config(
        None,
        [
            f"run.run_dir={root / 'run'}",
            f"catalog.archive={archive}",
            "ray.progress=false",
            "run.stages=[catalog,tile,align]",
            "catalog.sar_glob=[sar/*_sar.tif]",
            "catalog.optical_rule=null",
            "catalog.landcover=landcover/everywhere.tif",  # the default landcover_rule finds nothing here
            "tile.gsds_m=[10,20]",
            f"tile.tile_size={TILE}",
            "tile.speckle.filter=none",
            "tile.max_nodata_fraction=0.99",
        ],
    )
    summary = pipeline.run(cfg, ["catalog", "tile", "align"])
    scenes = {
        s["sar_uri"].rsplit("/", 1)[-1].removesuffix("_sar.tif"): s
        for s in pipeline.read_scenes(cfg.run.run_dir)
    }
    tiles = pipeline.read_tiles(cfg.run.run_dir).to_pylist()
    by_scene = defaultdict(list)
    for t in tiles:
        by_scene[t["scene_id"]].append(t)
    return cfg, summary, scenes, {name: by_scene[s["scene_id"]] for name, s in scenes.items()}, labels


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _outline_in(scene: dict, crs: str, n: int = 32) -> Polygon:
    """The scene's pixel-grid outline in ``crs``, from its own transform and PROJ."""
    t = Affine(*scene["transform"])
    w, h = scene["width"], scene["height"]
    s = np.linspace(0, 1, n + 1)[:-1]
    cols = np.concatenate([s * w, np.full_like(s, w), (1 - s) * w, np.zeros_like(s)])
    rows = np.concatenate([np.zeros_like(s), s * h, np.full_like(s, h), (1 - s) * h])
    xs, ys = t @ (cols, rows)
    if crs != scene["crs"]:
        xs, ys = Transformer.from_crs(scene["crs"], crs, always_xy=True).transform(xs, ys)
    return Polygon(zip(xs, ys)).buffer(0)


def test_every_layout_is_cataloged_with_its_orientation_and_tile_crs(oriented_run):
    _, summary, scenes, _, _ = oriented_run
    assert set(scenes) == {"northup", "southup", "flipew", "webmerc60"}
    assert summary["stages"]["catalog"]["rejected"] == 0
    assert not scenes["northup"]["rotated"] and scenes["southup"]["rotated"] and scenes["flipew"]["rotated"]
    for name in ("northup", "southup", "flipew"):
        assert scenes[name]["tile_crs"] == UTM, "UTM (scale 0.9996) is tiled in its own CRS"
    # Web Mercator at 60 N (scale ~2): tiled in the UTM zone of the scene, 32N
    assert scenes["webmerc60"]["tile_crs"] == "EPSG:32632"


def test_tiles_cover_every_scene_and_their_nodata_matches_the_outline(oriented_run):
    """Union of tile boxes covers the scene outline (PROJ) at every GSD; each tile's valid share is its
    overlap with the outline (so the grid sits on the scene, not beside it)."""
    _, _, scenes, tiles, _ = oriented_run
    for name, scene in scenes.items():
        assert tiles[name], f"{name}: no tile at all"
        for gsd in (10.0, 20.0):
            level = [t for t in tiles[name] if t["gsd_m"] == gsd]
            assert level, (name, gsd)
            outline = _outline_in(scene, level[0]["crs"])
            covered = shapely.union_all([box(*t["bounds"]) for t in level])
            assert outline.difference(covered).area <= 0.01 * outline.area, (name, gsd)
            for t in level:
                tile_box = box(*t["bounds"])
                expected_valid = outline.intersection(tile_box).area / tile_box.area
                edge = 4 / TILE  # a ring of partially covered pixels
                assert 1 - t["nodata_fraction"] == pytest.approx(expected_valid, abs=edge + 0.01), t[
                    "tile_id"
                ]


def _pixel_polygon(poly_4326: Polygon, tile: dict) -> Polygon:
    """A lon/lat polygon in a tile's pixel coordinates: PROJ to the tile CRS, then the inverse affine."""
    lon, lat = np.asarray(poly_4326.exterior.coords).T
    x, y = Transformer.from_crs(4326, tile["crs"], always_xy=True).transform(lon, lat)
    cols, rows = ~Affine(*tile["transform"]) @ (np.asarray(x), np.asarray(y))
    return Polygon(zip(cols, rows))


def test_objects_land_within_one_pixel_of_proj_and_on_bright_pixels(oriented_run):
    _, _, scenes, tiles, labels = oriented_run
    by_id = {f"labels/objects.parquet#feature={i}": (cls, g, n) for i, (cls, g, n) in enumerate(labels)}
    for name in scenes:
        seen = defaultdict(set)
        for t in tiles[name]:
            size = t["width"]
            img = _png(t["sar_png"])
            for obj in t["objects"]:
                cls, poly, label_name = by_id[obj["label_id"]]
                assert obj["class"] == cls
                px = _pixel_polygon(poly, t).intersection(box(0, 0, size, size))
                np.testing.assert_allclose(
                    obj["bbox_xyxy"], px.bounds, atol=1.0, err_msg=f"{t['tile_id']} {label_name}"
                )
                seen[t["gsd_m"]].add(label_name)
                if t["gsd_m"] == 10.0 and obj["visible_fraction"] == 1.0:
                    x0, y0, x1, y1 = px.bounds
                    inner = img[
                        math.ceil(y0) + 1 : math.floor(y1) - 1, math.ceil(x0) + 1 : math.floor(x1) - 1
                    ]
                    if inner.size:
                        assert inner.mean() > np.median(img) + 60, (
                            f"{t['tile_id']}: {label_name} is not on its bright pixels"
                        )
        mine = {n for _, _, n in labels if n.startswith("merc" if name == "webmerc60" else "utm")}
        for gsd in (10.0, 20.0):
            assert seen[gsd] == mine, (name, gsd, seen[gsd])


def _ground_gsd_utm(scene: dict) -> float:
    """Mean ground pixel size along the scene's edges: geodesic lengths (pyproj Geod) of its outline's
    sides, corners from PROJ."""
    t = Affine(*scene["transform"])
    w, h = scene["width"], scene["height"]
    to_ll = Transformer.from_crs(scene["crs"], 4326, always_xy=True)
    geod = Geod(ellps="WGS84")

    def side(p, q, n):
        s = np.linspace(0, 1, 65)
        cols, rows = p[0] + (q[0] - p[0]) * s, p[1] + (q[1] - p[1]) * s
        lon, lat = to_ll.transform(*(t @ (cols, rows)))
        return geod.line_length(lon, lat) / n

    gx = (side((0, 0), (w, 0), w) + side((0, h), (w, h), w)) / 2
    gy = (side((0, 0), (0, h), h) + side((w, 0), (w, h), h)) / 2
    return math.sqrt(gx * gy)


def _ground_gsd_webmerc(scene: dict) -> float:
    """From the EPSG:3857 definition (x = a*lon, y = a*ln tan(pi/4 + lat/2) on WGS 84 lon/lat): at latitude
    phi a map step dx is a*dlon, i.e. N(phi)*cos(phi)*dx/a metres east; dy is a*dphi/cos(phi), i.e.
    M(phi)*cos(phi)*dy/a metres north (N, M: the ellipsoid's radii of curvature)."""
    t = Affine(*scene["transform"])
    _, y = t @ (scene["width"] / 2, scene["height"] / 2)
    phi = 2 * math.atan(math.exp(y / A_WGS84)) - math.pi / 2  # inverse of the Mercator northing
    e2 = F_WGS84 * (2 - F_WGS84)
    w = 1 - e2 * math.sin(phi) ** 2
    n, m = A_WGS84 / math.sqrt(w), A_WGS84 * (1 - e2) / w**1.5
    gx = abs(t.a) * n * math.cos(phi) / A_WGS84
    gy = abs(t.e) * m * math.cos(phi) / A_WGS84
    return math.sqrt(gx * gy)


def test_recorded_gsd_is_the_ground_gsd(oriented_run):
    _, _, scenes, tiles, _ = oriented_run
    for name in ("northup", "southup", "flipew"):
        assert scenes[name]["gsd_m"] == pytest.approx(_ground_gsd_utm(scenes[name]), rel=0.02)
    merc = scenes["webmerc60"]
    expected = _ground_gsd_webmerc(merc)
    assert 4.9 < expected < 5.1  # the definition says: half the 10 m map pixel at 60 N
    assert merc["gsd_m"] == pytest.approx(expected, rel=0.02)
    assert {t["native_gsd_m"] for t in tiles["webmerc60"]} == {merc["gsd_m"]}


def test_mirrored_scenes_give_the_north_up_scene_tiles_pixel_for_pixel(oriented_run):
    """South-up and east-west flipped copies of the same pixels: the same tiles, the same PNG pixels, the
    same objects and land cover as the north-up file."""
    _, _, _, tiles, _ = oriented_run

    def key(t):
        return (t["gsd_m"], t["row"], t["col"])

    ref = {key(t): t for t in tiles["northup"]}
    assert len(ref) == 16 + 4  # 4 x 4 tiles at 10 m, 2 x 2 at 20 m: the scene exactly
    for name in ("southup", "flipew"):
        got = {key(t): t for t in tiles[name]}
        assert set(got) == set(ref), name
        for k, t in got.items():
            r = ref[k]
            assert t["transform"] == r["transform"] and t["bounds"] == r["bounds"] and t["crs"] == r["crs"]
            assert t["nodata_fraction"] == r["nodata_fraction"] == 0.0
            a, b = _png(t["sar_png"]).astype(int), _png(r["sar_png"]).astype(int)
            if k[0] == 10.0:  # native: the same pixels, mirrored back
                np.testing.assert_array_equal(a, b, err_msg=f"{name} {k}")
            else:  # averaged 2 x 2: the sums may differ in the last float bit
                assert np.abs(a - b).max() <= 1, (name, k)
            assert [(o["class"], o["label_id"]) for o in t["objects"]] == [
                (o["class"], o["label_id"]) for o in r["objects"]
            ]
            for o, p in zip(t["objects"], r["objects"]):
                np.testing.assert_allclose(o["bbox_xyxy"], p["bbox_xyxy"], atol=1e-6)
            assert t["landcover"] == r["landcover"], (name, k)


def test_one_landcover_raster_for_every_scene(oriented_run):
    """catalog.landcover (relative to the archive) is every scene's land cover when landcover_rule finds
    none; the fractions in a tile follow the raster's water/built-up edge."""
    cfg, _, scenes, tiles, _ = oriented_run
    path = f"{cfg.catalog.archive}/landcover/everywhere.tif"
    assert {s["landcover_uri"] for s in scenes.values()} == {path}
    x0, _ = _utm_corner()
    edge = x0 + WATER_EAST_M
    for t in tiles["northup"]:
        left, _, right, _ = t["bounds"]
        water = min(max((edge - left) / (right - left), 0.0), 1.0)
        fractions = dict(t["landcover"])
        assert fractions.get("water", 0.0) == pytest.approx(water, abs=1e-6), t["tile_id"]
        assert fractions.get("built-up", 0.0) == pytest.approx(1 - water, abs=1e-6), t["tile_id"]
    assert all(t["landcover"] == [] for t in tiles["webmerc60"]), "the raster does not reach Oslo"


def test_a_missing_landcover_raster_is_a_clear_error(tmp_path):
    from sarlang_ray.catalog import list_scenes
    from sarlang_ray.config import CatalogSection

    (tmp_path / "sar").mkdir()
    _write(tmp_path / "sar" / "a_sar.tif", np.ones((8, 8)), UTM, Affine(10, 0, 500000, 0, -10, 5800000))
    cfg = CatalogSection(archive=str(tmp_path), sar_glob=["sar/*.tif"], landcover="lc/missing.tif")
    with pytest.raises(
        FileNotFoundError,
        match=r"catalog.landcover='lc/missing.tif'.*does not exist.*relative to the archive",
    ):
        list_scenes(cfg)


def test_reject_mode_names_the_orientation(tmp_path):
    from sarlang_ray.catalog import inspect_scene
    from sarlang_ray.config import CatalogSection
    from sarlang_ray.errors import ItemError

    data = _scene_pixels([], 0)[:32, :32]
    for name, transform, store in _layouts():
        path = tmp_path / f"{name}_sar.tif"
        _write(path, np.ascontiguousarray(store(data)), UTM, transform)
        cfg = CatalogSection(archive=str(tmp_path), optical_rule=None, landcover_rule=None, rotated="reject")
        if name == "northup":
            assert not inspect_scene(str(path), cfg)["rotated"]
            continue
        with pytest.raises(
            ItemError, match={"southup": "south-up", "flipew": "flipped east-west"}[name]
        ) as info:
            inspect_scene(str(path), cfg)
        assert info.value.error_class == "rotated" and str(path) in str(info.value)
