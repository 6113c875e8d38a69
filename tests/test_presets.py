"""A GPU preset's wiring, run end to end at toy size before anyone pays for a GPU.

The preset file is loaded as a user's job would load it; only what needs a GPU cluster is swapped: the hub
model for the tiny offline model of the same family (``families.tiny_for``), the bucket for a local folder,
GPUs for CPUs, the data for a few pairs of the demo export. Everything else (LoRA rank, learning rate,
accumulation, precision, image size, prompts, evaluation settings) is the preset's own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO

from sarlang_ray import families, pipeline
from sarlang_ray.config import load_config
from sarlang_ray.tiny_models import init_tiny_vlm


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["qwen2vl-2b"])  # the paper's model; the other families: test_families.py
def test_a_gpu_preset_trains_and_evaluates_at_toy_size(preset, demo_run, tmp_path):
    workflow = REPO / "workflows" / f"{preset}.yaml"
    hub = load_config(str(workflow), ["run.run_dir=/tmp/placeholder"]).train.model
    family = families.tiny_for(hub)
    model = init_tiny_vlm(str(tmp_path / "tiny"), family=family)
    run_dir = tmp_path / "run"
    shutil.copytree(Path(demo_run[0].run.run_dir) / "export", run_dir / "export")
    cfg = load_config(
        str(workflow),
        [
            f"run.run_dir={run_dir}",
            f"train.model={model}",
            "ray.progress=false",
            # the GPU cluster, at toy size
            "train.use_gpu=false",
            "train.num_workers=1",
            "train.cpus_per_worker=1",
            "train.limit_pairs=16",
            "train.epochs=1",
            "train.precision=fp32",
            "evaluate.num_gpus=0",
            "evaluate.num_cpus=1",
            "evaluate.concurrency=1",
            "evaluate.max_concurrent_trials=1",
            "evaluate.dtype=float32",
            "evaluate.limit_pairs=12",
            "evaluate.images=[sar]",
            "evaluate.baselines=[majority]",
        ],
    )
    assert cfg.train.method == "lora" and cfg.train.lora_r == 8 and cfg.run.max_pixels  # the preset's recipe
    summary = pipeline.run(cfg)
    metrics = json.loads((run_dir / "train" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [-1, 0]
    merged = metrics["merged_model"]
    assert families.family_of(merged).name == family  # the merged model is still the preset's family
    board = (run_dir / "evaluate" / "leaderboard.md").read_text()
    for row in ("| base | sar |", "| finetuned | sar |"):
        assert row in board, board
    assert summary["stages"]["evaluate"]["trials"] >= 2 and summary["stages"]["evaluate"]["failed"] == 0
