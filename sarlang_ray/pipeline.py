"""The stages wired on Ray, top to bottom: synth -> catalog -> tile -> align, and the run summary.

Each stage reads the previous stage's table under the run folder and writes its own, then a
``<stage>/_SUCCESS.json`` with its counts. A stage whose ``_SUCCESS.json`` exists is skipped (a no-op)
unless ``run.force=true``; an interrupted stage resumes, skipping shards that are already written.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import time
from dataclasses import asdict

import pyarrow.compute as pc

from sarlang_ray import align, catalog, io, synth, tiling
from sarlang_ray.annotate import stage as annotate_stage
from sarlang_ray.config import WorkflowConfig, to_yaml
from sarlang_ray.errors import errors_table, redact_text
from sarlang_ray.tables import annotation_shards, read_annotations, read_errors, read_scenes, read_tiles, tile_shards, write_scenes  # noqa: F401  (re-exported)

log = logging.getLogger("sarlang")


def ensure_ray(cfg: WorkflowConfig) -> None:
    """Connect to the configured cluster (or RAY_ADDRESS), or start a local Ray on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict = {"log_to_driver": True}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # address="local": always a new local Ray, never one a `ray start` left on this machine
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.ray.progress
    ctx.execution_options.preserve_order = True  # deterministic manifests


def _done_marker(run_dir: str, stage: str) -> str:
    return io.join(run_dir, stage, "_SUCCESS.json")


def _finished(cfg: WorkflowConfig, stage: str) -> dict | None:
    marker = _done_marker(cfg.run.run_dir, stage)
    if not cfg.run.force and io.exists(marker):
        return io.read_json(marker)
    return None


def stage(name: str, needs_ray: bool = True):
    """Wrap a stage body: a finished stage is a no-op (unless run.force); otherwise sweep the partial files
    killed writers left in ``<run_dir>/<name>``, connect Ray, run the body, time it, and write
    ``<run_dir>/<name>/_SUCCESS.json`` with its counts."""

    def wrap(body):
        @functools.wraps(body)
        def runner(cfg: WorkflowConfig) -> dict:
            if (done := _finished(cfg, name)) is not None:
                return done
            swept = io.sweep_partial(io.join(cfg.run.run_dir, name))
            if swept:
                log.info("%s: removed %d partial files left by killed writers", name, len(swept))
            if needs_ray:
                ensure_ray(cfg)
            t0 = time.time()
            counts = body(cfg)
            counts["seconds"] = round(time.time() - t0, 2)
            io.write_json_atomic(_done_marker(cfg.run.run_dir, name), counts)
            return counts

        return runner

    return wrap


def _workers(concurrency: int | None) -> int:
    import ray

    return concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)))


def run_synth(cfg: WorkflowConfig) -> dict:
    marker = io.join(cfg.synth.out_dir, "_SUCCESS.json")
    if not cfg.run.force and io.exists(marker):
        return io.read_json(marker)
    t0 = time.time()
    counts = synth.write_archive(cfg.synth, cfg.run.seed)
    counts["seconds"] = round(time.time() - t0, 2)
    io.write_json_atomic(marker, counts)
    return counts


@stage("catalog")
def run_catalog(cfg: WorkflowConfig) -> dict:
    """Scan the archive (a folder, or a STAC catalog / ItemCollection file) into catalog/scenes.parquet
    (GeoParquet) and catalog/errors.parquet."""
    import ray

    rows, errors = catalog.list_scenes(cfg.catalog)  # errors: STAC items without a usable SAR asset
    planned = len(rows) + len(errors)
    results = []
    if rows:
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 64))
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=min(len(rows), _workers(None)))
        results = ds.map(catalog.SceneInspector, fn_constructor_args=(cfg.catalog,), compute=pool, num_cpus=1).take_all()
    scenes = [r["scene"] for r in results if r["scene"] is not None]
    errors += [r["error"] for r in results if r["error"] is not None]
    ids = collections.Counter(s["scene_id"] for s in scenes)
    assert all(n == 1 for n in ids.values()), f"scene_id collision: {[k for k, n in ids.items() if n > 1]}"
    out = io.join(cfg.run.run_dir, "catalog")
    write_scenes(io.join(out, "scenes.parquet"), sorted(scenes, key=lambda s: s["scene_id"]))
    io.write_parquet_atomic(io.join(out, "errors.parquet"), errors_table(errors))
    return {"planned": planned, "written": len(scenes), "rejected": len(errors)}




