"""The sample archive is realistic enough to test a SAR pipeline on: checked on the pixels themselves."""

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.features import geometry_mask
from scipy.ndimage import binary_dilation, binary_erosion

from sarlang_ray.synth import LABEL_CLASSES


@pytest.fixture(scope="module")
def archive(demo_run) -> Path:
    cfg, _ = demo_run
    return Path(cfg.synth.out_dir)


def test_archive_layout_and_metadata(archive):
    sars = sorted((archive / "sar").glob("*.tif"))
    assert len(sars) >= 4
    crss, gsds, cities = set(), set(), set()
    for p in sars:
        with rasterio.open(p) as src:
            assert src.dtypes[0] == "float32" and src.nodata == 0.0
            assert src.profile["tiled"] and src.compression is not None
            assert src.block_shapes[0] == (256, 256)
            crss.add(src.crs.to_epsg())
            gsds.add(src.res[0])
            cities.add(src.tags()["REGION"])
            data = src.read(1)
            assert (data == 0).mean() > 0.01, "scenes have nodata borders"
        stem = p.name.replace("_sar.tif", "")
        for twin, count, dtype in (("optical", 3, "uint8"), ("landcover", 1, "uint8")):
            with rasterio.open(archive / twin / f"{stem}_{twin}.tif") as t, rasterio.open(p) as s:
                assert t.count == count and t.dtypes[0] == dtype
                assert t.transform == s.transform and t.crs == s.crs  # co-registered
    assert len(cities) >= 2 and len(crss) >= 2 and all(32601 <= c <= 32660 for c in crss)
    assert min(gsds) <= 0.5 and max(gsds) >= 10


def test_labels_are_geoparquet_in_epsg4326_with_all_classes(archive):
    frames = [gpd.read_parquet(p) for p in sorted((archive / "labels").glob("*.parquet"))]
    for f in frames:
        assert f.crs.to_epsg() == 4326
        assert set(f.geom_type) <= {"Polygon", "MultiPolygon"} and f.is_valid.all()
    classes = set().union(*(set(f["class"]) for f in frames))
    assert set(LABEL_CLASSES) <= classes


def _scene(archive, name):
    path = next((archive / "sar").glob(f"{name}*_sar.tif"))
    with rasterio.open(path) as src:
        sar = src.read(1)
        meta = (src.transform, src.crs, src.shape)
    with rasterio.open(
        str(path).replace("/sar/", "/landcover/").replace("_sar.tif", "_landcover.tif")
    ) as src:
        lc = src.read(1)
    labels = gpd.read_parquet(archive / "labels" / f"{name.split('_')[0]}.parquet").to_crs(meta[1])
    return sar, lc, labels, meta


def test_sar_looks_like_sar(archive):
    sar, lc, labels, (transform, _crs, shape) = _scene(archive, "rotterdam_5m")
    valid = sar > 0
    db = 10 * np.log10(np.where(valid, sar, 1))
    water, land = (lc == 1) & valid, (lc == 3) & valid
    ships = labels[labels["class"] == "ship"]
    inside = ~geometry_mask(ships.geometry, shape, transform) & valid
    near_objects = binary_dilation(
        ~geometry_mask(labels.geometry, shape, transform, all_touched=True), iterations=3
    )
    open_water = binary_erosion(water, iterations=3) & ~near_objects  # no mixed shore pixels
    assert db[open_water].mean() < db[land].mean() - 10, "water is dark"
    # multiplicative gamma speckle: coefficient of variation 1/sqrt(looks) over open water
    sea = sar[open_water]
    assert sea.std() / sea.mean() == pytest.approx(1 / np.sqrt(4.0), rel=0.15)
    # ships are bright points on dark water
    assert inside.sum() > 20
    assert np.median(sar[inside]) > 20 * np.median(sar[water])


def test_double_bounce_and_radar_shadow_at_buildings(archive):
    """Illumination from the west: bright line on west walls, shadow east of the building."""
    sar, _lc, labels, (transform, _crs, shape) = _scene(archive, "rotterdam_5m")
    inv = ~transform
    wall, roof, east, west = [], [], [], []
    for g in labels[labels["class"] == "building"].geometry:
        x0, y0, x1, y1 = g.bounds
        ym = (y0 + y1) / 2
        samples = {
            "wall": (x0 + 1.0, ym),
            "roof": ((x0 + x1) / 2, ym),
            "east": (x1 + 2.5, ym),
            "west": (x0 - 7.5, ym),
        }
        px = {k: tuple(int(v) for v in inv @ xy) for k, xy in samples.items()}
        if not all(0 <= c < shape[1] and 0 <= r < shape[0] and sar[r, c] > 0 for c, r in px.values()):
            continue
        if x1 - x0 < 15:
            continue
        for k, lst in (("wall", wall), ("roof", roof), ("east", east), ("west", west)):
            c, r = px[k]
            lst.append(sar[r, c])
    assert len(wall) > 100
    assert np.median(wall) > 3 * np.median(roof), "double bounce at the wall facing the sensor"
    assert np.median(east) < 0.2 * np.median(west), "radar shadow behind buildings"


def test_optical_twin_shows_the_same_objects(archive):
    sar, lc, labels, (transform, _crs, shape) = _scene(archive, "rotterdam_0p5m")
    path = next((archive / "optical").glob("rotterdam_0p5m*_optical.tif"))
    with rasterio.open(path) as src:
        rgb = src.read().astype(float)
    water = lc == 1
    blue_excess = rgb[2] - rgb[0]
    assert blue_excess[water].mean() > 30  # water is blue in the optical twin
    tanks = labels[labels["class"] == "storage tank"]
    inside = ~geometry_mask(tanks.geometry, shape, transform) & (sar > 0)
    assert inside.sum() > 100 and rgb[:, inside].mean() > 200  # white tanks, where the labels say
