"""Paths that are local folders or ``s3://`` URIs, through fsspec, and atomic writes.

Every stage writes through :func:`write_bytes_atomic`, so a reader never sees half a file: locally a
temporary name is renamed into place; on S3 a single PUT is already all-or-nothing.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio


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


def parquet_dataset(uris: list[str], columns: list[str], keep=None, num_cpus: float = 0.1):
    """A Ray Dataset of the rows of Parquet files (local or remote, through fsspec), one file per task.

    Reading is light, so each task asks for ``num_cpus`` (a tenth of a CPU): reads still run when actor
    pools or training workers hold every CPU of the node. (``ray.data.read_parquet`` plans its file
    listing as a task that needs a whole CPU, which then waits forever behind them.) ``keep``: an optional
    row predicate applied while reading."""
    import ray

    def read(item: dict) -> list[dict]:
        rows = read_parquet(item["uri"], columns=columns).to_pylist()
        return [r for r in rows if keep(r)] if keep else rows

    return ray.data.from_items([{"uri": u} for u in uris]).flat_map(read, num_cpus=num_cpus)


READ_SHARE = 0.25  # CPUs an actor pool leaves free for the light read tasks of its own dataset


def pool_cpus(concurrency: int, num_cpus: float, cluster_cpus: float, read_share: float = READ_SHARE) -> float:
    """CPUs per actor for a pool of ``concurrency`` actors that is fed by :func:`parquet_dataset` reads.

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
    names come back unchanged. Downloads once per URI into ``cache`` (default: a temp folder)."""
    if not is_remote(uri):
        return uri
    import hashlib
    import tempfile

    target = os.path.join(cache or os.path.join(tempfile.gettempdir(), "sarlang-remote"),
                          hashlib.sha1(uri.encode()).hexdigest()[:16])
    if not os.path.exists(os.path.join(target, "_COMPLETE")):
        fs, path = filesystem(uri)
        partial = f"{target}.{uuid.uuid4().hex}.partial"
        fs.get(path.rstrip("/") + "/", partial, recursive=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            os.replace(partial, target)
        open(os.path.join(target, "_COMPLETE"), "w").close()
    return target


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def relative(uri: str, base: str) -> str:
    """``uri`` relative to ``base`` (no leading slash); ``uri`` itself when it is not under ``base``."""
    if base and uri.startswith(base):
        return uri[len(base):].lstrip("/")
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
    os.makedirs(os.path.dirname(uri) or ".", exist_ok=True)
    tmp = f"{uri}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, uri)


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


def open_raster(uri: str, **options) -> rasterio.io.DatasetReader:
    """Open a raster for reading: local paths directly, remote URIs through fsspec. ``options`` go to
    ``rasterio.open`` (``overview_level=k`` opens the k-th overview as a raster of its own)."""
    options = {k: v for k, v in options.items() if v is not None}
    if is_remote(uri):
        fs, path = filesystem(uri)
        return rasterio.open(path, opener=fs, **options)
    return rasterio.open(uri, **options)
