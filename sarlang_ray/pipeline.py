"""The orchestrator: which stages a command runs, in what order, and the run summary.

Each stage (:mod:`sarlang_ray.stages`) reads the tables of the stages before it under the run folder and
writes its own; :mod:`sarlang_ray.stages.stage` decides whether a stage is up to date, resumes or is
recomputed (fingerprints of the config keys and inputs it is made from). This module plans a command:

* ``sarlang run``: every stage of ``run.stages``;
* ``sarlang <stage>``: that stage, plus every stage after it that this run folder already holds (they are
  made from it, so they are redone when it changes and stay no-ops when it does not), plus the stages of
  ``run.stages`` before it that are missing or out of date.

So ``config.yaml`` (written once the planned stages are done) and ``summary.json`` (built from every
stage's ``_SUCCESS.json``, without reading a shard) describe what is on disk.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time

from sarlang_ray import io
from sarlang_ray.config import WorkflowConfig, to_yaml
from sarlang_ray.errors import redact_text
from sarlang_ray.stages.cluster import ensure_ray  # noqa: F401  (re-exported)

# re-exported
from sarlang_ray.stages.stage import ORDER, StageFailed, counts_of, downstream, registry  # noqa: F401
from sarlang_ray.tables import (  # noqa: F401
    annotation_shards,
    read_annotations,
    read_errors,
    read_scenes,
    read_tiles,
    tiles_table_shards,
)

log = logging.getLogger("sarlang")


def plan(cfg: WorkflowConfig, requested: list[str]) -> list[str]:
    """The stages a command runs, in pipeline order (see the module docstring)."""
    stages = registry()
    chosen = set(requested)
    for name in requested:  # what is made from a requested stage and is on disk: redo it if it changes
        chosen |= {d for d in downstream(name) if io.exists(stages[d].marker(cfg))}
    changed = True
    while changed:  # the configured stages a chosen one reads, when missing or out of date
        changed = False
        for name in list(chosen):
            for dep in stages[name].inputs:
                if dep not in chosen and dep in cfg.run.stages and stages[dep].status(cfg) != "done":
                    chosen.add(dep)
                    changed = True
    return [s for s in ORDER if s in chosen]


# what the summary shows once, at its top level, of the stages' counts
SUMMARY_FIELDS = ("tiles_per_gsd", "objects_per_class", "pairs_per_application")


def summarise(cfg: WorkflowConfig, stage_counts: dict, seconds: float) -> dict:
    """Scenes, tiles per GSD, objects per class, pairs per application, rejects by reason and wall time, from
    the finished stages' counts (their ``_SUCCESS.json``) only: it runs after every command, a no-op one
    included, and reads no shard (the workers counted them and the stage markers hold the sums)."""
    summary: dict = {
        "workflow": cfg.name,
        "run_dir": cfg.run.run_dir,
        "wall_seconds": round(seconds, 1),
        "stages": {
            name: {k: v for k, v in c.items() if k not in SUMMARY_FIELDS} for name, c in stage_counts.items()
        },
    }
    if "catalog" in stage_counts:
        summary["scenes"] = stage_counts["catalog"]["written"]
    align = stage_counts.get("align", {})
    summary["tiles_per_gsd"] = dict(
        sorted(align.get("tiles_per_gsd", {}).items(), key=lambda kv: float(kv[0].split()[0]))
    )
    summary["objects_per_class"] = dict(collections.Counter(align.get("objects_per_class", {})).most_common())
    if apps := stage_counts.get("annotate", {}).get("pairs_per_application"):
        summary["pairs_per_application"] = dict(collections.Counter(apps).most_common())
    rejects: collections.Counter = collections.Counter()
    for name, c in stage_counts.items():
        # align's label files and features
        labels = c.get("labels") if isinstance(c.get("labels"), dict) else {}
        for reasons in (c.get("rejects_by_reason") or {}, labels.get("rejects_by_reason") or {}):
            rejects.update({f"{name}:{k}": v for k, v in reasons.items()})
    summary["rejects_by_reason"] = dict(rejects.most_common())
    return summary


def format_summary(s: dict, stage_lines: bool = True) -> str:
    """The summary as text; ``stage_lines=False`` leaves out the per-stage rows (the terminal printed each
    stage's counts as it ended) but keeps their warnings."""
    lines = [f"== sarlang run '{s['workflow']}' -> {s['run_dir']} ({s['wall_seconds']} s) =="]
    for stage, c in s["stages"].items():
        extra = (
            f"  planned {c.get('planned')} = written {c.get('written')} + rejected {c.get('rejected')}"
            if "planned" in c
            else ""
        )
        if stage_lines:
            lines.append(f"  {stage:8s} {c.get('seconds', '-')} s{extra}")
        # one reason took out much of the stage
        lines += [
            f"  !! WARNING {stage}: {w}" if not stage_lines else f"  !! WARNING {w}"
            for w in c.get("warnings", [])
        ]
    if "scenes" in s:
        lines.append(f"scenes: {s['scenes']}")
    lines.append("tiles per GSD: " + ", ".join(f"{k}: {v}" for k, v in s["tiles_per_gsd"].items()))
    lines.append("objects per class: " + ", ".join(f"{k}: {v}" for k, v in s["objects_per_class"].items()))
    if "pairs_per_application" in s:
        lines.append(
            "pairs per application (QC passed): "
            + ", ".join(f"{k}: {v}" for k, v in s["pairs_per_application"].items())
        )
    lines.append(
        "rejects by reason: " + (", ".join(f"{k}: {v}" for k, v in s["rejects_by_reason"].items()) or "none")
    )
    if "train" in s["stages"]:
        t = s["stages"]["train"]
        split = t.get("held_out_split", "val")
        lines.append(
            f"train: held-out loss ({split} split{'!' if split != 'val' else ''}) {t['val_loss_before']:.3f} "
            "-> "
            f"{t['val_loss_after']:.3f} on {t['n_train']} pairs; checkpoint {t['checkpoint']}"
        )
    if "evaluate" in s["stages"]:
        e = s["stages"]["evaluate"]
        lines += [
            "",
            io.read_bytes(e["files"]).decode(),
            f"leaderboard files: {e['files']} (.csv, .json beside it)",
            "plots: " + ", ".join(e["plots"]),
        ]
    return "\n".join(lines)


def _absolute_local_paths(cfg: WorkflowConfig) -> None:
    """Relative local paths are relative to the driver's working directory; Ray workers may run
    elsewhere (an attached cluster), so hand them absolute paths. Remote URIs are left alone."""
    for section, key in (
        ("run", "run_dir"),
        ("synth", "out_dir"),
        ("catalog", "archive"),
        ("train", "storage_path"),
    ):
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if value and not io.is_remote(value) and not os.path.isabs(value):
            setattr(obj, key, os.path.abspath(value))
    # model: a hub name stays, an existing local folder gets absolute
    for obj in (
        cfg.train,
        cfg.annotate.hf,
    ):
        if obj.model and not os.path.isabs(obj.model) and os.path.isdir(obj.model):
            obj.model = os.path.abspath(obj.model)


def run(cfg: WorkflowConfig, stages: list[str] | None = None, console=None) -> dict:
    """Run the planned stages in order, then save the resolved config and the summary. ``console``
    (:class:`sarlang_ray.console.Console`) is told when each stage starts and ends, with its counts.

    Raises:
        StageFailed: a stage's work failed (its outputs and the summary so far are written first).
    """
    t0 = time.time()
    _absolute_local_paths(cfg)
    io.makedirs(cfg.run.run_dir)
    todo = plan(cfg, stages or cfg.run.stages)
    if stages and todo != [s for s in ORDER if s in stages]:
        log.info(
            "stages to run: %s (the ones after a requested stage that this run folder holds are redone when "
            "it changes; missing ones before it are made)",
            ", ".join(todo),
        )
    runners = registry()
    failed = True
    try:
        for i, name in enumerate(todo, 1):
            log.info("stage %s", name)
            if console is not None:
                console.stage_started(name, i, len(todo))
            counts = runners[name].run(cfg)
            if console is not None:
                console.stage_done(name, counts)
        failed = False
    finally:
        if console is not None:
            console.stop()
        # what is on disk now: the config of the stages just run, and every finished stage's counts
        try:
            io.write_bytes_atomic(io.join(cfg.run.run_dir, "config.yaml"), to_yaml(cfg).encode())
            summary = summarise(cfg, finished_counts(cfg), time.time() - t0)
            text = redact_text(json.dumps(summary, indent=2, default=str), [cfg.annotate.openai.api_key_env])
            # run_dir may hold s3://KEY:SECRET@
            io.write_bytes_atomic(io.join(cfg.run.run_dir, "summary.json"), text.encode())
        except Exception:
            if not failed:
                raise
            # the stage's own exception (StageFailed, an interrupt) is the one the command reports
            log.exception("the run summary could not be written after the failure below")
    return summary


def finished_counts(cfg: WorkflowConfig) -> dict:
    """The counts of every stage this run folder holds a finished, current result of."""
    out = {}
    for name, stage in registry().items():
        marker = stage.read_marker(cfg)
        if marker is not None and (name != "synth" or name in cfg.run.stages):
            out[name] = counts_of(marker)
    return out
