"""A second Ray on this machine for tests: ``ray start --head --block`` in its own temp dir, on free ports
of 127.0.0.1, stopped with SIGTERM (never ``ray stop``, which kills every Ray process on the machine, the
session's included). Used by the job-submission test and the autoscaling test (a head started with
``--autoscaling-config`` and Ray's fake multi-node provider)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's bin: `ray` and `sarlang` live here


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all held open while choosing, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_ok(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never via a proxy
    try:
        with opener.open(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def kill_leftovers(markers: list[str]) -> list[int]:
    """SIGKILL any process whose command line names one of our unique temp paths; their pids."""
    import psutil

    killed = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if p.pid != os.getpid() and any(m in cmdline for m in markers):
            try:
                p.kill()
                killed.append(p.pid)
            except psutil.Error:
                pass
    return killed


class HeadStartFailed(RuntimeError):
    """``ray start`` exited or did not serve its dashboard in time (the log tail is the message)."""


@contextlib.contextmanager
def ray_head(
    log_path: Path,
    ready_timeout_s: float = 180,
    num_cpus: int = 2,
    autoscaling: dict | None = None,
    extra_env: dict | None = None,
):
    """One ``ray start --head --block`` in its own temp dir and on its own free ports; stopped on exit,
    with any process left naming the temp dir or ``log_path``'s folder (the test's run folder) killed.

    ``autoscaling``: the ``available_node_types`` (head excluded) of a cluster config for Ray's fake
    multi-node provider (``RAY_FAKE_CLUSTER=1``): the head's autoscaler then starts and stops worker nodes,
    each its own raylet on this machine, as pending tasks and actors ask for them.

    Yields ``(dashboard_url, env, temp_dir)``: ``env`` is the environment for ``ray job`` commands and for
    drivers (``RAY_ADDRESS`` names this head's GCS).
    """
    # short: Ray's unix sockets live under the temp dir and their paths are limited to 107 bytes
    temp_dir = tempfile.mkdtemp(prefix="sarlang-rayjob-", dir="/tmp")
    ports = dict(
        zip(
            (
                "gcs",
                "dashboard",
                "agent_http",
                "agent_grpc",
                "runtime_env",
                "metrics",
                "node_manager",
                "object_manager",
            ),
            free_ports(8),
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # the job's entrypoint finds `sarlang` here
    env.update(
        RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    )
    env.update(extra_env or {})
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={ports['gcs']}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports['dashboard']}",
        "--include-dashboard=true",
        f"--dashboard-agent-listen-port={ports['agent_http']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--runtime-env-agent-port={ports['runtime_env']}",
        f"--metrics-export-port={ports['metrics']}",
        f"--node-manager-port={ports['node_manager']}",
        f"--object-manager-port={ports['object_manager']}",
        "--min-worker-port=0",
        "--max-worker-port=0",  # random worker ports: no clash with the session's Ray
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    if autoscaling is not None:
        config_path = Path(temp_dir, "autoscaling.json")
        config_path.write_text(json.dumps(fake_cluster_config(autoscaling, num_cpus, ports["gcs"])))
        cmd.append(f"--autoscaling-config={config_path}")
        # the fake provider's nodes, and their addresses: 127.0.0.1 (Ray's loopback mode), not the host's IP
        env.update(
            RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"
        )
    # the head's output for its whole life: closed when it is stopped
    log = open(log_path, "wb")  # noqa: SIM115
    # own session and process group: the test's signals do not reach it, and a last-resort killpg is safe
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard']}"
    try:
        deadline = time.time() + ready_timeout_s
        address_file = Path(temp_dir, "ray_current_cluster")  # written once the node is up
        while not (address_file.exists() and http_ok(f"{url}/api/version")):
            if proc.poll() is not None:
                raise HeadStartFailed(
                    f"ray start exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
                )
            if time.time() > deadline:
                raise HeadStartFailed(
                    f"no Ray dashboard on {url} after {ready_timeout_s} s:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(1)
        yield (
            url,
            {**env, "RAY_ADDRESS": f"127.0.0.1:{ports['gcs']}"} if autoscaling is not None else env,
            temp_dir,
        )
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` kills its node's processes, then exits
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
        time.sleep(1)
        # safety net (a job driver); normally nothing is left
        kill_leftovers([temp_dir, str(log_path.parent), f"127.0.0.1:{ports['gcs']}"])
        shutil.rmtree(temp_dir, ignore_errors=True)


def fake_cluster_config(worker_node_types: dict, head_cpus: int, gcs_port: int) -> dict:
    """A cluster config for Ray's ``fake_multinode`` provider (the keys of Ray's own
    ``fake_multi_node/example.yaml``, which the wheel does not ship)."""
    return {
        "cluster_name": "sarlang-fake",
        "max_workers": sum(t.get("max_workers", 1) for t in worker_node_types.values()),
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{gcs_port}",
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            **{name: {"node_config": {}, "min_workers": 0, **t} for name, t in worker_node_types.items()},
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }
