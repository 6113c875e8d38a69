"""SAR scenes by search (catalog.search): a real STAC API (rustac's server, paged) and stac-geoparquet
snapshots give the scenes an independent filter (shapely, plain python over the same items) selects; the
search is frozen into the run folder and a rerun does not ask again."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import geopandas as gpd
import pyarrow.parquet as pq
import pytest
import shapely
from shapely.geometry import box, mapping, shape
from stac_server import RustacServer  # tests/stac_server.py

from sarlang_ray import pipeline, search, tables
from sarlang_ray.config import SearchSection, load_config

T0 = dt.datetime(2024, 1, 1, 6, 0, tzinfo=dt.timezone.utc)
N_ITEMS = 45  # more than four pages of 10


def _pairs(real_sar: Path) -> list[tuple[Path, Path]]:
    """The OPERA RTC-S1 bursts' VV/VH files (real rasters, 100 x 100 px crops)."""
    vv = sorted((real_sar / "opera_rtc_s1_t137_crops").glob("*/*_VV.tif"))
    return [(p, p.with_name(p.name.replace("_VV.tif", "_VH.tif"))) for p in vv]


def _items(real_sar: Path, folder: Path) -> list[dict]:
    """Items over a 9 x 5 degree grid, one a day, every other one dual-polarisation (VV + VH assets), the rest
    VV only; each item's rasters are links of its own to real OPERA files (so no two items name one file)."""
    pairs = _pairs(real_sar)
    folder.mkdir()
    out = []
    for i in range(N_ITEMS):
        vv, vh = pairs[i % len(pairs)]
        dual = i % 2 == 0
        assets = {}
        for pol, src in (("vv", vv), ("vh", vh))[: 2 if dual else 1]:
            link = folder / f"scene{i:03d}_{pol.upper()}.tif"
            link.symlink_to(src)
            assets[pol] = {
                "href": str(link),
                "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                "roles": ["data"],
            }
        x, y = i % 9, i // 9
        geom = box(x, 40 + y, x + 0.8, 40.8 + y)
        out.append(
            {
                "type": "Feature",
                "stac_version": "1.0.0",
                "id": f"s1-{i:03d}",
                "collection": "opera-rtc",
                "geometry": mapping(geom),
                "bbox": list(geom.bounds),
                "links": [],
                "assets": assets,
                "stac_extensions": [],
                "properties": {
                    "datetime": (T0 + dt.timedelta(days=i)).isoformat().replace("+00:00", "Z"),
                    "platform": "sentinel-1a",
                    "sar:instrument_mode": "IW",
                    "sar:polarizations": ["VV", "VH"] if dual else ["VV"],
                    "sat:orbit_state": "ascending" if i % 3 else "descending",
                },
            }
        )
    return out


def _expected(items: list[dict], aoi, start: dt.datetime, end: dt.datetime, pol: str) -> set[str]:
    """The independent filter: shapely intersects, datetime within [start, end], polarisation listed."""
    keep = set()
    for it in items:
        when = dt.datetime.fromisoformat(it["properties"]["datetime"].replace("Z", "+00:00"))
        if (
            shape(it["geometry"]).intersects(aoi)
            and start <= when <= end
            and pol in it["properties"]["sar:polarizations"]
        ):
            keep.add(it["id"])
    return keep


@pytest.fixture(scope="module")
def stac_api(real_sar, tmp_path_factory):
    root = tmp_path_factory.mktemp("stac_api")
    items = _items(real_sar, root / "rasters")
    path = root / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    server = RustacServer(path, root / "rustac.log").start()
    yield server, items
    server.stop()


def _search_overrides(run_dir: Path, archive: Path, url: str, when: str) -> list[str]:
    return [
        f"run.run_dir={run_dir}",
        f"catalog.archive={archive}",
        "run.stages=[catalog]",
        f"catalog.search.source={url}",
        "catalog.search.collections=[opera-rtc]",
        "catalog.search.bbox=[2.5,40.5,6.2,43.1]",
        f"catalog.search.datetime={when}",
        "catalog.search.filter={sar:polarizations: [VH]}",
        "catalog.search.page_size=10",
    ]


