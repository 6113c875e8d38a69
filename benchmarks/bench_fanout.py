"""Driver CPU per work item of an actor-pool stage (``runner.map_items``): one block per item (before issue
31) vs items batched into blocks with the manifest streamed to a file (now).

    .venv/bin/python benchmarks/bench_fanout.py        # writes benchmarks/results/fanout.json

The row function does nothing (it returns a manifest row of the size the stages return), so what is measured
is the driver's own cost of fanning out the items and taking the rows back: the CPU time of the driver process
(``time.process_time``: every thread of it, Ray's core worker and Ray Data's scheduling loop included) and
its peak RSS growth, on a local Ray of 2 CPUs started on 127.0.0.1. The old way (``from_items`` with one block
per item, ``take_all``) is run at fewer items (its cost per item is flat, and 16k of them take minutes on
a 2-core machine); the new one at the same count and at 16,384 items. Each measurement is a fresh driver
process, so one run's Ray state does not carry into the next.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULT = REPO / "benchmarks" / "results" / "fanout.json"


class Echo:
    """A row function that only answers: a manifest row like the stages' (counters as JSON)."""

    def __call__(self, row: dict) -> dict:
        return {
            "shard": row["shard"],
            "planned": 8,
            "written": 8,
            "rejected": 0,
            "skipped": False,
            "reasons": "{}",
            "gsds": json.dumps({"10 m": 8}),
            "classes": json.dumps({"building": 12, "road": 3}),
        }


def measure(way: str, n: int) -> dict:
    import ray

    from sarlang_ray.stages import execution as runner

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    items = [{"shard": f"scene-{i // 100:05d}/10m-{i % 100:05d}.parquet"} for i in range(n)]
    runner.map_items(items[:4], Echo, (), None, 1.0)  # warm: worker processes and Ray Data's imports
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if way == "one_block_per_item":
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        rows = ds.map(Echo, compute=runner.pool(len(items), None, None, 1.0), num_cpus=1.0).take_all()
        totals = runner.totals(rows)
    else:
        manifest = runner.map_items(items, Echo, (), None, 1.0)
        totals = runner.totals(manifest)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    assert totals["shards"] == n and totals["planned"] == 8 * n, totals
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    out = {
        "way": way,
        "items": n,
        "driver_cpu_s": round(cpu, 3),
        "driver_cpu_ms_per_item": round(1000 * cpu / n, 4),
        "wall_s": round(wall, 2),
        "peak_rss_growth_mb": round(growth, 1),
    }
    ray.shutdown()
    return out


def main() -> None:
    if len(sys.argv) == 3:  # a child: one measurement
        print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
        return
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    runs = []
    for way, n in (("one_block_per_item", 2048), ("blocks", 2048), ("blocks", 16384)):
        done = subprocess.run(
            [sys.executable, __file__, way, str(n)], env=env, capture_output=True, text=True, check=True
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(runs[-1], flush=True)
    base = runs[0]["driver_cpu_ms_per_item"]
    result = {
        "benchmark": "driver CPU per item of runner.map_items",
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "runs": runs,
        "target_ms_per_item_at_16k": 1.0,
        "blocks_16k_ms_per_item": runs[2]["driver_cpu_ms_per_item"],
        "ratio_blocks_vs_one_block_per_item_at_2048": round(runs[1]["driver_cpu_ms_per_item"] / base, 3),
    }
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
