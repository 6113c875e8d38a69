"""GDAL's network settings (io.GDAL_NETWORK, io.GDAL_HTTP_OPEN) are in effect in a reader: an http(s) COG read
through io.open_raster asks the server for that COG only (no folder listing, no .aux.xml/.ovr/.msk probe), in
every thread of the process, while plain GDAL with its defaults asks for them; a user's own setting wins.
Each reader runs in a fresh process (GDAL's caches and options are per process), against a real HTTP server
on 127.0.0.1 that records every request (tests/http_files.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from http_files import FileServer
from rasterio.transform import from_origin

from sarlang_ray import io

REPO = Path(__file__).resolve().parents[1]

READ = r"""
import json, sys, threading
import rasterio, rasterio.env
from sarlang_ray import io
url, mode = sys.argv[1], sys.argv[2]
out = {}
if mode == "sarlang":
    src = io.open_raster(url)
else:  # plain GDAL, its defaults
    src = rasterio.open("/vsicurl/" + url)
def other():  # another thread reads the window and an overview, and the options it sees
    with rasterio.Env():
        out["options"] = {k: rasterio.env.get_gdal_config(k, normalize=False) for k in io.GDAL_NETWORK}
    out["sum"] = int(src.read(1, window=((256, 768), (256, 768))).astype("int64").sum())
    out["overviews"] = src.overviews(1)
t = threading.Thread(target=other); t.start(); t.join()
src.close()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiled COG (256-pixel blocks, internal overviews) of 1024 x 1024 uint16 on a recording HTTP server."""
    folder = tmp_path_factory.mktemp("cogs")
    plain = folder / "plain.tif"
    data = (np.arange(1024 * 1024, dtype="uint32") % 65521).astype("uint16").reshape(1024, 1024)
    with rasterio.open(
        plain,
        "w",
        driver="GTiff",
        width=1024,
        height=1024,
        count=1,
        dtype="uint16",
        crs="EPSG:32631",
        transform=from_origin(600000, 4800000, 10, 10),
    ) as dst:
        dst.write(data, 1)
    rasterio.shutil.copy(plain, folder / "scene.tif", driver="COG", BLOCKSIZE=256, COMPRESS="DEFLATE")
    plain.unlink()
    with FileServer(folder, signed_only=False) as server:
        yield server, folder / "scene.tif", int(data[256:768, 256:768].astype("int64").sum())


def _read(server, mode: str, **env_extra) -> tuple[dict, list]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GDAL_", "CPL_", "VSI_", "AWS_"))}
    env.update(env_extra, PYTHONPATH=str(REPO))
    with server.lock:
        server.requests.clear()
    done = subprocess.run(
        [sys.executable, "-c", READ, f"{server.url}/scene.tif", mode],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with server.lock:
        return json.loads(done.stdout.strip().splitlines()[-1]), list(server.requests)


def test_an_http_cog_read_by_open_raster_asks_for_the_cog_only(served):
    server, _, expected = served
    out, requests = _read(server, "sarlang")
    assert out["sum"] == expected and out["overviews"] == [2, 4]  # COG overviews, found inside the file
    assert requests and {path for _, path, _ in requests} == {"/scene.tif"}, requests
    assert out["options"] == io.GDAL_NETWORK  # the settings, seen from a thread that did not open the file


def test_gdal_defaults_would_probe_sidecars(served):
    """The control: the same read with GDAL's defaults lists the folder and asks for sidecars, which the test
    above would see."""
    server, _, expected = served
    out, requests = _read(server, "gdal")
    assert out["sum"] == expected
    probes = {path for _, path, _ in requests} - {"/scene.tif"}
    assert any(p.endswith((".aux.xml", ".ovr", ".msk")) for p in probes), probes
    assert out["options"]["GDAL_HTTP_MAX_RETRY"] is None  # nothing of ours in a plain process


def test_a_users_own_setting_wins(served):
    server, _, expected = served
    out, _ = _read(server, "sarlang", GDAL_HTTP_MAX_RETRY="7", GDAL_HTTP_MULTIRANGE="SERIAL")
    assert out["sum"] == expected
    assert out["options"]["GDAL_HTTP_MAX_RETRY"] == "7" and out["options"]["GDAL_HTTP_MULTIRANGE"] == "SERIAL"
    assert out["options"]["GDAL_HTTP_RETRY_DELAY"] == io.GDAL_NETWORK["GDAL_HTTP_RETRY_DELAY"]


def test_the_fsspec_reader_still_reads_http(served):
    """run.raster_reader=fsspec keeps reading http(s) through fsspec (same pixels)."""
    server, _local, expected = served
    with io.open_raster(f"{server.url}/scene.tif", reader="fsspec") as src:
        assert not src.name.startswith("/vsicurl/")
        assert int(src.read(1, window=((256, 768), (256, 768))).astype("int64").sum()) == expected
