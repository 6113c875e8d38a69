"""annotate: captions and QA for every tile shard -> ``annotate/shards/`` (the annotations table), with QC
and ``annotate/qc_report.json``."""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
from dataclasses import asdict

from sarlang_ray import io
from sarlang_ray.annotate import stage as annotate_stage
from sarlang_ray.annotate.visibility import VISIBILITY_KEYS
from sarlang_ray.config import AnnotateSection, WorkflowConfig
from sarlang_ray.errors import judge_outcome, summed_reasons
from sarlang_ray.stages import execution
from sarlang_ray.stages.execution import Manifest, Resources, Work, placement, shard_items, totals
from sarlang_ray.stages.stage import Stage

log = logging.getLogger("sarlang")


def _body(cfg: WorkflowConfig, retry: bool = False) -> dict:
    """Annotate every shard (finished ones counted again); ``retry``: and annotate again the failed tiles of
    the finished ones, keeping their other pairs."""
    a = cfg.annotate
    items = shard_items(io.join(cfg.run.run_dir, "align", "shards"))
    if a.backend == "vllm":  # one Ray Data LLM pipeline for the stage's prompts, then QC and writes per shard
        from sarlang_ray.annotate.vllm_backend import annotate_shards

        if retry:
            log.warning(
                "annotate: the vllm backend generates whole shards and cannot retry single tiles; the failed "
                "tiles stay in the errors table (run.force=true annotates everything again)"
            )
        manifest = Manifest()
        # each row with the node that finished it
        for row in annotate_shards(cfg, items, annotate_stage.AnnotateShard):
            manifest.append(row)
    else:
        # a model backend (hf, or one of your own) loads its model once per actor and keeps it: an actor pool;
        # the template and openai backends hold no model: tasks on the pooled workers
        manifest = execution.map(
            Work(
                items,
                annotate_stage.AnnotateShard,
                (a, cfg.run.run_dir, cfg.run.seed, cfg.run.max_pixels, retry),
                Resources.of(a),
                holds_model=a.backend not in ("template", "openai"),
                progress=cfg.ray.progress,
            )
        )
    counts = {**totals(manifest), "placement": placement(manifest)}
    hits: collections.Counter = collections.Counter()
    for m in manifest:
        hits.update(json.loads(m["qc_hits"]))
    pairs, passed = sum(m["pairs"] for m in manifest), sum(m["pairs_passed"] for m in manifest)
    counts["pairs"] = {"planned": pairs, "passed": passed, "rejected": pairs - passed}
    findings = [f for m in manifest for f in json.loads(m["findings"])]
    report = {
        "backend": a.backend,
        "pairs": counts["pairs"],
        "rule_hits": dict(hits),
        "rules": asdict(a.qc),
        "contradictions": annotate_stage.contradiction_report(findings, annotate_stage.backend_name(a)),
    }
    io.write_json_atomic(io.join(cfg.run.run_dir, "annotate", "qc_report.json"), report)
    counts = judge_outcome(
        "annotate", counts, summed_reasons(manifest), cfg.run.warn_reject_share, failure_hint(a)
    )
    if "failure" not in counts and pairs > 0 and passed == 0:
        counts["failure"] = (
            f"QC rejected all {pairs} pairs of the {counts['written']} annotated tiles (rule hits: "
            f"{dict(hits.most_common())}); see annotate/qc_report.json and the annotate.qc rules"
        )
    return counts


def failure_hint(a: AnnotateSection) -> str:
    """What to change when no tile was annotated: for the openai backend, the key variable when it is unset
    here (the usual cause: every request answered 401)."""
    if a.backend == "openai" and not os.environ.get(a.openai.api_key_env):
        return (
            f"The API key variable {a.openai.api_key_env} (annotate.openai.api_key_env) is not set in this "
            f"environment: export {a.openai.api_key_env}=<key> (on every node of a cluster) and run annotate "
            "again."
        )
    if a.backend in ("openai", "vllm", "hf"):
        return (
            f"Check that the annotate.{a.backend} model and endpoint work (the first error rows say how each "
            "tile failed)."
        )
    return ""


def read_keys(cfg: WorkflowConfig) -> tuple[str, ...]:
    """What annotate reads: QC and resolvability, and the selected backend's own keys only."""
    # the template annotator's
    questions = (
        "annotate.identification_pairs",
        "annotate.max_per_family",
        "run.seed",
    )
    model = (*questions, "annotate.hf", "run.max_pixels")
    backend = {
        "template": questions,
        "openai": ("annotate.openai",),
        "hf": model,
        "vllm": (*model, "annotate.vllm"),
    }
    # your own: all
    return (
        "annotate.backend",
        "annotate.qc",
        *VISIBILITY_KEYS,
        *backend.get(cfg.annotate.backend, ("annotate",)),
    )


STAGE = Stage(
    "annotate", _body, inputs=("align",), keys=read_keys, retry=functools.partial(_body, retry=True)
)


def run(cfg: WorkflowConfig) -> dict:
    return STAGE.run(cfg)
