"""s3:// raster reads: GDAL's /vsis3/ against a Python fsspec file object, on a real SeaweedFS server.

    python benchmarks/bench_vsis3.py [--windows 40] [--out benchmarks/results/vsis3_vs_fsspec.json]

The script starts SeaweedFS (`weed mini`, as the tests do), uploads one archive of tiled COGs with
overviews (the real Umbra scene of ../shared/data/real_sar made into a COG, plus synthetic float32
speckle scenes), and reads the same random 256 x 256 windows through `sarlang_ray.io.open_raster` with
`reader="fsspec"` and `reader="gdal"`, at full resolution and at overview level 1 (4x decimated).

Each reader runs in a fresh process (GDAL's caches are per process), three passes over the windows:
- cold: open each scene, read its windows (nothing cached);
- warm, same datasets: read the windows again from the datasets still open (GDAL's block cache serves
  both readers here);
- warm, reopened: close every dataset, open again, read again: what an actor that reopens scenes gets
  (GDAL keeps object sizes, listings and single-range reads such as headers per process, but fetches
  tile data read by multi-range requests again; an fsspec file object starts empty).

Reads go once straight to SeaweedFS (reads/s) and once through a counting HTTP proxy in this process
(requests and response bytes per pass); both readers' arrays are compared. Ratios come from the same run.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL_SAR = REPO.parent / "shared" / "data" / "real_sar"
BUCKET = "bench"
WINDOW = 256


# ---------------------------------------------------------------- a counting reverse proxy
class _Counts:
    def __init__(self):
        self.lock, self.requests, self.bytes = threading.Lock(), 0, 0


def start_proxy(upstream_port: int) -> tuple[http.server.ThreadingHTTPServer, _Counts]:
    """An HTTP proxy on 127.0.0.1 that forwards every request to SeaweedFS unchanged (Host and signature
    headers included: the server checks no signatures) and counts requests and response body bytes.
    ``GET /__counts`` answers the counters themselves (not counted)."""
    counts = _Counts()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _forward(self):
            if self.path == "/__counts":
                body = json.dumps({"requests": counts.requests, "bytes": counts.bytes}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            length = int(self.headers.get("Content-Length") or 0)
            payload = self.rfile.read(length) if length else None
            conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
            conn.request(self.command, self.path, body=payload, headers=dict(self.headers.items()))
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            with counts.lock:
                counts.requests += 1
                counts.bytes += len(body)
            self.send_response(resp.status, resp.reason)
            for key, value in resp.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            size = len(body) if self.command != "HEAD" else resp.getheader("Content-Length") or 0
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, counts


# ---------------------------------------------------------------- the archive
def write_archive(folder: Path, n_synthetic: int, size: int) -> list[Path]:
    """Tiled COGs (256-pixel blocks, deflate, averaged overviews): the real Umbra scene, and synthetic
    float32 speckle (gamma, 4 looks, over a smooth field) with a fixed seed, large enough (75 MiB at 4096
    pixels) that fetching whole 50 MiB s3fs blocks costs something."""
    import numpy as np
    import rasterio
    import rasterio.shutil
    from rasterio.transform import from_origin

    folder.mkdir(parents=True, exist_ok=True)
    cog = {"driver": "COG", "BLOCKSIZE": 256, "COMPRESS": "DEFLATE", "OVERVIEW_RESAMPLING": "AVERAGE"}
    out = []
    umbra = REAL_SAR / "umbra_gec_mount_yasur" / "umbra_mount_yasur.tiff"
    if umbra.exists():
        rasterio.shutil.copy(umbra, folder / "umbra.tif", **cog)
        out.append(folder / "umbra.tif")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n_synthetic):
        field = (0.05 + 0.2 * (np.sin(6 * xx + i) * np.cos(4 * yy) + 1)).astype("float32")
        data = (field * rng.gamma(4.0, 1 / 4.0, size=(size, size))).astype("float32")
        plain = folder / f"synthetic_{i}_plain.tif"
        with rasterio.open(
            plain,
            "w",
            driver="GTiff",
            width=size,
            height=size,
            count=1,
            dtype="float32",
            crs="EPSG:32631",
            transform=from_origin(600000 + i * 1e5, 4800000, 10, 10),
        ) as dst:
            dst.write(data, 1)
        rasterio.shutil.copy(plain, folder / f"synthetic_{i}.tif", **cog)
        plain.unlink()
        out.append(folder / f"synthetic_{i}.tif")
    return out


# ---------------------------------------------------------------- one reader, in a fresh process
def worker(reader: str, uris: list[str], n_windows: int, counts_url: str | None) -> dict:
    import hashlib
    import urllib.request

    import numpy as np
    from rasterio.windows import Window

    from sarlang_ray import io

    def counters() -> dict:
        if not counts_url:
            return {"requests": 0, "bytes": 0}
        with urllib.request.urlopen(counts_url) as r:
            return json.loads(r.read())

    rng = np.random.default_rng(1)
    plan = {}  # (uri, level) -> windows, drawn once so that every pass and both readers read the same
    for uri in uris:
        with io.open_raster(uri, reader=reader) as src:
            sizes = {None: (src.width, src.height)}
        for level, factor in ((None, 1), (1, 4)):
            w, h = sizes[None][0] // factor, sizes[None][1] // factor
            plan[(uri, level)] = [
                Window(
                    int(rng.integers(0, w - WINDOW + 1)), int(rng.integers(0, h - WINDOW + 1)), WINDOW, WINDOW
                )
                for _ in range(n_windows)
            ]

    result, digest = {}, hashlib.sha256()
    for level in (None, 1):
        name = "full" if level is None else "overview1"
        datasets: dict = {}
        phases = {}
        for phase in ("cold", "warm_same_datasets", "warm_reopened"):
            if phase == "warm_reopened":
                for ds in datasets.values():
                    ds.close()
                datasets = {}
            before, t0, reads = counters(), time.perf_counter(), 0
            for uri in uris:
                if uri not in datasets:
                    datasets[uri] = io.open_raster(uri, reader=reader, overview_level=level)
                for window in plan[(uri, level)]:
                    block = datasets[uri].read(1, window=window)
                    reads += 1
                    if phase == "cold":
                        digest.update(block.tobytes())
            seconds = time.perf_counter() - t0
            after = counters()
            phases[phase] = {
                "reads": reads,
                "seconds": round(seconds, 3),
                "reads_per_s": round(reads / seconds, 1),
                "requests": after["requests"] - before["requests"],
                "bytes": after["bytes"] - before["bytes"],
            }
        for ds in datasets.values():
            ds.close()
        result[name] = phases
    with io.open_raster(uris[0], reader=reader) as src:
        result["name_of_a_dataset"] = src.name
    result["sha256_of_cold_reads"] = digest.hexdigest()
    return result


def run_worker(reader: str, uris: list[str], n_windows: int, endpoint: str, counts_url: str | None) -> dict:
    """``worker`` in a fresh process (fresh GDAL caches) whose fsspec config points at ``endpoint``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GDAL_", "CPL_"))}
    env.update(FSSPEC_S3_ENDPOINT_URL=endpoint, PYTHONPATH=str(REPO))  # keys: the test server's, from main()
    args = [sys.executable, __file__, "--worker", reader, "--windows", str(n_windows), "--uris", *uris]
    if counts_url:
        args += ["--counts-url", counts_url]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode:
        raise RuntimeError(f"{reader} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=30, help="random 256x256 windows per scene and level")
    ap.add_argument("--synthetic", type=int, default=2, help="synthetic scenes besides the real one")
    ap.add_argument("--size", type=int, default=4096, help="width and height of a synthetic scene")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "vsis3_vs_fsspec.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--uris", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--counts-url", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.uris, a.windows, a.counts_url)))
        return

    # the test server: its ports, and the FSSPEC_S3_* environment that points fsspec at it (set before
    # fsspec is imported; the worker processes get their endpoint from run_worker instead)
    sys.path.insert(0, str(REPO / "tests"))
    import s3_server

    os.environ.update(s3_server.ENV)
    import fsspec
    import rasterio

    with tempfile.TemporaryDirectory(prefix="bench-vsis3-") as tmp:
        files = write_archive(Path(tmp) / "archive", a.synthetic, a.size)
        server = s3_server.WeedMini(Path(tmp) / "weed", BUCKET)
        server.start()
        proxy = None
        try:
            fs = fsspec.filesystem("s3")
            uris = []
            for path in files:
                fs.put(str(path), f"{BUCKET}/archive/{path.name}")
                uris.append(f"s3://{BUCKET}/archive/{path.name}")
            proxy, _ = start_proxy(s3_server.PORTS["s3"])
            proxied = f"http://127.0.0.1:{proxy.server_address[1]}"
            runs = {}
            for reader in ("fsspec", "gdal"):
                runs[reader] = {
                    "direct": run_worker(reader, uris, a.windows, s3_server.ENDPOINT, None),
                    "proxied": run_worker(reader, uris, a.windows, proxied, f"{proxied}/__counts"),
                }
        finally:
            if proxy:
                proxy.shutdown()
            server.stop()
        scenes = []
        for path in files:
            with rasterio.open(path) as src:
                scenes.append(
                    {
                        "name": path.name,
                        "shape": list(src.shape),
                        "dtype": src.dtypes[0],
                        "bytes": path.stat().st_size,
                        "overviews": src.overviews(1),
                    }
                )

    report = {
        "what": "random 256x256 window reads of s3:// COGs on SeaweedFS: GDAL /vsis3/ vs fsspec opener",
        "scenes": scenes,
        "windows_per_scene_and_level": a.windows,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1_5_15min": [round(x, 1) for x in os.getloadavg()],
            "python": platform.python_version(),
            "rasterio": rasterio.__version__,
            "gdal": rasterio.__gdal_version__,
        },
        "identical_pixels": len({r[m]["sha256_of_cold_reads"] for r in runs.values() for m in r}) == 1,
        "gdal_dataset_name": runs["gdal"]["direct"]["name_of_a_dataset"],
        "results": {},
        "ratios_gdal_over_fsspec": {},
    }
    for level in ("full", "overview1"):
        for phase in ("cold", "warm_same_datasets", "warm_reopened"):
            row = {}
            for reader in ("fsspec", "gdal"):
                d, p = runs[reader]["direct"][level][phase], runs[reader]["proxied"][level][phase]
                row[reader] = {
                    "reads_per_s": d["reads_per_s"],
                    "seconds": d["seconds"],
                    "reads": d["reads"],
                    "requests": p["requests"],
                    "bytes_transferred": p["bytes"],
                }
            report["results"][f"{level}/{phase}"] = row
            f, g = row["fsspec"], row["gdal"]
            report["ratios_gdal_over_fsspec"][f"{level}/{phase}"] = {
                "reads_per_s": round(g["reads_per_s"] / f["reads_per_s"], 2),
                "bytes_transferred": (
                    round(g["bytes_transferred"] / f["bytes_transferred"], 3)
                    if f["bytes_transferred"]
                    else None
                ),
                "requests": round(g["requests"] / f["requests"], 3) if f["requests"] else None,
            }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratios_gdal_over_fsspec"], indent=2))
    print(f"identical pixels: {report['identical_pixels']}; written to {a.out}")


if __name__ == "__main__":
    main()
