"""Every file of ../shared/data/real_sar goes through catalog -> tile -> align, and the results are checked
against the source rasters themselves."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import rasterio
import shapely
from PIL import Image
from rasterio.features import geometry_mask
from shapely.geometry import Polygon, box

from sarlang_ray import pipeline
from sarlang_ray.config import load_config


@pytest.fixture(scope="module")
def real_run(ray_session, real_sar, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("real") / "run"
    cfg = load_config(
        None,
        [
            f"run.run_dir={run_dir}",
            f"catalog.archive={real_sar}",
            "run.stages=[catalog,tile,align]",
            "ray.progress=false",
            (
                "catalog.sar_glob=[pyrosar_s1_grd_geocoded/*.tif,umbra_gec_mount_yasur/*.tiff,opera_rtc_s1_t137_crops/*/*.tif,"
                "sen1floods11_spain_7370579/*_S1Hand.tif,sen1floods11_spain_7370579/*_S2Hand.tif]"
            ),
            "catalog.optical_rule=[_S1Hand\\.tif$,_S2Hand.tif]",
            "catalog.landcover_rule=[_S1Hand\\.tif$,_LabelHand.tif]",
            "catalog.labels_glob=[sen1floods11_spain_7370579/*.geojson]",
            "align.class_column=location",
            "align.landcover_classes={0: land, 1: water}",
            "align.optical_bands=[4,3,2]",
            "tile.gsds_m=[2,10,30,60]",
            "tile.tile_size=64",
            "tile.max_nodata_fraction=0.9",
        ],
    )
    summary = pipeline.run(cfg)
    tiles = pipeline.read_tiles(cfg.run.run_dir).to_pylist()
    return cfg, summary, tiles


def _scene_rows(cfg):
    """Scene rows by the file name of each of their bands (an OPERA burst's VV and VH files are one scene)."""
    return {
        b["uri"].rsplit("/", 1)[-1]: s
        for s in pipeline.read_scenes(cfg.run.run_dir)
        for b in json.loads(s["bands"])
    }


def test_every_real_sar_file_is_tiled(real_run, real_sar):
    cfg, summary, tiles = real_run
    scenes = _scene_rows(cfg)
    sar_files = [
        p
        for p in real_sar.rglob("*.tif*")
        if not p.name.endswith(".xml") and not p.name.endswith(("_S2Hand.tif", "_LabelHand.tif"))
    ]
    assert len(sar_files) == 63
    per_scene = {}
    for t in tiles:
        per_scene[t["scene_id"]] = per_scene.get(t["scene_id"], 0) + 1
    for p in sar_files:
        assert p.name in scenes, f"{p.name} not cataloged"
        assert per_scene.get(scenes[p.name]["scene_id"], 0) >= 1, f"{p.name} gave no tiles"
    for t in tiles:
        img = np.asarray(Image.open(io.BytesIO(t["sar_png"])))
        assert img.shape == (64, 64) and img.std() > 0
        assert t["transform"][1] == 0 and t["transform"][3] == 0, "tiles are north-up"
    for stage in ("catalog", "tile", "align"):
        c = summary["stages"][stage]
        assert c["planned"] == c["written"] + c["rejected"]


def test_units_detected_per_product(real_run):
    cfg, _, _ = real_run
    scenes = _scene_rows(cfg)
    assert scenes["S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif"]["units"] == "db"
    assert scenes["umbra_mount_yasur.tiff"]["units"] == "amplitude"
    assert scenes["Spain_7370579_S1Hand.tif"]["units"] == "db"
    opera = {s["scene_id"]: s for n, s in scenes.items() if n.startswith("OPERA")}
    # 60 files: 15 bursts x 2 dates, each burst-date's VV and VH files one scene with both polarisations
    assert len(opera) == 30 and {s["units"] for s in opera.values()} == {"intensity"}
    assert {s["polarisation"] for s in opera.values()} == {"VV+VH"}
    for s in opera.values():
        vv, vh = json.loads(s["bands"])
        assert (vv["polarisation"], vh["polarisation"]) == ("VV", "VH")
        assert vv["uri"].endswith("_VV.tif") and vh["uri"] == vv["uri"][: -len("_VV.tif")] + "_VH.tif"
    assert scenes["Spain_7370579_S1Hand.tif"]["polarisation"] == "VV"  # from the band description


def test_sentinel2_given_as_sar_is_rejected_with_reason(real_run):
    cfg, _, _ = real_run
    errors = pipeline.read_errors(cfg.run.run_dir).to_pylist()
    s2 = [e for e in errors if e["item"].endswith("Spain_7370579_S2Hand.tif")]
    assert len(s2) == 1 and s2[0]["error_class"] == "not_sar" and "13 bands" in s2[0]["message"]


def test_umbra_rotated_scene_is_warped_north_up_with_the_right_footprint(real_run):
    """Valid-pixel share of each tile equals the overlap of the tile with the rotated scene outline."""
    cfg, _, tiles = real_run
    scene = _scene_rows(cfg)["umbra_mount_yasur.tiff"]
    assert scene["rotated"]
    with rasterio.open(scene["sar_uri"]) as src:
        t, w, h = src.transform, src.width, src.height
    outline = Polygon([t @ (0, 0), t @ (w, 0), t @ (w, h), t @ (0, h)])
    umbra = [x for x in tiles if x["scene_id"] == scene["scene_id"]]
    assert {x["gsd_m"] for x in umbra} >= {2.0, 10.0, 30.0}  # 60 m: one tile, 90 % outside the outline
    for x in umbra:
        tile_box = box(*x["bounds"])
        expected_valid = outline.intersection(tile_box).area / tile_box.area
        edge_px = 4 * 64 / (64 * 64)  # one ring of partially covered pixels
        assert 1 - x["nodata_fraction"] == pytest.approx(expected_valid, abs=edge_px + 0.01), x["tile_id"]


def test_sen1floods11_water_fraction_agrees_with_the_hand_label(real_run, real_sar):
    cfg, _, tiles = real_run
    scene = _scene_rows(cfg)["Spain_7370579_S1Hand.tif"]
    assert scene["tile_crs"] == "EPSG:32630"  # geographic scene: tiles cut in its UTM zone
    with rasterio.open(real_sar / "sen1floods11_spain_7370579" / "Spain_7370579_LabelHand.tif") as src:
        label, lt = src.read(1), src.transform
    flood = [x for x in tiles if x["scene_id"] == scene["scene_id"] and x["gsd_m"] == 10.0]
    assert len(flood) >= 30
    water_frac, db_mean = [], []
    for x in flood:
        inside = ~geometry_mask([shapely.from_wkb(x["footprint"])], label.shape, lt)
        known = inside & (label >= 0)
        if known.sum() < 500:
            continue
        expected = (label[known] == 1).mean()
        lc = dict(x["landcover"])
        assert lc.get("water", 0.0) == pytest.approx(expected, abs=0.05), x["tile_id"]
        assert x["optical_png"] is not None
        water_frac.append(expected)
        db_mean.append(x["db_mean"])
    assert len(water_frac) >= 30
    assert np.corrcoef(water_frac, db_mean)[0, 1] < -0.5, "water tiles are darker in SAR"


def test_event_polygon_from_geojson_covers_every_flood_tile(real_run):
    cfg, summary, tiles = real_run
    scene = _scene_rows(cfg)["Spain_7370579_S1Hand.tif"]
    flood = [x for x in tiles if x["scene_id"] == scene["scene_id"]]
    for x in flood:
        spain = [o for o in x["objects"] if o["class"] == "Spain"]
        assert len(spain) == 1, x["tile_id"]  # the event polygon contains the whole chip
        assert spain[0]["bbox_xyxy"] == pytest.approx([0, 0, 64, 64])
    assert summary["stages"]["align"]["labels"]["written"] == 12


def test_a_mask_under_a_broad_glob_is_not_sar_and_real_uint8_sar_is(ray_session, real_sar, tmp_path):
    """``sen1floods11_spain_7370579/*.tif`` also catches the hand-labelled water mask (int16, -1/0/1) and
    the Sentinel-2 image: both are rejected with what to do; the SAR chip and Umbra's 8-bit amplitude
    (uint8, 0-255) are cataloged."""
    cfg = load_config(
        None,
        [
            f"run.run_dir={tmp_path / 'run'}",
            f"catalog.archive={real_sar}",
            "ray.progress=false",
            "catalog.sar_glob=[sen1floods11_spain_7370579/*.tif,umbra_gec_mount_yasur/*.tiff]",
            "catalog.optical_rule=null",
            "catalog.landcover_rule=null",
            "run.stages=[catalog]",
        ],
    )
    summary = pipeline.run(cfg, ["catalog"])
    scenes = _scene_rows(cfg)
    assert set(scenes) == {"Spain_7370579_S1Hand.tif", "umbra_mount_yasur.tiff"}
    assert (
        scenes["umbra_mount_yasur.tiff"]["units"] == "amplitude"
        and scenes["umbra_mount_yasur.tiff"]["dtype"] == "uint8"
    )
    errors = {e["item"].rsplit("/", 1)[-1]: e for e in pipeline.read_errors(cfg.run.run_dir).to_pylist()}
    assert set(errors) == {"Spain_7370579_LabelHand.tif", "Spain_7370579_S2Hand.tif"}
    mask = errors["Spain_7370579_LabelHand.tif"]
    assert mask["error_class"] == "not_sar"
    assert "Spain_7370579_LabelHand.tif" in mask["message"] and "{-1, 0, 1}" in mask["message"]
    assert "catalog.sar_glob" in mask["message"] and "mask" in mask["message"]
    assert summary["stages"]["catalog"]["written"] == 2
