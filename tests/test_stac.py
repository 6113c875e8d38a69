"""STAC archives: a static catalog (catalog.json) or an ItemCollection file as ``catalog.archive`` gives the
same scenes as scanning the folder, carries the items' metadata, and rejects bad items with a reason."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import fsspec
import pystac
import pytest
import rasterio
from shapely.geometry import box, mapping

from sarlang_ray import catalog, pipeline
from sarlang_ray.config import SynthSection, load_config
from sarlang_ray.synth import write_archive

WHEN = dt.datetime(2024, 5, 1, 10, 30, tzinfo=dt.timezone.utc)
SYNTH_PROPS = {
    "platform": "sarlang-synth",
    "sar:instrument_mode": "SM",
    "sar:polarizations": ["VV"],
    "sar:frequency_band": "X",
    "sar:product_type": "GRD",
}


def _item(
    item_id: str, raster: Path | None, props: dict, assets: dict[str, pystac.Asset], when: dt.datetime = WHEN
) -> pystac.Item:
    """An item whose geometry is the raster's footprint, as a publisher would write it."""
    if raster is not None and raster.exists():
        with rasterio.open(raster) as src:
            footprint = catalog.footprint_4326(src)
    else:  # the bad items: no file, a made-up geometry
        footprint = box(4.0, 51.99, 4.01, 52.0)
    item = pystac.Item(item_id, mapping(footprint), list(footprint.bounds), when, dict(props))
    for key, asset in assets.items():
        item.add_asset(key, asset)
    return item


def _data(href: Path | str) -> pystac.Asset:
    return pystac.Asset(str(href), media_type=pystac.MediaType.COG, roles=["data"])


def _synthetic_items(archive: Path) -> list[pystac.Item]:
    """One item per SAR scene (a SAR asset, a thumbnail and an optical 'visual' GeoTIFF that must not be
    picked), one item whose SAR href is missing, one item with a thumbnail only."""
    items = []
    for sar in sorted((archive / "sar").glob("*_sar.tif")):
        stem = sar.name[: -len("_sar.tif")]
        items.append(
            _item(
                stem,
                sar,
                SYNTH_PROPS,
                {
                    "vv": _data(sar),
                    "visual": pystac.Asset(
                        str(archive / "optical" / f"{stem}_optical.tif"),
                        media_type=pystac.MediaType.COG,
                        roles=["visual"],
                    ),
                    "thumbnail": pystac.Asset(
                        str(archive / f"{stem}.png"), media_type=pystac.MediaType.PNG, roles=["thumbnail"]
                    ),
                },
            )
        )
    items.append(
        _item("missing-scene", None, SYNTH_PROPS, {"vv": _data(archive / "sar" / "missing_sar.tif")})
    )
    items.append(
        _item(
            "thumbnail-only",
            None,
            SYNTH_PROPS,
            {
                "thumbnail": pystac.Asset(
                    str(archive / "x.png"), media_type=pystac.MediaType.PNG, roles=["thumbnail"]
                )
            },
        )
    )
    return items


