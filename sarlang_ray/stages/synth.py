"""synth: write the embedded sample archive (SAR scenes, optical twins, land cover, labels) to
synth.out_dir."""

from __future__ import annotations

from sarlang_ray import synth
from sarlang_ray.config import WorkflowConfig
from sarlang_ray.stages.stage import Stage


def _body(cfg: WorkflowConfig) -> dict:
    return synth.write_archive(cfg.synth, cfg.run.seed)


STAGE = Stage("synth", _body, keys=("synth", "run.seed"), needs_ray=False)


def run(cfg: WorkflowConfig) -> dict:
    return STAGE.run(cfg)
