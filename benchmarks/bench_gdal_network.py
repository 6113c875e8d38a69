"""GDAL's network settings for remote COGs: GDAL's defaults against each option alone and against the settings
sarlang-ray applies (``io.GDAL_NETWORK``, ``io.GDAL_HTTP_OPEN``), over ``/vsicurl/`` and ``/vsis3/``.

    python benchmarks/bench_gdal_network.py [--latency-ms 30] [--windows 12] [--out
benchmarks/results/gdal_network.json]

Archive: tiled COGs with overviews (256-pixel blocks, deflate): the real Umbra scene of
../shared/data/real_sar made into a COG (2000 x 2000 uint8) and a synthetic float32 speckle scene (4096 x
4096), as bench_vsis3 makes them. Servers, on 127.0.0.1, each adding ``--latency-ms`` to every answer (a
remote store's round trip) and counting requests and body bytes:

* ``/vsicurl/``: tests/http_files.FileServer over the folder (HTTP/1.1 keep-alive, single ranges, 404 for a
  folder URL as blob stores answer);
* ``/vsis3/``: SeaweedFS (`weed mini`, tests/s3_server.py) behind tests/header_proxy.HeaderProxy.

Each configuration runs in a fresh process (GDAL's caches are per process) and reads the same random 512 x 512
windows per scene, at full resolution and at overview level 1, in two passes: ``cold`` (open each scene, read
its windows, close it) and ``reopened`` (the same again in the same process: what a worker that reopens a
scene gets). ``gdal_defaults`` opens with plain rasterio and no GDAL option set (the storage options only, for
/vsis3/); ``sarlang`` opens through ``io.open_raster``; the others are the defaults plus one option. Every
configuration's pixels are hashed: they must all be equal.
"""

from __future__ import annotations

import argparse
import hashlib
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
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]
BUCKET = "bench"
WINDOW = 512

# the defaults plus one option: the options sarlang sets, and candidates it does not (their effect measured)
VARIANTS = {
    "GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR": {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"},
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES=YES": {"GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES"},
    "GDAL_HTTP_MULTIRANGE=SERIAL": {"GDAL_HTTP_MULTIRANGE": "SERIAL"},
    "VSI_CACHE=TRUE (25 MB per handle)": {"VSI_CACHE": "TRUE", "VSI_CACHE_SIZE": str(25 * 2**20)},
    "GDAL_NUM_THREADS=ALL_CPUS": {"GDAL_NUM_THREADS": "ALL_CPUS"},
    "GDAL_INGESTED_BYTES_AT_OPEN=65536": {"GDAL_INGESTED_BYTES_AT_OPEN": "65536"},
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS=.tif": {"CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif"},
}


# ---------------------------------------------------------------- counters the worker processes can read
class Counters(http.server.ThreadingHTTPServer):
    """``GET /`` answers the active server's request and byte counts, and how many requests named something
    other than a .tif (a folder listing, a sidecar probe), as JSON."""

    daemon_threads = True

    def __init__(self):
        self.target = None

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(inner):
                body = json.dumps(self.counts()).encode()
                inner.send_response(200)
                inner.send_header("Content-Length", str(len(body)))
                inner.end_headers()
                inner.wfile.write(body)

            def log_message(inner, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def counts(self) -> dict:
        with self.target.lock:
            paths = [r[1].split("?")[0] for r in self.target.requests]
            return {
                "requests": len(paths),
                "bytes": self.target.bytes_sent,
                "not_the_tif": sum(not p.endswith(".tif") for p in paths),
                "head": sum(r[0] == "HEAD" for r in self.target.requests),
            }


# ---------------------------------------------------------------- one configuration, in a fresh process
def worker(mode: str, hrefs: list[str], n_windows: int, counts_url: str) -> dict:
    import urllib.request

    import numpy as np
    import rasterio
    from rasterio.windows import Window

    from sarlang_ray import io

    def counters() -> dict:
        with urllib.request.urlopen(counts_url) as r:
            return json.loads(r.read())

    def opened(href: str, level):
        if mode == "sarlang":
            return io.open_raster(href, overview_level=level)
        gdal_path = f"/vsis3/{href[5:]}" if href.startswith("s3://") else f"/vsicurl/{href}"
        return rasterio.open(gdal_path, overview_level=level)

    if mode == "sarlang":  # the filesystem objects (s3fs, aiohttp imports) made before the clock starts
        for href, _ in hrefs:
            io.filesystem(href)
    rng = np.random.default_rng(1)
    plan = {}
    for href, (width, height) in hrefs:
        for level, factor in ((None, 1), (1, 4)):
            w, h = width // factor, height // factor
            side = min(WINDOW, w, h)
            plan[(href, level)] = [
                Window(int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1)), side, side)
                for _ in range(n_windows)
            ]
    out, digest = {}, hashlib.sha256()
    for level in (None, 1):
        for phase in ("cold", "reopened"):
            before, t0 = counters(), time.perf_counter()
            for href, _ in hrefs:
                with opened(href, level) as src:
                    for window in plan[(href, level)]:
                        block = src.read(1, window=window)
                        if phase == "cold":
                            digest.update(block.tobytes())
            seconds = time.perf_counter() - t0
            after = counters()
            out[f"{'full' if level is None else 'overview1'}/{phase}"] = {
                "seconds": round(seconds, 3),
                **{k: after[k] - before[k] for k in after},
            }
    out["sha256"] = digest.hexdigest()
    return out


