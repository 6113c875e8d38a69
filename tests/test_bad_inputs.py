"""Bad input gets a clear error naming the item, the run goes on, and counts reconcile."""

from __future__ import annotations

import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from shapely.geometry import Point, Polygon

from sarlang_ray import pipeline
from sarlang_ray.config import ConfigError, SynthSection, load_config
from sarlang_ray.synth import write_archive


@pytest.fixture(scope="module")
def bad_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    archive = root / "archive"
    write_archive(SynthSection(out_dir=str(archive), scene_size_px=256), seed=3)
    sar = archive / "sar"
    good = sorted(sar.glob("*.tif"))[0]
    with rasterio.open(good) as src:
        profile, data = src.profile, src.read(1)

    raw = good.read_bytes()  # truncated: header intact, most tiles missing
    (sar / "truncated_sar.tif").write_bytes(raw[: len(raw) // 3])
    (sar / "garbage_sar.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 8)  # TIFF magic, then junk
    p = dict(profile)
    p.pop("crs")
    with rasterio.open(sar / "nocrs_sar.tif", "w", **p) as dst:  # no CRS at all
        dst.write(data, 1)
    with rasterio.open(sar / "allnodata_sar.tif", "w", **profile) as dst:
        dst.write(np.zeros_like(data), 1)
    bad_pixels = data.copy()
    bad_pixels[:, :180] = np.nan  # most of the scene is NaN, some inf
    bad_pixels[200:, 200:] = np.inf
    with rasterio.open(sar / "naninf_sar.tif", "w", **profile) as dst:
        dst.write(bad_pixels, 1)
    shutil.copy(next((archive / "optical").glob("*.tif")), sar / "rgb_given_as_sar.tif")

    crs = gpd.read_parquet(next((archive / "labels").glob("*.parquet"))).crs
    bowtie = Polygon([(4.10, 51.93), (4.11, 51.94), (4.11, 51.93), (4.10, 51.94)])
    gpd.GeoDataFrame({"class": ["ship", "car", "ship", None]},
                     geometry=[bowtie, Polygon(), Point(4.1, 51.93), Point(4.1, 51.93).buffer(1e-4)],
                     crs=crs).to_parquet(archive / "labels" / "bad_geometries.parquet")
    gpd.GeoDataFrame({"class": ["ship"]}, geometry=[Point(4.1, 51.93).buffer(1e-4)]).to_parquet(
        archive / "labels" / "no_crs.parquet")

    cfg = load_config(None, [f"run.run_dir={root / 'run'}", f"catalog.archive={archive}",
                             "run.stages=[catalog,tile,align]", "ray.progress=false", "tile.tile_size=128"])
    summary = pipeline.run(cfg)
    errors = pipeline.read_errors(cfg.run.run_dir).to_pylist()
    return cfg, summary, errors


def _errors_for(errors, name):
    return [e for e in errors if name in e["item"]]


@pytest.mark.parametrize("name, error_class, advice", [
    ("truncated_sar.tif", "unreadable", "re-download"),
    ("garbage_sar.tif", "unreadable", "corrupt"),
    ("nocrs_sar.tif", "no_crs", "Georeference it"),
    ("allnodata_sar.tif", "all_nodata", "nodata"),
    ("rgb_given_as_sar.tif", "not_sar", "optical"),
])
def test_bad_scene_is_rejected_at_catalog_with_reason(bad_run, name, error_class, advice):
    _, _, errors = bad_run
    found = _errors_for(errors, name)
    assert len(found) == 1, found
    e = found[0]
    assert e["stage"] == "catalog" and e["error_class"] == error_class
    assert name in e["message"] and advice in e["message"]


def test_nan_and_inf_pixels_are_nodata_and_never_reach_a_png(bad_run):
    cfg, _, errors = bad_run
    scene = [s for s in pipeline.read_scenes(cfg.run.run_dir) if s["sar_uri"].endswith("naninf_sar.tif")]
    assert len(scene) == 1, "a scene with some NaN/inf pixels is still usable"
    sid = scene[0]["scene_id"]
    dropped = [e for e in errors if e["stage"] == "tile" and e["item"].startswith(sid)]
    assert dropped and all(e["error_class"] == "nodata" and "NaN" in e["message"] for e in dropped)
    kept = [t for t in pipeline.read_tiles(cfg.run.run_dir).to_pylist() if t["scene_id"] == sid]
    assert kept and all(np.isfinite(t["db_mean"]) and t["nodata_fraction"] <= 0.5 for t in kept)


def test_bad_label_features_and_files_are_rejected_the_rest_is_used(bad_run):
    cfg, summary, errors = bad_run
    by_class = {e["error_class"] for e in _errors_for(errors, "bad_geometries.parquet")}
    assert by_class == {"invalid_geometry", "empty_geometry", "not_polygon", "no_class"}
    bowtie = [e for e in errors if e["error_class"] == "invalid_geometry"][0]
    assert "Self-intersection" in bowtie["message"] and "#feature=0" in bowtie["item"]
    nocrs = _errors_for(errors, "no_crs.parquet")
    assert len(nocrs) == 1 and nocrs[0]["error_class"] == "no_crs" and "set_crs" in nocrs[0]["message"]
    labels = summary["stages"]["align"]["labels"]
    assert labels["planned"] == labels["written"] + labels["rejected"] and labels["files_rejected"] == 1
    assert summary["objects_per_class"], "the good labels were still aligned"


def test_the_run_goes_on_and_counts_reconcile(bad_run):
    cfg, summary, errors = bad_run
    stages = summary["stages"]
    assert stages["catalog"]["planned"] == 4 + 6 and stages["catalog"]["rejected"] == 5
    for stage in ("catalog", "tile", "align"):
        c = stages[stage]
        assert c["planned"] == c["written"] + c["rejected"], stage
    assert stages["tile"]["rejected"] == sum(e["stage"] == "tile" for e in errors)
    n_tiles = pipeline.read_tiles(cfg.run.run_dir, columns=["tile_id"]).num_rows
    assert n_tiles == stages["align"]["written"] > 0


def test_repair_mode_keeps_fixable_polygons(tmp_path):
    from sarlang_ray.align import prepare_labels
    from sarlang_ray.config import AlignSection

    bowtie = Polygon([(0, 0), (1, 1), (1, 0), (0, 1)])
    path = tmp_path / "l.parquet"
    gpd.GeoDataFrame({"class": ["ship"]}, geometry=[bowtie], crs=4326).to_parquet(path)
    labels, errors, planned = prepare_labels([str(path)], AlignSection(invalid_geometry="repair"))
    assert planned == 1 and not errors and len(labels) == 1 and labels.geometry.iloc[0].is_valid


def test_unknown_config_key_is_a_clear_error():
    with pytest.raises(ConfigError, match="tile_szie"):
        load_config(None, ["tile.tile_szie=1"])
