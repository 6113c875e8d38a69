"""Sentinel-1 GRD products as distributed (SAFE zips with GCPs and digital numbers) through catalog -> tile:
geolocation checked at the product's own geolocation-grid nodes and against GDAL's TPS transformer,
radiometry against an independent calibration written here (scipy, bilinear in line/pixel), on the two
real products of ../shared (IPF 2.x and IPF 3.x noise schemas)."""

from __future__ import annotations

import io
import json
import statistics
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
import pytest
import shapely.geometry
from affine import Affine
from PIL import Image
from pyproj import Transformer
from rasterio.control import GroundControlPoint
from rasterio.transform import GCPTransformer
from safe_products import PRODUCTS, annotation, build_product
from scipy.interpolate import RegularGridInterpolator

from sarlang_ray import catalog, pipeline, tiling
from sarlang_ray.config import load_config

TARGET_DN = 10000
BACKGROUND_DN = 100


def _targets(ann):
    """Four interior geolocation-grid nodes (a 2 x 2 cell of the grid) and three points between nodes."""
    lines = sorted({p["line"] for p in ann.grid})
    pixels = sorted({p["pixel"] for p in ann.grid})
    nodes = [p for p in ann.grid if p["line"] in lines[3:5] and p["pixel"] in pixels[8:10]]
    l0, l1, p0, p1 = lines[3], lines[4], pixels[8], pixels[9]
    between = [
        (l0 + 0.5 * (l1 - l0), p0 + 0.5 * (p1 - p0)),
        (l0 + 0.27 * (l1 - l0), p0 + 0.61 * (p1 - p0)),
        (l0 + 0.8 * (l1 - l0), p0 + 0.2 * (p1 - p0)),
    ]
    return nodes, [(round(a), round(b)) for a, b in between]


@pytest.fixture(scope="module", params=sorted(PRODUCTS))
def grd(request, real_sar, tmp_path_factory):
    """A real product completed with measurement files holding bright squares at grid nodes and between
    them."""
    ann = annotation(real_sar / "s1_grd_safe_metadata" / PRODUCTS[request.param])
    nodes, between = _targets(ann)
    targets = [(p["line"], p["pixel"], TARGET_DN) for p in nodes] + [(a, b, TARGET_DN) for a, b in between]
    folder = tmp_path_factory.mktemp(f"grd{request.param}")
    zip_path = build_product(real_sar, request.param, folder / "archive", BACKGROUND_DN, targets)
    return request.param, zip_path, ann, nodes, between


def _run(zip_path, run_dir, nodes, *overrides):
    lon = [p["longitude"] for p in nodes]
    lat = [p["latitude"] for p in nodes]
    aoi = [min(lon) - 0.03, min(lat) - 0.03, max(lon) + 0.03, max(lat) + 0.03]
    cfg = load_config(
        None,
        [
            f"run.run_dir={run_dir}",
            f"catalog.archive={zip_path.parent}",
            "catalog.sar_glob=['*.zip']",
            "catalog.optical_rule=null",
            "catalog.landcover_rule=null",
            "run.stages=[catalog,tile]",
            "ray.progress=false",
            f"tile.aoi={aoi}",
            "tile.gsds_m=[20]",
            "tile.include_native=true",
            "tile.tile_size=512",
            "tile.speckle.filter=none",
            "tile.stretch.mode=fixed",
            "tile.stretch.db_min=0",
            "tile.stretch.db_max=40",
            "tile.max_nodata_fraction=1.0",
            *overrides,
        ],
    )
    summary = pipeline.run(cfg, ["catalog", "tile"])
    scenes = pipeline.read_scenes(cfg.run.run_dir)
    return cfg, summary, scenes


