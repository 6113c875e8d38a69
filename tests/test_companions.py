"""Companions found, not named: optical twins by space-time search of a STAC source, land cover from a
tiled layer (per-scene VRT), labels from a partitioned global GeoParquet layer read per scene, and the
demo with twins found by search (workflows/demo-search.yaml) giving the regex run's tiles."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pystac
import pytest
import rasterio
import shapely
from affine import Affine
from pyproj import Geod
from rasterio.enums import Resampling
from rasterio.windows import Window
from shapely.geometry import box, mapping

from sarlang_ray import align, catalog, companions, pipeline
from sarlang_ray.config import AlignSection, SynthSection, load_config
from sarlang_ray.synth import write_archive
from sarlang_ray.tiling import warp_window

REPO = Path(__file__).resolve().parents[1]
GEOD = Geod(ellps="WGS84")


def _run(run_dir: Path, archive: Path, stages: str, *overrides: str, workflow: str | None = None):
    cfg = load_config(
        workflow,
        [
            f"run.run_dir={run_dir}",
            f"catalog.archive={archive}",
            f"synth.out_dir={archive}",
            f"run.stages={stages}",
            "ray.progress=false",
            *overrides,
        ],
    )
    return cfg, pipeline.run(cfg)


DEMO = str(REPO / "workflows" / "demo.yaml")
SMALL = ["synth.scene_size_px=256", "tile.gsds_m=[5.0,10.0]"]  # the demo, small


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """The demo's archive (seed 0, as workflows/demo.yaml) with 256 px scenes."""
    out = tmp_path_factory.mktemp("companions") / "archive"
    write_archive(SynthSection(out_dir=str(out), scene_size_px=256), seed=0)
    return out


@pytest.fixture(scope="module")
def regex_run(ray_session, archive, tmp_path_factory) -> Path:
    """catalog -> tile -> align of the small demo as workflows/demo.yaml pairs it (regex rules,
    labels_glob)."""
    run_dir = tmp_path_factory.mktemp("regex") / "run"
    _run(run_dir, archive, "[catalog,tile,align]", *SMALL, workflow=DEMO)
    return run_dir


@pytest.fixture(scope="module")
def scenes(ray_session, archive, tmp_path_factory) -> list[dict]:
    """The archive's scenes as the catalog inspects them (no twins: the rule is off)."""
    run_dir = tmp_path_factory.mktemp("scenes") / "run"
    _run(run_dir, archive, "[catalog]", "catalog.optical_rule=null")
    return pipeline.read_scenes(str(run_dir))


# ---------------------------------------------------------------- optical twins


def _geodesic_area(geom) -> float:
    return abs(GEOD.geometry_area_perimeter(geom)[0])


def _item(item_id: str, geom, when: dt.datetime, cloud: float | None, href: str) -> pystac.Item:
    props = {} if cloud is None else {"eo:cloud_cover": cloud}
    item = pystac.Item(item_id, mapping(geom), list(geom.bounds), when, props)
    item.add_asset("visual", pystac.Asset(href, media_type=pystac.MediaType.COG, roles=["visual"]))
    return item


def _candidates(scene: dict, archive: Path, k: int) -> list[pystac.Item]:
    """Around one scene: a full-cover item 20 days off, a full-cover cloudy item 1 day off, a half-cover
    clear item 12 hours off, a full-cover clear item outside the window, two identical items (a tie)
    for scene 0, and one whose footprint misses the scene."""
    fp = shapely.from_wkb(scene["footprint"])
    when = companions.parse_time(scene["datetime"])
    x0, y0, x1, y1 = fp.bounds
    full = fp.buffer(0.001)
    west_half = box(x0 - 0.001, y0 - 0.001, (x0 + x1) / 2, y1 + 0.001)
    href = str(archive / "optical" / "any_optical.tif")
    day = dt.timedelta(days=1)
    items = [
        _item(f"s{k}-full-late", full, when + 20 * day, 0.0, href),
        _item(f"s{k}-full-cloudy", full, when - day, 80.0, href),
        _item(f"s{k}-half-clear", west_half, when + day / 2, 0.0, href),
        _item(f"s{k}-full-outside", full, when + 40 * day, 0.0, href),
        _item(f"s{k}-far-away", box(x0 + 5, y0 + 5, x1 + 5, y1 + 5), when, 0.0, href),
        _item(f"s{k}-no-cloud-field", full, when + 3 * day, None, href),
    ]
    if k == 0:  # two equal best items: the smaller id wins
        items += [_item("s0-tie-b", full, when, 1.0, href), _item("s0-tie-a", full, when, 1.0, href)]
    return items