def test_stac_api_search_is_frozen_and_matches_an_independent_filter(ray_session, stac_api, tmp_path):
    server, items = stac_api
    when = "2024-01-03T00:00:00Z/2024-02-05T00:00:00Z"
    expected = _expected(
        items,
        box(2.5, 40.5, 6.2, 43.1),
        dt.datetime(2024, 1, 3, tzinfo=dt.timezone.utc),
        dt.datetime(2024, 2, 5, tzinfo=dt.timezone.utc),
        "VH",
    )
    assert 5 <= len(expected) < N_ITEMS / 2  # the filters bite, and something is left
    run_dir = tmp_path / "run"
    overrides = _search_overrides(run_dir, tmp_path, server.url, when)
    before = len(server.requests)
    pipeline.run(load_config(None, overrides))
    asked = server.requests[before:]
    search_pages = [r for r in asked if "/search" in r]
    assert len(search_pages) >= 2, asked  # the AOI + datetime set spans more than one page of 10

    scenes = pq.read_table(tables.scenes_uri(str(run_dir))).to_pylist()
    assert {s["stac_item"] for s in scenes} == expected
    # each item's VV and VH assets grouped as one scene
    assert all(s["polarisations"] == "VV+VH" for s in scenes)
    # frozen: the snapshot holds exactly the selection, as stac-geoparquet
    snapshot = search.snapshot_uri(load_config(None, overrides).catalog.search, str(run_dir))
    frozen = list(search.read_items(snapshot))
    assert {d["id"] for d in frozen} == expected

    # a rerun, and a rerun that re-catalogs (a non-search key changed): no request reaches the API
    n = len(server.requests)
    pipeline.run(load_config(None, overrides))
    summary = pipeline.run(load_config(None, [*overrides, "catalog.min_valid_fraction=0.002"]))
    assert server.requests[n:] == []
    assert summary["stages"]["catalog"]["search"]["queried"] is False
    assert {s["stac_item"] for s in pq.read_table(tables.scenes_uri(str(run_dir))).to_pylist()} == expected

    # a changed search key asks again
    wider = "2024-01-01T00:00:00Z/2024-02-14T23:59:59Z"
    pipeline.run(load_config(None, _search_overrides(run_dir, tmp_path, server.url, wider)))
    assert [r for r in server.requests[n:] if "/search" in r]
    assert {s["stac_item"] for s in pq.read_table(tables.scenes_uri(str(run_dir))).to_pylist()} == _expected(
        items,
        box(2.5, 40.5, 6.2, 43.1),
        dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
        dt.datetime(2024, 2, 14, 23, 59, 59, tzinfo=dt.timezone.utc),
        "VH",
    )


def test_a_run_is_reproducible_from_its_snapshot(stac_api, tmp_path):
    """The frozen file is itself a stac-geoparquet source: searching it with no keys gives the same items;
    and an AOI given as a vector file in a projected CRS selects what the same AOI in lon/lat selects."""
    server, items = stac_api
    q = SearchSection(source=server.url, collections=["opera-rtc"], bbox=[1.2, 40.2, 3.4, 42.9], page_size=7)
    uri, counts = search.freeze(q, str(tmp_path / "a"))
    assert counts["queried"] and counts["pages"] >= 2
    again, _ = search.freeze(SearchSection(source=uri), str(tmp_path / "b"))
    assert {d["id"] for d in search.read_items(again)} == {d["id"] for d in search.read_items(uri)}
    expected = {it["id"] for it in items if shape(it["geometry"]).intersects(box(1.2, 40.2, 3.4, 42.9))}
    assert {d["id"] for d in search.read_items(uri)} == expected

    # the same box as a GeoPackage in UTM 31N (densified, so the reprojected outline stays the box's)
    outline = shapely.segmentize(box(1.2, 40.2, 3.4, 42.9), 0.01)
    aoi = gpd.GeoDataFrame(geometry=[outline], crs="EPSG:4326").to_crs("EPSG:32631")
    aoi.to_file(tmp_path / "aoi.gpkg")
    by_file, _ = search.freeze(SearchSection(source=uri, aoi=str(tmp_path / "aoi.gpkg")), str(tmp_path / "c"))
    assert {d["id"] for d in search.read_items(by_file)} == expected


def test_property_filter_and_cql2():
    props = {"sar:polarizations": ["VV", "VH"], "sat:orbit_state": "ascending", "sat:relative_orbit": 37}
    assert search.property_matches(props, {"sar:polarizations": ["VH"], "sat:orbit_state": "ascending"})
    assert not search.property_matches(props, {"sar:polarizations": ["HH"]})
    assert search.property_matches(props, {"sat:relative_orbit": [37, 139]})
    assert not search.property_matches(props, {"sat:relative_orbit": 139})
    assert not search.property_matches(props, {"platform": "sentinel-1a"})  # absent: no match
    assert search.cql2({"sar:polarizations": ["VH"], "sat:orbit_state": "ascending"}) == {
        "op": "and",
        "args": [
            {"op": "a_contains", "args": [{"property": "sar:polarizations"}, ["VH"]]},
            {"op": "=", "args": [{"property": "sat:orbit_state"}, "ascending"]},
        ],
    }


