"""Runs on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head and worker nodes, each its own
raylet, on this machine). Each test drives its cluster from a subprocess, so the session's Ray is untouched."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

SCRIPT = textwrap.dedent('''
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
    base = [f"catalog.archive={archive}", "catalog.sar_glob=[pyrosar_s1_grd_geocoded/*.tif]", "run.stages=[catalog]"]
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
''')


def test_a_local_run_dir_is_refused_on_a_multi_node_cluster(real_sar, tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(real_sar), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["nodes"] == 2
    assert "is a local path, but the Ray cluster has 2 nodes" in out["local"]
    assert "s3://" in out["local"] and "run.shared_fs=true" in out["local"]
    assert not (tmp_path / "local" / "catalog").exists(), "nothing written before the refusal"
    assert out["shared"] == 1


NODE_LOSS = textwrap.dedent('''
    import hashlib, json, sys, threading, time
    from pathlib import Path
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
        return load_config(None, [f"run.run_dir={run_dir}", f"catalog.archive={archive}", "run.shared_fs=true",
                                  "tile.gsds_m=[1.0,5.0]", "tile.tile_size=128", "tile.tiles_per_shard=4",
                                  "tile.concurrency=2", "annotate.concurrency=2", "align.concurrency=2",
                                  "annotate.backend=annotate_backends:SlowBackend",  # a model's pace, not milliseconds
                                  "run.stages=[catalog,tile,align,annotate]"])

    def contents(run_dir, stage):
        base = Path(run_dir, stage)
        return {str(p.relative_to(base)): hashlib.sha1(p.read_bytes()).hexdigest()
                for p in sorted(base.rglob("*.parquet")) if "errors" not in p.parts}

    pipeline.run(config(root / "reference"))
    removed = {}

    def remove_a_busy_node(stage):
        try:
            _remove_a_busy_node(stage)
        except Exception as exc:  # say why in the output rather than die silently in the thread
            removed[stage + "_error"] = repr(exc)

    def _remove_a_busy_node(stage):
        shards = root / "faulty" / stage / "shards"
        while not list(shards.glob("*/*.parquet")):
            time.sleep(0.01)
        busy = {a["Address"]["NodeID"] for a in ray._private.state.actors().values()  # the GCS's actor table
                if a["State"] == "ALIVE" and "MapWorker" in a["ActorClassName"]}
        victim = next(w for w in workers if w.node_id in busy and w not in removed.values())
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
           "same": {s: contents(root / "faulty", s) == contents(root / "reference", s) for s in ("tile", "align", "annotate")}}
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(out))
''')


@pytest.mark.slow
def test_a_node_lost_mid_tile_and_mid_annotate_loses_and_duplicates_nothing(demo_run, tmp_path):
    """A 4-node cluster (1 CPU each, pools of 2 actors); while tile runs, then while annotate runs, a worker
    node that hosts an actor is removed (as a spot node is reclaimed): the stages finish on the nodes left,
    and every table equals the one of an undisturbed run on the same cluster, shard for shard."""
    cfg, _ = demo_run
    proc = subprocess.run([sys.executable, "-c", NODE_LOSS, cfg.synth.out_dir, str(tmp_path)], capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["removed"] == ["tile", "annotate"], out["errors"]
    for stage in ("tile", "annotate"):
        assert 0 < out["shards_at_removal"][stage] < out["total_shards"][stage], out
    assert out["same"] == {"tile": True, "align": True, "annotate": True}, out


TRAIN_NODE_LOSS = textwrap.dedent('''
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
    cfg = load_config(None, [f"run.run_dir={run_dir}", f"train.model={model}", "run.shared_fs=true", "ray.progress=false",
                             "train.method=full", "train.batch_size=8", "train.lr=0.003", "train.epochs=4",
                             "train.limit_pairs=96", "train.max_failures=2", "run.stages=[train]"])
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
''')


@pytest.mark.slow
def test_losing_the_node_of_a_training_worker_resumes_from_the_checkpoint(demo_run, tiny_vlm, tmp_path):
    """The node that runs the Ray Train worker is removed after the first checkpoint: the worker group
    restarts on the nodes left and resumes from that checkpoint; every epoch runs exactly once."""
    import shutil
    from pathlib import Path

    cfg, _ = demo_run
    shutil.copytree(Path(cfg.run.run_dir) / "export", tmp_path / "run" / "export")
    proc = subprocess.run([sys.executable, "-c", TRAIN_NODE_LOSS, str(tmp_path / "run"), tiny_vlm], capture_output=True,
                          text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.get("removed_node_had_the_worker"), out
    assert out["resumes"] and 1 <= out["resumes"][0] <= 3, out  # resumed from a checkpoint, not restarted
    assert out["epochs"] == [-1, 0, 1, 2, 3], out  # every epoch exactly once
    assert out["loss"][1] < out["loss"][0]
