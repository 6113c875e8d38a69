"""Generated stac-geoparquet snapshots of any size, partitioned by month like the Planetary Computer's
``geoparquet-items`` (one folder per month, row groups of ``row_group`` items sorted by latitude), written
with pyarrow directly (stac-geoparquet itself builds the GeoParquet metadata once, from one item), so a
million items take seconds. The generating arrays come back with the path: a test's expected selection
is computed from them with numpy, not by reading the snapshot."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

YEAR = 2024
EUROPE = (-10.0, 35.0, 30.0, 70.0)  # west, south, east, north of the item centres
SIDE = 2.0  # degrees: an IW GRD frame is ~250 x 170 km


def _geo_metadata() -> dict[bytes, bytes]:
    """The GeoParquet 1.1 + stac-geoparquet schema metadata (bbox covering included), from stac-geoparquet."""
    import tempfile

    import stac_geoparquet.arrow

    item = {
        "type": "Feature",
        "stac_version": "1.0.0",
        "id": "x",
        "collection": "sentinel-1-grd",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]},
        "bbox": [0.0, 0.0, 1.0, 1.0],
        "links": [],
        "stac_extensions": [],
        "properties": {"datetime": "2024-01-01T00:00:00Z"},
        "assets": {},
    }
    table = stac_geoparquet.arrow.parse_stac_items_to_arrow([item]).read_all()
    with tempfile.TemporaryDirectory() as tmp:
        stac_geoparquet.arrow.to_parquet(table, f"{tmp}/x.parquet")
        return dict(pq.read_schema(f"{tmp}/x.parquet").metadata)


def write_snapshot(
    folder: Path,
    n: int,
    seed: int = 0,
    row_group: int = 10_000,
    href: str = "s3://sentinel-1-grd/{id}_{pol}.tif",
) -> dict[str, np.ndarray]:
    """``n`` Sentinel-1-like items over Europe through one year, in ``folder/month=YYYY-MM/part-0.parquet``.
    Returns the generating arrays: ids, bbox columns, datetimes (numpy datetime64[us]), dual (VV+VH or VV)."""
    rng = np.random.default_rng(seed)
    w, s, e, nn = EUROPE
    cx, cy = rng.uniform(w, e, n), rng.uniform(s, nn, n)
    xmin, ymin, xmax, ymax = cx - SIDE / 2, cy - SIDE / 2, cx + SIDE / 2, cy + SIDE / 2
    start = np.datetime64(f"{YEAR}-01-01T00:00:00", "us")
    seconds = rng.integers(0, 366 * 86400, n)
    when = start + seconds.astype("timedelta64[s]").astype("timedelta64[us]")
    dual = rng.random(n) < 0.8
    ids = np.array([f"S1_{i:08d}" for i in range(n)])
    meta = _geo_metadata()
    months = when.astype("datetime64[M]")
    for month in np.unique(months):
        sel = np.flatnonzero(months == month)
        sel = sel[np.argsort(ymin[sel], kind="stable")]  # latitude bands: row-group bbox statistics are tight
        geoms = shapely.box(xmin[sel], ymin[sel], xmax[sel], ymax[sel])
        pols = [["VV", "VH"] if d else ["VV"] for d in dual[sel]]
        vv = pa.array([href.format(id=i, pol="VV") for i in ids[sel]])
        vh = pa.array([href.format(id=i, pol="VH") if d else None for i, d in zip(ids[sel], dual[sel])])
        kind = pa.array(["image/tiff; application=geotiff; profile=cloud-optimized"] * len(sel))
        roles = pa.array([["data"]] * len(sel), pa.list_(pa.string()))

        def asset(h, missing=None, roles=roles, kind=kind):
            return pa.StructArray.from_arrays([h, roles, kind], ["href", "roles", "type"], mask=missing)

        table = pa.table(
            {
                "type": pa.array(["Feature"] * len(sel)),
                "stac_version": pa.array(["1.0.0"] * len(sel)),
                "stac_extensions": pa.array([[]] * len(sel), pa.list_(pa.string())),
                "id": pa.array(ids[sel]),
                "collection": pa.array(["sentinel-1-grd"] * len(sel)),
                "geometry": pa.array(shapely.to_wkb(geoms), pa.binary()),
                "bbox": pa.StructArray.from_arrays(
                    [pa.array(a[sel]) for a in (xmin, ymin, xmax, ymax)], ["xmin", "ymin", "xmax", "ymax"]
                ),
                "assets": pa.StructArray.from_arrays(
                    [asset(vv), asset(vh, pa.array(~dual[sel]))], ["vv", "vh"]
                ),
                "links": pa.array(
                    [[]] * len(sel), pa.list_(pa.struct([("href", pa.string()), ("rel", pa.string())]))
                ),
                "datetime": pa.array(when[sel], pa.timestamp("us", tz="UTC")),
                "platform": pa.array(np.where(seconds[sel] % 2 == 0, "sentinel-1a", "sentinel-1c")),
                "sar:instrument_mode": pa.array(["IW"] * len(sel)),
                "sar:polarizations": pa.array(pols, pa.list_(pa.string())),
            }
        ).replace_schema_metadata(meta)
        part = folder / f"month={month!s}"
        part.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, part / "part-0.parquet", row_group_size=row_group, compression="zstd")
    (folder / "_generated.json").write_text(
        json.dumps({"items": n, "seed": seed, "at": dt.datetime.now().isoformat()})
    )
    return {"ids": ids, "xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax, "when": when, "dual": dual}


def expected(arrays: dict[str, np.ndarray], bbox: list[float], start: str, end: str) -> set[str]:
    """Items whose box meets ``bbox`` (closed intervals: axis-aligned boxes intersect iff they overlap on both
    axes) acquired within [start, end]: numpy over the generating arrays."""
    w, s, e, n = bbox
    a = arrays
    hit = (a["xmin"] <= e) & (a["xmax"] >= w) & (a["ymin"] <= n) & (a["ymax"] >= s)
    hit &= (a["when"] >= np.datetime64(start, "us")) & (a["when"] <= np.datetime64(end, "us"))
    return set(a["ids"][hit].tolist())
