"""Runs on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head and worker nodes, each its own
raylet, on this machine). Each test drives its cluster from a subprocess, so the session's Ray is
untouched."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, demo_config

pytestmark = pytest.mark.needs_ray  # every test drives a ray.cluster_utils.Cluster from a subprocess

SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from sarlang_ray import pipeline
    from sarlang_ray.config import load_config

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = {"nodes": len([n for n in ray.nodes() if n["Alive"]])}
    archive, run_dir = sys.argv[1], sys.argv[2]
    base = [f"catalog.archive={archive}", "catalog.sar_glob=[pyrosar_s1_grd_geocoded/*.tif]",
            "run.stages=[catalog]"]
    try:
        pipeline.run(load_config(None, [f"run.run_dir={run_dir}/local", *base]))
        out["local"] = "ran"
    except pipeline.StageFailed as exc:
        out["local"] = str(exc)
    # this machine's folder is every node's folder here, as a shared file system would be
    summary = pipeline.run(load_config(None, [f"run.run_dir={run_dir}/shared", "run.shared_fs=true", *base]))
    out["shared"] = summary["stages"]["catalog"]["written"]
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(out))
""")


def test_a_local_run_dir_is_refused_on_a_multi_node_cluster(real_sar, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(real_sar), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["nodes"] == 2
    assert "is a local path, but the Ray cluster has 2 nodes" in out["local"]
    assert "s3://" in out["local"] and "run.shared_fs=true" in out["local"]
    assert not (tmp_path / "local" / "catalog").exists(), "nothing written before the refusal"
    assert out["shared"] == 1


NODE_LOSS = textwrap.dedent("""
    import hashlib, json, sys, threading, time
    from pathlib import Path
    import psutil
    import ray
    from ray.cluster_utils import Cluster
    from sarlang_ray import pipeline
    from sarlang_ray.config import load_config

    archive, root = sys.argv[1], Path(sys.argv[2])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    # a spare node from the start: nodes can only join from the main thread (Ray registers signal handlers)
    workers = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def config(run_dir):
        return load_config(None, [
            f"run.run_dir={run_dir}", f"catalog.archive={archive}", "run.shared_fs=true",
            "tile.gsds_m=[1.0,5.0]", "tile.tile_size=128", "tile.tiles_per_shard=4",
            "tile.concurrency=2", "annotate.concurrency=2", "align.concurrency=2",
            "annotate.backend=annotate_backends:SlowBackend",  # a model's pace, not milliseconds
            "run.stages=[catalog,tile,align,annotate]",
        ])

    def contents(run_dir, stage):
        base = Path(run_dir, stage)
        return {str(p.relative_to(base)): hashlib.sha1(p.read_bytes()).hexdigest()
                for p in sorted(base.rglob("*.parquet")) if "errors" not in p.parts}

    pipeline.run(config(root / "reference"))
    removed = {}

    def busy_nodes(stage):
        if stage == "annotate":  # Ray Data actors: the GCS's actor table
            actors = ray._private.state.actors().values()
            return {a["Address"]["NodeID"] for a in actors
                    if a["State"] == "ALIVE" and "MapWorker" in a["ActorClassName"]}
        # tile's chunks are Ray tasks: a worker process titled ray::sarlang.TileChunk while it runs one, a
        # child of its node's raylet (whose command line names the node)
        out = set()
        for proc in psutil.Process().children(recursive=True):
            try:
                if " ".join(proc.cmdline()).startswith("ray::sarlang.TileChunk"):
                    out |= {a.split("=", 1)[1] for a in proc.parent().cmdline() if a.startswith("--node_id=")}
            except psutil.Error:
                continue
        return out

    def remove_a_busy_node(stage):
        try:
            _remove_a_busy_node(stage)
        except Exception as exc:  # say why in the output rather than die silently in the thread
            removed[stage + "_error"] = repr(exc)

    def _remove_a_busy_node(stage):
        shards = root / "faulty" / stage / "shards"
        while not list(shards.glob("*/*.parquet")):
            time.sleep(0.01)
        deadline = time.time() + 30
        while True:
            candidates = [w for w in workers if w.node_id in busy_nodes(stage) and w not in removed.values()]
            if candidates or time.time() > deadline:
                break
            time.sleep(0.01)
        victim = candidates[0]
        removed[stage] = victim
        removed[stage + "_shards_at_removal"] = len(list(shards.glob("*/*.parquet")))
        cluster.remove_node(victim)

    for stage in ("tile", "annotate"):
        t = threading.Thread(target=remove_a_busy_node, args=(stage,), daemon=True)
        t.start()
        pipeline.run(config(root / "faulty"), [stage] if stage == "tile" else ["align", "annotate"])
        t.join(timeout=5)
    out = {"removed": [s for s in ("tile", "annotate") if s in removed],
           "errors": {k: v for k, v in removed.items() if k.endswith("_error")},
           "shards_at_removal": {s: removed.get(s + "_shards_at_removal") for s in ("tile", "annotate")},
           "total_shards": {s: len(contents(root / "reference", s)) for s in ("tile", "annotate")},
           "same": {s: contents(root / "faulty", s) == contents(root / "reference", s)
                    for s in ("tile", "align", "annotate")}}
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_a_node_lost_mid_tile_and_mid_annotate_loses_and_duplicates_nothing(demo_run, tmp_path):
    """A 4-node cluster (1 CPU each; 2 tile tasks at once, then a pool of 2 annotate actors); while tile runs,
    then while annotate runs, a worker node busy with the stage is removed (as a spot node is reclaimed): the
    stages finish on the nodes left, and every table equals the one of an undisturbed run on the same cluster,
    shard for shard."""
    cfg, _ = demo_run
    proc = subprocess.run(
        [sys.executable, "-c", NODE_LOSS, cfg.synth.out_dir, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["removed"] == ["tile", "annotate"], out["errors"]
    for stage in ("tile", "annotate"):
        assert 0 < out["shards_at_removal"][stage] < out["total_shards"][stage], out
    assert out["same"] == {"tile": True, "align": True, "annotate": True}, out


TRAIN_NODE_LOSS = textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    from sarlang_ray import pipeline
    from sarlang_ray.config import load_config

    run_dir, model = Path(sys.argv[1]), sys.argv[2]
    # the head runs the driver only: the training worker lands on a worker node, which can be lost
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = load_config(None, [
        f"run.run_dir={run_dir}", f"train.model={model}", "run.shared_fs=true", "ray.progress=false",
        "train.method=full", "train.batch_size=8", "train.lr=0.003", "train.epochs=4",
        "train.limit_pairs=96", "train.max_failures=2", "run.stages=[train]",
    ])
    out = {}

    def lose_the_training_node():
        snapshot = run_dir / "train" / "sarlang-train" / "checkpoint_manager_snapshot.json"
        while not (snapshot.exists() and "checkpoint_" in snapshot.read_text()):  # a checkpoint is registered
            time.sleep(0.05)
        nodes = {a["Address"]["NodeID"] for a in ray._private.state.actors().values()
                 if a["State"] == "ALIVE" and "RayTrainWorker" in a["ActorClassName"]}
        victim = next(w for w in workers if w.node_id in nodes)
        out["removed_node_had_the_worker"] = True
        cluster.remove_node(victim)

    t = threading.Thread(target=lose_the_training_node, daemon=True)
    t.start()
    pipeline.run(cfg)
    t.join(timeout=5)
    metrics = json.loads((run_dir / "train" / "metrics.json").read_text())
    out.update(resumes=metrics["resumes"], epochs=[h["epoch"] for h in metrics["history"]],
               loss=[metrics["val_loss_before"], metrics["val_loss_after"]])
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_losing_the_node_of_a_training_worker_resumes_from_the_checkpoint(demo_run, tiny_vlm, tmp_path):
    """The node that runs the Ray Train worker is removed after the first checkpoint: the worker group
    restarts on the nodes left and resumes from that checkpoint; every epoch runs exactly once."""
    import shutil
    from pathlib import Path

    cfg, _ = demo_run
    shutil.copytree(Path(cfg.run.run_dir) / "export", tmp_path / "run" / "export")
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN_NODE_LOSS, str(tmp_path / "run"), tiny_vlm],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.get("removed_node_had_the_worker"), out
    assert out["resumes"] and 1 <= out["resumes"][0] <= 3, out  # resumed from a checkpoint, not restarted
    assert out["epochs"] == [-1, 0, 1, 2, 3], out  # every epoch exactly once
    assert out["loss"][1] < out["loss"][0]


S3_RUN = textwrap.dedent("""
    import json, os, subprocess, sys, time
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster

    workflow, temp_dir = sys.argv[1], sys.argv[2]
    # a head and 2 worker raylets, 1 CPU each: one-CPU actors of a pool of 3 can only be placed one per node
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, "temp_dir": temp_dir}
    )
    out = {}
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        t0 = time.time()
        # the real CLI, as a driver of the cluster (the environment carries the S3 endpoint and keys)
        run = subprocess.run(
            [str(Path(sys.executable).parent / "sarlang"), "run", workflow, "--json"],
            env={**os.environ, "RAY_ADDRESS": cluster.address}, capture_output=True, text=True, timeout=480,
        )
        out.update(rc=run.returncode, seconds=round(time.time() - t0, 1), stderr=run.stderr[-4000:])
        ray.init(address=cluster.address, log_to_driver=False)
        # the GCS's tables: every node, and every actor the run made (dead ones included) with its node
        out["nodes"] = [
            {"id": n["NodeID"], "ip": n["NodeManagerAddress"], "alive": n["Alive"],
             "head": "node:__internal_head__" in n["Resources"]}
            for n in ray.nodes()
        ]
        out["actors"] = [
            {"class": a["ActorClassName"] + " " + (a.get("Name") or ""), "node": a["Address"]["NodeID"]}
            for a in ray._private.state.actors().values()
        ]
        ray.shutdown()
    finally:
        cluster.shutdown()
    print(json.dumps(out))
