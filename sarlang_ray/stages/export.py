"""export: geographic splits, a leakage report, and the dataset in four forms under ``export/``
(see :mod:`sarlang_ray.export`)."""

from __future__ import annotations

from sarlang_ray import export
from sarlang_ray.config import WorkflowConfig
from sarlang_ray.stages.runner import Stage

STAGE = Stage("export", export.run_export, inputs=("annotate",), keys=("export", "run.seed"), needs_ray=False)


def run(cfg: WorkflowConfig) -> dict:
    return STAGE.run(cfg)
