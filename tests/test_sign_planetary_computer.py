"""catalog.sign=planetary_computer, with the real planetary-computer package against a SAS token server and a
blob store on 127.0.0.1 that accepts only valid, unexpired tokens.

The package asks ``$PC_SDK_SAS_URL/<account>/<container>`` for a token and signs only blob URLs
(``<account>.blob.core.windows.net``): the rasters are named by such URLs and GDAL reaches them through
``GDAL_HTTP_PROXY``, the recording file server (tests/http_files.py), which checks every request's token.
Tokens live TOKEN_LIFE_S seconds and the reader runs more than twice as long, in a fresh process (the
package's settings and token cache are per process): every read succeeds, every request carries a token
that was valid when it arrived, and several tokens were used, so hrefs are signed at each open with a
current token, not once."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import rasterio
from http_files import FileServer

pytest.importorskip("planetary_computer", reason="catalog.sign=planetary_computer needs the dev extra")

REPO = Path(__file__).resolve().parents[1]
ACCOUNT, CONTAINER = "sarlangtest", "s1-rtc"
TOKEN_LIFE_S = 3.0
SECRET = b"sarlang-sas-test"


def _sig(container: str, expiry: str) -> str:
    return hmac.new(SECRET, f"{container}|{expiry}".encode(), hashlib.sha256).hexdigest()[:32]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class TokenServer(http.server.ThreadingHTTPServer):
    """The SAS token endpoint: ``GET /api/sas/v1/token/<account>/<container>`` answers a token shaped as the
    Planetary Computer's (``st``, ``se``, ``sp``, ``sv``, ``sr``, ``sig``) that expires TOKEN_LIFE_S ahead."""

    daemon_threads = True

    def __init__(self):
        self.issued: list[str] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                container = self.path.rstrip("/").split("/")[-1]
                start, expiry = _now(), _now() + dt.timedelta(seconds=TOKEN_LIFE_S)
                se = expiry.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                token = (
                    f"st={start.strftime('%Y-%m-%dT%H:%M:%SZ')}&se={se}&sp=rl&sv=2021-06-08&sr=c"
                    f"&sig={_sig(container, se)}"
                )
                with outer.lock:
                    outer.issued.append(token)
                body = json.dumps({"msft:expiry": se, "token": token}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/api/sas/v1/token"

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class BlobStore:
    """Checks a request's SAS token: the signature of its container and expiry, and the expiry still ahead.
    ``seen``: (token signature, arrival time, valid) of every request."""

    def __init__(self):
        self.seen: list[tuple[str, dt.datetime, bool]] = []

    def __call__(self, path: str, query: dict) -> bool:
        container = path.lstrip("/").split("/")[0]
        se, sig = query.get("se", [""])[0], query.get("sig", [""])[0]
        try:
            ok = sig == _sig(container, se) and dt.datetime.fromisoformat(se.replace("Z", "+00:00")) > _now()
        except ValueError:
            ok = False
        self.seen.append((sig, _now(), ok))
        return ok


READER = r"""
import json, sys, time
from sarlang_ray import io
hrefs, expected, seconds = json.loads(sys.argv[1]), json.loads(sys.argv[2]), float(sys.argv[3])
io.use_access(sign="planetary_computer")
reads, end = 0, time.monotonic() + seconds
while time.monotonic() < end:  # what a worker does over a long run: open, read, close, scene after scene
    for href, want in zip(hrefs, expected):
        with io.open_raster(href) as src:
            got = float(src.read(1).astype("float64").sum())
        assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), (href, got, want)
        reads += 1
print(json.dumps({"reads": reads}))
"""


@pytest.fixture(scope="module")
def blobs(real_sar, tmp_path_factory):
    """Three real OPERA RTC-S1 crops in a container folder, with their pixel sums read locally."""
    root = tmp_path_factory.mktemp("blobs")
    (root / CONTAINER / "bursts").mkdir(parents=True)
    files = sorted((real_sar / "opera_rtc_s1_t137_crops").glob("*/*_VV.tif"))[:3]
    expected = []
    for f in files:
        shutil.copy(f, root / CONTAINER / "bursts" / f.name)
        with rasterio.open(f) as src:
            expected.append(float(src.read(1).astype("float64").sum()))
    hrefs = [f"http://{ACCOUNT}.blob.core.windows.net/{CONTAINER}/bursts/{f.name}" for f in files]
    return root, hrefs, expected


def test_planetary_computer_signs_every_read_and_refreshes_tokens(blobs):
    root, hrefs, expected = blobs
    store = BlobStore()
    with TokenServer() as tokens, FileServer(root, authorize=store) as files:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GDAL_", "CPL_", "PC_SDK_"))}
        # no ~/.planetarycomputer
        env.update(
            PYTHONPATH=str(REPO),
            PC_SDK_SAS_URL=tokens.url,
            PC_SDK_SUBSCRIPTION_KEY="",
            GDAL_HTTP_PROXY=files.url.split("://")[1],
            HOME=str(root),
        )
        started = _now()
        done = subprocess.run(
            [sys.executable, "-c", READER, json.dumps(hrefs), json.dumps(expected), str(2.5 * TOKEN_LIFE_S)],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        reads = json.loads(done.stdout.strip().splitlines()[-1])["reads"]
        with files.lock:
            requests = list(files.requests)
        issued = list(tokens.issued)

    assert reads >= len(hrefs) and requests
    # every request reached a blob path with a valid, unexpired token (the store answered 403 otherwise)
    assert all(signed for _, _, signed in requests), [r for r in requests if not r[2]][:5]
    assert all(ok for _, _, ok in store.seen) and len(store.seen) == len(requests)
    assert {p for _, p, _ in requests} <= {f"/{CONTAINER}/bursts/{h.rsplit('/', 1)[1]}" for h in hrefs}
    # the run outlived the first token, and the tokens used came from the token server, several of them
    used = {sig for sig, _, _ in store.seen}
    assert max(t for _, t, _ in store.seen) > started + dt.timedelta(seconds=TOKEN_LIFE_S)
    assert len(used) >= 3 and used <= {t.rsplit("sig=", 1)[1] for t in issued}


def test_the_blob_store_refuses_unsigned_and_expired_reads(blobs):
    """The control: the store the test above relies on says no to a read without a token and to a token
    past its expiry."""
    root, hrefs, _ = blobs
    store = BlobStore()
    with TokenServer() as tokens, FileServer(root, authorize=store) as files:
        path = "/" + hrefs[0].split("/", 3)[3]
        with urllib.request.urlopen(f"{tokens.url}/{ACCOUNT}/{CONTAINER}") as r:
            token = json.loads(r.read())["token"]
        with urllib.request.urlopen(f"{files.url}{path}?{token}") as r:
            assert r.status == 200 and r.read()[:2] in (b"II", b"MM")  # a TIFF
        for query, wait in (("", 0.0), (token, TOKEN_LIFE_S + 0.5)):
            time.sleep(wait)
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{files.url}{path}?{query}")
            assert refused.value.code == 403
