"""Re-running is a no-op, interrupted stages resume, and the same config gives identical tables."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sarlang_ray import io, pipeline

from conftest import REPO, demo_config


def _snapshot(root: str) -> dict[str, tuple[int, str]]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = (os.stat(p).st_mtime_ns, hashlib.sha1(Path(p).read_bytes()).hexdigest())
    return out


def test_a_stage_start_sweeps_partial_files_of_killed_writers_only(tmp_path):
    """A writer killed between write and rename leaves ``<shard>.tmp-<hex>``; the next start of that stage
    removes such files once they are old, and leaves young ones (a writer may still be at work) and
    every other file alone."""
    from sarlang_ray.config import load_config

    shards = tmp_path / "run" / "demo_stage" / "shards"
    shards.mkdir(parents=True)
    stale, young = shards / f"a.parquet.tmp-{'0' * 32}", shards / f"b.parquet.tmp-{'f' * 32}"
    keep = [shards / "a.parquet", shards / "notes.tmp-x", shards / f"c.tmp-{'0' * 32}.parquet"]
    for p in (stale, young, *keep):
        p.write_bytes(b"x")
    hour_ago = os.stat(stale).st_mtime - 3600
    for p in (stale, *keep):
        os.utime(p, (hour_ago, hour_ago))

    calls = []

    @pipeline.stage("demo_stage", needs_ray=False)
    def body(cfg):
        calls.append(sorted(p.name for p in shards.iterdir()))
        return {"planned": 0}

    body(load_config(None, [f"run.run_dir={tmp_path / 'run'}"]))
    assert calls == [sorted([young.name, *(p.name for p in keep)])]  # swept before the body ran
    assert (tmp_path / "run" / "demo_stage" / "_SUCCESS.json").exists()


def test_rerunning_a_finished_tile_stage_writes_nothing(demo_run):
    cfg, summary = demo_run
    before = _snapshot(cfg.run.run_dir)
    again = pipeline.run(cfg, ["tile", "align"])
    after = _snapshot(cfg.run.run_dir)
    changed = {k for k in after if before.get(k) != after[k]} - {"summary.json", "config.yaml"}
    assert not changed, changed
    assert again["stages"]["tile"] == summary["stages"]["tile"]


def test_an_interrupted_stage_resumes_without_duplicates(demo_run):
    cfg, summary = demo_run
    shards = io.glob(io.join(cfg.run.run_dir, "tile", "shards"), "*/*.parquet")
    lost = shards[len(shards) // 2]
    os.remove(lost)  # as if the run died before this shard was written
    os.remove(io.join(cfg.run.run_dir, "tile", "_SUCCESS.json"))
    counts = pipeline.run_tile(cfg)
    assert counts["skipped_shards"] == counts["shards"] - 1  # only the missing shard was redone
    assert os.path.exists(lost)
    assert {k: counts[k] for k in ("planned", "written", "rejected")} == \
        {k: summary["stages"]["tile"][k] for k in ("planned", "written", "rejected")}
    ids = pipeline.read_tiles(cfg.run.run_dir, columns=["tile_id"])["tile_id"].to_pylist()
    assert len(ids) == len(set(ids)) == summary["stages"]["align"]["written"]


@pytest.mark.slow
def test_same_seed_gives_identical_tables(demo_run, tmp_path):
    cfg, _ = demo_run
    cfg2 = demo_config(tmp_path / "run2")
    pipeline.run(cfg2)
    for stage in ("tile", "align"):
        a = io.glob(io.join(cfg.run.run_dir, stage, "shards"), "*/*.parquet")
        b = io.glob(io.join(cfg2.run.run_dir, stage, "shards"), "*/*.parquet")
        assert [Path(x).relative_to(cfg.run.run_dir) for x in a] == [Path(x).relative_to(cfg2.run.run_dir) for x in b]
        for x, y in zip(a, b):
            assert Path(x).read_bytes() == Path(y).read_bytes(), x


@pytest.mark.slow
def test_cli_runs_the_workflow_on_the_session_cluster(ray_session, tmp_path):
    """`sarlang run workflows/demo.yaml ...` as a user types it, attached to the running Ray cluster: every
    stage, ending with the leaderboard of the untrained and fine-tuned tiny VLM and both baselines."""
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    run_dir = tmp_path / "runs" / "cli"  # given relative to the working directory, as the demo does
    proc = subprocess.run(
        [sys.executable, "-m", "sarlang_ray", "run", str(REPO / "workflows/demo.yaml"), "run.run_dir=runs/cli",
         "synth.out_dir=runs/cli/archive", "synth.scene_size_px=256", "tile.tile_size=128", "ray.progress=false",
         "train.epochs=1", "evaluate.limit_pairs=60"],  # lighter than the demo: trained_run covers the full recipe
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiles per GSD" in proc.stdout and "objects per class" in proc.stdout
    assert (run_dir / "config.yaml").read_text().count("tile_size: 128") == 1
    assert (run_dir / "summary.json").exists() and (run_dir / "export" / "dataset_card.md").exists()
    assert "pairs per application" in proc.stdout
    board = proc.stdout[proc.stdout.index("## Leaderboard"):]
    for row in ("| base | sar | paper |", "| finetuned | sar | paper |", "majority answer (lower bound)",
                "template oracle (upper bound)"):
        assert row in board, row
    assert f"plots: {run_dir.resolve()}/evaluate/plots/vqa_per_application.png" in proc.stdout
    assert (run_dir / "tiny-vlm" / "model.safetensors").exists()  # train.init_tiny wrote the model
