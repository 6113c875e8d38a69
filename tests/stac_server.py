"""A real STAC API for tests: rustac's server (``rustac serve``, PyPI rustac, in-memory backend) on 127.0.0.1
over an ItemCollection the test wrote, behind a counting pass-through proxy so a test can tell how many
requests reached the API (rustac keeps no access log). The API's own links name the proxy (``--addr``),
so pystac-client pages through it."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Proxy(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, upstream: str):
        self.upstream = upstream
        self.requests: list[str] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Forward)


class _Forward(http.server.BaseHTTPRequestHandler):
    def _forward(self) -> None:
        server: _Proxy = self.server  # type: ignore[assignment]
        with server.lock:
            server.requests.append(f"{self.command} {self.path}")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
        req = urllib.request.Request(
            server.upstream + self.path, data=body, headers=headers, method=self.command
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                status, data, kind = resp.status, resp.read(), resp.headers.get("Content-Type")
        except urllib.error.HTTPError as exc:
            status, data, kind = exc.code, exc.read(), exc.headers.get("Content-Type")
        self.send_response(status)
        self.send_header("Content-Type", kind or "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _forward

    def log_message(self, *args) -> None:  # quiet
        pass


class RustacServer:
    """``rustac serve`` of ``items`` (an ItemCollection JSON) on 127.0.0.1; ``url`` is the counting proxy."""

    def __init__(self, items: Path, log: Path):
        self.items, self.log = items, log
        self.proc: subprocess.Popen | None = None
        self.proxy: _Proxy | None = None

    @property
    def requests(self) -> list[str]:
        assert self.proxy is not None
        with self.proxy.lock:
            return list(self.proxy.requests)

    def start(self) -> RustacServer:
        exe = Path(sys.executable).parent / "rustac"
        if not exe.exists():
            raise RuntimeError(
                f"{exe} not found: install the dev extra (pip install -e '.[dev]', it has rustac)"
            )
        api_port, proxy_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{proxy_port}"
        self.proxy = _Proxy(proxy_port, f"http://127.0.0.1:{api_port}")
        threading.Thread(target=self.proxy.serve_forever, daemon=True).start()
        self.proc = subprocess.Popen(
            [
                str(exe),
                "serve",
                "--addr",
                self.url,
                "--bind",
                f"127.0.0.1:{api_port}",
                "--create-collections",
                str(self.items),
            ],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rustac serve exited: {self.log.read_text()}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{api_port}/", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"rustac serve did not answer in 30 s: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.proxy is not None:
            self.proxy.shutdown()
            self.proxy.server_close()
