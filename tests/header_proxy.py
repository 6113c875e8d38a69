"""A pass-through HTTP proxy on 127.0.0.1 that records the headers of every request (tests: what a reader
sent to SeaweedFS: a signature or none, ``x-amz-request-payer``); with ``latency_s`` it delays every answer,
as a remote store's round trip would, and ``bytes_sent`` counts the body bytes it answered (benchmarks)."""

from __future__ import annotations

import http.client
import http.server
import threading
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _forward(self) -> None:
        server: HeaderProxy = self.server  # type: ignore[assignment]
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        with server.lock:
            server.requests.append((self.command, self.path, {k.lower(): v for k, v in headers.items()}))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        up = urlsplit(server.upstream)
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
        conn.request(self.command, self.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if server.latency_s:
            time.sleep(server.latency_s)
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                self.send_header(k, v)  # a HEAD's Content-Length is the object's size
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
            with server.lock:
                server.bytes_sent += len(data)
        conn.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    def log_message(self, *args) -> None:
        pass


class HeaderProxy(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str, latency_s: float = 0.0):
        self.upstream, self.requests, self.lock = upstream, [], threading.Lock()
        self.latency_s, self.bytes_sent = latency_s, 0
        super().__init__(("127.0.0.1", 0), _Forward)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> Self:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
