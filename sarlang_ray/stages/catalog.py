"""catalog: scan the archive (a folder, or a STAC catalog / ItemCollection file) into
``catalog/scenes.parquet`` (GeoParquet) and ``catalog/errors.parquet``; companions the rules do not name
are searched for (optical twins in ``catalog.optical``, land-cover tiles in ``catalog.landcover``), with
per-scene land-cover VRTs under ``catalog/landcover/``."""

from __future__ import annotations

import collections

from sarlang_ray import catalog, io, search, tables
from sarlang_ray.config import WorkflowConfig
from sarlang_ray.errors import errors_table
from sarlang_ray.stages.runner import Stage, map_tasks, placement


def _body(cfg: WorkflowConfig) -> dict:
    io.use_access(cfg.catalog.sign, cfg.catalog.s3_anonymous, cfg.catalog.s3_requester_pays)
    snapshot, searched = None, None
    if cfg.catalog.search.source:  # frozen into the run folder before anything is inspected; reused by a rerun
        snapshot, searched = search.freeze(cfg.catalog.search, cfg.run.run_dir)
    rows, errors = catalog.list_scenes(cfg.catalog, snapshot)  # errors: STAC items without a usable SAR asset
    planned = len(rows) + len(errors)
    # one Ray task per scene, on the pooled workers the tile stage then finds warm (rasterio, numba imported)
    results = map_tasks(rows, catalog.SceneInspector, (cfg.catalog,), progress=cfg.ray.progress)
    scenes = sorted((r["scene"] for r in results if r["scene"] is not None), key=lambda s: s["scene_id"])
    errors += [r["error"] for r in results if r["error"] is not None]
    ids = collections.Counter(s["scene_id"] for s in scenes)
    assert all(n == 1 for n in ids.values()), f"scene_id collision: {[k for k, n in ids.items() if n > 1]}"
    scenes, twin_errors, companions = catalog.assign_companions(
        scenes, cfg.catalog, io.join(cfg.run.run_dir, "catalog", "landcover"))
    errors += twin_errors
    catalog.write_scenes(tables.scenes_uri(cfg.run.run_dir), scenes)
    io.write_parquet_atomic(io.join(cfg.run.run_dir, "catalog", "errors.parquet"), errors_table(errors))
    reasons = collections.Counter(e["error_class"] for e in errors)
    counts = {"planned": planned, "written": len(scenes), "rejected": len(errors), "companions": companions,
              "rejects_by_reason": dict(sorted(reasons.items())), "placement": placement(results),
              # STAC proj:* fields that disagreed with the file (the file won), GRD scenes on strong relief
              "proj_mismatches": sum(1 for s in scenes if s.get("proj_mismatch")),
              "relief_flagged": sum(1 for s in scenes if s.get("relief_flag"))}
    if searched is not None:
        counts["search"] = searched
    if not scenes:
        source = snapshot or cfg.catalog.archive
        counts["failure"] = (f"none of the {planned} files of {source} is a usable SAR scene "
                             f"({', '.join(f'{k}: {n}' for k, n in reasons.most_common())}); the reason for each file is in "
                             "catalog/errors.parquet (sarlang_ray.tables.read_errors). Check catalog.sar_glob and the files")
    return counts


# the synthetic archive, when this run makes it, is an input: a new one means new scenes. The label keys are
# align's: a class-map change must not re-tile
LABEL_KEYS = frozenset({"catalog.labels_glob", "catalog.labels", "catalog.labels_class_map", "catalog.labels_id_column"})
STAGE = Stage("catalog", _body, inputs=("synth",), keys=("catalog",), drop=LABEL_KEYS)


def run(cfg: WorkflowConfig) -> dict:
    return STAGE.run(cfg)
