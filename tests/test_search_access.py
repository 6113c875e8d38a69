"""Access to the archive: ``catalog.sign`` signs every asset href that is read (the file server answers signed
requests only and records every one), and ``catalog.s3_anonymous`` / ``catalog.s3_requester_pays`` reach both
raster readers, fsspec (s3fs) and GDAL (/vsis3/), as seen by a header-recording proxy in front of
SeaweedFS."""

from __future__ import annotations

import datetime as dt
import shutil
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import stac_geoparquet.arrow
from header_proxy import HeaderProxy  # tests/header_proxy.py
from http_files import FileServer  # tests/http_files.py
from s3fs import S3FileSystem

from sarlang_ray import catalog, io, pipeline, tables
from sarlang_ray.config import load_config

N_ITEMS = 6


def _snapshot(real_sar: Path, served: Path, url: str, out: Path) -> list[str]:
    """A stac-geoparquet file of items whose VV/VH assets are served over HTTP (real OPERA files)."""
    vv = sorted((real_sar / "opera_rtc_s1_t137_crops").glob("2021-11-19/*_VV.tif"))[:N_ITEMS]
    items = []
    for i, path in enumerate(vv):
        assets = {}
        for pol in ("VV", "VH"):
            name = f"scene{i}_{pol}.tif"
            shutil.copy(path.with_name(path.name.replace("_VV.tif", f"_{pol}.tif")), served / name)
            assets[pol.lower()] = {
                "href": f"{url}/{name}",
                "type": "image/tiff; application=geotiff",
                "roles": ["data"],
            }
        with rasterio.open(path) as src:
            footprint = catalog.footprint_4326(src)
        items.append(
            {
                "type": "Feature",
                "stac_version": "1.0.0",
                "id": f"item{i}",
                "collection": "opera",
                "links": [],
                "stac_extensions": [],
                "geometry": footprint.__geo_interface__,
                "bbox": list(footprint.bounds),
                "properties": {
                    "datetime": dt.datetime(2021, 11, 19, tzinfo=dt.timezone.utc).isoformat(),
                    "sar:polarizations": ["VV", "VH"],
                },
                "assets": assets,
            }
        )
    stac_geoparquet.arrow.to_parquet(stac_geoparquet.arrow.parse_stac_items_to_arrow(items), out)
    return [it["id"] for it in items]


def test_every_href_read_is_signed_by_the_entry_point(ray_session, real_sar, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    with FileServer(served) as server:
        ids = _snapshot(real_sar, served, server.url, tmp_path / "items.parquet")
        # the server refuses what is not signed (403): an unsigned read fails
        with pytest.raises(io.RemoteRasterError, match="scene0_VV.tif"):
            io.open_raster(f"{server.url}/scene0_VV.tif")
        assert server.requests and not any(signed for _, _, signed in server.requests)
        server.requests.clear()

        run_dir = tmp_path / "run"
        cfg = load_config(
            None,
            [
                f"run.run_dir={run_dir}",
                f"catalog.archive={tmp_path}",
                "run.stages=[catalog,tile]",
                f"catalog.search.source={tmp_path / 'items.parquet'}",
                "catalog.sign=stac_signers:sign",
                "tile.gsds_m=[30]",
                "tile.tile_size=64",
                "tile.speckle.filter=none",
            ],
        )
        try:
            summary = pipeline.run(cfg)
        finally:
            io.use_access()  # the driver took catalog.sign into its environment: back to none for later tests
        scenes = pq.read_table(tables.scenes_uri(str(run_dir))).to_pylist()
        assert sorted(s["stac_item"] for s in scenes) == ids
        assert summary["stages"]["tile"]["written"] > 0  # the tile workers read the pixels, signed too
        paths = {p for _, p, _ in server.requests}
        assert {p for p in paths if p.endswith(".tif")} == {
            f"/scene{i}_{pol}.tif" for i in range(N_ITEMS) for pol in ("VV", "VH")
        }
        # besides the rasters, only the Capella-style sidecar metadata the catalog looks for beside each scene
        assert all(p.endswith((".tif", "_VV.json", "_VV_extended.json")) for p in paths), sorted(paths)
        assert all(signed for _, _, signed in server.requests), [r for r in server.requests if not r[2]][:3]
        # the scenes table keeps the hrefs as published: a token is never stored
        assert all("sig=" not in s["sar_uri"] and "sig=" not in s["bands"] for s in scenes)


@pytest.fixture
def proxied_s3(s3, monkeypatch, real_sar):
    """The session's SeaweedFS behind a header-recording proxy, as the pipeline's fsspec config; one
    object."""
    import s3_server

    key = f"sarlang/access-{uuid.uuid4().hex[:8]}"
    io.use_access()  # none of catalog.sign / anonymous / requester pays to start with
    with HeaderProxy(s3_server.ENDPOINT) as proxy:
        monkeypatch.setitem(
            fsspec.config.conf,
            "s3",
            {"endpoint_url": proxy.url, "key": "sarlang-test", "secret": "sarlang-test-secret"},
        )
        monkeypatch.setattr(S3FileSystem, "_cache", {})
        fs = S3FileSystem(
            endpoint_url=proxy.url, key="sarlang-test", secret="sarlang-test-secret", skip_instance_cache=True
        )
        src = real_sar / "opera_rtc_s1_t137_crops"
        path = min(src.glob("2021-11-19/*_VV.tif"))
        for name in (
            "gdal-anon.tif",
            "fsspec-anon.tif",
            "gdal-payer.tif",
            "fsspec-payer.tif",
            "gdal-plain.tif",
        ):
            fs.put(str(path), f"{key}/{name}")
        with rasterio.open(path) as local:
            expected = local.read(1)
        yield proxy, key, expected
        io.use_access()  # back to the defaults: the FSSPEC_S3_* variables it set are removed


def _reads(proxy: HeaderProxy, name: str) -> list[dict]:
    """The headers of the reads (GET, HEAD) of object ``name`` (the fixture's uploads left out)."""
    return [h for m, p, h in proxy.requests if m in ("GET", "HEAD") and p.split("?")[0].endswith(name)]


def test_anonymous_and_requester_pays_reach_both_readers(proxied_s3, monkeypatch):
    proxy, key, expected = proxied_s3
    # the default: both readers sign their requests and name no payer
    with io.open_raster(f"s3://{key}/gdal-plain.tif", reader="gdal") as src:
        assert np.array_equal(src.read(1), expected)
    plain = _reads(proxy, "gdal-plain.tif")
    assert plain and all("authorization" in h and "x-amz-request-payer" not in h for h in plain)

    io.use_access(anonymous=True)
    monkeypatch.setattr(S3FileSystem, "_cache", {})
    for reader in ("gdal", "fsspec"):
        name = f"{reader}-anon.tif"
        with io.open_raster(f"s3://{key}/{name}", reader=reader) as src:
            assert np.array_equal(src.read(1), expected)
        sent = _reads(proxy, name)
        assert sent and all("authorization" not in h for h in sent), (reader, sent[:2])

    io.use_access(requester_pays=True)
    monkeypatch.setattr(S3FileSystem, "_cache", {})
    for reader in ("gdal", "fsspec"):
        name = f"{reader}-payer.tif"
        with io.open_raster(f"s3://{key}/{name}", reader=reader) as src:
            assert np.array_equal(src.read(1), expected)
        sent = _reads(proxy, name)
        assert sent and all(
            h.get("x-amz-request-payer") == "requester" and "authorization" in h for h in sent
        ), (reader, sent[:2])
