"""Every catalog source streams: a glob over a folder or an s3:// bucket and a STAC file (ItemCollection,
static catalog) are listed in pages (catalog.listing_pages) that flow into the same inspection tasks as a
search snapshot. Expected values come from the whole-listing functions (catalog.list_scenes, stac.read_items)
and the per-scene inspector run in the test process, not from the streaming code."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pystac
import pytest

from sarlang_ray import catalog, pipeline, stac, tables
from sarlang_ray.config import load_config

OPERA = "opera_rtc_s1_t137_crops"


def _rows_key(rows: list[dict]) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in rows)


def _streamed(cfg, page_rows: int = 64) -> tuple[list[dict], list[dict], list[int]]:
    rows, errors, sizes = [], [], []
    for page, errs in catalog.listing_pages(cfg, None, page_rows):
        rows += page
        errors += errs
        sizes.append(len(page))
    return rows, errors, sizes


@pytest.fixture
def tricky_archive(real_sar, tmp_path) -> Path:
    """OPERA VV/VH pairs in two folders, plus names that sort between a group's members (``x_VHa.tif``, a
    folder ``x_VH/``), OPERA masks with and without their pair, a polarisation named twice, a SAFE folder and
    a file no pattern matches."""
    src = sorted((real_sar / OPERA).glob("*/*_VV.tif"))
    root = tmp_path / "archive"
    for i, vv in enumerate(src[:6]):
        folder = root / "sar" / ("a" if i < 3 else "b/deep")
        folder.mkdir(parents=True, exist_ok=True)
        for pol in ("VV", "VH"):
            (folder / f"burst{i}_{pol}.tif").symlink_to(vv.with_name(vv.name.replace("_VV.", f"_{pol}.")))
    a = root / "sar" / "a"
    shutil.copy(src[0], a / "burst0_mask.tif")  # a mask with its pair
    shutil.copy(src[0], a / "lonely_mask.tif")  # a mask of nothing: a scene of its own
    (a / "burst1_VHa.tif").symlink_to(src[1])  # sorts between burst1_VH and burst1_VV
    (a / "burst1_VH").mkdir()
    (a / "burst1_VH" / "inner_VV.tif").symlink_to(src[2])  # a folder between the members
    (root / "sar" / "b" / "deep" / "burst3_VV_copy").mkdir()
    (root / "sar" / "b" / "twice_VV.tif").symlink_to(src[3])
    (root / "sar" / "b" / "twice_VV.tiff").symlink_to(src[4])  # same key, another suffix: alone
    safe_dir = root / "sar" / "S1A_IW_GRDH_1SDV_20210119T031653_20210119T031718_036201_043ED0_8255.SAFE"
    (safe_dir / "measurement").mkdir(parents=True)
    (safe_dir / "manifest.safe").write_text("<xml/>")
    (safe_dir / "measurement" / "s1a-iw-grd-vv.tif").symlink_to(src[5])  # inside a product: never a scene
    (root / "sar" / "notes.txt").write_text("not a raster")
    return root


@pytest.mark.parametrize(
    "globs",
    [
        ["sar/**/*.tif"],
        ["sar/**/*.tif", "sar/**/*.tiff", "**/manifest.safe"],
        ["sar/a/*.tif", "sar/b/**/*.tif"],
    ],
)
def test_a_glob_streams_the_rows_of_the_whole_listing(tricky_archive, globs):
    """The streamed glob lists what list_scenes lists (groups, masks, products, loners), in pages of the sizes
    the stream promises (4, 8, 16... at most 64), for several pattern sets."""
    cfg = load_config(
        None, [f"catalog.archive={tricky_archive}", f"catalog.sar_glob={json.dumps(globs)}"]
    ).catalog
    whole, whole_errors = catalog.list_scenes(cfg)
    rows, errors, sizes = _streamed(cfg, page_rows=8)
    assert _rows_key(rows) == _rows_key(whole) and errors == whole_errors == []
    assert any(r["bands"] and len(r["bands"]) == 2 for r in rows)  # polarisation pairs were grouped
    promised = [4] + [8] * len(sizes)  # full pages of 4, then 8 (page_rows); the last one holds the rest
    assert sizes[:-1] == promised[: len(sizes) - 1] and 0 < sizes[-1] <= promised[len(sizes) - 1]


def test_a_glob_without_polarisation_groups_and_a_glob_that_finds_nothing(tricky_archive):
    cfg = load_config(
        None,
        [
            f"catalog.archive={tricky_archive}",
            "catalog.group_polarisations=false",
            'catalog.sar_glob=["sar/**/*.tif"]',
        ],
    ).catalog
    assert _rows_key(_streamed(cfg)[0]) == _rows_key(catalog.list_scenes(cfg)[0])
    cfg = load_config(
        None, [f"catalog.archive={tricky_archive}", 'catalog.sar_glob=["nothing/**/*.tif"]']
    ).catalog
    with pytest.raises(FileNotFoundError, match="no SAR scenes match"):
        _streamed(cfg)


def test_stac_files_stream_the_items_of_the_whole_read(real_sar, tmp_path):
    """An ItemCollection parsed item by item and a static catalog walked link by link (a broken link included)
    give the items and error rows stac.read_items gives, and the same inspection rows."""
    vv = sorted((real_sar / OPERA).glob("*/*_VV.tif"))[:5]
    items = [
        pystac.Item(
            f"s1-{i}",
            {"type": "Point", "coordinates": [i, 40]},
            [i, 40, i, 40],
            dt.datetime(2024, 1, i + 1, tzinfo=dt.timezone.utc),
            {"platform": "sentinel-1a", "sar:polarizations": ["VV"]},
        )
        for i in range(5)
    ]
    for item, path in zip(items, vv):
        item.add_asset(
            "vv", pystac.Asset(str(path), media_type="image/tiff; application=geotiff", roles=["data"])
        )
    fc = tmp_path / "items.json"
    fc.write_text(json.dumps(pystac.ItemCollection(items).to_dict()))
    root = pystac.Catalog("root", "streamed")
    child = pystac.Catalog("child", "a child")
    root.add_child(child)
    for i, item in enumerate(items):
        (root if i % 2 else child).add_item(item.clone())
    root.normalize_hrefs(str(tmp_path / "static"))
    root.save(pystac.CatalogType.SELF_CONTAINED)
    (tmp_path / "static" / "child" / "s1-0" / "s1-0.json").unlink()  # a broken item link: one error row
    for archive in (fc, tmp_path / "static" / "catalog.json"):
        whole_items, whole_errors = stac.read_items(str(archive), "catalog")
        streamed = list(stac.iter_items(str(archive), "catalog"))
        assert [(i.id, b) for i, b in whole_items] == [
            (i.id, b) for i, b in (e for e in streamed if not isinstance(e, dict))
        ]
        assert [e["error_class"] for e in whole_errors] == [
            e["error_class"] for e in streamed if isinstance(e, dict)
        ]
        cfg = load_config(None, [f"catalog.archive={archive}"]).catalog
        rows, errors, _ = _streamed(cfg)
        whole, werr = catalog.list_scenes(cfg)
        assert _rows_key(rows) == _rows_key(whole) and len(rows) == (5 if archive == fc else 4)
        assert [e["item"] for e in errors] == [e["item"] for e in werr] and len(errors) == (archive != fc)


def _expected_tables(cfg) -> tuple[list[str], list[tuple[str, str]]]:
    """The whole-listing result: every row of list_scenes inspected in this process (catalog.SceneInspector),
    as sorted scene ids and sorted (file name, error class) pairs."""
    rows, errors = catalog.list_scenes(cfg)
    inspector = catalog.SceneInspector(cfg)
    results = [inspector(r) for r in rows]
    scenes = sorted(r["scene"]["scene_id"] for r in results if r["scene"])
    errors = errors + [r["error"] for r in results if r["error"]]
    return scenes, sorted((e["item"].rsplit("/", 1)[-1], e["error_class"]) for e in errors)


def test_the_streamed_glob_equals_the_whole_listing_locally_and_on_s3(ray_session, s3, real_sar, tmp_path):
    """A folder of OPERA pairs, single files and a corrupt file, catalogued by the streaming stage from the
    local folder and from its copy on SeaweedFS: both tables hold what inspecting the whole listing gives (the
    same scene ids, the corrupt file in errors), and planned = written + rejected."""
    import fsspec

    local = tmp_path / "archive"
    (local / "sar" / "x").mkdir(parents=True)
    pairs = sorted((real_sar / OPERA).glob("2021-11-19/*_VV.tif"))[:5]
    for i, vv in enumerate(pairs):
        shutil.copy(vv, local / "sar" / "x" / vv.name)
        if i % 2 == 0:
            vh = vv.with_name(vv.name.replace("_VV.", "_VH."))
            shutil.copy(vh, local / "sar" / "x" / vh.name)
    # a TIFF header and nothing else
    (local / "sar" / "corrupt_VV.tif").write_bytes(b"II*\x00" + b"\x00" * 200)
    prefix = f"sarlang/stream-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("s3")
    fs.put(str(local / "sar"), f"{prefix}/sar", recursive=True)

    for archive, run in ((str(local), tmp_path / "run_local"), (f"s3://{prefix}", tmp_path / "run_s3")):
        cfg = load_config(
            None,
            [
                f"run.run_dir={run}",
                f"catalog.archive={archive}",
                "run.stages=[catalog]",
                "ray.progress=false",
            ],
        )
        expected_scenes, expected_errors = _expected_tables(cfg.catalog)
        counts = pipeline.run(cfg)["stages"]["catalog"]
        scenes = pq.read_table(tables.scenes_uri(str(run))).column("scene_id").to_pylist()
        errors = tables.read_errors(str(run), stage="catalog")
        assert sorted(scenes) == expected_scenes and len(expected_scenes) == 5
        names = [u.rsplit("/", 1)[-1] for u in errors.column("item").to_pylist()]
        assert sorted(zip(names, errors.column("error_class").to_pylist())) == expected_errors
        assert names == ["corrupt_VV.tif"]
        assert counts["planned"] == counts["written"] + counts["rejected"] == 6 and counts["pages"] >= 2
        assert not (run / "catalog" / "parts").exists()


def test_twin_candidates_pruned_per_page_choose_the_twins_of_the_whole_source(tmp_path):
    """A page's TwinFinder keeps only the optical items its scenes can use (footprint on the page's extent,
    time within the window of one of its scenes): every scene gets the twin, score and reason the finder over
    the whole source gives, including ``outside_time_window`` for scenes whose only candidates were pruned by
    time."""
    import random

    import shapely
    from shapely.geometry import box, mapping

    from sarlang_ray import companions

    rng = random.Random(7)
    t0 = dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)
    scenes = []
    for k in range(48):
        x, y = (k % 8) * 2.0, 40 + (k // 8) * 2.0
        scenes.append(
            {
                "scene_id": f"s{k}",
                "footprint": shapely.to_wkb(box(x, y, x + 1, y + 1)),
                "datetime": (t0 + dt.timedelta(days=10 * k)).isoformat(),
                "tile_crs": "EPSG:32631",
                "optical_uri": None,
            }
        )
    scenes[-1]["footprint"] = shapely.to_wkb(box(100, 0, 101, 1))  # far from every item: no_candidate
    feats = []
    for j in range(600):
        x, y = rng.uniform(-2, 17), rng.uniform(38, 53)
        when = t0 + dt.timedelta(days=rng.uniform(-60, 540))
        props = {"datetime": None if j % 50 == 0 else when.isoformat(), "eo:cloud_cover": rng.uniform(0, 60)}
        if props["datetime"] is None:
            props |= {"start_datetime": when.isoformat(), "end_datetime": when.isoformat()}
        geom = box(x, y, x + rng.uniform(0.3, 2.5), y + rng.uniform(0.3, 2.5))
        feats.append(
            {
                "type": "Feature",
                "stac_version": "1.0.0",
                "id": f"opt{j:03d}",
                "geometry": mapping(geom),
                "bbox": list(geom.bounds),
                "properties": props,
                "links": [],
                "assets": {
                    "visual": {
                        "href": f"opt{j:03d}.tif",
                        "type": "image/tiff; application=geotiff",
                        "roles": ["visual"],
                    }
                },
            }
        )
    source = tmp_path / "optical.json"
    source.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    cfg = load_config(
        None,
        [
            f"catalog.archive={tmp_path}",
            "catalog.optical_rule=null",
            f"catalog.optical={source}",
            "catalog.time_window_days=20",
        ],
    ).catalog
    whole = companions.TwinFinder(cfg, str(source))

    def pick(finder, s):
        twin, reason = finder.choose(
            shapely.from_wkb(s["footprint"]), companions.parse_time(s["datetime"]), s["tile_crs"]
        )
        return (twin.item.item_id, twin.item.uri, round(twin.score, 9)) if twin else None, reason

    reasons = set()
    for start in range(0, len(scenes), 8):
        page = scenes[start : start + 8]
        pruned = companions.TwinFinder(cfg, str(source), scenes=page)
        assert len(pruned.items) < len(whole.items) and pruned.usable == whole.usable == 600
        for s in page:
            expected = pick(whole, s)
            assert pick(pruned, s) == expected, s["scene_id"]
            reasons.add(expected[1])
    assert {None, "outside_time_window", "no_candidate"} <= reasons
