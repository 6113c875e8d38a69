"""train: Ray Train fine-tuning on the export (see :mod:`sarlang_ray.train`)."""

from __future__ import annotations

from sarlang_ray.config import WorkflowConfig
from sarlang_ray.stages.stage import Stage


def _body(cfg: WorkflowConfig) -> dict:
    from sarlang_ray.train import run_train  # torch and transformers load only when a run trains

    out = run_train(cfg)
    counts = {
        k: out[k] for k in ("n_train", "val_loss_before", "val_loss_after", "checkpoint", "held_out_split")
    }
    if out["held_out_split"] != "val":
        counts["warnings"] = [
            (
                "train: the export has no val split, so the held-out loss is the test split's (the "
                "pairs the leaderboard scores)"
            )
        ]
    return counts


# init_tiny only says whether to write the tiny model when it is missing (the model itself is train.model);
# name is where the checkpoints go under storage_path
STAGE = Stage(
    "train",
    _body,
    inputs=("export",),
    keys=("train", "run.max_pixels"),
    ignore=frozenset({"init_tiny", "name"}),
)


def run(cfg: WorkflowConfig) -> dict:
    return STAGE.run(cfg)
