"""align: every tile shard with its objects, land cover and optical twin -> ``align/shards/`` (the tiles
table). Labels come from ``catalog.labels_glob`` (validated once into ``align/labels.parquet``) or, for a
global layer (``catalog.labels``), from per-scene slices (``align/labels/<scene_id>.parquet``)."""

from __future__ import annotations

from collections import Counter

from sarlang_ray import align, catalog, companions, io, tables
from sarlang_ray.config import WorkflowConfig
from sarlang_ray.errors import errors_table, judge_outcome, summed_reasons
from sarlang_ray.stages import execution
from sarlang_ray.stages.execution import Manifest, Resources, Work, placement, shard_items, totals
from sarlang_ray.stages.stage import Stage


def _global_labels(cfg: WorkflowConfig, out: str) -> tuple[dict, Manifest]:
    """Slice the global layer per scene on workers; merge the per-scene error rows (a feature met by two
    scenes is one error) into ``align/label_errors.parquet``. Counts are per (scene, feature)."""
    assert cfg.catalog.labels is not None  # called for a global label layer only
    layer = companions.LabelLayer.open(catalog.resolve_path(cfg.catalog, cfg.catalog.labels))
    layer.check(cfg.catalog.labels_class_map, cfg.align.class_column, cfg.catalog.labels_id_column)
    scenes = [
        {"scene_id": s["scene_id"], "footprint": s["footprint"]}
        for s in io.read_parquet(
            tables.scenes_uri(cfg.run.run_dir), columns=["scene_id", "footprint"]
        ).to_pylist()
    ]
    manifest = execution.map(
        Work(
            scenes,
            align.LabelSlicer,
            (layer, cfg.catalog.labels_class_map, cfg.catalog.labels_id_column, cfg.align, out),
            Resources.of(cfg.align),
            progress=cfg.ray.progress,
        )
    )
    error_files = [io.join(out, "label_errors", f"{s['scene_id']}.parquet") for s in scenes]
    rows, seen = [], set()
    for uri in error_files:
        for row in tables.read_error_rows(uri):  # a scene whose labels were all good wrote none
            if row["item"] not in seen:
                seen.add(row["item"])
                rows.append(row)
    io.write_parquet_atomic(io.join(out, "label_errors.parquet"), errors_table(rows))
    files = sorted({f for m in manifest for f in m["files"]})
    return {
        "layer": layer.root,
        "layer_files": len(layer.files),
        "files_read": len(files),
        "features_read": sum(m["read"] for m in manifest),
        "unmapped": sum(m["unmapped"] for m in manifest),
        "planned": sum(m["planned"] for m in manifest),
        "written": sum(m["written"] for m in manifest),
        "rejected": sum(m["rejected"] for m in manifest),
        "distinct_errors": len(rows),
        "rejects_by_reason": _reasons(rows),
    }, manifest


def _reasons(rows: list[dict]) -> dict[str, int]:
    """Label files and features rejected per ``error_class`` (the run summary's ``align:`` reasons)."""
    return dict(sorted(Counter(r["error_class"] for r in rows).items()))


def _body(cfg: WorkflowConfig) -> dict:
    out = io.join(cfg.run.run_dir, "align")
    # an unknown preset stops here
    companions.landcover_classes(cfg.align.landcover_classes, cfg.align.landcover_preset)
    labels_uri, labels_dir, sliced = None, None, Manifest()
    if cfg.catalog.labels:
        label_counts, sliced = _global_labels(cfg, out)
        labels_dir = io.join(out, "labels")
    else:
        # a STAC catalog's labels sit beside its catalog.json
        root = catalog.archive_root(cfg.catalog.archive)
        label_uris = sorted({u for pattern in cfg.catalog.labels_glob for u in io.glob(root, pattern)})
        labels, label_errors, n_features = align.prepare_labels(label_uris, cfg.align, root)
        if label_uris:
            labels_uri = io.join(out, "labels.parquet")
            fs, path = io.filesystem(labels_uri)
            io.makedirs(out)
            labels.to_parquet(path, filesystem=fs, write_covering_bbox=True)
        io.write_parquet_atomic(io.join(out, "label_errors.parquet"), errors_table(label_errors))
        feature_errors = sum("#feature=" in e["item"] for e in label_errors)
        label_counts = {
            "files": len(label_uris),
            "files_rejected": len(label_errors) - feature_errors,
            "planned": n_features,
            "written": len(labels),
            "rejected": feature_errors,
            "rejects_by_reason": _reasons(label_errors),
        }
    shards = shard_items(io.join(cfg.run.run_dir, "tile", "shards"))
    manifest = execution.map(
        Work(
            shards,
            align.AlignShard,
            (cfg.align, cfg.run.run_dir, labels_uri, 4, labels_dir, io.access_of(cfg.catalog)),
            Resources.of(cfg.align),
            progress=cfg.ray.progress,
        )
    )
    counts = {**totals(manifest), "placement": placement(sliced, manifest)}
    counts["labels"] = label_counts
    return judge_outcome(
        "align",
        counts,
        summed_reasons(manifest),
        cfg.run.warn_reject_share,
        "Check the tiles' optical and land-cover rasters (catalog.optical_rule, catalog.landcover_rule).",
    )


STAGE = Stage(
    "align",
    _body,
    inputs=("tile",),
    keys=(
        "align",
        "catalog.labels_glob",
        "catalog.labels",
        "catalog.labels_class_map",
        "catalog.labels_id_column",
    ),
)


def run(cfg: WorkflowConfig) -> dict:
    return STAGE.run(cfg)