def _expected_twin(
    scene: dict,
    items: list[pystac.Item],
    window: float = 30.0,
    min_overlap: float = 0.1,
    wt: float = 0.5,
    wc: float = 0.5,
) -> str | None:
    """The twin by the documented score, computed here with geodesic areas on the ellipsoid (the code
    measures in the tile CRS)."""
    fp = shapely.from_wkb(scene["footprint"])
    when = companions.parse_time(scene["datetime"])
    best = None
    for item in items:
        geom = shapely.geometry.shape(item.geometry)
        if not geom.intersects(fp):
            continue
        gap = abs((item.datetime - when).total_seconds()) / 86400
        if gap > window:
            continue
        overlap = _geodesic_area(geom.intersection(fp)) / _geodesic_area(fp)
        if overlap < min_overlap:
            continue
        cloud = item.properties.get("eo:cloud_cover", 100.0)
        score = overlap - wt * gap / window - wc * cloud / 100
        key = (-round(score, 6), item.id)
        best = min(best, key) if best else key
    return None if best is None else best[1]


def _item_collection(path: Path, items: list[pystac.Item]) -> Path:
    path.write_text(
        json.dumps(
            {"type": "FeatureCollection", "features": [i.to_dict(include_self_link=False) for i in items]}
        )
    )
    return path


def test_twin_by_search_is_the_best_scored_item_and_ties_go_to_the_smaller_id(scenes, archive, tmp_path):
    items = [i for k, s in enumerate(scenes) for i in _candidates(s, archive, k)]
    source = _item_collection(tmp_path / "optical.json", items)
    cfg = load_config(
        None, [f"catalog.archive={archive}", "catalog.optical_rule=null", f"catalog.optical={source}"]
    )
    kept, errors, counts = catalog.assign_companions(
        [dict(s) for s in scenes], cfg.catalog, str(tmp_path / "vrt")
    )
    assert errors == [] and counts["twins"] == {"search": len(scenes)}
    for k, scene in enumerate(kept):
        expected = _expected_twin(scene, _candidates(scene, archive, k))
        assert scene["optical_items"] == [expected], scene["scene_id"]
        chosen = next(i for i in items if i.id == expected)
        gap = abs((chosen.datetime - companions.parse_time(scene["datetime"])).total_seconds()) / 86400
        assert scene["optical_gap_days"] == pytest.approx(gap)
        assert scene["optical_cloud"] == chosen.properties.get("eo:cloud_cover")
        fp = shapely.from_wkb(scene["footprint"])
        overlap = _geodesic_area(shapely.geometry.shape(chosen.geometry).intersection(fp)) / _geodesic_area(
            fp
        )
        assert scene["optical_overlap"] == pytest.approx(overlap, abs=0.01)
        assert scene["optical_source"] == "search" and scene["optical_reason"] is None
    assert kept[0]["optical_items"] == ["s0-tie-a"]  # the tie, broken by item id
    assert {s["optical_items"][0].split("-", 1)[1] for s in kept[1:]} <= {
        "half-clear",
        "full-cloudy",
        "full-late",
        "no-cloud-field",
    }

    # the same items as a stac-geoparquet file give the same twins
    import stac_geoparquet.arrow

    table = stac_geoparquet.arrow.parse_stac_items_to_arrow(
        [i.to_dict(include_self_link=False) for i in items]
    )
    stac_geoparquet.arrow.to_parquet(table, str(tmp_path / "optical.parquet"))
    cfg_gpq = load_config(
        None,
        [
            f"catalog.archive={archive}",
            "catalog.optical_rule=null",
            f"catalog.optical={tmp_path / 'optical.parquet'}",
        ],
    )
    again, _, _ = catalog.assign_companions([dict(s) for s in scenes], cfg_gpq.catalog, str(tmp_path / "vrt"))
    assert [s["optical_items"] for s in again] == [s["optical_items"] for s in kept]
    assert [s["optical_score"] for s in again] == pytest.approx([s["optical_score"] for s in kept])


