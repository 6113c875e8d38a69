"""catalog: scan the archive (a folder, or a STAC catalog / ItemCollection file) into
``catalog/scenes.parquet`` (GeoParquet) and ``catalog/errors.parquet``; companions the rules do not name
are searched for (optical twins in ``catalog.optical``, land-cover tiles in ``catalog.landcover``), with
per-scene land-cover VRTs under ``catalog/landcover/``."""

from __future__ import annotations

import collections
import dataclasses

import pyarrow.compute as pc

from sarlang_ray import catalog, io, search, tables
from sarlang_ray.config import WorkflowConfig
from sarlang_ray.errors import errors_table
from sarlang_ray.stages import execution
from sarlang_ray.stages.execution import Resources, Work, placement
from sarlang_ray.stages.stage import Stage


def _body(cfg: WorkflowConfig) -> dict:
    io.use_access(cfg.catalog.sign, cfg.catalog.s3_anonymous, cfg.catalog.s3_requester_pays)
    if cfg.catalog.search.source:  # frozen into the run folder before anything is inspected; reused by a rerun
        snapshot, searched = search.freeze(cfg.catalog.search, cfg.run.run_dir)
        return _stream(cfg, snapshot, searched)
    rows, errors = catalog.list_scenes(cfg.catalog)  # errors: STAC items without a usable SAR asset
    planned = len(rows) + len(errors)
    # one Ray task per scene, on the pooled workers the tile stage then finds warm (rasterio, numba imported)
    results = execution.map(Work(rows, catalog.SceneInspector, (cfg.catalog,), Resources.of(cfg.catalog),
                                 progress=cfg.ray.progress))
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
    if not scenes:
        counts["failure"] = (f"none of the {planned} files of {cfg.catalog.archive} is a usable SAR scene "
                             f"({', '.join(f'{k}: {n}' for k, n in reasons.most_common())}); the reason for each file is in "
                             "catalog/errors.parquet (sarlang_ray.tables.read_errors). Check catalog.sar_glob and the files")
    return counts


PAGE_ROWS = 64  # scenes per inspection task of the streaming catalog


class CatalogPage:
    """Row class of the streaming catalog: one page of the listing (:func:`sarlang_ray.catalog.inspect_page`)."""

    def __init__(self, cfg, run_dir: str):
        self.cfg, self.run_dir = cfg, run_dir

    def __call__(self, item: dict) -> dict:
        return catalog.inspect_page(self.cfg, self.run_dir, item["page"], item["rows"], item["errors"])


def _stream(cfg: WorkflowConfig, snapshot: str, searched: dict) -> dict:
    """The catalog of a search snapshot, streaming: pages of the listing become Ray tasks as they are read (at
    most two per CPU of the cluster in flight), each task writes its part of the scenes and errors tables, and the
    driver keeps counts (and an 8-byte digest per asset, for duplicates across pages) until the parts are merged
    into ``catalog/scenes.parquet`` one at a time."""
    import ray

    pages = 0

    def listing():
        nonlocal pages
        for rows, listing_errors in catalog.snapshot_pages(cfg.catalog, snapshot, PAGE_ROWS):
            yield {"page": pages, "rows": rows, "errors": listing_errors}
            pages += 1

    resources = Resources.of(cfg.catalog)
    window = max(2, int(2 * ray.cluster_resources().get("CPU", 1)))  # pages in flight: the listing is read as they end
    done = execution.map(Work(listing(), CatalogPage, (cfg.catalog, cfg.run.run_dir),
                              dataclasses.replace(resources, concurrency=resources.concurrency or window),
                              progress=cfg.ray.progress))
    catalog.merge_parts(cfg.run.run_dir, pages)
    ids = io.read_parquet(tables.scenes_uri(cfg.run.run_dir), columns=["scene_id"]).column("scene_id")
    assert len(pc.unique(ids)) == len(ids), "scene_id collision in the streaming catalog"
    reasons: collections.Counter = collections.Counter()
    companions: dict = {}
    for d in done:
        reasons.update(d["reasons"])
        for key, value in d["companions"].items():
            if isinstance(value, dict):
                companions[key] = dict(collections.Counter(companions.get(key, {})) + collections.Counter(value))
            else:
                companions[key] = value
    counts = {"planned": sum(d["planned"] for d in done), "written": sum(d["written"] for d in done),
              "rejected": sum(d["rejected"] for d in done), "companions": companions,
              "rejects_by_reason": dict(sorted(reasons.items())),
              "placement": placement(done),
              "proj_mismatches": sum(d["proj_mismatches"] for d in done),
              "relief_flagged": sum(d["relief_flagged"] for d in done), "search": searched, "pages": pages}
    if not counts["written"]:
        counts["failure"] = (f"none of the {counts['planned']} items of the search snapshot {snapshot} is a usable SAR "
                             f"scene ({', '.join(f'{k}: {n}' for k, n in reasons.most_common())}); the reason for each "
                             "is in catalog/errors.parquet (sarlang_ray.tables.read_errors)")
    return counts


# the synthetic archive, when this run makes it, is an input: a new one means new scenes. The label keys are
# align's: a class-map change must not re-tile
LABEL_KEYS = frozenset({"catalog.labels_glob", "catalog.labels", "catalog.labels_class_map", "catalog.labels_id_column"})
STAGE = Stage("catalog", _body, inputs=("synth",), keys=("catalog",), drop=LABEL_KEYS)


def run(cfg: WorkflowConfig) -> dict:
    return STAGE.run(cfg)
