"""Paths that are local folders or ``s3://`` URIs, through fsspec; atomic writes; rasters (``/vsis3/``).

Every stage writes through :func:`write_bytes_atomic`, so a reader never sees half a file: locally a
temporary name is renamed into place; on S3 a single PUT is already all-or-nothing.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
import rasterio.errors


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``uri`` and the path inside it (credentials: the standard chains)."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def arrow_filesystem(uri: str):
    """``(pyarrow filesystem or None, path)`` for Ray Train / Tune ``storage_path``: remote URIs go through
    the same fsspec filesystem (endpoint, credentials) as every other read and write of the pipeline."""
    if not is_remote(uri):
        return None, os.path.abspath(uri)
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def parquet_rows(uris: list[str]) -> int:
    """Rows of Parquet files, from their footers (no data read)."""
    total = 0
    for uri in uris:
        fs, path = filesystem(uri)
        with fs.open(path, "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


READ_SHARE = 0.25  # CPUs an actor pool leaves free for the light read tasks of its own dataset


def pool_cpus(
    concurrency: int, num_cpus: float, cluster_cpus: float, read_share: float = READ_SHARE
) -> float:
    """CPUs per actor for a pool of ``concurrency`` actors that is fed by light Ray Data read tasks (0.1 CPU
    each).

    A fixed-size pool whose actors together take every CPU of the cluster (``evaluate.concurrency=2,
    num_cpus=1`` on a 2-CPU node) leaves nothing for the 0.1-CPU read tasks feeding it, and the dataset
    waits forever. Such a pool's actors each ask for ``(cluster_cpus - read_share) / concurrency``
    instead, so ``read_share`` CPUs stay free for reads; a pool that fits is left as asked. (On an
    autoscaling cluster the cap is computed against the CPUs present when the pool starts; GPU pools are
    placed by their GPUs, so a smaller CPU request changes nothing there.)"""
    if concurrency * num_cpus + read_share <= cluster_cpus:
        return num_cpus
    return max(0.01, round((cluster_cpus - read_share) / concurrency, 3))


def local_copy(uri: str, cache: str | None = None) -> str:
    """A local folder with the contents of ``uri`` (a model folder on s3://, say); local paths and hub
    names come back unchanged.

    Downloads once per URI and node into ``cache`` (default: a temp folder), however many processes of the
    node ask at once: the first takes an exclusive lock (``<folder>.lock``, ``fcntl.flock``, released by the
    kernel if the process dies) and downloads into ``<folder>.<random>.partial``, renamed into place when
    complete; the others wait on the lock and find the folder there. Partial copies left by a killed
    download are removed by the next one."""
    if not is_remote(uri):
        return uri
    import fcntl
    import glob as _glob
    import hashlib
    import shutil

    target = os.path.join(
        cache or os.path.join(tempfile.gettempdir(), "sarlang-remote"),
        hashlib.sha1(uri.encode()).hexdigest()[:16],
    )
    complete = os.path.join(target, "_COMPLETE")
    if os.path.exists(complete):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(f"{target}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; the others wait here
        try:
            if os.path.exists(complete):  # another process fetched it while this one waited
                return target
            for stale in _glob.glob(f"{_glob.escape(target)}.*.partial") + (
                [target] if os.path.exists(target) else []
            ):
                shutil.rmtree(stale, ignore_errors=True)  # a download killed midway (the lock holder is gone)
            fs, path = filesystem(uri)
            partial = f"{target}.{uuid.uuid4().hex}.partial"
            try:
                fs.get(path.rstrip("/") + "/", partial, recursive=True)
                os.makedirs(partial, exist_ok=True)  # an empty folder downloads nothing
                open(os.path.join(partial, "_COMPLETE"), "w").close()
                os.replace(partial, target)
            finally:
                shutil.rmtree(partial, ignore_errors=True)  # nothing left behind by a failed download
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def relative(uri: str, base: str) -> str:
    """``uri`` relative to ``base`` (no leading slash); ``uri`` itself when it is not under ``base``."""
    if base and uri.startswith(base):
        return uri[len(base) :].lstrip("/")
    return uri


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return bool(fs.exists(path))


def glob(base: str, pattern: str) -> list[str]:
    """Sorted URIs under ``base`` matching ``pattern`` (``**`` recurses)."""
    fs, path = filesystem(base)
    matches = fs.glob(join(path, pattern))
    if not is_remote(base):  # fsspec answers absolute paths: keep the caller's form (relative stays relative)
        root = os.path.abspath(base)
        return sorted(join(base, os.path.relpath(m, root)) for m in matches)
    protocol = base.split("://", 1)[0] + "://"
    return sorted(protocol + m if not m.startswith(protocol) else m for m in matches)


def makedirs(uri: str) -> None:
    if not is_remote(uri):
        os.makedirs(uri, exist_ok=True)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that ``uri`` either does not exist or holds all of it."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        fs.pipe_file(path, data)
        return
    _replace_local(uri, (data,))


def write_stream_atomic(uri: str, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` one after another so that ``uri`` either does not exist or holds all of them, holding
    one chunk at a time. Local: as :func:`write_bytes_atomic`; remote: spooled to a local temporary file,
    then one upload, which the object store makes visible only when it is complete."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        with tempfile.NamedTemporaryFile(prefix="sarlang-stream-") as tmp:
            for chunk in chunks:
                tmp.write(chunk)
            tmp.flush()
            fs.put_file(tmp.name, path)
        return
    _replace_local(uri, chunks)


def _replace_local(uri: str, chunks: Iterable[bytes]) -> None:
    """Write a local file under a temporary name (``<name>.tmp-<32 hex>``, what :func:`sweep_partial` cleans
    after a killed writer), then rename it into place; a failed write leaves nothing behind."""
    os.makedirs(os.path.dirname(uri) or ".", exist_ok=True)
    tmp = f"{uri}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.writelines(chunks)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, uri)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def sweep_partial(folder: str, older_than_s: float = 600.0) -> list[str]:
    """Delete the temporary files of :func:`write_bytes_atomic` (``<name>.tmp-<32 hex>``) under a local
    ``folder`` that are older than ``older_than_s``: what a writer killed between write and rename left
    behind (never read, since readers only open final names). Younger ones may belong to a writer still
    at work and stay. Remote folders have none (a PUT is atomic). Returns the deleted paths."""
    import re
    import time

    if is_remote(folder) or not os.path.isdir(folder):
        return []
    partial, cutoff, gone = re.compile(r"\.tmp-[0-9a-f]{32}$"), time.time() - older_than_s, []
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            try:
                if partial.search(name) and os.stat(path).st_mtime < cutoff:
                    os.remove(path)
                    gone.append(path)
            except FileNotFoundError:  # its writer renamed or removed it meanwhile
                continue
    return gone


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return bytes(fs.cat_file(path))


def write_json_atomic(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def parquet_bytes(table: pa.Table) -> bytes:
    """Serialise a table deterministically (same table -> same bytes)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_parquet_atomic(uri: str, table: pa.Table) -> None:
    write_bytes_atomic(uri, parquet_bytes(table))


def read_parquet(uris: list[str] | str, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file or concatenate several (small tables only: manifests, errors, scenes)."""
    uris = [uris] if isinstance(uris, str) else uris
    tables = []
    for uri in uris:
        fs, path = filesystem(uri)
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="permissive")


# ---------------------------------------------------------------- rasters
RASTER_READERS = ("gdal", "fsspec")
# how s3:// rasters are read in this process and the Ray workers it starts (``run.raster_reader``)
RASTER_READER_ENV = "SARLANG_RASTER_READER"
# GDAL's network settings for remote rasters (/vsis3/, /vsicurl/), in ONE place: every process that opens a
# remote raster through open_raster puts them into its environment (configure_gdal_network), where the
# environment does not set the option already, so a user overrides any of them by setting it (in the shell, or
# a cluster's runtime_env env_vars). Chosen by benchmarks/bench_gdal_network.py (docs/remote-rasters.md).
GDAL_NETWORK = {
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",  # one ranged GET for neighbouring blocks of a window
    "GDAL_HTTP_MULTIRANGE": "YES",  # the ranges of a window fetched in parallel (GDAL's default, pinned)
    "GDAL_HTTP_MULTIPLEX": "YES",  # ... over one HTTP/2 connection where the server speaks HTTP/2
    "GDAL_HTTP_MAX_RETRY": "3",  # retry 429/502/503/504 (a busy object store), ...
    "GDAL_HTTP_RETRY_DELAY": "1",  # ... after 1 s, then longer
}
# GDAL's options for the open of an http(s) raster (thread-local, for the open only: what GDAL learns at open,
# the sidecar list, is kept by the dataset). A URL names one object: listing its "folder" is a GET of an HTML
# page that blob stores refuse, after which GDAL asks for every sidecar name it knows (.aux.xml, .ovr, .msk,
# ...), each a request with its latency; EMPTY_DIR asks for none. (/vsis3/ keeps its one LIST per folder:
# sidecars such as pyroSAR's .aux.xml are found there.)
GDAL_HTTP_OPEN = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}
GDAL_S3_TUNING = GDAL_NETWORK  # the name this table had when it tuned /vsis3/ only
_gdal_s3_lock = threading.Lock()
_gdal_s3_applied: dict[str, str] = {}


class RemoteRasterError(rasterio.errors.RasterioIOError):
    """A remote raster could not be opened; the message names the URI, the reader and what to check."""


def raster_reader(reader: str | None = None) -> str:
    """The reader of ``s3://`` rasters: ``reader`` if given, else ``$SARLANG_RASTER_READER``, else ``gdal``.

    Raises:
        ValueError: the name is not one of :data:`RASTER_READERS`.
    """
    name = reader or os.environ.get(RASTER_READER_ENV) or "gdal"
    if name not in RASTER_READERS:
        raise ValueError(
            f"unknown raster reader {name!r}: set run.raster_reader (environment variable "
            f"{RASTER_READER_ENV}) to one of {', '.join(RASTER_READERS)}"
        )
    return name


def use_raster_reader(reader: str) -> dict[str, str]:
    """Make ``reader`` (``run.raster_reader``) the default of :func:`open_raster` in this process and in the
    Ray workers it starts. Call it before ``ray.init``; on a running cluster pass the returned variables as
    ``runtime_env={"env_vars": ...}`` so its workers get them too."""
    os.environ[RASTER_READER_ENV] = raster_reader(reader)
    return {RASTER_READER_ENV: os.environ[RASTER_READER_ENV]}


# ---------------------------------------------------------------- access: signed hrefs, anonymous, requester
# pays
SIGN_ENV = "SARLANG_SIGN"  # catalog.sign in this process and the Ray workers it starts
_signers: dict[str, Any] = {}
_access_env: set[str] = set()  # the FSSPEC_S3_* variables use_access set (a user's own are left alone)


def signer(spec: str | None = None):
    """The function that signs an href before it is read, for ``catalog.sign``: None for ``none``;
    ``planetary_computer`` (the Planetary Computer's SAS tokens, refreshed by that package before they
    expire, so a long run keeps reading); ``module:function`` any python entry point ``href -> href``.
    ``spec=None`` takes ``$SARLANG_SIGN``.

    Raises:
        ValueError: the entry point cannot be imported (the message names it).
    """
    spec = spec if spec is not None else os.environ.get(SIGN_ENV, "none")
    if spec in ("", "none"):
        return None
    if spec not in _signers:
        import importlib

        module, _, name = ("planetary_computer:sign" if spec == "planetary_computer" else spec).partition(":")
        try:
            _signers[spec] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            extra = " (pip install planetary-computer)" if spec == "planetary_computer" else ""
            raise ValueError(f"catalog.sign={spec!r}: cannot load {module}:{name}{extra}: {exc}") from None
    return _signers[spec]


def sign_href(uri: str, spec: str | None = None) -> str:
    """``uri`` as it must be read: signed by ``catalog.sign`` when it is remote (local paths are never
    signed). Signing happens at every open, never once in the driver, so a token never outlives its run."""
    fn = signer(spec)
    return uri if fn is None or not is_remote(uri) else str(fn(uri))


def use_access(sign: str = "none", anonymous: bool = False, requester_pays: bool = False) -> dict[str, str]:
    """Make ``catalog.sign``, ``catalog.s3_anonymous`` and ``catalog.s3_requester_pays`` the access of this
    process: the fsspec config (so every s3fs filesystem made from now on, and through
    :func:`gdal_s3_options` GDAL's ``/vsis3/``, sends unsigned or requester-pays requests) and the environment
    (``SARLANG_SIGN``, ``FSSPEC_S3_ANON``, ``FSSPEC_S3_REQUESTER_PAYS``) that the Ray workers it starts
    inherit. Workers call it too with the config they are given. Returns the variables set."""
    env = {SIGN_ENV: sign or "none"}
    s3 = fsspec.config.conf.setdefault("s3", {})
    for key, name, on in (
        ("anon", "FSSPEC_S3_ANON", anonymous),
        ("requester_pays", "FSSPEC_S3_REQUESTER_PAYS", requester_pays),
    ):
        if on:
            s3[key] = True
            env[name] = "true"
            _access_env.add(name)
        elif name in _access_env:
            s3.pop(key, None)
            os.environ.pop(name, None)
            _access_env.discard(name)
    os.environ.update(env)
    return env


def access_of(catalog) -> dict:
    """The access settings of a catalog section (``catalog.sign``, ``s3_anonymous``, ``s3_requester_pays``)
    as the keyword arguments of :func:`use_access`, for the row classes of the stages that read rasters."""
    return {
        "sign": catalog.sign,
        "anonymous": catalog.s3_anonymous,
        "requester_pays": catalog.s3_requester_pays,
    }


def gdal_s3_options(fs: fsspec.AbstractFileSystem) -> dict[str, str]:
    """GDAL configuration options that make ``/vsis3/`` reach the storage the s3fs filesystem ``fs`` reaches.

    Taken from what s3fs was configured with (arguments or fsspec's config, e.g. ``FSSPEC_S3_*``):
    ``endpoint_url`` (an argument or in ``client_kwargs``) gives ``AWS_S3_ENDPOINT`` (host:port) and
    ``AWS_HTTPS``; a custom endpoint uses path-style addresses (``AWS_VIRTUAL_HOSTING=FALSE``) unless
    ``config_kwargs`` ask for ``{"s3": {"addressing_style": "virtual"}}``; ``client_kwargs["region_name"]``
    gives ``AWS_REGION``; ``key``/``secret``/``token`` the access key, secret and session token; ``anon``
    unsigned requests; ``profile`` the shared-credentials profile; ``requester_pays`` the payer. What s3fs
    was not given is not set, so GDAL looks where botocore would: the ``AWS_*`` variables, ``~/.aws``, the
    instance role.
    """
    opts: dict[str, str] = {}
    client = fs.client_kwargs  # s3fs passes these to botocore besides its own arguments (both: same value)
    endpoint = client.get("endpoint_url") or fs.endpoint_url
    if endpoint:
        url = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        opts["AWS_S3_ENDPOINT"] = url.netloc
        opts["AWS_HTTPS"] = "YES" if url.scheme == "https" else "NO"
    elif not client.get("use_ssl", fs.use_ssl):
        opts["AWS_HTTPS"] = "NO"
    style = (fs.config_kwargs.get("s3") or {}).get("addressing_style")
    if style in ("path", "virtual"):
        opts["AWS_VIRTUAL_HOSTING"] = "TRUE" if style == "virtual" else "FALSE"
    elif endpoint:  # S3-compatible servers (SeaweedFS, MinIO, Ceph) answer path-style addresses
        opts["AWS_VIRTUAL_HOSTING"] = "FALSE"
    region = client.get("region_name")
    if region:
        opts["AWS_REGION"] = region
    if fs.anon:
        opts["AWS_NO_SIGN_REQUEST"] = "YES"
    else:
        for name, value in (
            ("AWS_ACCESS_KEY_ID", client.get("aws_access_key_id") or fs.key),
            ("AWS_SECRET_ACCESS_KEY", client.get("aws_secret_access_key") or fs.secret),
            ("AWS_SESSION_TOKEN", client.get("aws_session_token") or fs.token),
            ("AWS_PROFILE", fs.kwargs.get("profile")),
        ):
            if value:
                opts[name] = str(value)
    if fs.requester_pays:
        opts["AWS_REQUEST_PAYER"] = "requester"
    return opts


def configure_gdal_s3(fs: fsspec.AbstractFileSystem) -> dict[str, str]:
    """Point GDAL's ``/vsis3/`` at the storage of ``fs`` for the whole process (see :func:`gdal_s3_options`).

    The options go into the process environment, which GDAL reads for every option it is not given
    otherwise, in every thread. That is deliberate: a dataset opened here is kept open by actors and read
    later, from other threads, and GDAL may open more handles then (overviews, sidecar files, a reopened
    connection), each reading the options anew. ``rasterio.Env`` (and ``rasterio.env.set_gdal_config``
    outside the main thread) sets thread-local options that other threads do not see and that end with
    the ``with`` block, and rasterio's ``AWSSession`` needs boto3. Worker processes that start later
    inherit the settings, which name the same storage as their own fsspec config. The network options of
    :data:`GDAL_NETWORK` are added where the environment does not set them. Options set here that a
    new ``fs`` no longer implies are removed. Returns the options in force.
    """
    storage = gdal_s3_options(fs)
    with _gdal_s3_lock:
        wanted = {
            **{k: v for k, v in GDAL_NETWORK.items() if k not in os.environ or k in _gdal_s3_applied},
            **storage,
        }
        if wanted != _gdal_s3_applied:
            for key in set(_gdal_s3_applied) - set(wanted):
                os.environ.pop(key, None)
            os.environ.update(wanted)
            _gdal_s3_applied.clear()
            _gdal_s3_applied.update(wanted)
        return dict(_gdal_s3_applied)


def configure_gdal_network() -> dict[str, str]:
    """Put GDAL's network settings (:data:`GDAL_NETWORK`) into this process's environment where it does not
    set them already (a user's own value wins), for every thread and every handle GDAL opens later (see
    :func:`configure_gdal_s3` for why the environment). Called at every remote open; returns the options in
    force."""
    with _gdal_s3_lock:
        for key, value in GDAL_NETWORK.items():
            if key not in os.environ:
                os.environ[key] = value
                _gdal_s3_applied[key] = value
        return {key: os.environ[key] for key in GDAL_NETWORK}


def _is_http(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocol


def open_raster(uri: str, reader: str | None = None, **options) -> rasterio.io.DatasetReader:
    """Open a raster for reading. ``options`` go to ``rasterio.open`` (``overview_level=k`` opens the k-th
    overview as a raster of its own).

    Local paths are opened directly. ``s3://`` URIs are read by GDAL's ``/vsis3/`` (``reader="gdal"``,
    the default: ranged GETs of the blocks a window needs, GDAL's block cache, object sizes and headers
    cached per process; endpoint and credentials from the pipeline's fsspec config, see
    :func:`configure_gdal_s3`) or through a Python fsspec file object (``reader="fsspec"``); ``http(s)://``
    URIs likewise by GDAL's ``/vsicurl/`` (no sidecar looked for: :data:`GDAL_HTTP_OPEN`) or fsspec.
    Both GDAL paths run with :data:`GDAL_NETWORK` (:func:`configure_gdal_network`).
    ``reader=None`` takes ``$SARLANG_RASTER_READER`` (``run.raster_reader``), so worker processes follow
    the run's choice. Other remote schemes (``gs://``) go through fsspec. A local ``.vrt``
    may name ``/vsis3/`` sources: GDAL gets the same storage settings before opening one. GDAL keeps what
    it learned of an object (size, listing, cached ranges) for the life of the process: write a changed
    file under a new name, not over an object already read.

    Raises:
        RemoteRasterError: a remote raster cannot be opened; the message says whether the object is
            missing or unreachable and what to check (URI, endpoint, credentials).
    """
    options = {k: v for k, v in options.items() if v is not None}
    href = sign_href(uri)  # catalog.sign: every remote href is signed right before it is read
    if not is_remote(href):
        # a .vrt may name /vsis3/ sources (land-cover mosaics); /vsizip//vsis3/: a member of a zip on s3
        # (SAFE)
        if href.lower().endswith(".vrt") or "/vsis3/" in href:
            configure_gdal_s3(fsspec.filesystem("s3"))
        return rasterio.open(href, **options)
    fs, path = filesystem(href)
    http = _is_http(href)
    name = raster_reader(reader) if _is_s3(fs) or http else "fsspec"
    try:
        # a signed href names one object: GDAL must not look for sidecars (.aux.xml, .ovr, .msk) beside it,
        # whose names it would derive from the signed URL (query included) and ask for unsigned; nor beside
        # any http(s) URL (GDAL_HTTP_OPEN)
        with rasterio.Env(**(GDAL_HTTP_OPEN if http or href != uri else {})):
            if name == "gdal" and http:
                configure_gdal_network()
                return rasterio.open(f"/vsicurl/{href}", **options)
            if name == "gdal":
                configure_gdal_s3(fs)
                return rasterio.open(f"/vsis3/{path}", **options)
            return rasterio.open(path, opener=fs, **options)
    except rasterio.errors.RasterioIOError as exc:
        # the message names the href as published: a signed one carries a token, which stays out of logs
        message = _open_failure(uri, name, fs, path, exc)
        raise RemoteRasterError(
            message.replace(href, uri).replace(path, uri) if href != uri else message
        ) from exc


def _open_failure(uri: str, reader: str, fs: fsspec.AbstractFileSystem, path: str, exc: Exception) -> str:
    """Why ``uri`` did not open, and what to check: asks the storage (through fsspec) whether the object
    exists, so a missing object and refused access read differently."""
    via = ("GDAL /vsis3/" if _is_s3(fs) else "GDAL /vsicurl/") if reader == "gdal" else "fsspec"
    if _is_s3(fs):
        where = fs.client_kwargs.get("endpoint_url") or fs.endpoint_url
        where = f"{via}, endpoint {where}" if where else f"{via}, the default AWS endpoint"
        config = (
            "the S3 endpoint and the credentials of the pipeline's fsspec config "
            "(FSSPEC_S3_ENDPOINT_URL, FSSPEC_S3_KEY / FSSPEC_S3_SECRET, "
            "or the AWS_* variables and ~/.aws)"
        )
    else:
        where, config = via, "the storage's credentials (fsspec config)"
    try:
        fs.invalidate_cache(path)
        found: bool | None = bool(fs.exists(path))
    except Exception:  # noqa: BLE001 - credentials refused, endpoint down: exists() fails like the open did
        found = None
    if found is False:
        return (
            f"{uri} does not exist ({where}). Check the URI, and that the endpoint and bucket are the "
            "ones that hold the archive (fsspec config, e.g. FSSPEC_S3_ENDPOINT_URL)."
        )
    if found is None:
        return f"cannot reach {uri} ({where}): {exc}. Check {config}."
    hint = " (run.raster_reader=fsspec reads it through fsspec instead)" if reader == "gdal" else ""
    return (
        f"cannot open {uri} ({where}): {exc}. The object exists: if the reason is HTTP 403 or access "
        f"denied, check {config}; otherwise the file is corrupt or not a raster{hint}."
    )