def run_best(repeat: int, *args) -> dict:
    """``run_worker`` ``repeat`` times: requests and bytes of the first run (every run asks the same), each
    pass's fastest time (the machine is shared: the slower runs measure other people's load)."""
    runs = [run_worker(*args) for _ in range(repeat)]
    best = runs[0]
    for key in [k for k in best if "/" in k]:
        best[key]["seconds"] = min(r[key]["seconds"] for r in runs)
        best[key]["seconds_all_runs"] = [r[key]["seconds"] for r in runs]
    return best


def run_worker(mode: str, hrefs, n_windows: int, counts_url: str, env_extra: dict) -> dict:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GDAL_", "CPL_", "VSI_", "FSSPEC_"))
    }
    env.update(env_extra, PYTHONPATH=str(REPO))
    args = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        "--windows",
        str(n_windows),
        "--counts-url",
        counts_url,
        "--hrefs",
        json.dumps(hrefs),
    ]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode:
        raise RuntimeError(f"{mode} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def configurations(storage_env: dict, sarlang_env: dict) -> list[tuple[str, str, dict]]:
    rows = [("gdal_defaults", "raw", storage_env)]
    rows += [(name, "raw", {**storage_env, **opts}) for name, opts in VARIANTS.items()]
    rows.append(("sarlang", "sarlang", sarlang_env))
    return rows


def totals(result: dict) -> dict:
    keys = [k for k in result if "/" in k]
    return {
        m: round(sum(result[k][m] for k in keys), 3) for m in ("seconds", "requests", "bytes", "not_the_tif")
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency-ms", type=float, default=30.0)
    ap.add_argument(
        "--windows", type=int, default=12, help="random 512x512 windows per scene, level and pass"
    )
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration (fastest time kept)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gdal_network.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--hrefs", help=argparse.SUPPRESS)
    ap.add_argument("--counts-url", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, json.loads(a.hrefs), a.windows, a.counts_url)))
        return

    import s3_server  # tests/: SeaweedFS ports chosen at import

    os.environ.update(s3_server.ENV)
    import fsspec
    import rasterio
    from bench_vsis3 import write_archive
    from header_proxy import HeaderProxy
    from http_files import FileServer

    latency = a.latency_ms / 1000
    report = {
        "what": __doc__.split("\n")[0],
        "latency_ms_per_request": a.latency_ms,
        "window": WINDOW,
        "runs_per_configuration": a.repeat,
        "seconds": "each pass's fastest of the runs",
        "windows_per_scene_level_pass": a.windows,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "rasterio": rasterio.__version__,
            "gdal": rasterio.__gdal_version__,
            "load_average_1min": round(os.getloadavg()[0], 1),
        },
        "transports": {},
    }
    counters = Counters()
    with tempfile.TemporaryDirectory(prefix="bench-gdal-net-") as tmp:
        files = write_archive(Path(tmp) / "archive", 1, a.size)
        sizes = {}
        for path in files:
            with rasterio.open(path) as src:
                sizes[path.name] = (src.width, src.height)
        report["scenes"] = [
            {"name": p.name, "shape": list(sizes[p.name]), "bytes": p.stat().st_size} for p in files
        ]
        runs: dict[str, dict] = {}
        with FileServer(Path(tmp) / "archive", signed_only=False, latency_s=latency) as server:
            counters.target = server
            hrefs = [(f"{server.url}/{p.name}", sizes[p.name]) for p in files]
            runs["vsicurl"] = {
                name: run_best(a.repeat, mode, hrefs, a.windows, counters.url, env)
                for name, mode, env in configurations({}, {})
            }
        weed = s3_server.WeedMini(Path(tmp) / "weed", BUCKET)
        weed.start()
        try:
            fs = fsspec.filesystem("s3")
            for path in files:
                fs.put(str(path), f"{BUCKET}/archive/{path.name}")
            with HeaderProxy(s3_server.ENDPOINT, latency_s=latency) as proxy:
                counters.target = proxy
                storage = {
                    "AWS_S3_ENDPOINT": proxy.url.split("://")[1],
                    "AWS_HTTPS": "NO",
                    "AWS_VIRTUAL_HOSTING": "FALSE",
                    "AWS_ACCESS_KEY_ID": s3_server.ENV["FSSPEC_S3_KEY"],
                    "AWS_SECRET_ACCESS_KEY": s3_server.ENV["FSSPEC_S3_SECRET"],
                }
                sarlang = {**s3_server.ENV, "FSSPEC_S3_ENDPOINT_URL": proxy.url}
                hrefs = [(f"s3://{BUCKET}/archive/{p.name}", sizes[p.name]) for p in files]
                runs["vsis3"] = {
                    name: run_best(a.repeat, mode, hrefs, a.windows, counters.url, env)
                    for name, mode, env in configurations(storage, sarlang)
                }
        finally:
            weed.stop()
    counters.shutdown()
    digests = {r["sha256"] for t in runs.values() for r in t.values()}
    report["identical_pixels"] = len(digests) == 1
    for transport, rows in runs.items():
        base = totals(rows["gdal_defaults"])
        table = {}
        for name, result in rows.items():
            tot = totals(result)
            table[name] = {
                "total": tot,
                "vs_defaults": {
                    m: round(tot[m] / base[m], 3) if base[m] else None
                    for m in ("seconds", "requests", "bytes")
                },
                "passes": {k: v for k, v in result.items() if "/" in k},
            }
        report["transports"][transport] = table
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    for transport, table in report["transports"].items():
        for name, row in table.items():
            print(f"{transport:8s} {name:42s} {row['total']} {row['vs_defaults']}")
    print(f"identical pixels: {report['identical_pixels']}; written to {a.out}")


if __name__ == "__main__":
    main()