def test_scene_without_candidate_is_kept_with_its_reason_or_rejected(scenes, archive, tmp_path):
    # candidates for scene 0 only; scene 1 gets only an item outside the time window
    items = _candidates(scenes[0], archive, 0)
    late = companions.parse_time(scenes[1]["datetime"]) + dt.timedelta(days=45)
    items.append(
        _item("s1-too-late", shapely.from_wkb(scenes[1]["footprint"]).buffer(0.001), late, 0.0, "x.tif")
    )
    source = _item_collection(tmp_path / "optical.json", items)
    base = [f"catalog.archive={archive}", "catalog.optical_rule=null", f"catalog.optical={source}"]
    kept, errors, counts = catalog.assign_companions(
        [dict(s) for s in scenes], load_config(None, base).catalog, str(tmp_path)
    )
    assert len(kept) == len(scenes) and errors == []
    reasons = [s["optical_reason"] for s in kept]
    assert reasons[0] is None and reasons[1] == "outside_time_window"
    assert set(reasons[2:]) == {"no_candidate"}
    assert counts["no_twin"] == {"no_candidate": len(scenes) - 2, "outside_time_window": 1}
    assert all(s["optical_uri"] is None for s in kept[1:])

    kept, errors, counts = catalog.assign_companions(
        [dict(s) for s in scenes], load_config(None, base + ["catalog.no_twin=reject"]).catalog, str(tmp_path)
    )
    assert len(kept) == 1 and len(errors) == len(scenes) - 1
    assert {e["error_class"] for e in errors} == {"no_optical_twin"}
    assert all(
        "catalog.no_twin=keep" in e["message"] and e["item"] in {s["sar_uri"] for s in scenes} for e in errors
    )


def test_bad_twin_config_is_refused_naming_the_key(archive):
    """When the config is loaded (before any scan), and again by the catalog for a section built by hand."""
    from dataclasses import replace

    with pytest.raises(ValueError, match="catalog.no_twin"):
        load_config(None, [f"catalog.archive={archive}", "catalog.no_twin=drop"])
    with pytest.raises(ValueError, match="catalog.min_overlap"):
        catalog.list_scenes(
            replace(load_config(None, [f"catalog.archive={archive}"]).catalog, min_overlap=5.0)
        )


def test_scene_time_from_tags_and_file_names():
    assert (
        companions.acquired_from_file({"ACQUISITION_DATETIME": "2024-06-01T10:00:00Z"}, "x.tif")
        == "2024-06-01T10:00:00Z"
    )
    name = "OPERA_L2_RTC-S1_T137-292318-IW1_20211119T015854Z_20250830T120333Z_S1A_30_v1.0_VV.tif"
    # the first token: the acquisition
    assert companions.acquired_from_file({}, name) == "2021-11-19T01:58:54Z"
    assert companions.acquired_from_file({}, "scene.tif") is None


# ---------------------------------------------------------------- land cover in tiles


