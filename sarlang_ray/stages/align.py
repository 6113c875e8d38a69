"""align: every tile shard with its objects, land cover and optical twin -> ``align/shards/`` (the tiles
table); labels are validated once into ``align/labels.parquet``."""

from __future__ import annotations

from sarlang_ray import align, catalog, io
from sarlang_ray.config import WorkflowConfig
from sarlang_ray.errors import errors_table
from sarlang_ray.stages.runner import Stage, map_items, shard_items, totals


def _body(cfg: WorkflowConfig) -> dict:
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
    shards = shard_items(io.join(cfg.run.run_dir, "tile", "shards"))
    manifest = map_items(shards, align.AlignShard, (cfg.align, cfg.run.run_dir, labels_uri), cfg.align.concurrency,
                         cfg.align.num_cpus, max_actors=cfg.align.max_actors, memory_gb=cfg.align.memory_gb)
    counts = totals(manifest)
    feature_errors = sum("#feature=" in e["item"] for e in label_errors)
    counts["labels"] = {"files": len(label_uris), "files_rejected": len(label_errors) - feature_errors,
                        "planned": n_features, "written": len(labels), "rejected": feature_errors}
    return counts


STAGE = Stage("align", _body, inputs=("tile",), keys=("align", "catalog.labels_glob"))


def run(cfg: WorkflowConfig) -> dict:
    return STAGE.run(cfg)