def test_the_streaming_catalog_equals_the_whole_listing(ray_session, real_sar, tmp_path):
    """A snapshot of more items than three pages of inspection tasks, with items whose file is missing and an
    asset named by two items on different pages: the streamed scenes and errors tables hold what the catalog
    of the same items as one ItemCollection (the whole-listing path) holds, and the counts reconcile."""
    import stac_geoparquet.arrow

    from sarlang_ray.stages import catalog as catalog_stage

    n = 2 * catalog_stage.PAGE_ROWS + 20
    items = _items_n(real_sar, tmp_path / "rasters", n)
    items[5]["assets"]["vv"]["href"] = str(tmp_path / "rasters" / "missing_VV.tif")  # stac_bad_href
    # the raster of item 1, pages apart: stac_duplicate
    items[-1]["assets"] = {"vv": dict(items[1]["assets"]["vv"])}
    items[-1]["properties"]["sar:polarizations"] = ["VV"]
    stac_geoparquet.arrow.to_parquet(
        stac_geoparquet.arrow.parse_stac_items_to_arrow(items), tmp_path / "items.parquet"
    )
    (tmp_path / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": items}))

    streamed, whole = tmp_path / "streamed", tmp_path / "whole"
    base = [f"catalog.archive={tmp_path}", "run.stages=[catalog]"]
    summary = pipeline.run(
        load_config(
            None, [f"run.run_dir={streamed}", *base, f"catalog.search.source={tmp_path / 'items.parquet'}"]
        )
    )
    pipeline.run(
        load_config(None, [f"run.run_dir={whole}", *base, f"catalog.archive={tmp_path / 'items.json'}"])
    )
    counts = summary["stages"]["catalog"]
    assert counts["pages"] >= 3 and counts["planned"] == counts["written"] + counts["rejected"] == n
    assert counts["rejects_by_reason"] == {"stac_bad_href": 1, "stac_duplicate": 1}
    a = pq.read_table(tables.scenes_uri(str(streamed))).to_pylist()
    b = pq.read_table(tables.scenes_uri(str(whole))).to_pylist()
    assert len(a) == n - 2
    key = lambda s: s["scene_id"]
    # the same properties and instants; the stac-geoparquet round trip writes datetimes with microseconds
    drop = ("stac_properties", "datetime")
    instant = lambda t: dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    assert [instant(s["datetime"]) for s in sorted(a, key=key)] == [
        instant(s["datetime"]) for s in sorted(b, key=key)
    ]

    def rows(table):  # JSON: NaN nodata compares equal to itself
        return [
            json.dumps({k: v for k, v in s.items() if k not in drop}, sort_keys=True, default=str)
            for s in sorted(table, key=key)
        ]

    assert rows(a) == rows(b)
    errors = pq.read_table(streamed / "catalog" / "errors.parquet").to_pylist()
    assert sorted(e["error_class"] for e in errors) == ["stac_bad_href", "stac_duplicate"]
    assert not (streamed / "catalog" / "parts").exists()


def _items_n(real_sar: Path, folder: Path, n: int) -> list[dict]:
    """``n`` items like :func:`_items` (VV + VH on even items), each with rasters of its own."""
    pairs = _pairs(real_sar)
    folder.mkdir()
    out = []
    for i in range(n):
        vv, vh = pairs[i % len(pairs)]
        assets = {}
        for pol, src in (("vv", vv), ("vh", vh))[: 2 if i % 2 == 0 else 1]:
            link = folder / f"scene{i:04d}_{pol.upper()}.tif"
            link.symlink_to(src)
            assets[pol] = {"href": str(link), "type": "image/tiff; application=geotiff", "roles": ["data"]}
        geom = box(i % 20, 40 + i // 20, i % 20 + 0.5, 40.5 + i // 20)
        out.append(
            {
                "type": "Feature",
                "stac_version": "1.0.0",
                "id": f"s1-{i:04d}",
                "collection": "opera-rtc",
                "geometry": mapping(geom),
                "bbox": list(geom.bounds),
                "links": [],
                "assets": assets,
                "stac_extensions": [],
                "properties": {
                    "datetime": (T0 + dt.timedelta(hours=i)).isoformat().replace("+00:00", "Z"),
                    "platform": "sentinel-1a",
                    "sar:polarizations": ["VV", "VH"] if i % 2 == 0 else ["VV"],
                },
            }
        )
    return out


def test_api_pages_of_different_shapes_freeze_whole(real_sar, tmp_path):
    """The API path writes each page to the snapshot as it arrives: items of later pages carry a property and
    an asset the first pages' items lack, and the frozen stac-geoparquet still holds every item as served
    (ids, properties and asset keys), with a cap that stops in the middle of a page."""
    items = _items_n(real_sar, tmp_path / "rasters", 30)
    for i, it in enumerate(items):
        it["assets"] = {"vv": it["assets"]["vv"]}
        if i >= 20:  # from the fifth page of 5 on
            it["properties"]["sat:relative_orbit"] = 37 + i
            it["assets"]["thumbnail"] = {"href": f"http://127.0.0.1/thumb{i}.png", "roles": ["thumbnail"]}
    path = tmp_path / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    server = RustacServer(path, tmp_path / "rustac.log").start()
    try:
        uri, counts = search.freeze(SearchSection(source=server.url, page_size=5), str(tmp_path / "a"))
        capped, _ = search.freeze(
            SearchSection(source=server.url, page_size=5, max_items=23), str(tmp_path / "b")
        )
    finally:
        server.stop()
    assert counts["pages"] >= 6 and counts["items"] == 30
    frozen = {d["id"]: d for d in search.read_items(uri)}
    assert set(frozen) == {it["id"] for it in items}
    for it in items:
        got = frozen[it["id"]]
        assert set(got["assets"]) == set(it["assets"])
        assert got["properties"].get("sat:relative_orbit") == it["properties"].get("sat:relative_orbit")
        assert got["properties"]["sar:polarizations"] == it["properties"]["sar:polarizations"]
    assert [d["id"] for d in search.read_items(capped)] == [it["id"] for it in items][:23]
