"""Runs on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head and worker nodes, each its own
raylet, on this machine). Each test drives its cluster from a subprocess, so the session's Ray is untouched."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

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