def _split_in_four(raster: Path, out: Path, cut: tuple[int, int]) -> list[Path]:
    """Four GeoTIFF tiles of a raster, cut at pixel (col, row) off-centre."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with rasterio.open(raster) as src:
        c, r = cut
        for name, (col0, row0, w, h) in {
            "nw": (0, 0, c, r),
            "ne": (c, 0, src.width - c, r),
            "sw": (0, r, c, src.height - r),
            "se": (c, r, src.width - c, src.height - r),
        }.items():
            window = Window(col0, row0, w, h)
            profile = {
                **src.profile,
                "width": w,
                "height": h,
                "transform": src.window_transform(window),
                "tiled": False,
                "compress": "deflate",
            }
            profile.pop("blockxsize", None), profile.pop("blockysize", None)
            path = out / f"lc_{name}.tif"
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(src.read(1, window=window), 1)
            paths.append(path)
    return paths


def _tile_grid(scene: dict, gsd: float, size: int = 64) -> list[Affine]:
    t = Affine(*scene["transform"])
    left, top = t.c, t.f
    right, bottom = left + t.a * scene["width"], top + t.e * scene["height"]
    step = gsd * size
    return [
        Affine(gsd, 0, x, 0, -gsd, y)
        for x in np.arange(left, right - step / 2, step)
        for y in np.arange(top, bottom + step / 2, -step)
    ]


@pytest.mark.parametrize("as_stac", [False, True])
def test_landcover_split_in_four_tiles_gives_the_unsplit_fractions(scenes, archive, tmp_path, as_stac):
    scene = next(s for s in scenes if "rotterdam_5m" in s["scene_id"])
    raster = archive / "landcover" / "rotterdam_5m_00_landcover.tif"
    tiles = _split_in_four(raster, tmp_path / "tiles", (97, 141))
    layer = str(tmp_path / "tiles")
    if as_stac:
        collection = pystac.Collection(
            "lc",
            "land-cover tiles",
            pystac.Extent(
                pystac.SpatialExtent([[-180, -90, 180, 90]]), pystac.TemporalExtent([[None, None]])
            ),
        )
        for p in tiles:
            with rasterio.open(p) as src:
                fp = catalog.footprint_4326(src)
            item = pystac.Item(p.stem, mapping(fp), list(fp.bounds), dt.datetime(2021, 1, 1), {})
            item.add_asset("map", pystac.Asset(str(p), media_type=pystac.MediaType.COG, roles=["data"]))
            collection.add_item(item)
        collection.normalize_hrefs(str(tmp_path / "stac"))
        collection.save(pystac.CatalogType.ABSOLUTE_PUBLISHED)
        layer = str(tmp_path / "stac" / "collection.json")
    cfg = load_config(
        None, [f"catalog.archive={archive}", "catalog.landcover_rule=null", f"catalog.landcover={layer}"]
    )
    kept, _, counts = catalog.assign_companions(
        [dict(scene, landcover_uri=None)], cfg.catalog, str(tmp_path / "vrt")
    )
    assert kept[0]["landcover_tiles"] == 4 and kept[0]["landcover_uri"].endswith(".vrt")
    assert counts["landcover"] == {"tiles": 1}
    classes = AlignSection().landcover_classes
    compared = 0
    with rasterio.open(kept[0]["landcover_uri"]) as vrt, rasterio.open(raster) as whole:
        assert vrt.bounds == pytest.approx(whole.bounds) and vrt.shape == whole.shape
        for gsd in (2.5, 5.0, 7.3):
            for t in _tile_grid(scene, gsd):
                a = warp_window(vrt, 1, t, scene["tile_crs"], 64, Resampling.nearest)
                b = warp_window(whole, 1, t, scene["tile_crs"], 64, Resampling.nearest)
                assert (a is None) == (b is None)
                if a is not None:
                    assert align.landcover_fractions(a, classes) == align.landcover_fractions(b, classes)
                    compared += 1
    assert compared > 60


def test_worldcover_preset_and_unknown_preset():
    assert companions.landcover_classes({1: "x"}, "worldcover")[80] == "water"
    assert sorted(companions.landcover_classes({}, "worldcover")) == [
        10,
        20,
        30,
        40,
        50,
        60,
        70,
        80,
        90,
        95,
        100,
    ]
    with pytest.raises(ValueError, match="align.landcover_preset"):
        companions.landcover_classes({}, "corine")


# ---------------------------------------------------------------- global label layers


@pytest.fixture(scope="module")
def label_layers(archive, tmp_path_factory) -> dict:
    """The archive's labels as one GeoParquet file (small row groups) and as a hive-partitioned layer of
    many files (city=<name>/cell=<i>_<j>/part.parquet on a 0.005 degree grid), both with a covering bbox
    and an OSM-style `building`/`kind` attribute instead of a class column; plus far-away decoy files."""
    root = tmp_path_factory.mktemp("layers")
    gdf = pd.concat(
        [gpd.read_parquet(p) for p in sorted((archive / "labels").glob("*.parquet"))], ignore_index=True
    )
    gdf = gpd.GeoDataFrame(gdf, crs=4326)
    gdf["building"] = np.where(gdf["class"] == "building", "yes", None)
    gdf["kind"] = gdf["class"]
    gdf = gdf.drop(columns=["class"])
    single = root / "single.parquet"
    gdf.to_parquet(single, write_covering_bbox=True, row_group_size=200)
    parted = root / "parted"
    c = gdf.geometry.centroid
    cells = (
        np.floor(c.x / 0.005).astype(int).astype(str) + "_" + np.floor(c.y / 0.005).astype(int).astype(str)
    )
    for (city, cell), part in gdf.groupby([gdf["city"], cells]):
        folder = parted / f"city={city}" / f"cell={cell}"
        folder.mkdir(parents=True)
        part.drop(columns=["city"]).to_parquet(
            folder / "part.parquet", write_covering_bbox=True, row_group_size=50
        )
    decoy = gpd.GeoDataFrame(
        {"kind": ["building"] * 3, "building": ["yes"] * 3, "object_id": ["d1", "d2", "d3"]},
        geometry=[box(-70 + i, -30, -69.99 + i, -29.99) for i in range(3)],
        crs=4326,
    )
    (parted / "city=nowhere" / "cell=0_0").mkdir(parents=True)
    decoy.to_parquet(parted / "city=nowhere" / "cell=0_0" / "part.parquet", write_covering_bbox=True)
    return {"gdf": gdf, "single": str(single), "parted": str(parted)}


CLASS_MAP = {
    "building": "building",
    "kind=ship": "ship",
    "kind=road": "road",
    "kind=harbour": "harbour",
    "kind=storage tank": "storage tank",
    "kind=aircraft": "aircraft",
    "kind=car": "car",
    "kind=bridge": "bridge",
}


def _slice(layer_uri: str, scene: dict, out: Path) -> tuple[gpd.GeoDataFrame, dict]:
    layer = companions.LabelLayer.open(layer_uri)
    slicer = align.LabelSlicer(layer, CLASS_MAP, "object_id", AlignSection(), str(out))
    manifest = slicer(scene)
    return gpd.read_parquet(out / "labels" / f"{scene['scene_id']}.parquet"), manifest


def test_partitioned_layer_reads_only_the_files_a_scene_needs_and_equals_the_single_file(
    scenes, label_layers, tmp_path
):
    gdf = label_layers["gdf"]
    for scene in scenes:
        fp = shapely.from_wkb(scene["footprint"])
        one, m1 = _slice(label_layers["single"], scene, tmp_path / "one")
        many, m2 = _slice(label_layers["parted"], scene, tmp_path / "many")
        cols = ["label_id", "class"]
        a = one.sort_values("label_id").reset_index(drop=True)
        b = many.sort_values("label_id").reset_index(drop=True)
        assert a[cols].equals(b[cols]) and a.geometry.equals(b.geometry)
        assert (m1["planned"], m1["written"], m1["rejected"]) == (
            m2["planned"],
            m2["written"],
            m2["rejected"],
        )
        # expected features, computed from the whole frame: those whose bbox meets the footprint's bounds
        b0 = gdf.geometry.bounds
        x0, y0, x1, y1 = fp.bounds
        meets = (b0.minx <= x1) & (b0.maxx >= x0) & (b0.miny <= y1) & (b0.maxy >= y0)
        assert sorted(a["label_id"]) == sorted(gdf.loc[meets, "object_id"])
        expected_class = gdf.loc[meets].set_index("object_id")["kind"]
        assert all(expected_class[i] == c for i, c in zip(a["label_id"], a["class"]))
        # only the files whose features' extent meets the footprint were opened
        files = sorted(Path(label_layers["parted"]).glob("*/*/part.parquet"))
        needed = []
        for f in files:
            fb = gpd.read_parquet(f).total_bounds
            if not (fb[0] > x1 or fb[2] < x0 or fb[1] > y1 or fb[3] < y0):
                needed.append(str(f))
        assert sorted(m2["files"]) == sorted(needed) and 0 < len(needed) < len(files)
        assert m1["files"] == [label_layers["single"]]


def test_files_of_a_layer_with_different_columns_are_read_with_all_of_them(scenes, tmp_path):
    """A region file without the `kind` attribute first, then one with it: kind-mapped features are kept."""
    fp = shapely.from_wkb(scenes[0]["footprint"])
    cx, cy = fp.centroid.x, fp.centroid.y
    (tmp_path / "layer" / "region=a").mkdir(parents=True)
    (tmp_path / "layer" / "region=b").mkdir(parents=True)
    gpd.GeoDataFrame(
        {"building": ["yes"], "object_id": ["a1"]}, geometry=[box(cx, cy, cx + 1e-4, cy + 1e-4)], crs=4326
    ).to_parquet(tmp_path / "layer" / "region=a" / "part.parquet", write_covering_bbox=True)
    gpd.GeoDataFrame(
        {"building": [None], "kind": ["ship"], "object_id": ["b1"]},
        geometry=[box(cx + 2e-4, cy, cx + 3e-4, cy + 1e-4)],
        crs=4326,
    ).to_parquet(tmp_path / "layer" / "region=b" / "part.parquet", write_covering_bbox=True)
    labels, m = _slice(str(tmp_path / "layer"), scenes[0], tmp_path / "out")
    assert sorted(zip(labels["label_id"], labels["class"])) == [("a1", "building"), ("b1", "ship")]
    assert m["unmapped"] == 0 and len(m["files"]) == 2


def test_layer_without_geo_metadata_is_refused(tmp_path):
    pq.write_table(
        pd.DataFrame({"a": [1]}).pipe(lambda d: __import__("pyarrow").Table.from_pandas(d)),
        tmp_path / "plain.parquet",
    )
    with pytest.raises(ValueError, match="no GeoParquet 'geo' metadata"):
        companions.LabelLayer.open(str(tmp_path / "plain.parquet"))
    with pytest.raises(FileNotFoundError, match="catalog.labels"):
        companions.LabelLayer.open(str(tmp_path / "missing"))


def test_bad_features_of_a_global_layer_go_to_the_errors_table(scenes, tmp_path):
    scene = scenes[0]
    fp = shapely.from_wkb(scene["footprint"])
    cx, cy = fp.centroid.x, fp.centroid.y
    bowtie = shapely.Polygon([(cx, cy), (cx + 1e-4, cy + 1e-4), (cx + 1e-4, cy), (cx, cy + 1e-4)])
    gdf = gpd.GeoDataFrame(
        {"building": ["yes", "yes", None, "yes"], "id": ["ok", "bowtie", "unmapped", "line"]},
        geometry=[
            box(cx, cy, cx + 1e-4, cy + 1e-4),
            bowtie,
            box(cx, cy, cx + 2e-4, cy + 2e-4),
            shapely.LineString([(cx, cy), (cx + 1e-4, cy)]),
        ],
        crs=4326,
    )
    gdf.to_parquet(tmp_path / "layer.parquet", write_covering_bbox=True)
    layer = companions.LabelLayer.open(str(tmp_path / "layer.parquet"))
    m = align.LabelSlicer(layer, {"building": "building"}, "id", AlignSection(), str(tmp_path / "out"))(scene)
    assert (m["read"], m["unmapped"], m["planned"], m["written"], m["rejected"]) == (4, 1, 3, 1, 2)
    errors = pq.read_table(tmp_path / "out" / "label_errors" / f"{scene['scene_id']}.parquet").to_pylist()
    assert sorted((e["item"].rsplit("#", 1)[1], e["error_class"]) for e in errors) == [
        ("bowtie", "invalid_geometry"),
        ("line", "not_polygon"),
    ]


@pytest.mark.slow
def test_align_with_partitioned_layer_equals_align_with_the_demo_labels(
    regex_run, archive, label_layers, tmp_path
):
    """catalog -> tile -> align with the archive's labels (labels_glob), then with the partitioned layer
    (catalog.labels): every tile's objects are the same (ids are the layer's object_id, the demo's are
    <file>#feature=<row>: compared through the demo labels' object_id)."""
    _, summary = _run(
        tmp_path / "layer",
        archive,
        "[catalog,tile,align]",
        *SMALL,
        f"catalog.labels={label_layers['parted']}",
        "catalog.labels_id_column=object_id",
        "catalog.labels_class_map=" + json.dumps(CLASS_MAP),
        workflow=DEMO,
    )
    counts = summary["stages"]["align"]["labels"]
    assert counts["files_read"] < counts["layer_files"] and counts["rejected"] == 0
    demo_ids = {}
    for p in sorted((archive / "labels").glob("*.parquet")):
        for i, oid in enumerate(gpd.read_parquet(p)["object_id"]):
            demo_ids[f"labels/{p.name}#feature={i}"] = oid
    t1 = {t["tile_id"]: t for t in pipeline.read_tiles(str(regex_run)).to_pylist()}
    t2 = {t["tile_id"]: t for t in pipeline.read_tiles(str(tmp_path / "layer")).to_pylist()}
    assert sorted(t1) == sorted(t2) and len(t1) > 0
    n_objects = 0
    for tid, a in t1.items():
        b = t2[tid]
        objs_a = sorted((demo_ids[o["label_id"]], o["class"], tuple(o["bbox_xyxy"])) for o in a["objects"])
        objs_b = sorted((o["label_id"], o["class"], tuple(o["bbox_xyxy"])) for o in b["objects"])
        assert objs_a == objs_b, tid
        n_objects += len(objs_a)
        assert a["landcover"] == b["landcover"] and a["optical_png"] == b["optical_png"]
    assert n_objects > 50


