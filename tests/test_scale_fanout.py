"""Fan-out of actor-pool stages (issue 31): the actor pool of execution.map puts many items in few blocks and
streams the manifest rows to a file of the driver, in item order. Driver CPU per item:
benchmarks/bench_fanout.py."""

from __future__ import annotations

import os

from sarlang_ray.stages import execution as runner


class Square:
    def __call__(self, row: dict) -> dict:
        return {
            "shard": row["shard"],
            "planned": row["n"],
            "written": row["n"] * row["n"],
            "rejected": 0,
            "skipped": row["n"] % 2 == 0,
            "pid": os.getpid(),
        }


def test_many_items_go_in_few_blocks_and_the_manifest_streams_to_a_file(ray_session, monkeypatch):
    monkeypatch.setattr(runner, "MAX_BLOCKS", 8)
    n = 200
    assert runner.item_blocks(n) == max(8, 16 * int(ray_session.cluster_resources()["CPU"])) < n
    items = [{"shard": f"s/{i:05d}.parquet", "n": i} for i in range(n)]
    manifest = runner.map(runner.Work(items, Square, (), holds_model=True))
    assert isinstance(manifest, runner.Manifest) and os.path.getsize(manifest.path) > 0 and len(manifest) == n
    rows = list(manifest)
    assert [r["shard"] for r in rows] == [i["shard"] for i in items]  # item order
    assert [r["written"] for r in rows] == [i * i for i in range(n)] and list(manifest) == rows  # read again
    assert os.getpid() not in {r["pid"] for r in rows}  # the rows ran on actors
    t = runner.totals(manifest)
    assert (t["shards"], t["planned"], t["skipped_shards"]) == (n, sum(range(n)), n // 2)
    assert t["written"] == sum(i * i for i in range(n))
    manifest.close()
    assert not os.path.exists(manifest.path)  # the spool goes with its manifest


def test_few_items_keep_a_block_each(ray_session):
    assert runner.item_blocks(5) == 5 and runner.item_blocks(runner.MAX_BLOCKS) == runner.MAX_BLOCKS
