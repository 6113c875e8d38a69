"""Ray Train fine-tuning of a tiny offline VLM on the exported demo dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sarlang_ray import pipeline
from sarlang_ray.config import load_config


def _train_config(run_dir: Path, model: str, *overrides: str):
    return load_config(
        None, [f"run.run_dir={run_dir}", f"train.model={model}", "ray.progress=false", *overrides]
    )


def _of_this_session(proc) -> bool:
    """Whether a Ray worker process belongs to the session's Ray (its raylet runs in the session's folder),
    not to another Ray on the same machine."""
    import psutil
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    try:
        return session in " ".join(proc.parent().cmdline())
    except (psutil.Error, AttributeError):
        return False


def _copy_export(demo_run, run_dir: Path) -> None:
    import shutil

    cfg, _ = demo_run
    shutil.copytree(Path(cfg.run.run_dir) / "export", run_dir / "export")


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(demo_run, tiny_vlm, tmp_path):
    """SIGKILL the Ray Train worker process after the first checkpoint is registered: the worker group
    restarts (FailureConfig.max_failures), resumes from that checkpoint and finishes every epoch."""
    import threading
    import time

    import psutil

    run_dir = tmp_path / "train"
    _copy_export(demo_run, run_dir)
    tr = _train_config(
        run_dir,
        tiny_vlm,
        "train.method=full",
        "train.batch_size=8",
        "train.lr=0.003",
        "train.epochs=4",
        "train.limit_pairs=96",
        "train.max_failures=2",
        "train.num_to_keep=2",
    )
    outcome: dict = {}

    def fit():
        try:
            outcome["summary"] = pipeline.run(tr, ["train"])
        except BaseException as exc:  # noqa: BLE001  (surfaced by the assertions below)
            outcome["error"] = exc

    thread = threading.Thread(target=fit)
    thread.start()
    snapshot = run_dir / "train" / "sarlang-train" / "checkpoint_manager_snapshot.json"
    killed, deadline = None, time.time() + 600
    while killed is None and thread.is_alive() and time.time() < deadline:
        if snapshot.exists() and "checkpoint_" in snapshot.read_text():  # a checkpoint is registered
            for proc in psutil.process_iter(["cmdline"]):
                if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []) and _of_this_session(proc):
                    proc.kill()
                    killed = proc.pid
                    break
        time.sleep(0.1)
    thread.join(timeout=900)
    assert killed is not None, "no training worker was found to kill before the run ended"
    assert "error" not in outcome, outcome.get("error")
    metrics = json.loads((run_dir / "train" / "metrics.json").read_text())
    # resumed, not restarted
    assert metrics["resumes"] and 1 <= metrics["resumes"][0] <= 3, metrics["resumes"]
    assert [h["epoch"] for h in metrics["history"]] == [-1, 0, 1, 2, 3]  # every epoch exactly once
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow
def test_finetuned_tiny_model_beats_untrained_on_unseen_test_tiles(trained_run):
    """The issue's must-show: on the test split (scenes never trained on), the fine-tuned tiny VLM's VQA
    accuracy is above the untrained one's; the majority-answer baseline is reported beside both."""
    from sarlang_ray import io
    from sarlang_ray.evaluate import select_pairs, split_files

    tr, summary = trained_run
    train_ids = set(io.read_parquet(split_files(tr, "train"), columns=["tile_id"])["tile_id"].to_pylist())
    test_pairs = select_pairs(io.read_parquet(split_files(tr, "test"), columns=None), None)
    assert test_pairs and not train_ids & {p["tile_id"] for p in test_pairs}  # tiles it never saw
    assert summary["stages"]["train"]["val_loss_after"] < summary["stages"]["train"]["val_loss_before"] - 1.0
    board = json.loads((Path(tr.run.run_dir) / "evaluate" / "leaderboard.json").read_text())
    acc = {r["model"]: r["vqa_strict"] for r in board["rows"]}
    print("VQA accuracy (strict) on the test split:", acc)
    assert acc["finetuned"] > acc["base"] + 0.05, acc
    assert 0 < acc["majority answer (lower bound)"] < acc["template oracle (upper bound)"] == 1.0
    assert summary["stages"]["evaluate"]["trials"] == 2