# ---------------------------------------------------------------- real data


def test_real_sen1floods11_water_mask_as_landcover_and_as_label_layer(ray_session, real_sar, tmp_path):
    """The Sen1Floods11 chip (real Sentinel-1, EPSG:4326) with its hand-labelled water mask given once
    as a one-file land-cover layer and once, polygonised, as a one-file label layer: per tile, the water
    fraction of the land cover equals the water objects' share of the tile."""
    from rasterio.features import shapes

    src_dir = real_sar / "sen1floods11_spain_7370579"
    mask = src_dir / "Spain_7370579_LabelHand.tif"
    with rasterio.open(mask) as src:
        values = src.read(1)
        polys = [
            shapely.geometry.shape(g)
            for g, v in shapes(values.astype("int16"), transform=src.transform)
            if v == 1
        ]
    layer = tmp_path / "water.parquet"
    gpd.GeoDataFrame({"water": ["yes"] * len(polys)}, geometry=polys, crs=4326).to_parquet(
        layer, write_covering_bbox=True
    )
    _, summary = _run(
        tmp_path / "run",
        src_dir,
        "[catalog,tile,align]",
        "catalog.sar_glob=[*_S1Hand.tif]",
        "catalog.optical_rule=null",
        "catalog.landcover_rule=null",
        f"catalog.landcover={mask}",
        f"catalog.labels={layer}",
        "catalog.labels_class_map={water: water}",
        "catalog.units=db",
        "align.landcover_classes={0: land, 1: water}",
        "tile.gsds_m=[20.0]",
        "tile.tile_size=64",
        "align.min_visible_fraction=0.0",
    )
    assert summary["stages"]["align"]["labels"]["written"] == len(polys) > 10
    tiles = pipeline.read_tiles(str(tmp_path / "run")).to_pylist()
    assert len(tiles) >= 4
    checked = 0
    for t in tiles:
        lc = dict(t["landcover"] or [])
        if t["landcover_valid_fraction"] < 0.99:
            continue
        water_px = (
            shapely.union_all([shapely.from_wkb(o["polygon"]) for o in t["objects"]]).area
            if t["objects"]
            else 0.0
        )
        assert lc.get("water", 0.0) == pytest.approx(water_px / (64 * 64), abs=0.03), t["tile_id"]
        checked += 1
    assert checked >= 4