def _tile_rows(run_dir):
    import pyarrow.parquet as pq

    from sarlang_ray import io as sio

    files = sio.glob(str(run_dir / "tile" / "shards"), "**/*.parquet")
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def _blobs(tiles, gsd, centres_xy, stretch=(0.0, 40.0)):
    """Linear-intensity-weighted centroids (tile CRS) of the bright pixels nearest each expected centre."""
    lo, hi = stretch
    sums = {i: [0.0, 0.0, 0.0] for i in range(len(centres_xy))}
    cx = np.array([c[0] for c in centres_xy])
    cy = np.array([c[1] for c in centres_xy])
    for t in tiles:
        if abs(t["gsd_m"] - gsd) > 1e-6:
            continue
        img = np.asarray(Image.open(io.BytesIO(t["sar_png"]))).astype(float)
        rows, cols = np.nonzero(img > 0)
        if not rows.size:
            continue
        linear = 10 ** ((lo + img[rows, cols] / 255 * (hi - lo)) / 10)
        xs, ys = Affine(*t["transform"]) * (cols + 0.5, rows + 0.5)
        nearest = np.argmin((xs[:, None] - cx) ** 2 + (ys[:, None] - cy) ** 2, axis=1)
        for i in range(len(centres_xy)):
            sel = nearest == i
            sums[i][0] += float((linear[sel] * xs[sel]).sum())
            sums[i][1] += float((linear[sel] * ys[sel]).sum())
            sums[i][2] += float(linear[sel].sum())
    return [(s[0] / s[2], s[1] / s[2]) if s[2] else (np.nan, np.nan) for s in sums.values()]


def _errors_m(tiles, scene, gsd, expected_lonlat):
    to_tile = Transformer.from_crs("EPSG:4326", scene["tile_crs"], always_xy=True)
    centres = [to_tile.transform(lon, lat) for lon, lat in expected_lonlat]
    found = _blobs(tiles, gsd, centres)
    return [float(np.hypot(f[0] - c[0], f[1] - c[1])) for f, c in zip(found, centres)]


def test_grd_targets_land_on_their_geolocation_grid_nodes(ray_session, grd, tmp_path):
    """Every bright square centred on a geolocation-grid node lands within 0.5 px of the node's own lat/lon
    (annotation XML); every square between nodes within 0.5 px of where GDAL's TPS transformer (the one
    its warper uses with SRC_METHOD=GCP_TPS), called here directly on the GCPs, puts it. At the native
    GSD (nearest neighbour) and at 20 m (average)."""
    key, zip_path, ann, nodes, between = grd
    _cfg, _summary, scenes = _run(zip_path, tmp_path / "run", nodes)
    assert len(scenes) == 1
    scene = scenes[0]
    assert scene["georef"] == "gcps" and scene["product_type"] == "GRD" and scene["polarisations"] == "VV+VH"
    assert scene["calibration"] == "sigma0" and scene["noise_removed"] is True
    assert scene["noise_schema"] == {"2015": "ipf2", "2021": "ipf3"}[key]
    assert scene["sar_uri"] == str(zip_path)  # read in place: nothing unpacked next to it
    assert sorted(p.name for p in zip_path.parent.iterdir()) == [zip_path.name]
    tiles = _tile_rows(tmp_path / "run")
    assert tiles and {len(t["bands"]) for t in tiles} == {2}
    gcps = [
        GroundControlPoint(row=p["line"], col=p["pixel"], x=p["longitude"], y=p["latitude"]) for p in ann.grid
    ]
    tps = GCPTransformer(gcps, tps=True)
    xs, ys = tps.xy([b[0] for b in between], [b[1] for b in between], offset="ul")
    expected = [(p["longitude"], p["latitude"]) for p in nodes] + list(zip(xs, ys))
    for gsd in sorted({t["gsd_m"] for t in tiles}):
        errors = _errors_m(tiles, scene, gsd, expected)
        px = [e / gsd for e in errors]
        assert max(px[: len(nodes)]) < 0.5, (key, gsd, "node targets off by px", px)
        assert max(px[len(nodes) :]) < 0.5, (key, gsd, "between-node targets off by px", px)
    # the same product through one affine fitted to the GCPs: hundreds of metres off (so this test can fail)
    _run(zip_path, tmp_path / "affine", nodes, "catalog.gcp_method=affine")
    affine_tiles = _tile_rows(tmp_path / "affine")
    errors = _errors_m(affine_tiles, scene, 20.0, expected)
    assert statistics.median(errors) > 50, errors


def _lut_xml(zip_path, kind, pol="vv"):
    with zipfile.ZipFile(zip_path) as zf:
        name = next(n for n in zf.namelist() if f"/calibration/{kind}-" in n and f"-{pol}-" in n)
        return ET.fromstring(zf.read(name))


