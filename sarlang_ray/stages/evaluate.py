"""evaluate: a Ray Tune sweep of models x image variants x prompts on a split of ``evaluate.dataset`` (this
run's export, an imported release, a LLaMA-Factory JSON) -> the leaderboard (see :mod:`sarlang_ray.evaluate`).
A failed trial is listed in the leaderboard with its root exception, and makes the stage (and the command)
fail once the leaderboard is written."""

from __future__ import annotations

import dataclasses

from sarlang_ray import io
from sarlang_ray.config import WorkflowConfig
from sarlang_ray.stages.stage import Stage


def _body(cfg: WorkflowConfig) -> dict:
    from sarlang_ray.evaluate import run_evaluate  # torch and transformers load only when a run evaluates

    board = run_evaluate(cfg)
    mode = board["vqa_mode"]
    counts = {
        "dataset": board["dataset"],
        "trials": len([r for r in board["rows"] if "samples_per_s" in r]),
        "failed": len(board["failed"]),
        "leaderboard": [
            {
                "model": r["model"],
                "image": r["image"],
                "prompt": r["prompt"],
                f"vqa_{mode}": r.get(f"vqa_{mode}"),
                "concise_cider_tok": r.get("concise_cider_tok"),
            }
            for r in board["rows"]
        ],
        "files": io.join(cfg.run.run_dir, "evaluate", "leaderboard.md"),
        "plots": board["plots"],
    }
    if board["failed"]:
        counts["failure"] = (
            f"{len(board['failed'])} trial(s) failed (leaderboard written: {counts['files']}): "
            + "; ".join(
                f"{f['model']} / {f['image']} / {f['prompt']}: {f.get('error_class', 'Error')}: {f['error']}"
                for f in board["failed"]
            )
        )
    return counts


def read_keys(cfg: WorkflowConfig) -> tuple[str, ...]:
    """What evaluate reads: its section (the vLLM engine's keys with evaluate.engine=vllm only, the embedding
    judge's with evaluate.judge=embedding only), the base model (train.model), the image size, the oracle's
    annotator settings, and the OpenAI judge's endpoint (annotate.openai)."""
    ev = cfg.evaluate
    unread = (
        ({"vllm"} if ev.engine != "vllm" else set())
        | ({"judge_threshold"} if ev.judge != "embedding" else set())
        | ({"judge_model"} if ev.judge not in ("embedding", "served") else set())
    )
    keys = [f"evaluate.{f.name}" for f in dataclasses.fields(ev) if f.name not in unread]
    keys += ["train.model", "run.max_pixels"]
    if "oracle" in ev.baselines:  # recomputes the answers with the annotate stage's template annotator
        keys += ["run.seed", "annotate.identification_pairs", "annotate.max_per_family"]
    # what the judge's requests are made of (stages.stage.RESOURCE_KEYS: how they are sent)
    if ev.judge == "openai":
        keys += [
            "annotate.openai.base_url",
            "annotate.openai.model",
            "annotate.openai.temperature",
            "annotate.openai.max_tokens",
        ]
    return tuple(keys)


# batch_size only groups prompts per generate() call
STAGE = Stage("evaluate", _body, inputs=("export", "train"), keys=read_keys, ignore=frozenset({"batch_size"}))


def run(cfg: WorkflowConfig) -> dict:
    return STAGE.run(cfg)
