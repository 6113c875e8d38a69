"""tile: every cataloged scene at every pyramid GSD -> ``tile/shards/<scene>/<gsd>-<chunk>.parquet``."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from sarlang_ray import io, tables, tiling
from sarlang_ray.config import WorkflowConfig
from sarlang_ray.stages import execution
from sarlang_ray.stages.execution import Resources, Work, placement, totals
from sarlang_ray.stages.stage import Stage

if TYPE_CHECKING:
    from sarlang_ray.rows import SceneRow


def nothing_planned(scenes: list[dict], cfg: WorkflowConfig) -> str:
    """Why a tile stage with scenes planned no tile, and what to change."""
    if not scenes:
        return (
            "the catalog has no usable scene, so there is nothing to tile; see catalog/errors.parquet "
            "(sarlang_ray.tables.read_errors) for why each file was rejected"
        )
    finest = min(s["gsd_m"] for s in scenes)
    return (
        f"every pyramid level (tile.gsds_m={list(cfg.tile.gsds_m)}) is finer than the archive's {finest:g} "
        "m, so no "
        f"tile was planned. Add {finest:g} (or coarser GSDs) to tile.gsds_m, or set tile.include_native=true"
    )


def _body(cfg: WorkflowConfig) -> dict:
    scenes = tables.read_scenes(cfg.run.run_dir)
    chunks = [c for s in scenes for c in tiling.plan_chunks(cast("SceneRow", s), cfg.tile)]
    if not chunks:
        return {"planned": 0, "written": 0, "rejected": 0, "failure": nothing_planned(scenes, cfg)}
    manifest = execution.map(
        Work(
            chunks,
            tiling.TileChunk,
            (cfg.tile, cfg.run.run_dir, io.access_of(cfg.catalog)),
            Resources.of(cfg.tile),
            progress=cfg.ray.progress,
        )
    )
    counts = {**totals(manifest), "placement": placement(manifest)}
    # for the run summary: the errors tables of the shards that rejected tiles, read once here
    counts["rejects_by_reason"] = tables.shard_error_reasons(
        cfg.run.run_dir, "tile", [m["shard"] for m in manifest if m["rejected"]]
    )
    if counts["written"] == 0:
        counts["failure"] = (
            f"all {counts['planned']} planned tiles were rejected; the reason for each is in tile/errors/ "
            "(sarlang_ray.tables.read_errors): nodata tiles need a higher tile.max_nodata_fraction, "
            "unreadable ones a fresh copy of the scene"
        )
    return counts


STAGE = Stage("tile", _body, inputs=("catalog",), keys=("tile",))


def run(cfg: WorkflowConfig) -> dict:
    return STAGE.run(cfg)