@pytest.fixture(scope="module")
def stac_archive(tmp_path_factory) -> Path:
    """The synthetic archive with, at its root, a self-contained static catalog (root -> collection ->
    items in sub-folders, relative asset hrefs) and an ItemCollection file (hrefs relative to it)."""
    archive = tmp_path_factory.mktemp("stac") / "archive"
    write_archive(SynthSection(out_dir=str(archive), scene_size_px=256), seed=5)

    root = pystac.Catalog("sarlang-synthetic", "The synthetic demo archive as a static STAC catalog")
    scenes = pystac.Catalog("scenes", "SAR scenes")
    root.add_child(scenes)
    for item in _synthetic_items(archive):
        scenes.add_item(item)
    root.normalize_hrefs(str(archive))
    root.make_all_asset_hrefs_relative()  # ../../sar/x_sar.tif: resolved against each item's own file
    root.save(pystac.CatalogType.SELF_CONTAINED)

    features = []
    for item in _synthetic_items(archive):  # no self links: relative hrefs resolve against items.json
        for asset in item.assets.values():
            asset.href = "./" + str(Path(asset.href).relative_to(archive))
        features.append(item.to_dict(include_self_link=False, transform_hrefs=False))
    (archive / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return archive


def _catalog(run_dir: Path, archive: str, *overrides: str):
    cfg = load_config(
        None,
        [
            f"run.run_dir={run_dir}",
            f"catalog.archive={archive}",
            "run.stages=[catalog]",
            "ray.progress=false",
            *overrides,
        ],
    )
    summary = pipeline.run(cfg)
    scenes = {s["scene_id"]: s for s in pipeline.read_scenes(str(run_dir))}
    errors = pipeline.read_errors(str(run_dir)).to_pylist()
    return summary["stages"]["catalog"], scenes, errors


@pytest.fixture(scope="module")
def folder_scan(ray_session, stac_archive, tmp_path_factory):
    return _catalog(tmp_path_factory.mktemp("folder") / "run", str(stac_archive))


def _assert_same_scenes(stac_scenes: dict, folder_scenes: dict, exact_ids: bool = True) -> None:
    if exact_ids:
        assert sorted(stac_scenes) == sorted(folder_scenes)
    by_uri = {s["sar_uri"]: s for s in folder_scenes.values()}
    assert sorted(s["sar_uri"] for s in stac_scenes.values()) == sorted(by_uri)
    for s in stac_scenes.values():
        f = by_uri[s["sar_uri"]]
        for key in (
            "footprint",
            "crs",
            "tile_crs",
            "transform",
            "width",
            "height",
            "gsd_m",
            "units",
            "optical_uri",
            "landcover_uri",
            "rotated",
            "valid_fraction",
        ):
            assert s[key] == f[key], (s["sar_uri"], key)
        assert s["scene_id"].rsplit("-", 1)[0] == f["scene_id"].rsplit("-", 1)[0]  # same stem


def _assert_synthetic_metadata(scenes: dict) -> None:
    for s in scenes.values():
        assert s["stac_item"] == Path(s["sar_uri"]).name[: -len("_sar.tif")] and s["stac_asset"] == "vv"
        assert s["datetime"] == "2024-05-01T10:30:00Z" and s["platform"] == "sarlang-synth"
        assert s["instrument_mode"] == "SM" and s["polarisation"] == "VV" and s["sensor"] == "sarlang-synth"
        props = json.loads(s["stac_properties"])
        assert props["sar:frequency_band"] == "X" and props["sar:product_type"] == "GRD"


def _assert_bad_items_rejected(counts: dict, errors: list[dict], archive: Path) -> None:
    assert (counts["planned"], counts["written"], counts["rejected"]) == (6, 4, 2)
    by_class = {e["error_class"]: e for e in errors}
    assert sorted(by_class) == ["stac_bad_href", "stac_no_sar_asset"]
    bad = by_class["stac_bad_href"]
    assert bad["item"] == str(archive / "sar" / "missing_sar.tif")
    assert "'missing-scene'" in bad["message"] and "does not exist" in bad["message"]
    assert "Fix the href" in bad["message"]
    assert "'thumbnail-only'" in by_class["stac_no_sar_asset"]["message"]


def test_static_catalog_gives_the_folder_scenes_with_item_metadata(stac_archive, folder_scan, tmp_path):
    folder_counts, folder_scenes, _ = folder_scan
    assert folder_counts["written"] == 4
    counts, scenes, errors = _catalog(tmp_path / "run", str(stac_archive / "catalog.json"))
    _assert_same_scenes(scenes, folder_scenes)
    _assert_synthetic_metadata(scenes)
    _assert_bad_items_rejected(counts, errors, stac_archive)
    assert all(s["stac_item"] is None for s in folder_scenes.values())
    # a folder scene's time is its file's ACQUISITION_DATETIME tag; the STAC item's datetime beats it
    for s in folder_scenes.values():
        with rasterio.open(s["sar_uri"]) as src:
            assert s["datetime"] == src.tags()["ACQUISITION_DATETIME"] != "2024-05-01T10:30:00Z"


def test_item_collection_with_named_assets(stac_archive, folder_scan, tmp_path):
    _, folder_scenes, _ = folder_scan
    counts, scenes, errors = _catalog(
        tmp_path / "run", str(stac_archive / "items.json"), "catalog.stac_assets=[VV]"
    )
    _assert_same_scenes(scenes, folder_scenes)
    _assert_synthetic_metadata(scenes)
    _assert_bad_items_rejected(counts, errors, stac_archive)
    assert "['VV']" in next(e for e in errors if e["error_class"] == "stac_no_sar_asset")["message"]


def test_broken_item_link_rejects_that_item_only(ray_session, stac_archive, tmp_path):
    bad = json.loads((stac_archive / "scenes" / "catalog.json").read_text())
    bad["links"].append({"rel": "item", "href": "./gone/gone.json", "type": "application/geo+json"})
    (stac_archive / "scenes" / "catalog.json").write_text(json.dumps(bad))
    try:
        counts, _scenes, errors = _catalog(tmp_path / "run", str(stac_archive / "catalog.json"))
    finally:
        bad["links"].pop()
        (stac_archive / "scenes" / "catalog.json").write_text(json.dumps(bad))
    assert counts["planned"] == 7 and counts["written"] == 4 and counts["rejected"] == 3
    gone = [e for e in errors if e["error_class"] == "stac_unreadable"]
    assert len(gone) == 1 and gone[0]["item"] == str(stac_archive / "scenes" / "gone" / "gone.json")


def test_not_stac_json_is_refused_with_advice(ray_session, tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"type": "Topology"}))
    with pytest.raises(ValueError, match="not STAC"):
        _catalog(tmp_path / "run", str(tmp_path / "x.json"))


