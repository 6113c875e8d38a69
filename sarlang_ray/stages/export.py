"""export: geographic splits, a leakage report, and the dataset in four forms under ``export/``
(see :mod:`sarlang_ray.export`).

Ray tasks plan the split from block aggregates (the driver holds blocks and per-shard counters, not tiles;
:func:`~sarlang_ray.export.plan_on_workers`), each shard's decisions in a file its exporter reads: every
shard is exported by an actor of a pool (:class:`~sarlang_ray.export.ExportShard`: PNGs, Parquet shards,
per-shard parts of the JSON and CSV files, the contradiction checker's report of its pairs); the driver then
streams each JSON/CSV file together from its parts, one part in memory at a time
(:func:`~sarlang_ray.export.assemble`), or, for a file above ``export.shard_records`` /
``export.shard_bytes``, has Ray tasks write it as numbered shards (Parquet included), lists every file in
``manifest.json``, and draws the card from the summed counters and reports.
"""

from __future__ import annotations

import json
from collections import Counter

from sarlang_ray import export, io
from sarlang_ray.annotate import consistency
from sarlang_ray.annotate.visibility import VISIBILITY_KEYS, Visibility
from sarlang_ray.config import WorkflowConfig
from sarlang_ray.errors import judge_outcome
from sarlang_ray.splits import SPLITS
from sarlang_ray.stages import execution
from sarlang_ray.stages.execution import Resources, Work, placement
from sarlang_ray.stages.stage import Stage


def _body(cfg: WorkflowConfig) -> dict:
    out = io.join(cfg.run.run_dir, "export")
    items, split_counts = export.plan(cfg)
    reasons = Counter(split_counts["reasons"])
    if split_counts["planned"] and not split_counts["written"]:
        return judge_outcome(
            "export",
            {k: split_counts[k] for k in ("planned", "written", "rejected")},
            reasons,
            cfg.run.warn_reject_share,
            "A larger export.block_m (or a smaller export.buffer_m) leaves fewer tiles at split boundaries.",
        )
    visibility = Visibility.from_config(cfg.annotate)
    resources = Resources.of(cfg.export)
    shards = execution.map(
        Work(items, export.ExportShard, (cfg.run.run_dir, visibility), resources, progress=cfg.ray.progress)
    )
    manifest = sorted(shards, key=lambda m: m["index"])
    e = cfg.export
    jobs = export.assembly_jobs(out, manifest, e.shard_records, e.shard_bytes)
    # files within the thresholds (12 small text files at most): in the driver, where starting a Ray worker
    # costs more than the copy; the numbered shards of big files: Ray tasks, each streaming its parts
    written = [export.assemble(job) for job in jobs if not job["sharded"]]
    assembled = execution.map(
        Work([job for job in jobs if job["sharded"]], export.AssembleFile, (), resources)
    )
    written += list(assembled)
    export.write_manifest(out, jobs, written, manifest, any(i["nested_images"] for i in items))
    export.write_dataset_info(out, {job["logical"] for job in jobs if job["sharded"]})
    export.remove_merged_parquet(out, jobs)
    export.remove_parts(out)
    export.remove_parts(out, export.PLAN)  # the planner's index and decisions: read by the shards, now done
    stats = export.merge_stats(manifest)
    leakage = split_counts["leakage"]
    counts = {
        "splits": {s: {"tiles": stats["tiles"][s], "pairs": stats["pairs"][s]} for s in SPLITS},
        "planned": split_counts["planned"],
        "written": split_counts["written"],
        "rejected": split_counts["rejected"],
        "question_types": len(stats["question_types"]),
        "leakage": {k: v for k, v in leakage.items() if k in ("leak_free", "pairs", "clipped_objects")},
        "shards": len(manifest),
        "skipped_shards": sum(bool(m["skipped"]) for m in manifest),
    }
    contradictions = consistency.merge_reports([json.loads(m["contradictions"]) for m in manifest])
    export.write_card(out, cfg, stats, counts, leakage, contradictions)
    counts["placement"] = placement(shards, assembled)  # the marker's, not the card's
    return judge_outcome("export", counts, reasons, cfg.run.warn_reject_share)


# the card names the backend and the QC rules, and reports resolvability with annotate's settings
STAGE = Stage(
    "export",
    _body,
    inputs=("annotate",),
    keys=("export", "run.seed", "annotate.backend", "annotate.qc", *VISIBILITY_KEYS),
)


def run(cfg: WorkflowConfig) -> dict:
    return STAGE.run(cfg)