# ---------------------------------------------------------------- demo-search


@pytest.mark.slow
def test_demo_search_gives_the_regex_demo_tiles_and_records_twins(regex_run, tmp_path):
    """workflows/demo-search.yaml (its own archive, synthesised from the same seed) against the regex demo."""
    search_dir = tmp_path / "search"
    _, summary = _run(
        search_dir,
        search_dir / "archive",
        "[synth,catalog,tile,align,annotate,export]",
        *SMALL,
        workflow=str(REPO / "workflows" / "demo-search.yaml"),
    )
    assert summary["stages"]["catalog"]["companions"]["twins"] == {"search": 4}
    scenes = pipeline.read_scenes(str(search_dir))
    for s in scenes:
        stem = s["sar_uri"].rsplit("/", 1)[1][: -len("_sar.tif")]
        assert s["optical_items"] == [f"{stem}_optical"] and s["optical_uri"].endswith(
            f"/optical/{stem}_optical.tif"
        )
        assert s["optical_gap_days"] is not None and s["optical_overlap"] == pytest.approx(1.0, abs=1e-6)
        assert s["optical_cloud"] is not None and s["optical_score"] is not None
    a = pipeline.read_tiles(str(regex_run)).sort_by("tile_id")
    b = pipeline.read_tiles(str(search_dir)).sort_by("tile_id")
    assert a.num_rows == b.num_rows > 0 and a.equals(b)
    assert sum(p is not None for p in b.column("optical_png").to_pylist()) > 0
    card = (search_dir / "export" / "dataset_card.md").read_text()
    assert "## Optical twins" in card and "- search: 4 scene(s)" in card and "plots/time_gap.png" in card
    assert (search_dir / "export" / "plots" / "time_gap.png").stat().st_size > 1000
    assert not math.isnan(max(s["optical_gap_days"] for s in scenes))


def test_layer_keys_naming_missing_columns_are_refused(label_layers):
    layer = companions.LabelLayer.open(label_layers["parted"])
    assert {"city", "cell", "building", "kind", "object_id"} <= layer.columns()  # hive keys included
    layer.check(CLASS_MAP, "class", "object_id")
    with pytest.raises(ValueError, match="catalog.labels_id_column"):
        layer.check(CLASS_MAP, "class", "osm_id")
    with pytest.raises(ValueError, match="align.class_column"):
        layer.check(None, "class", None)