def test_real_opera_burst_item(ray_session, real_sar, tmp_path):
    """An OPERA RTC-S1 burst as its STAC item (assets VV and VH, absolute hrefs into the data folder)."""
    folder = real_sar / "opera_rtc_s1_t137_crops" / "2021-11-19"
    stem = "OPERA_L2_RTC-S1_T137-292318-IW1_20211119T015854Z_20250830T120333Z_S1A_30_v1.0"
    files = {pol: folder / f"{stem}_{pol}.tif" for pol in ("VV", "VH")}
    if not all(p.exists() for p in files.values()):
        pytest.skip(f"OPERA burst {stem} not in {folder}")
    props = {
        "platform": "sentinel-1a",
        "constellation": "sentinel-1",
        "sar:instrument_mode": "IW",
        "sar:polarizations": ["VV", "VH"],
        "sar:product_type": "RTC",
    }
    item = _item(
        stem,
        files["VV"],
        props,
        {pol: _data(p) for pol, p in files.items()},
        when=dt.datetime(2021, 11, 19, 1, 58, 54, tzinfo=dt.timezone.utc),
    )
    root = pystac.Catalog("opera", "one OPERA RTC-S1 burst")
    root.add_item(item)
    root.normalize_hrefs(str(tmp_path / "stac"))
    root.save(pystac.CatalogType.SELF_CONTAINED)  # asset hrefs stay absolute: the data lives elsewhere

    counts, scenes, errors = _catalog(tmp_path / "run", str(tmp_path / "stac" / "catalog.json"))
    # the item's VV and VH assets are one scene with both polarisations, as the folder scan groups the files
    assert (counts["planned"], counts["written"], counts["rejected"]) == (1, 1, 0) and not errors
    _, folder_scenes, _ = _catalog(tmp_path / "folder", str(folder), f"catalog.sar_glob=[{stem}_*.tif]")
    _assert_same_scenes(scenes, folder_scenes, exact_ids=False)  # ids hash paths relative to another root
    (s,) = scenes.values()
    assert s["stac_asset"] == "VV+VH" and s["polarisation"] == "VV+VH"
    assert [(b["polarisation"], b["uri"]) for b in json.loads(s["bands"])] == [
        (p, str(files[p])) for p in ("VV", "VH")
    ]
    (f,) = folder_scenes.values()
    assert [b["uri"] for b in json.loads(f["bands"])] == [b["uri"] for b in json.loads(s["bands"])]
    for s in scenes.values():
        assert s["sensor"] == "Sentinel-1" and s["platform"] == "sentinel-1a" and s["instrument_mode"] == "IW"
        assert s["stac_item"] == stem and s["datetime"] == "2021-11-19T01:58:54Z"


@pytest.mark.slow
def test_static_catalog_on_s3(ray_session, s3, stac_archive, folder_scan, tmp_path):
    """The same catalog read through fsspec from s3://: same scene ids (paths relative to the catalog's
    folder)."""
    _, folder_scenes, _ = folder_scan
    fs = fsspec.filesystem("s3")
    fs.put(str(stac_archive), "sarlang/stac-archive", recursive=True)
    counts, scenes, errors = _catalog(tmp_path / "run", "s3://sarlang/stac-archive/catalog.json")
    assert sorted(scenes) == sorted(folder_scenes)
    assert all(s["sar_uri"].startswith("s3://sarlang/stac-archive/sar/") for s in scenes.values())
    assert all(s["optical_uri"].startswith("s3://sarlang/stac-archive/optical/") for s in scenes.values())
    _assert_synthetic_metadata(scenes)
    assert counts["written"] == 4 and {e["error_class"] for e in errors} == {
        "stac_bad_href",
        "stac_no_sar_asset",
    }