def _run_shards(items: list[dict], fn, constructor_args: tuple, concurrency: int | None, num_cpus: float,
                num_gpus: float = 0.0) -> list[dict]:
    """Map a row function over small work items on an actor pool; one block per item for balance."""
    import ray

    if not items:
        return []
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    workers = min(_workers(concurrency), len(items))
    pool = ray.data.ActorPoolStrategy(size=workers)
    return ds.map(fn, fn_constructor_args=constructor_args, compute=pool, num_cpus=num_cpus, num_gpus=num_gpus).take_all()


@stage("tile")
def run_tile(cfg: WorkflowConfig) -> dict:
    """Tile every cataloged scene at every pyramid GSD into tile/shards/**.parquet."""
    chunks = [c for s in read_scenes(cfg.run.run_dir) for c in tiling.plan_chunks(s, cfg.tile)]
    manifest = _run_shards(chunks, tiling.TileChunk, (cfg.tile, cfg.run.run_dir), cfg.tile.concurrency, cfg.tile.num_cpus)
    return _totals(manifest)


@stage("align")
def run_align(cfg: WorkflowConfig) -> dict:
    """Align every tile shard with labels, land cover and the optical twin into align/shards/**.parquet."""
    out = io.join(cfg.run.run_dir, "align")
    root = catalog.archive_root(cfg.catalog.archive)  # a STAC catalog's labels sit beside its catalog.json
    label_uris = sorted({u for pattern in cfg.catalog.labels_glob for u in io.glob(root, pattern)})
    labels, label_errors, n_features = align.prepare_labels(label_uris, cfg.align, root)
    labels_uri = None
    if label_uris:
        labels_uri = io.join(out, "labels.parquet")
        fs, path = io.filesystem(labels_uri)
        io.makedirs(out)
        labels.to_parquet(path, filesystem=fs, write_covering_bbox=True)
    io.write_parquet_atomic(io.join(out, "label_errors.parquet"), errors_table(label_errors))
    shards = _shard_items(io.join(cfg.run.run_dir, tiling.STAGE, "shards"))
    manifest = _run_shards(shards, align.AlignShard, (cfg.align, cfg.run.run_dir, labels_uri), cfg.align.concurrency, cfg.align.num_cpus)
    counts = _totals(manifest)
    feature_errors = sum("#feature=" in e["item"] for e in label_errors)
    counts["labels"] = {"files": len(label_uris), "files_rejected": len(label_errors) - feature_errors,
                        "planned": n_features, "written": len(labels), "rejected": feature_errors}
    return counts


@stage("annotate")
def run_annotate(cfg: WorkflowConfig) -> dict:
    """Captions and QA for every tile shard into annotate/shards/**.parquet, with QC and its report."""
    a = cfg.annotate
    manifest = _run_shards(_shard_items(io.join(cfg.run.run_dir, "align", "shards")), annotate_stage.AnnotateShard,
                           (a, cfg.run.run_dir, cfg.run.seed, cfg.run.max_pixels), a.concurrency, a.num_cpus, a.num_gpus)
    counts = _totals(manifest)
    hits: collections.Counter = collections.Counter()
    for m in manifest:
        hits.update(json.loads(m["qc_hits"]))
    pairs, passed = sum(m["pairs"] for m in manifest), sum(m["pairs_passed"] for m in manifest)
    counts["pairs"] = {"planned": pairs, "passed": passed, "rejected": pairs - passed}
    report = {"backend": a.backend, "pairs": counts["pairs"], "rule_hits": dict(hits), "rules": asdict(a.qc)}
    io.write_json_atomic(io.join(cfg.run.run_dir, "annotate", "qc_report.json"), report)
    return counts