def _grid_interp(root, vector, value):
    """Bilinear over (line, pixel) with scipy, on the vectors that share the first vector's pixels."""
    vecs = list(root.iter(vector))
    pixels = np.array(vecs[0].findtext("pixel").split(), float)
    lines, rows = [], []
    for v in vecs:
        p = np.array(v.findtext("pixel").split(), float)
        vals = np.array(v.findtext(value).split(), float)
        if p.shape != pixels.shape or not np.allclose(p, pixels):
            vals = np.interp(pixels, p, vals)  # IPF 3 noise vectors differ in length: onto the common pixels
        lines.append(float(v.findtext("line")))
        rows.append(vals)
    return RegularGridInterpolator(
        (np.array(lines), pixels), np.array(rows), bounds_error=False, fill_value=None
    )


def _azimuth_noise(root, line, pixel):
    for v in root.iter("noiseAzimuthVector"):
        if int(v.findtext("firstAzimuthLine")) <= line <= int(v.findtext("lastAzimuthLine")) and int(
            v.findtext("firstRangeSample")
        ) <= pixel <= int(v.findtext("lastRangeSample")):
            return float(
                np.interp(
                    line,
                    np.array(v.findtext("line").split(), float),
                    np.array(v.findtext("noiseAzimuthLut").split(), float),
                )
            )
    return 1.0


