"""A static file server on 127.0.0.1 for tests and benchmarks, with HTTP range requests (what GDAL and fsspec
read COGs by), that records every request, so a test can tell what a reader asked for. With ``signed_only``
(the default) it answers only signed requests (:mod:`stac_signers`: ``?sig=`` must be the signature of the
path; or what ``authorize`` says), so a test can tell that every href read was signed; ``latency_s``
delays every answer, as a remote store's round trip would; ``bytes_sent`` counts the body bytes sent."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from stac_signers import signature

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real store: a reader's connection serves many requests

    def _serve(self, body: bool) -> None:
        server: FileServer = self.server  # type: ignore[assignment]
        url = urlsplit(self.path)  # a path, or an absolute URL when the server is a reader's HTTP proxy
        query = parse_qs(url.query)
        signed = (
            server.authorize(url.path, query)
            if server.authorize
            else query.get("sig", [""])[0] == signature(url.path)
        )
        with server.lock:
            server.requests.append((self.command, url.path, signed))
        if server.latency_s:
            time.sleep(server.latency_s)
        path = server.root / url.path.lstrip("/")
        if server.signed_only and not signed:
            return self._status(403)
        if not path.is_file():
            return self._status(404)
        size = path.stat().st_size
        start, end = 0, size - 1
        ranged = self.headers.get("Range", "").startswith("bytes=")
        if ranged:
            first, _, last = self.headers["Range"][6:].split(",")[0].partition("-")
            start, end = (
                (size - int(last), size - 1)
                if not first
                else (int(first), min(int(last or size - 1), size - 1))
            )
        with path.open("rb") as f:  # the range only: a benchmark's large COG is not read whole per request
            f.seek(start)
            chunk = f.read(end + 1 - start) if body else b""
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Length", str(end + 1 - start))
        self.send_header("Accept-Ranges", "bytes")
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if body:
            self.wfile.write(chunk)
            with server.lock:
                server.bytes_sent += len(chunk)

    def _status(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self._serve(True)

    def do_HEAD(self) -> None:
        self._serve(False)

    def log_message(self, *args) -> None:
        pass


class FileServer(http.server.ThreadingHTTPServer):
    """Serves ``root`` on 127.0.0.1; ``requests``: (method, path, signed) of every request."""

    daemon_threads = True

    def __init__(self, root: Path, signed_only: bool = True, latency_s: float = 0.0, authorize=None):
        self.root, self.requests, self.lock = Path(root), [], threading.Lock()
        self.authorize = authorize  # (path, parsed query) -> bool instead of the stac_signers signature
        self.signed_only, self.latency_s, self.bytes_sent = signed_only, latency_s, 0
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> Self:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