def _shard_items(root: str) -> list[dict]:
    return [{"shard": io.relative(u, root)} for u in io.glob(root, "*/*.parquet")]


def _totals(manifest: list[dict]) -> dict:
    return {
        "shards": len(manifest),
        "planned": sum(m["planned"] for m in manifest),
        "written": sum(m["written"] for m in manifest),
        "rejected": sum(m["rejected"] for m in manifest),
        "skipped_shards": sum(bool(m["skipped"]) for m in manifest),
    }


def summarise(cfg: WorkflowConfig, stage_counts: dict, seconds: float) -> dict:
    """Scenes, tiles per GSD, objects per class, rejects by reason, wall time; read shard by shard."""
    run_dir = cfg.run.run_dir
    summary: dict = {"workflow": cfg.name, "run_dir": run_dir, "stages": stage_counts, "wall_seconds": round(seconds, 1)}
    if io.exists(io.join(run_dir, "catalog", "scenes.parquet")):
        summary["scenes"] = len(read_scenes(run_dir))
    tiles_per_gsd: collections.Counter = collections.Counter()
    objects: collections.Counter = collections.Counter()
    for uri in tile_shards(run_dir):
        t = io.read_parquet(uri, columns=["gsd_m", "objects"])
        tiles_per_gsd.update(f"{g:g} m" for g in t["gsd_m"].to_pylist())
        flat = pc.list_flatten(t["objects"])
        if len(flat):
            objects.update(pc.struct_field(flat, "class").to_pylist())
    summary["tiles_per_gsd"] = dict(sorted(tiles_per_gsd.items(), key=lambda kv: float(kv[0].split()[0])))
    summary["objects_per_class"] = dict(objects.most_common())
    apps: collections.Counter = collections.Counter()
    for uri in annotation_shards(run_dir):
        t = io.read_parquet(uri, columns=["application", "qc_passed"])
        apps.update(a for a, ok in zip(t["application"].to_pylist(), t["qc_passed"].to_pylist()) if ok)
    if apps:
        summary["pairs_per_application"] = dict(apps.most_common())
    errors = read_errors(run_dir)
    summary["rejects_by_reason"] = dict(collections.Counter(
        f"{s}:{c}" for s, c in zip(errors["stage"].to_pylist(), errors["error_class"].to_pylist())).most_common())
    return summary


def format_summary(s: dict) -> str:
    lines = [f"== sarlang run '{s['workflow']}' -> {s['run_dir']} ({s['wall_seconds']} s) =="]
    for stage, c in s["stages"].items():
        extra = f"  planned {c.get('planned')} = written {c.get('written')} + rejected {c.get('rejected')}" if "planned" in c else ""
        lines.append(f"  {stage:8s} {c.get('seconds', '-')} s{extra}")
    if "scenes" in s:
        lines.append(f"scenes: {s['scenes']}")
    lines.append("tiles per GSD: " + ", ".join(f"{k}: {v}" for k, v in s["tiles_per_gsd"].items()))
    lines.append("objects per class: " + ", ".join(f"{k}: {v}" for k, v in s["objects_per_class"].items()))
    if "pairs_per_application" in s:
        lines.append("pairs per application (QC passed): " + ", ".join(f"{k}: {v}" for k, v in s["pairs_per_application"].items()))
    lines.append("rejects by reason: " + (", ".join(f"{k}: {v}" for k, v in s["rejects_by_reason"].items()) or "none"))
    if "train" in s["stages"]:
        t = s["stages"]["train"]
        lines.append(f"train: held-out loss {t['val_loss_before']:.3f} -> {t['val_loss_after']:.3f} on {t['n_train']} pairs; "
                     f"checkpoint {t['checkpoint']}")
    if "evaluate" in s["stages"]:
        e = s["stages"]["evaluate"]
        lines += ["", io.read_bytes(e["files"]).decode(), f"leaderboard files: {e['files']} (.csv, .json beside it)",
                  "plots: " + ", ".join(e["plots"])]
    return "\n".join(lines)


