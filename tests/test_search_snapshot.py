"""A 1,000,000-item stac-geoparquet snapshot partitioned by month (generated, ~11 s): an AOI and one month
select exactly the items numpy selects from the generating arrays, reading only the row groups whose bbox and
datetime statistics can match; property filters and max_items apply on top."""

from __future__ import annotations

import numpy as np
import pytest
from stac_snapshots import expected, write_snapshot  # tests/stac_snapshots.py

from sarlang_ray import search
from sarlang_ray.config import SearchSection

pytestmark = pytest.mark.slow  # ~20 s, most of it writing the million items
N = 1_000_000
AOI = [4.0, 50.0, 8.0, 53.5]  # the Rhine delta and around, lon/lat
MARCH = ("2024-03-01T00:00:00", "2024-03-31T23:59:59.999999")


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    folder = tmp_path_factory.mktemp("snapshot") / "sentinel-1-grd"
    arrays = write_snapshot(folder, N)
    return folder, arrays


def test_aoi_and_one_month_of_a_million_items(snapshot, tmp_path):
    folder, arrays = snapshot
    q = SearchSection(source=str(folder), bbox=AOI, datetime=f"{MARCH[0]}Z/{MARCH[1]}Z")
    uri, counts = search.freeze(q, str(tmp_path))
    want = expected(arrays, AOI, *MARCH)
    assert 500 < len(want) < 10_000
    got = [d["id"] for d in search.read_items(uri)]
    assert len(got) == len(set(got)) and set(got) == want
    # only the partitions and row groups that can match were read: one month's file, a few latitude bands
    assert counts["files"] == 12 and counts["files_read"] == 1
    assert counts["row_groups_read"] <= 0.05 * counts["row_groups"], counts
    assert counts["rows_matched_pushdown"] == len(want)  # the bbox of an axis-aligned box is the box

    # the frozen items are whole STAC items the catalog can read: assets, polarisations, datetime
    first = next(iter(search.read_items(uri)))
    assert (
        first["assets"]["vv"]["href"].startswith("s3://sentinel-1-grd/") and first["properties"]["datetime"]
    )


def test_property_filter_and_cap_on_the_snapshot(snapshot, tmp_path):
    folder, arrays = snapshot
    q = SearchSection(
        source=str(folder),
        bbox=AOI,
        datetime=f"{MARCH[0]}Z/{MARCH[1]}Z",
        filter={"sar:polarizations": ["VH"]},
    )
    uri, _ = search.freeze(q, str(tmp_path / "a"))
    dual = set(arrays["ids"][arrays["dual"]].tolist())
    assert {d["id"] for d in search.read_items(uri)} == expected(arrays, AOI, *MARCH) & dual
    capped, counts = search.freeze(
        SearchSection(source=str(folder), bbox=AOI, max_items=50), str(tmp_path / "b")
    )
    ids = [d["id"] for d in search.read_items(capped)]
    assert len(ids) == 50 and set(ids) <= expected(
        arrays, AOI, "2024-01-01T00:00:00", "2024-12-31T23:59:59.999999"
    )
    assert counts["items"] == 50


def test_a_search_that_finds_nothing_says_so(snapshot, tmp_path):
    folder, _ = snapshot
    with pytest.raises(search.SearchError, match="found no items"):
        search.freeze(SearchSection(source=str(folder), bbox=[150.0, -40.0, 151.0, -39.0]), str(tmp_path))
    with pytest.raises(search.SearchError, match="does not exist"):
        search.freeze(SearchSection(source=str(folder / "nope")), str(tmp_path))
    assert not np.any([p.exists() for p in (tmp_path / "search").glob("*.parquet")])
