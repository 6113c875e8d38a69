"""catalog: scan the archive (a folder, or a STAC catalog / ItemCollection file) into
``catalog/scenes.parquet`` (GeoParquet) and ``catalog/errors.parquet``; companions the rules do not name
are searched for (optical twins in ``catalog.optical``, land-cover tiles in ``catalog.landcover``), with
per-scene land-cover VRTs under ``catalog/landcover/``."""

from __future__ import annotations

import collections
import dataclasses

from sarlang_ray import catalog, io, search, tables
from sarlang_ray.config import WorkflowConfig
from sarlang_ray.stages import execution
from sarlang_ray.stages.execution import Resources, Work, placement
from sarlang_ray.stages.stage import Stage


def _body(cfg: WorkflowConfig) -> dict:
    io.use_access(cfg.catalog.sign, cfg.catalog.s3_anonymous, cfg.catalog.s3_requester_pays)
    snapshot, searched = None, None
    # frozen into the run folder before anything is inspected; reused by a rerun
    if cfg.catalog.search.source:
        snapshot, searched = search.freeze(cfg.catalog.search, cfg.run.run_dir)
    return _stream(cfg, snapshot, searched)


PAGE_ROWS = 64  # scenes per inspection task of the streaming catalog


class CatalogPage:
    """Row class of the streaming catalog: one page of the listing
    (:func:`sarlang_ray.catalog.inspect_page`)."""

    def __init__(self, cfg, run_dir: str):
        self.cfg, self.run_dir = cfg, run_dir

    def __call__(self, item: dict) -> dict:
        return catalog.inspect_page(self.cfg, self.run_dir, item["page"], (item["rows"], item["errors"]))


def _stream(cfg: WorkflowConfig, snapshot: str | None, searched: dict | None) -> dict:
    """The catalog, streaming, whatever the source (a search snapshot, a STAC file, a glob over a folder or
    bucket: :func:`catalog.listing_pages`): pages of the listing become tasks of ``execution.map`` as they are
    read (at most two per CPU of the cluster in flight), each task writes its part of the scenes and errors
    tables, and the driver keeps counts (and an 8-byte digest per asset, for duplicates across pages) until
    the parts are merged into ``catalog/scenes.parquet`` one at a time.

    A page travels through the object store (``Work.by_reference``), not inline in the task: Ray kept ~12 KB
    of every task's inline arguments in the driver after the task had finished (23 MB at 1,563 pages)."""
    import ray

    pages = 0

    def listing():
        nonlocal pages
        for rows, listing_errors in catalog.listing_pages(cfg.catalog, snapshot, PAGE_ROWS):
            yield {"page": pages, "rows": rows, "errors": listing_errors}
            pages += 1

    resources = Resources.of(cfg.catalog)
    # pages in flight: the listing is read as they end
    window = max(2, int(2 * ray.cluster_resources().get("CPU", 1)))
    done = execution.map(
        Work(
            listing(),
            CatalogPage,
            (cfg.catalog, cfg.run.run_dir),
            dataclasses.replace(resources, concurrency=resources.concurrency or window),
            progress=cfg.ray.progress,
            by_reference=True,
        )
    )
    catalog.merge_parts(cfg.run.run_dir, pages)
    totals: collections.Counter = collections.Counter()
    reasons: collections.Counter = collections.Counter()
    companions: dict = {}
    for d in done:  # the manifest is spooled to a file: one page's counts at a time
        totals.update(
            {k: d[k] for k in ("planned", "written", "rejected", "proj_mismatches", "relief_flagged")}
        )
        reasons.update(d["reasons"])
        for key, value in d["companions"].items():
            if isinstance(value, dict):
                companions[key] = dict(
                    collections.Counter(companions.get(key, {})) + collections.Counter(value)
                )
            else:
                companions[key] = value
    duplicates = catalog.duplicate_ids(tables.scenes_uri(cfg.run.run_dir), totals["written"])
    assert not duplicates, f"scene_id collision in the streaming catalog: {duplicates}"
    counts = {
        "planned": totals["planned"],
        "written": totals["written"],
        "rejected": totals["rejected"],
        "companions": companions,
        "rejects_by_reason": dict(sorted(reasons.items())),
        "placement": placement(done, weight="planned"),  # scenes per node, not pages
        "proj_mismatches": totals["proj_mismatches"],
        "relief_flagged": totals["relief_flagged"],
        "pages": pages,
    }
    if searched is not None:
        counts["search"] = searched
    if not counts["written"]:
        source = f"items of the search snapshot {snapshot}" if snapshot else f"files of {cfg.catalog.archive}"
        counts["failure"] = (
            f"none of the {counts['planned']} {source} is a usable SAR scene "
            f"({', '.join(f'{k}: {n}' for k, n in reasons.most_common())}); the reason for each file "
            "is in catalog/errors.parquet (sarlang_ray.tables.read_errors). Check catalog.sar_glob "
            "and the files"
        )
    return counts


# the synthetic archive, when this run makes it, is an input: a new one means new scenes. The label keys are
# align's: a class-map change must not re-tile
LABEL_KEYS = frozenset(
    {"catalog.labels_glob", "catalog.labels", "catalog.labels_class_map", "catalog.labels_id_column"}
)
STAGE = Stage("catalog", _body, inputs=("synth",), keys=("catalog",), drop=LABEL_KEYS)


def run(cfg: WorkflowConfig) -> dict:
    return STAGE.run(cfg)