@stage("export", needs_ray=False)
def run_export_stage(cfg: WorkflowConfig) -> dict:
    """Splits and the four export forms under export/ (streams shard by shard in the driver)."""
    from sarlang_ray.export import run_export

    return run_export(cfg)


@stage("train")
def run_train_stage(cfg: WorkflowConfig) -> dict:
    """Ray Train fine-tuning on the export (see sarlang_ray.train)."""
    from sarlang_ray.train import run_train

    out = run_train(cfg)
    return {k: out[k] for k in ("n_train", "val_loss_before", "val_loss_after", "checkpoint")}


@stage("evaluate")
def run_evaluate_stage(cfg: WorkflowConfig) -> dict:
    """Ray Tune sweep of models x image variants x prompts on the test split -> leaderboard (sarlang_ray.evaluate)."""
    from sarlang_ray.evaluate import run_evaluate

    board = run_evaluate(cfg)
    mode = board["vqa_mode"]
    return {"trials": len([r for r in board["rows"] if "samples_per_s" in r]), "failed": len(board["failed"]),
            "leaderboard": [{"model": r["model"], "image": r["image"], "prompt": r["prompt"], f"vqa_{mode}": r.get(f"vqa_{mode}"),
                             "concise_cider_tok": r.get("concise_cider_tok")} for r in board["rows"]],
            "files": io.join(cfg.run.run_dir, "evaluate", "leaderboard.md"), "plots": board["plots"]}


RUNNERS = {"synth": run_synth, "catalog": run_catalog, "tile": run_tile, "align": run_align, "annotate": run_annotate,
           "export": run_export_stage, "train": run_train_stage,
           "evaluate": run_evaluate_stage}


def _absolute_local_paths(cfg: WorkflowConfig) -> None:
    """Relative local paths are relative to the driver's working directory; Ray workers may run
    elsewhere (an attached cluster), so hand them absolute paths. Remote URIs are left alone."""
    for section, key in (("run", "run_dir"), ("synth", "out_dir"), ("catalog", "archive"), ("train", "storage_path")):
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if value and not io.is_remote(value) and not os.path.isabs(value):
            setattr(obj, key, os.path.abspath(value))
    for obj in (cfg.train, cfg.annotate.hf):  # model: a hub name stays, an existing local folder gets absolute
        if obj.model and not os.path.isabs(obj.model) and os.path.isdir(obj.model):
            obj.model = os.path.abspath(obj.model)


def run(cfg: WorkflowConfig, stages: list[str] | None = None) -> dict:
    """Run the configured stages in order, save the resolved config, print and save the summary."""
    t0 = time.time()
    stages = stages or cfg.run.stages
    _absolute_local_paths(cfg)
    io.makedirs(cfg.run.run_dir)
    io.write_bytes_atomic(io.join(cfg.run.run_dir, "config.yaml"), to_yaml(cfg).encode())
    counts = {}
    for stage in stages:
        log.info("stage %s", stage)
        counts[stage] = RUNNERS[stage](cfg)
    summary = summarise(cfg, counts, time.time() - t0)
    text = redact_text(json.dumps(summary, indent=2, default=str), [cfg.annotate.openai.api_key_env])
    io.write_bytes_atomic(io.join(cfg.run.run_dir, "summary.json"), text.encode())  # run_dir may hold s3://KEY:SECRET@
    return summary