""")

DATA_STAGES = ("catalog", "tile", "align", "annotate", "export")


def _tables(run_dir: str) -> dict:
    """What a run wrote, read back with the table readers (local or s3://)."""
    import collections
    import hashlib

    from sarlang_ray import io, tables

    tiles = tables.read_tiles(run_dir, ["tile_id", "sar_png", "objects"]).to_pylist()
    pairs = tables.read_annotations(
        run_dir, ["pair_id", "tile_id", "kind", "question", "answer", "qc_passed"]
    ).to_pylist()
    export = io.read_parquet(
        io.glob(io.join(run_dir, "export"), "parquet/*/*.parquet"),
        columns=["pair_id", "tile_id", "split", "answer"],
    ).to_pylist()
    errors = tables.read_errors(run_dir).to_pylist()
    return {
        "scenes": sorted(s["scene_id"] for s in tables.read_scenes(run_dir)),
        "tile_shard_rows": io.parquet_rows(tables.shards(run_dir, "tile")),
        "tiles": sorted(
            (t["tile_id"], hashlib.sha1(t["sar_png"]).hexdigest(), len(t["objects"])) for t in tiles
        ),
        "pairs": sorted(
            (p["pair_id"], p["tile_id"], p["kind"], p["question"], p["answer"], p["qc_passed"]) for p in pairs
        ),
        "export": sorted((r["pair_id"], r["tile_id"], r["split"], r["answer"]) for r in export),
        "rejects": dict(collections.Counter(f"{e['stage']}:{e['error_class']}" for e in errors)),
    }


def _items_run(run_dir: str) -> dict[str, int]:
    """The items each data stage ran, counted from its outputs (not from the marker under test): the
    catalog's planned scenes, the tile, align and annotate shards, and for export one item per align shard
    with a tile in a split (a tile not in export's errors table)."""
    from sarlang_ray import io

    scenes = io.read_json(io.join(run_dir, "catalog", "_SUCCESS.json"))["planned"]
    shards = {
        s: len(io.glob(io.join(run_dir, s, "shards"), "*/*.parquet")) for s in ("tile", "align", "annotate")
    }
    dropped = {
        r["item"]
        for r in io.read_parquet(io.join(run_dir, "export", "errors.parquet"), columns=["item"]).to_pylist()
    }
    exported = sum(
        1
        for uri in io.glob(io.join(run_dir, "align", "shards"), "*/*.parquet")
        if set(io.read_parquet(uri, columns=["tile_id"])["tile_id"].to_pylist()) - dropped
    )
    return {"catalog": scenes, **shards, "export": exported}


@pytest.mark.slow
def test_sarlang_run_of_the_demo_on_s3_on_a_3_node_cluster(demo_run, s3, tmp_path):
    """`sarlang run` (catalog to export) as a driver of a 3-node cluster, archive and run folder on s3://
    (SeaweedFS): the storage check accepts s3:// without run.shared_fs, every stage records where its items
    ran (the nodes' ids and addresses, the items adding up), the run spreads over the nodes, and the tables
    read back from S3 equal those of the one-node local demo run."""
    import shutil
    import tempfile

    import fsspec
    from ray_heads import kill_leftovers

    from sarlang_ray import io
    from sarlang_ray.config import to_yaml

    demo_cfg, _ = demo_run
    # the demo's archive
    fsspec.filesystem("s3").put(demo_cfg.synth.out_dir, "sarlang/multinode/archive", recursive=True)
    run_dir = "s3://sarlang/multinode/run"
    cfg = demo_config(
        tmp_path / "unused",
        f"run.run_dir={run_dir}",
        "catalog.archive=s3://sarlang/multinode/archive",
        f"run.stages=[{','.join(DATA_STAGES)}]",
    )
    assert not cfg.run.shared_fs
    workflow = tmp_path / "workflow.yaml"
    workflow.write_text(to_yaml(cfg))
    # short: Ray's unix sockets live under the temp dir; unique: what is left naming it is ours to kill
    temp_dir = tempfile.mkdtemp(prefix="sarlang-mn-", dir="/tmp")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", S3_RUN, str(workflow), temp_dir],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
            check=False,
        )
    # a safety net: cluster.shutdown() (or Ray's reaper, if the script was killed) normally stops everything
    finally:
        if left := kill_leftovers([temp_dir, str(workflow)]):
            print(f"killed {len(left)} processes the cluster left")
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rc"] == 0, out["stderr"]
    print(f"sarlang run on the 3-node cluster: {out['seconds']} s")

    # the run had 3 nodes, one of them the head
    nodes = {n["id"] for n in out["nodes"] if n["alive"]}
    assert len(nodes) == 3 and sum(n["head"] for n in out["nodes"]) == 1, out["nodes"]
    # every data stage's marker records where its items ran (execution.map, tasks or actors): per node id
    # its address and items, the items adding up to what the stage ran, counted from its outputs
    ip = {n["id"]: n["ip"] for n in out["nodes"]}
    expected = _items_run(run_dir)
    spread = {}
    for stage in DATA_STAGES:
        placement = io.read_json(io.join(run_dir, stage, "_SUCCESS.json"))["placement"]
        spread[stage] = set(placement)
        assert spread[stage] and spread[stage] <= nodes, (stage, placement, out["actors"])
        assert all(p["ip"] == ip[node] for node, p in placement.items()), (stage, placement, ip)
        assert sum(p["items"] for p in placement.values()) == expected[stage], (stage, placement, expected)
    print("nodes per stage:", {s: len(n) for s, n in spread.items()})
    # one stage's items may fit one node (the catalog's few pages, small tasks): Ray chooses; the run as a
    # whole used every node of the cluster
    assert set().union(*spread.values()) == nodes

    # the run folder on S3: the storage check let s3:// through without run.shared_fs, and every stage
    # finished
    assert "shared_fs: false" in io.read_bytes(f"{run_dir}/config.yaml").decode()
    summary = io.read_json(f"{run_dir}/summary.json")
    counts = summary["stages"]
    assert list(counts) == list(DATA_STAGES)

    # the same tables as the one-node local run of the same archive and settings
    ours, local = _tables(run_dir), _tables(demo_cfg.run.run_dir)
    for key in ("scenes", "tiles", "pairs", "export", "rejects"):
        assert ours[key] == local[key], key
    assert ours["tiles"] and ours["export"]

    # counts reconcile (planned = written + rejected), and agree with the tables
    for stage in DATA_STAGES:
        c = counts[stage]
        assert c["planned"] == c["written"] + c["rejected"], (stage, c)
    rejects = ours["rejects"]

    def rejected(stage):
        return sum(n for k, n in rejects.items() if k.startswith(f"{stage}:"))

    assert counts["catalog"]["written"] == len(ours["scenes"]) and counts["catalog"]["rejected"] == rejected(
        "catalog"
    )
    assert counts["tile"]["written"] == ours["tile_shard_rows"] and counts["tile"]["rejected"] == rejected(
        "tile"
    )
    assert counts["align"]["written"] == len(ours["tiles"])
    assert counts["annotate"]["written"] == len({p[1] for p in ours["pairs"]})
    assert counts["annotate"]["pairs"]["passed"] == sum(p[5] for p in ours["pairs"])
    assert counts["annotate"]["pairs"]["planned"] == len(ours["pairs"])
    assert counts["export"]["written"] == len({r[1] for r in ours["export"]}) and counts["export"][
        "rejected"
    ] == rejected("export")
    assert len(ours["export"]) == len(
        {p[0] for p in ours["pairs"] if p[5] and p[1] in {r[1] for r in ours["export"]}}
    )
    print(
        f"tiles {len(ours['tiles'])}, pairs {len(ours['pairs'])} ({counts['annotate']['pairs']['passed']} "
        "passed QC), "
        f"exported {len(ours['export'])} pairs of {counts['export']['written']} tiles; counts {counts}"
    )