@pytest.mark.parametrize("calibration", ["sigma0", "beta0", "gamma0"])
@pytest.mark.parametrize("noise_removal", [False, True])
def test_grd_calibration_equals_an_independent_computation(grd, tmp_path, calibration, noise_removal):
    """sigma0 / beta0 / gamma0 of every tile pixel = (DN^2 - noise) / A^2 computed here from the XML with
    scipy's bilinear interpolator, within 0.05 dB, with and without thermal-noise removal, both noise
    schemas (the 2015 product's noise LUT is all zeros: removal must leave it unchanged)."""
    key, zip_path, ann, _nodes, _between = grd
    lo, hi = -30.0, -5.0  # fixed stretch: one PNG level = 0.098 dB, so decoding is within 0.05 dB
    cfg = load_config(
        None,
        [
            f"run.run_dir={tmp_path}",
            f"catalog.archive={zip_path.parent}",
            "catalog.optical_rule=null",
            "catalog.landcover_rule=null",
            f"catalog.calibration={calibration}",
            f"catalog.noise_removal={noise_removal}",
            "tile.tile_size=128",
            "tile.speckle.filter=none",
            "tile.stretch.mode=fixed",
            f"tile.stretch.db_min={lo}",
            f"tile.stretch.db_max={hi}",
            "tile.gsds_m=[20]",
        ],
    )
    scene = catalog.inspect_product(str(zip_path), cfg.catalog)
    assert scene["calibration"] == calibration and scene["noise_removed"] is noise_removal
    worker = tiling.TileChunk(cfg.tile, str(tmp_path))
    grid = tiling.grid_for(scene, 20.0, cfg.tile)
    cal = _grid_interp(
        _lut_xml(zip_path, "calibration"),
        "calibrationVector",
        {"sigma0": "sigmaNought", "beta0": "betaNought", "gamma0": "gamma"}[calibration],
    )
    noise_root = _lut_xml(zip_path, "noise")
    new_schema = noise_root.find("noiseRangeVectorList") is not None
    rng = _grid_interp(
        noise_root,
        "noiseRangeVector" if new_schema else "noiseVector",
        "noiseRangeLut" if new_schema else "noiseLut",
    )
    gcps = [
        GroundControlPoint(row=p["line"], col=p["pixel"], x=p["longitude"], y=p["latitude"]) for p in ann.grid
    ]
    tps = GCPTransformer(gcps, tps=True)
    # tiles across the swath (near and far range: the LUTs change most along range), away from the targets
    to_tile = Transformer.from_crs("EPSG:4326", scene["tile_crs"], always_xy=True)
    checked, diffs, noise_effect = 0, [], []
    for frac_line, frac_pixel in ((0.15, 0.1), (0.5, 0.55), (0.85, 0.9)):
        lon, lat = tps.xy([ann.height * frac_line], [ann.width * frac_pixel], offset="ul")
        x, y = to_tile.transform(lon[0], lat[0])
        r, c = int((grid.y0 - y) // (grid.stride * grid.gsd)), int((x - grid.x0) // (grid.stride * grid.gsd))
        tile = worker.make_tile(worker._dataset(json.loads(scene["bands"])[0]["uri"]), scene, grid, r, c, "t")
        assert not isinstance(tile, str), tile
        img = np.asarray(Image.open(io.BytesIO(tile["sar_png"]))).astype(float)
        got = lo + img / 255 * (hi - lo)
        t = Affine(*tile["transform"])
        rows, cols = np.mgrid[0:128:9, 0:128:9]
        px, py = t * (cols + 0.5, rows + 0.5)
        plon, plat = Transformer.from_crs(scene["tile_crs"], "EPSG:4326", always_xy=True).transform(
            px.ravel(), py.ravel()
        )
        srow, scol = tps.rowcol(plon, plat, op=lambda v: v)
        line, pixel = np.floor(np.asarray(srow, float)), np.floor(np.asarray(scol, float))  # the source pixel
        a = cal(np.column_stack([line, pixel]))
        dn2 = np.full(line.shape, BACKGROUND_DN**2, float)
        noise = rng(np.column_stack([line, pixel])) * np.array(
            [_azimuth_noise(noise_root, li, pi) for li, pi in zip(line, pixel)]
        )
        power = dn2 - noise if noise_removal else dn2
        expected = 10 * np.log10(power / a**2)
        noise_effect.append(float(np.max(np.abs(10 * np.log10((dn2 - noise) / dn2)))))
        diffs.append(np.abs(got[rows.ravel(), cols.ravel()] - expected))
        checked += expected.size
    diffs = np.concatenate(diffs)
    assert checked > 300 and diffs.max() < 0.05, (key, calibration, noise_removal, float(diffs.max()))
    if key == "2021":
        assert max(noise_effect) > 0.07  # the new schema's noise is large enough that skipping it would fail
    else:
        assert max(noise_effect) == 0.0  # IPF 2.x: all-zero noise LUT


def test_opera_burst_vv_and_vh_are_one_scene_and_composites_hold_the_documented_channels(
    ray_session, real_sar, tmp_path
):
    """The VV and VH files of an OPERA burst are one scene; ``tile.bands=composite`` PNGs are R = VV dB,
    G = VH dB, B = VV/VH in dB, ``tile.bands=VH`` a grey VH PNG; each tile holds both bands' statistics.
    Expected values are read from the two files directly (at 30 m the tile grid is the files' pixel grid)."""
    import rasterio

    folder = real_sar / "opera_rtc_s1_t137_crops" / "2021-11-19"
    stem = "OPERA_L2_RTC-S1_T137-292319-IW2_20211119T015858Z_20250830T120333Z_S1A_30_v1.0"
    lo, hi = -30.0, 20.0
    base = [
        f"catalog.archive={folder}",
        f"catalog.sar_glob=[{stem}_*.tif]",
        "catalog.optical_rule=null",
        "catalog.landcover_rule=null",
        "run.stages=[catalog,tile]",
        "ray.progress=false",
        "tile.gsds_m=[30]",
        "tile.tile_size=50",
        "tile.speckle.filter=none",
        "tile.stretch.mode=fixed",
        f"tile.stretch.db_min={lo}",
        f"tile.stretch.db_max={hi}",
    ]
    expected = {}
    for pol in ("VV", "VH"):
        with rasterio.open(folder / f"{stem}_{pol}.tif") as src:
            expected[pol] = 10 * np.log10(np.maximum(src.read(1).astype(np.float64), 1e-10))
    expected["ratio"] = expected["VV"] - expected["VH"]
    step = (hi - lo) / 255
    for mode in ("composite", "VH"):
        run_dir = tmp_path / mode
        cfg = load_config(None, [f"run.run_dir={run_dir}", *base, f"tile.bands={mode}"])
        pipeline.run(cfg, ["catalog", "tile"])
        (scene,) = pipeline.read_scenes(cfg.run.run_dir)
        assert scene["polarisations"] == "VV+VH"
        tiles = _tile_rows(run_dir)
        assert len(tiles) == 4  # 100 x 100 px at 30 m in 50 px tiles
        for t in tiles:
            img = np.asarray(Image.open(io.BytesIO(t["sar_png"]))).astype(float)
            r0, c0 = t["row"] * 50, t["col"] * 50
            window = np.s_[r0 : r0 + 50, c0 : c0 + 50]
            channels = {"composite": [("VV", 0), ("VH", 1), ("ratio", 2)], "VH": [("VH", None)]}[mode]
            assert img.shape == ((50, 50, 3) if mode == "composite" else (50, 50))
            for name, k in channels:
                got = lo + (img if k is None else img[..., k]) / 255 * (hi - lo)
                want = np.clip(expected[name][window], lo, hi)
                assert np.abs(got - want).max() <= step / 2 + 1e-3, (
                    mode,
                    name,
                    float(np.abs(got - want).max()),
                )
            stats = {b["polarisation"]: b for b in t["bands"]}
            assert sorted(stats) == ["VH", "VV"]
            for pol in ("VV", "VH"):
                assert stats[pol]["db_mean"] == pytest.approx(
                    max(expected[pol][window].mean(), -100), abs=1e-3
                )
            assert t["polarisation"] == ("VV+VH composite" if mode == "composite" else "VH")


def test_stac_grd_item_with_made_up_proj_fields_gives_the_products_own_tiles(ray_session, real_sar, tmp_path):
    """A Sentinel-1 GRD STAC item (measurement assets vv / vh, calibration and noise XML assets, as the
    Planetary Computer publishes them) whose proj:shape is transposed and proj:transform made up from the
    bounding box: the files win (same tiles, byte for byte, as the SAFE product read directly) and the
    disagreement is recorded on the scene and counted."""
    import pystac

    ann = annotation(real_sar / "s1_grd_safe_metadata" / PRODUCTS["2021"])
    nodes, _between = _targets(ann)
    targets = [(p["line"], p["pixel"], TARGET_DN) for p in nodes]
    safe_dir = build_product(real_sar, "2021", tmp_path / "product", BACKGROUND_DN, targets, as_zip=False)
    node = nodes[0]
    aoi = [
        node["longitude"] - 0.02,
        node["latitude"] - 0.02,
        node["longitude"] + 0.02,
        node["latitude"] + 0.02,
    ]
    assets = {}
    for kind, folder in (
        ("measurement", "measurement"),
        ("calibration", "annotation/calibration"),
        ("noise", "annotation/calibration"),
        ("product", "annotation"),
    ):
        for pol in ("vv", "vh"):
            path = next(
                p
                for p in (safe_dir / folder).iterdir()
                if f"-{pol}-" in p.name and (kind in ("measurement", "product") or p.name.startswith(kind))
            )
            key = pol if kind == "measurement" else f"schema-{kind}-{pol}"
            media = "image/tiff; application=geotiff" if kind == "measurement" else "application/xml"
            assets[key] = pystac.Asset(
                str(path), media_type=media, roles=["data"] if kind == "measurement" else ["metadata"]
            )
    lons = [p["longitude"] for p in ann.grid]
    lats = [p["latitude"] for p in ann.grid]
    bbox = [min(lons), min(lats), max(lons), max(lats)]
    props = {
        "platform": "SENTINEL-1A",
        "sar:instrument_mode": "IW",
        "sar:polarizations": ["VV", "VH"],
        "sar:product_type": "GRD",
        "proj:epsg": 4326,
        "proj:shape": [ann.width, ann.height],  # transposed, as catalogues publish it
        "proj:transform": [
            (bbox[2] - bbox[0]) / ann.width,
            0,
            bbox[0],
            0,
            -(bbox[3] - bbox[1]) / ann.height,
            bbox[3],
        ],
    }
    import datetime as dt

    item = pystac.Item(
        "S1A_IW_GRDH_2021",
        shapely.geometry.mapping(shapely.geometry.box(*bbox)),
        bbox,
        dt.datetime(2021, 1, 19, 3, 16, 53, tzinfo=dt.timezone.utc),
        props,
    )
    for key, asset in assets.items():
        item.add_asset(key, asset)
    pystac.ItemCollection([item]).save_object(dest_href=str(tmp_path / "items.json"))
    common = [
        "catalog.optical_rule=null",
        "catalog.landcover_rule=null",
        "run.stages=[catalog,tile]",
        "ray.progress=false",
        f"tile.aoi={aoi}",
        "tile.gsds_m=[20]",
        "tile.tile_size=256",
    ]
    stac_cfg = load_config(
        None, [f"run.run_dir={tmp_path / 'stac'}", f"catalog.archive={tmp_path / 'items.json'}", *common]
    )
    summary = pipeline.run(stac_cfg, ["catalog", "tile"])
    (scene,) = pipeline.read_scenes(stac_cfg.run.run_dir)
    assert scene["georef"] == "gcps" and scene["calibration"] == "sigma0" and scene["noise_removed"]
    assert scene["polarisations"] == "VV+VH" and scene["stac_asset"] == "vv+vh"
    mismatch = json.loads(scene["proj_mismatch"])
    assert set(mismatch) == {"proj:shape", "proj:transform", "proj:code"}
    assert mismatch["proj:shape"]["file"] == [ann.height, ann.width]
    assert summary["stages"]["catalog"]["proj_mismatches"] == 1
    safe_cfg = load_config(
        None,
        [
            f"run.run_dir={tmp_path / 'safe'}",
            f"catalog.archive={safe_dir.parent}",
            "catalog.sar_glob=['*.SAFE']",
            *common,
        ],
    )
    pipeline.run(safe_cfg, ["catalog", "tile"])
    (safe_scene,) = pipeline.read_scenes(safe_cfg.run.run_dir)
    assert safe_scene["proj_mismatch"] is None
    by_key = {(t["gsd_m"], t["row"], t["col"]): t for t in _tile_rows(tmp_path / "safe")}
    stac_tiles = _tile_rows(tmp_path / "stac")
    assert stac_tiles and sorted(by_key) == sorted((t["gsd_m"], t["row"], t["col"]) for t in stac_tiles)
    for t in stac_tiles:
        other = by_key[(t["gsd_m"], t["row"], t["col"])]
        assert (
            t["sar_png"] == other["sar_png"]
            and t["transform"] == other["transform"]
            and t["bands"] == other["bands"]
        )


@pytest.mark.slow
def test_safe_zip_on_s3_is_read_in_place_and_gives_the_local_tiles(ray_session, s3, real_sar, tmp_path):
    """A SAFE zip in a bucket: manifest and LUT XML by ranged reads of the zip, the measurement by GDAL's
    /vsizip//vsis3/ (nothing downloaded whole); the tiles equal those of the same zip on a local disk."""
    import fsspec

    ann = annotation(real_sar / "s1_grd_safe_metadata" / PRODUCTS["2021"])
    nodes, _ = _targets(ann)
    zip_path = build_product(
        real_sar,
        "2021",
        tmp_path / "local",
        BACKGROUND_DN,
        [(p["line"], p["pixel"], TARGET_DN) for p in nodes],
    )
    fsspec.filesystem("s3").put(str(zip_path), f"sarlang/grd-archive/{zip_path.name}")
    node = nodes[0]
    aoi = [
        node["longitude"] - 0.02,
        node["latitude"] - 0.02,
        node["longitude"] + 0.02,
        node["latitude"] + 0.02,
    ]
    common = [
        "catalog.sar_glob=['*.zip']",
        "catalog.optical_rule=null",
        "catalog.landcover_rule=null",
        "run.stages=[catalog,tile]",
        "ray.progress=false",
        f"tile.aoi={aoi}",
        "tile.gsds_m=[20]",
        "tile.tile_size=256",
    ]
    tiles = {}
    for name, archive in (("s3", "s3://sarlang/grd-archive"), ("local", str(zip_path.parent))):
        cfg = load_config(None, [f"run.run_dir={tmp_path / name}", f"catalog.archive={archive}", *common])
        summary = pipeline.run(cfg, ["catalog", "tile"])
        assert summary["stages"]["catalog"]["written"] == 1, summary["stages"]["catalog"]
        (scene,) = pipeline.read_scenes(cfg.run.run_dir)
        assert scene["sar_uri"] == f"{archive}/{zip_path.name}"
        assert json.loads(scene["bands"])[0]["uri"].startswith(
            "/vsizip//vsis3/sarlang/" if name == "s3" else "/vsizip/"
        )
        tiles[name] = {(t["row"], t["col"]): t["sar_png"] for t in _tile_rows(tmp_path / name)}
    assert tiles["s3"] and tiles["s3"] == tiles["local"]


def test_opera_layover_shadow_mask_becomes_nodata(ray_session, real_sar, tmp_path):
    """An OPERA burst with its ``_mask`` layer (0 valid, 1 shadow, 2 layover, 3 both): masked pixels are
    nodata in every band; the tile's nodata fraction is the mask's non-zero share of its window."""
    import shutil

    import rasterio

    folder = real_sar / "opera_rtc_s1_t137_crops" / "2021-11-19"
    stem = "OPERA_L2_RTC-S1_T137-292319-IW2_20211119T015858Z_20250830T120333Z_S1A_30_v1.0"
    archive = tmp_path / "archive"
    archive.mkdir()
    for pol in ("VV", "VH"):
        shutil.copy(folder / f"{stem}_{pol}.tif", archive)
    with rasterio.open(folder / f"{stem}_VV.tif") as src:
        profile = {**src.profile, "dtype": "uint8", "nodata": 255, "compress": "deflate"}
    mask = np.zeros((100, 100), np.uint8)
    mask[10:30, 5:45] = 1  # shadow
    mask[60:95, 55:70] = 2  # layover
    mask[0:3, :] = 3
    with rasterio.open(archive / f"{stem}_mask.tif", "w", **profile) as dst:
        dst.write(mask, 1)
    cfg = load_config(
        None,
        [
            f"run.run_dir={tmp_path / 'run'}",
            f"catalog.archive={archive}",
            "catalog.sar_glob=['*.tif']",
            "catalog.optical_rule=null",
            "catalog.landcover_rule=null",
            "run.stages=[catalog,tile]",
            "ray.progress=false",
            "tile.gsds_m=[30]",
            "tile.tile_size=50",
            "tile.max_nodata_fraction=1.0",
            "tile.speckle.filter=none",
        ],
    )
    summary = pipeline.run(cfg, ["catalog", "tile"])
    assert summary["stages"]["catalog"]["planned"] == 1  # the VV, VH and mask files are one scene
    (scene,) = pipeline.read_scenes(cfg.run.run_dir)
    assert {b["mask"] for b in json.loads(scene["bands"])} == {str(archive / f"{stem}_mask.tif")}
    tiles = _tile_rows(tmp_path / "run")
    assert len(tiles) == 4
    for t in tiles:
        window = mask[t["row"] * 50 : t["row"] * 50 + 50, t["col"] * 50 : t["col"] * 50 + 50]
        assert t["nodata_fraction"] == pytest.approx((window != 0).mean())
        for b in t["bands"]:
            assert b["nodata_fraction"] == pytest.approx((window != 0).mean())


def test_amplitude_product_with_a_sidecar_scale_factor_is_calibrated(ray_session, real_sar, tmp_path):
    """The real Umbra amplitude file with a Capella-style sidecar (``collect.image.scale_factor``,
    ``radiometry``): amplitude = DN x scale factor, so every tile's dB statistics shift by exactly
    20 log10(scale factor) against the same file without the sidecar, and the scene says how."""
    import shutil

    src = real_sar / "umbra_gec_mount_yasur" / "umbra_mount_yasur.tiff"
    factor = 0.0123
    runs = {}
    for name in ("plain", "sidecar"):
        archive = tmp_path / name
        archive.mkdir()
        shutil.copy(src, archive)
        if name == "sidecar":
            (archive / "umbra_mount_yasur_extended.json").write_text(
                json.dumps({"collect": {"image": {"scale_factor": factor, "radiometry": "beta_nought"}}})
            )
        cfg = load_config(
            None,
            [
                f"run.run_dir={tmp_path / name / 'run'}",
                f"catalog.archive={archive}",
                "catalog.sar_glob=['*.tiff']",
                "catalog.optical_rule=null",
                "catalog.landcover_rule=null",
                "run.stages=[catalog,tile]",
                "ray.progress=false",
                "tile.gsds_m=[10]",
                "tile.tile_size=64",
                "tile.max_nodata_fraction=0.9",
            ],
        )
        pipeline.run(cfg, ["catalog", "tile"])
        (scene,) = pipeline.read_scenes(cfg.run.run_dir)
        runs[name] = (scene, {(t["row"], t["col"]): t for t in _tile_rows(tmp_path / name / "run")})
    scene, tiles = runs["sidecar"]
    assert (
        scene["scale_factor"] == factor
        and scene["calibration"] == "beta0"
        and "scale factor" in scene["units_source"]
    )
    assert runs["plain"][0]["scale_factor"] is None
    assert tiles and sorted(tiles) == sorted(runs["plain"][1])
    shift = 20 * np.log10(factor)
    for key, t in tiles.items():
        plain = runs["plain"][1][key]
        assert t["db_mean"] - plain["db_mean"] == pytest.approx(shift, abs=1e-3)
        assert t["sar_png"] == plain["sar_png"]  # a per-tile percentile stretch: the same picture
