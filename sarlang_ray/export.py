"""export: leakage-free splits, then the dataset in four forms, written shard by shard on Ray workers.

* ``export/parquet/<split>/<shard>.parquet``: one row per QC-passed pair with the SAR tile as an
  ``image`` {bytes, path} column and Hugging Face ``features`` metadata, so
  ``datasets.load_dataset("parquet", data_files=...)`` decodes images.
* ``export/sarlang1m/``: the SARLANG-1M release layout: ``SAR_images/`` (the one copy of every tile PNG),
  ``captions/{concise,detailed}_<split>.csv`` (``image,caption``), ``vqa/vqa_<split>.json`` in LLaMA-Factory
  form (plus ``application``, ``question_type`` and ``pair_id`` keys, which LLaMA-Factory ignores).
  :mod:`sarlang_ray.release` reads it back (``import_sarlang1m`` and ``release_image`` are re-exported here).
* ``export/llamafactory/``: ShareGPT JSON per split (``messages`` + ``images``, one ``<image>`` per image) and
  ``dataset_info.json``. Its records name the images of ``sarlang1m/SAR_images/`` as
  ``../sarlang1m/SAR_images/<tile>.png``: LLaMA-Factory joins an image path to ``media_dir``, which defaults
  to ``dataset_dir`` (this folder), so ``dataset_dir=export/llamafactory`` finds them with no copy.
* ``export/objects/<shard>.parquet``: the label objects of every exported tile (``tile_id``, ``split``,
  ``object_id``, ``label_id``, ``class``); ``object_id`` is the label id, or for an object clipped at a split
  boundary the id of its part in that split (:func:`sarlang_ray.splits.clipped_id`).
* ``export/tiles/<shard>.parquet``: the split of every exported tile of that tiles shard (``tile_id``,
  ``scene_id``, ``split``), whatever the Parquet above was merged into; the card and ``sarlang view`` read it.
* ``export/dataset_card.md`` with counts and PNG plots.

Geographic splits are planned by Ray tasks from block aggregates (:func:`plan_on_workers`: the driver holds
blocks, never tiles; each shard's decisions in ``export/_plan/decisions/``), or with ``export.planner:
driver`` (and for the scene and region splits) in the driver from small per-tile descriptors
(:func:`split_inputs`: no images). The rest is per shard (:class:`ExportShard`, on Ray workers): it reads one
tiles shard and its annotations, writes the PNGs, the Parquet shards and, for each JSON/CSV file of the
layouts, a *part* (that shard's records, already encoded) under ``export/_parts/``, and returns only counters.
:func:`assemble` then streams each file's parts, in shard order and one at a time, into the final file (one
JSON array, byte for byte what one ``json.dumps`` of all records would give), and the parts are removed.
Splits are by geography (default), scene or region, so no ground lands in two splits.
"""

from __future__ import annotations

import csv
import hashlib
import io as _io
import json
import os
import socket
from collections import Counter
from collections.abc import Iterator
from collections.abc import Set as AbstractSet

import pyarrow as pa
import pyarrow.compute
import shapely

from sarlang_ray import io, plots, tables
from sarlang_ray.config import WorkflowConfig
from sarlang_ray.errors import error_row, errors_table
from sarlang_ray.rows import TileKey
from sarlang_ray.splits import (
    OBJECT,
    SPLITS,
    SplitTile,
    clipped_id,
    geographic_splits,
    group_splits,
    leakage_report,
)

PAIR_COLUMNS = [
    "pair_id",
    "tile_id",
    "scene_id",
    "gsd_m",
    "kind",
    "application",
    "question_type",
    "question",
    "answer",
]
# what the contradiction checker reads of a shard's tiles and pairs
CHECK_TILE_COLUMNS = ["tile_id", "gsd_m", "width"]
CHECK_PAIR_COLUMNS = ["pair_id", "tile_id", "gsd_m", "kind", "question", "answer", "backend"]
HF_FEATURES = {
    "pair_id": {"dtype": "string", "_type": "Value"},
    "tile_id": {"dtype": "string", "_type": "Value"},
    "scene_id": {"dtype": "string", "_type": "Value"},
    "gsd_m": {"dtype": "float64", "_type": "Value"},
    "kind": {"dtype": "string", "_type": "Value"},
    "application": {"dtype": "string", "_type": "Value"},
    "question_type": {"dtype": "string", "_type": "Value"},
    "question": {"dtype": "string", "_type": "Value"},
    "answer": {"dtype": "string", "_type": "Value"},
    "split": {"dtype": "string", "_type": "Value"},
    "image": {"_type": "Image"},
}
EXPORT_SCHEMA = pa.schema(
    [(c, pa.float64() if c == "gsd_m" else pa.string()) for c in PAIR_COLUMNS]
    + [("split", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))]
).with_metadata({b"huggingface": json.dumps({"info": {"features": HF_FEATURES}}).encode()})

IMAGES = "sarlang1m/SAR_images"  # under export/: the one copy of every tile PNG
LLAMA_IMAGES = "../sarlang1m/SAR_images"  # how llamafactory/ records name that folder (relative to media_dir)
PARTS = "_parts"  # under export/: per-shard parts of the JSON and CSV files, removed once assembled
# under export/: the label objects of every exported tile, with the id they carry in this export
OBJECTS = "objects"
# under export/: the split of every exported tile, one file per tiles shard named like it (its Parquet and
# JSON may be merged into numbered shards; this stays, for the card and `sarlang view`)
TILES = "tiles"
TILES_SCHEMA = pa.schema([("tile_id", pa.string()), ("scene_id", pa.string()), ("split", pa.string())])
OBJECTS_SCHEMA = pa.schema(
    [
        ("tile_id", pa.string()),
        ("split", pa.string()),
        ("object_id", pa.string()),  # label_id, or its clipped id (splits.clipped_id) when clipped
        ("label_id", pa.string()),
        ("class", pa.string()),
    ]
)
CSV_HEADER = b"image,caption\r\n"  # csv.DictWriter's header (and its \r\n line ends)
# the card's counters
STATS = (
    "pairs",
    "applications",
    "question_types",
    "classes",
    "landcover",
    "gsd",
    "tiles",
)


def _image_name(tile_id: str) -> str:
    return f"{tile_id}.png"


def image_path(tile: TileKey, nested: bool) -> str:
    """Where a tile's PNG lives under ``SAR_images/``: flat (``<tile>.png``, the published layout) or, for an
    export of more tiles than ``export.images_per_prefix``, under its scene and GSD
    (``<scene>/<gsd>m/<tile>.png``:
    a scene holds ~1,000 tiles per GSD, so no prefix of an object store holds more than a few thousand
    PNGs)."""
    name = _image_name(tile["tile_id"])
    return f"{tile['scene_id']}/{tile['gsd_m']:g}m/{name}" if nested else name


def assembled_files(split: str) -> dict[str, str]:
    """The files of one split that are assembled from per-shard parts (path under export/ -> json or csv)."""
    return {
        f"llamafactory/sarlang_{split}.json": "json",
        f"sarlang1m/vqa/vqa_{split}.json": "json",
        f"sarlang1m/captions/concise_{split}.csv": "csv",
        f"sarlang1m/captions/detailed_{split}.csv": "csv",
    }


def parquet_target(split: str) -> str:
    """The logical Parquet file of a split (path under export/): the workers write one file per tiles shard in
    ``parquet/<split>/``; a sharded export merges them into numbered shards there."""
    return f"parquet/{split}.parquet"


def shard_names(target: str, n: int) -> list[str]:
    """The numbered shards of ``target`` (a path under export/), in a folder named after it:
    ``llamafactory/sarlang_train.json`` -> ``llamafactory/sarlang_train/sarlang_train-00000-of-00003.json``.
    The folder holds the shards only (LLaMA-Factory loads every file of a dataset folder and wants one type).
    Parquet shards sit in ``parquet/<split>/``, where the per-shard files were (what train and evaluate read).
    """
    folder, _, name = target.rpartition("/")
    stem, ext = name.rsplit(".", 1)
    return [f"{folder}/{stem}/{stem}-{i:05d}-of-{n:05d}.{ext}" for i in range(n)]


def part_uri(out: str, target: str, shard: str) -> str:
    """Where a shard's part of ``target`` (a path under export/) lives."""
    return io.join(out, PARTS, target, shard.replace("/", "__") + ".part")


# ---------------------------------------------------------------- driver: splits from small descriptors
def split_inputs(run_dir: str) -> Iterator[tuple[str, SplitTile]]:
    """(tiles shard name, split input) of every tile that has QC-passed pairs (the ones export writes), in
    shard order; read shard by shard, no images."""
    tile_root, ann_root = tables.shard_root(run_dir, "align"), tables.shard_root(run_dir, "annotate")
    for tile_uri in tables.tiles_table_shards(run_dir):
        name = io.relative(tile_uri, tile_root)
        ann_uri = io.join(ann_root, name)
        if not io.exists(ann_uri):
            continue
        ann = io.read_parquet(ann_uri, columns=["tile_id", "qc_passed"])
        used = {t for t, ok in zip(ann["tile_id"].to_pylist(), ann["qc_passed"].to_pylist()) if ok}
        cols = ["tile_id", "scene_id", "region", "footprint", "crs", "objects"]
        for t in io.read_parquet(tile_uri, columns=cols).to_pylist():
            if t["tile_id"] in used:
                yield (
                    name,
                    SplitTile(
                        t["tile_id"],
                        t["scene_id"],
                        t["region"],
                        shapely.from_wkb(t["footprint"]),
                        t["crs"],
                        frozenset(o["label_id"] for o in t["objects"] if o["label_id"]),
                    ),
                )


def plan(cfg: WorkflowConfig) -> tuple[list[dict], dict]:
    """Split the tiles (in the driver, from descriptors), write ``leakage.json`` and ``errors.parquet``.

    Returns the work items, one per tiles shard with exported tiles (``index``, ``shard`` and ``splits``, its
    tiles' splits as JSON), and the counts of the split (planned, written, rejected, leakage). A geographic
    split with ``export.planner: workers`` (the default) is planned by Ray tasks instead
    (:func:`plan_on_workers`)."""
    e, out = cfg.export, io.join(cfg.run.run_dir, "export")
    if e.split_by == "geographic" and e.planner == "workers":
        return plan_on_workers(cfg)
    shard_of: dict[str, str] = {}
    candidates = []
    for shard, tile in split_inputs(cfg.run.run_dir):
        shard_of[tile.tile_id] = shard
        candidates.append(tile)
    ratios = {"train": e.train, "val": e.val, "test": e.test}
    dropped: dict[str, tuple[str, str]] = {}
    clipped: set[str] = set()
    if e.split_by == "geographic":
        tile_split, dropped, clipped = geographic_splits(
            candidates, ratios, cfg.run.seed, e.block_m, e.buffer_m
        )
    else:
        tile_split = group_splits(candidates, e.split_by, ratios, cfg.run.seed)
    leakage = leakage_report(candidates, tile_split, e.buffer_m, clipped)
    leakage.update(split_by=e.split_by, dropped_tiles=len(dropped))
    io.write_json_atomic(io.join(out, "leakage.json"), leakage)
    io.write_parquet_atomic(
        io.join(out, "errors.parquet"),
        errors_table(
            [
                error_row("export", tid, "split_object", why)
                if kind == OBJECT
                else error_row("export", tid, "split_boundary", why)
                for tid, (kind, why) in sorted(dropped.items())
            ]
        ),
    )
    nested = len(tile_split) > e.images_per_prefix  # PNGs under SAR_images/<scene>/<gsd>m/ (image_path)
    by_shard: dict[str, dict[str, str]] = {}
    clipped_in: dict[str, set[str]] = {}
    for tile in candidates:  # shard order (split_inputs'), tiles in shard order
        if tile.tile_id in tile_split:
            by_shard.setdefault(shard_of[tile.tile_id], {})[tile.tile_id] = tile_split[tile.tile_id]
            clipped_in.setdefault(shard_of[tile.tile_id], set()).update(tile.label_ids & clipped)
    items = [
        {
            "index": i,
            "shard": shard,
            "splits": json.dumps(splits),
            "clipped": json.dumps(sorted(clipped_in[shard])),
            "nested_images": nested,
        }
        for i, (shard, splits) in enumerate(by_shard.items())
    ]
    counts = {
        "planned": len(candidates),
        "written": len(candidates) - len(dropped),
        "rejected": len(dropped),
        "reasons": dict(Counter(kind for kind, _ in dropped.values())),
        "leakage": leakage,
    }
    return items, counts


# ---------------------------------------------------------------- workers: the split planned from block
# aggregates
# under export/: the planner's tile index (one file per batch of tiles shards) and its decisions
PLAN = "_plan"
PLAN_SHARDS_PER_TASK = 32  # tiles shards a planning task indexes (~8k tiles at 256 a shard)
# boundary tiles a conflict task loads at most (a larger group of conflicts: one task)
PLAN_TILES_PER_UNIT = 20_000
LABEL_BUCKETS = 8  # the group-by on label id: partitions, each settled by one task
INDEX_SCHEMA = pa.schema(
    [
        ("tile_id", pa.string()),
        ("shard", pa.string()),
        ("col", pa.int64()),
        ("row", pa.int64()),
        ("gx", pa.float64()),
        ("gy", pa.float64()),
        ("footprint", pa.binary()),
        ("crs", pa.string()),
        ("labels", pa.list_(pa.string())),
    ]
)
DECISIONS_SCHEMA = pa.schema(
    [("tile_id", pa.string()), ("split", pa.string()), ("clipped", pa.list_(pa.string()))]
)


def block_keys(cols, rows):
    """One int64 per block (column, row; |column| < 2**30, |row| < 2**31): the key block arrays are sorted and
    looked up by, in column then row order."""
    import numpy as np

    return ((np.asarray(cols, dtype=np.int64) + (1 << 30)) << 32) | (
        np.asarray(rows, dtype=np.int64) + (1 << 31)
    )


def decisions_uri(out: str, shard: str) -> str:
    """The planner's per-tile decisions for one tiles shard (tile id, split, clipped labels): what its
    :class:`ExportShard` reads instead of a list of every tile from the driver."""
    return io.join(out, PLAN, "decisions", shard.replace("/", "__"))


def _index_batch(run_dir: str, out: str, k: int, names: list[str], block_m: float) -> dict:
    """Index one batch of tiles shards (the tiles with QC-passed pairs): per tile its block, grid centroid,
    footprint, CRS and label ids, written to ``_plan/index/<k>.parquet``; returns the batch's block aggregates
    (block, tile count, bounds of its tiles' footprints) only."""
    import numpy as np

    from sarlang_ray.splits import grid_centroids

    tile_root, ann_root = tables.shard_root(run_dir, "align"), tables.shard_root(run_dir, "annotate")
    parts = []
    for name in names:
        ann_uri = io.join(ann_root, name)
        if not io.exists(ann_uri):
            continue
        ann = io.read_parquet(ann_uri, columns=["tile_id", "qc_passed"])
        used = {t for t, ok in zip(ann["tile_id"].to_pylist(), ann["qc_passed"].to_pylist()) if ok}
        t = io.read_parquet(io.join(tile_root, name), columns=["tile_id", "footprint", "crs", "objects"])
        keep = [tid in used for tid in t["tile_id"].to_pylist()]
        if not any(keep):
            continue
        t = t.filter(pa.array(keep))
        labels = [sorted({o["label_id"] for o in objs if o["label_id"]}) for objs in t["objects"].to_pylist()]
        parts.append(
            pa.table(
                {
                    "tile_id": t["tile_id"],
                    "shard": [name] * t.num_rows,
                    "footprint": t["footprint"],
                    "crs": t["crs"],
                    "labels": pa.array(labels, pa.list_(pa.string())),
                }
            )
        )
    if not parts:
        return {"k": k, "tiles": 0}
    t = pa.concat_tables(parts)
    geoms = shapely.from_wkb(t["footprint"].to_numpy(zero_copy_only=False))
    gx, gy = grid_centroids(list(geoms))
    col, row = np.floor(gx / block_m).astype(np.int64), np.floor(gy / block_m).astype(np.int64)
    index = pa.table(
        {
            "tile_id": t["tile_id"],
            "shard": t["shard"],
            "col": col,
            "row": row,
            "gx": gx,
            "gy": gy,
            "footprint": t["footprint"],
            "crs": t["crs"],
            "labels": t["labels"],
        },
        schema=INDEX_SCHEMA,
    )
    io.write_parquet_atomic(io.join(out, PLAN, "index", f"{k:05d}.parquet"), index)
    keys, n, bounds = reduce_blocks(
        block_keys(col, row), np.ones(len(col), dtype=np.int32), outward32(shapely.bounds(geoms))
    )
    # a file, not the task's result: a result of this size goes through the object store, whose pages the
    # driver maps while it reads them (they counted in its RSS, ~20 MB at 1M tiles of one visit)
    io.write_parquet_atomic(
        blocks_uri(out, k),
        pa.table(
            {
                "key": keys,
                "n": n,
                "minx": bounds[:, 0],
                "miny": bounds[:, 1],
                "maxx": bounds[:, 2],
                "maxy": bounds[:, 3],
            }
        ),
    )
    return {"k": k, "tiles": t.num_rows, "blocks": len(keys)}


def blocks_uri(out: str, k: int) -> str:
    """One index batch's block aggregates (key, tile count, float32 bounds), read by the driver."""
    return io.join(out, PLAN, "blocks", f"{k:05d}.parquet")


def read_blocks(out: str, k: int):
    """(keys, tile counts, bounds) of one index batch's blocks, numpy arrays (bounds: float32, n x 4)."""
    import numpy as np

    t = io.read_parquet(blocks_uri(out, k))
    return (
        t["key"].to_numpy(),
        t["n"].to_numpy(),
        np.column_stack([t[c].to_numpy() for c in ("minx", "miny", "maxx", "maxy")]),
    )


def outward32(bounds):
    """Bounds (minx, miny, maxx, maxy rows) as float32, rounded outward (minima down, maxima up): they still
    contain the float64 bounds, so neighbouring blocks found from them are a superset of the exact ones (a
    group of conflicts may take in a block more; the tiles compared are the same), at half the memory."""
    import numpy as np

    b = np.asarray(bounds, dtype=np.float64)
    f = b.astype(np.float32)
    low = f[:, :2]
    low[...] = np.where(low > b[:, :2], np.nextafter(low, np.float32(-np.inf)), low)
    high = f[:, 2:]
    high[...] = np.where(high < b[:, 2:], np.nextafter(high, np.float32(np.inf)), high)
    return f


def reduce_blocks(keys, n, bounds):
    """Block aggregates with one row per key (sorted keys, tile counts summed, bounds merged) from rows that
    may repeat a key (a block's tiles, or a block seen by several batches): numpy arrays (28 bytes a block
    with int32 counts and float32 bounds)."""
    import numpy as np

    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, dtype=np.int64)
    merged = np.empty((len(starts), 4), dtype=bounds.dtype)
    for c, reduce in enumerate((np.minimum, np.minimum, np.maximum, np.maximum)):
        merged[:, c] = reduce.reduceat(bounds[order, c], starts) if len(starts) else []
    return keys[starts], np.add.reduceat(n[order], starts) if len(starts) else n[:0], merged


class BlockAggregates:
    """The driver's blocks (sorted keys, tile counts, bounds) merged as index batches arrive: the batches'
    arrays are reduced once they hold as many rows as the blocks so far, so the driver never holds every
    batch's rows at once (at one visit blocks are nearly as many as tiles: 2 km blocks of 1.28 km tiles).
    Also which batches hold each block (sorted block keys, batch numbers; a block of revisits is in
    several)."""

    def __init__(self) -> None:
        import numpy as np

        self.keys, self.n = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
        self.bounds = np.zeros((0, 4), dtype=np.float32)
        self._pending: list[tuple] = []
        self._rows = 0
        self._batch_keys: list = []
        self._batch_ks: list = []

    def add(self, k: int, keys, n, bounds) -> None:
        import numpy as np

        self._pending.append((keys, n.astype(np.int32), bounds.astype(np.float32)))
        self._batch_keys.append(keys)
        self._batch_ks.append(np.full(len(keys), k, dtype=np.int32))
        self._rows += len(keys)
        if self._rows > max(65_536, len(self.keys)):
            self._reduce()

    def _reduce(self) -> None:
        import numpy as np

        if self._pending:
            parts = [(self.keys, self.n, self.bounds), *self._pending]
            self._pending, self._rows = [], 0
            self.keys, self.n, self.bounds = reduce_blocks(
                *(np.concatenate([p[i] for p in parts]) for i in range(3))
            )

    def finish(self):
        """(keys, tile counts, bounds) of the blocks, and (keys, batches) of the blocks' batches,
        key-sorted."""
        import numpy as np

        self._reduce()
        pair_key, pair_k = np.concatenate(self._batch_keys), np.concatenate(self._batch_ks)
        self._batch_keys = self._batch_ks = []
        order = np.argsort(pair_key, kind="stable")
        return (self.keys, self.n, self.bounds), (pair_key[order], pair_k[order])


def _read_index(out: str, ks, columns: list[str]) -> pa.Table:
    return io.read_parquet([io.join(out, PLAN, "index", f"{k:05d}.parquet") for k in ks], columns=columns)


def _split_of(keys, sorted_keys, block_split):
    """The split index (into ``SPLITS``) of each tile, from its block key and the blocks (sorted keys,
    splits)."""
    import numpy as np

    return block_split[np.searchsorted(sorted_keys, keys)]


def _boundary_unit(
    out: str,
    ks: list[int],
    clusters: list[list[int]],
    bkeys,
    bsplit,
    ratios: dict[str, float],
    buffer_m: float,
    dropped=None,
    count_only: bool = False,
) -> dict:
    """One task's groups of neighbouring blocks of different splits (each a connected group: every pair of
    tiles of different splits that can meet lies in one group). Without ``dropped``: the boundary tiles to
    drop, by :func:`~sarlang_ray.splits.ground_drops` (today's rule, on exactly the tiles it could touch);
    with it (every tile the plan dropped): the leakage report's ground part over the tiles kept."""
    import numpy as np

    from sarlang_ray.splits import BOUNDARY, ground_drops, leakage_report, meeting_pairs

    t = _read_index(out, ks, ["tile_id", "col", "row", "footprint", "crs"])
    keys = block_keys(t["col"].to_numpy(), t["row"].to_numpy())
    split = _split_of(keys, bkeys, bsplit)
    tids = t["tile_id"].to_pylist()
    fps = shapely.from_wkb(t["footprint"].to_numpy(zero_copy_only=False))
    crs = t["crs"].to_pylist()
    drops: list[tuple[str, str, str]] = []
    report: dict[str, Counter] = {"area": Counter(), "pairs": Counter()}
    lost = [0] * len(SPLITS)
    gone = set(dropped) if dropped is not None else set()
    for cluster in clusters:
        idx = np.flatnonzero(np.isin(keys, np.asarray(cluster, dtype=np.int64)))
        # tile order: by id, whatever the files' order
        idx = idx[np.argsort([tids[i] for i in idx], kind="stable")]
        if dropped is not None:
            idx = np.asarray([i for i in idx if tids[i] not in gone], dtype=np.int64)
        tiles = [SplitTile(tids[i], "", "", fps[i], crs[i], frozenset()) for i in idx]
        names = [SPLITS[split[i]] for i in idx]
        if dropped is None:
            for i, (kind, why) in ground_drops(
                names, meeting_pairs(tiles, buffer_m), tiles, ratios, buffer_m
            ).items():
                lost[SPLITS.index(names[i])] += 1
                if not count_only:
                    drops.append((tiles[i].tile_id, kind, why))
        else:
            rep = leakage_report(tiles, {tl.tile_id: s for tl, s in zip(tiles, names)}, buffer_m)
            for pair, p in rep["pairs"].items():
                report["area"][pair] += p["intersection_m2"]
                report["pairs"][pair] += p["tile_pairs_within_buffer"]
    assert all(kind == BOUNDARY for _, kind, _ in drops)
    return {"drops": drops, "report": report, "lost": lost}


def _label_bucket(labels, buckets: int):
    import numpy as np
    import pandas as pd

    return (pd.util.hash_array(np.asarray(labels, dtype=object)) % np.uint64(buckets)).astype(np.int64)


def _label_rows(out: str, k: int, bkeys, bsplit, buckets: int, dropped=None, clipped=None) -> int:
    """The map side of the group-by on label id: one row per (tile, label) of a batch, with the tile's split
    and grid centroid and whether the plan dropped it, in ``buckets`` partitions by hash of the label. With
    ``clipped`` (the report's pass), the rows of kept tiles only, by object id (a clipped label: its
    part's)."""
    import numpy as np
    import pandas as pd

    from sarlang_ray.splits import clipped_id

    t = _read_index(out, [k], ["tile_id", "col", "row", "gx", "gy", "labels"])
    split = _split_of(block_keys(t["col"].to_numpy(), t["row"].to_numpy()), bkeys, bsplit)
    lab = t["labels"].combine_chunks()
    parent = pa.compute.list_parent_indices(lab).to_numpy()
    df = pd.DataFrame(
        {
            "label": pa.compute.list_flatten(lab).to_numpy(zero_copy_only=False),
            "tile_id": np.asarray(t["tile_id"].to_numpy(zero_copy_only=False))[parent],
            "split": split[parent],
            "gx": t["gx"].to_numpy()[parent],
            "gy": t["gy"].to_numpy()[parent],
        }
    )
    df["gone"] = df["tile_id"].isin(set(dropped)) if dropped is not None else False
    if clipped is not None:
        df = df[~df["gone"]]
        is_clipped = df["label"].isin(set(clipped)).to_numpy()
        names = np.asarray(SPLITS, dtype=object)[df["split"].to_numpy()]
        object_id = [
            clipped_id(label, s) if c else label for label, s, c in zip(df["label"], names, is_clipped)
        ]
        df = pd.DataFrame(
            {
                "base": df["label"].to_numpy(),
                "label": object_id,
                "split": df["split"].to_numpy(),
                "clipped": is_clipped,
            }
        ).drop_duplicates()
    # a label's parts together
    bucket = _label_bucket(df["base" if clipped is not None else "label"].to_numpy(), buckets)
    folder = "report" if clipped is not None else "labels"
    for b in range(buckets):  # files, not task results: small results would come back through the driver
        part = df[bucket == b]
        if len(part):
            io.write_parquet_atomic(
                io.join(out, PLAN, folder, f"{b:02d}", f"{k:05d}.parquet"),
                pa.Table.from_pandas(part, preserve_index=False),
            )
    return len(df)


def _partition(out: str, folder: str, b: int, ks: list[int]):
    """Every map task's rows of one partition of the group-by on label id (a pandas frame, or None)."""
    uris = [
        u for u in (io.join(out, PLAN, folder, f"{b:02d}", f"{k:05d}.parquet") for k in ks) if io.exists(u)
    ]
    return io.read_parquet(uris).to_pandas() if uris else None


def _settle_labels(ratios: dict[str, float], block_m: float, out: str, b: int, ks: list[int]) -> dict:
    """The reduce side: every label id of one partition with all its tiles. A label whose tiles (those the
    ground resolution kept) lie in more than one split is clipped when long (its tiles' grid centroids more
    than ``block_m`` apart along x or y, as :class:`~sarlang_ray.splits.ObjectIndex`), else stays in the split
    holding most of them (ties: larger target share, then name) and its tiles in the other splits are dropped
    (:func:`~sarlang_ray.splits.resolve_objects`' rule, each label on the ground-kept tiles)."""
    import pandas as pd

    df = _partition(out, "labels", b, ks)
    if df is None or df.empty:
        return {"drops": [], "clipped": []}
    g = df.groupby("label")
    span = pd.concat([g["gx"].max() - g["gx"].min(), g["gy"].max() - g["gy"].min()], axis=1).max(axis=1)
    long = (g.size() > 1) & (span > block_m)
    kept = df[~df["gone"]]
    counts = kept.groupby(["label", "split"]).size()
    n_splits = counts.groupby(level=0).size()
    multi = n_splits[n_splits > 1].index
    clipped = sorted(label for label in multi if long[label])
    home = {}
    for label in multi:
        if long[label]:
            continue
        c = {SPLITS[s]: int(n) for s, n in counts[label].items()}
        home[label] = max(c, key=lambda s: (c[s], ratios[s], s)), c
    drops = {}
    if home:
        rows = kept[kept["label"].isin(set(home))]
        for label, tid, s in sorted(zip(rows["label"], rows["tile_id"], rows["split"])):
            h, c = home[label]
            if SPLITS[s] != h and tid not in drops:
                drops[tid] = (
                    OBJECT,
                    (
                        f"tile {tid} (split {SPLITS[s]}) shows label object {label}, which {c[h]} tile(s) of "
                        f"split {h} "
                        "also show; dropped so that the object lives in one split (it spans less than "
                        "export.block_m, "
                        "so it is not clipped). A larger export.block_m means fewer split boundaries."
                    ),
                )
    return {"drops": [(tid, kind, why) for tid, (kind, why) in drops.items()], "clipped": clipped}


def _report_labels(out: str, b: int, ks: list[int]) -> dict:
    """The leakage report's label part for one partition of label ids (the kept tiles' object ids): per pair
    of splits, the object ids in both; the clipped labels whose kept tiles still lie in more than one split (a
    label clipped on the ground-kept tiles whose other parts' tiles were all dropped for another label is one
    split's again, as :func:`~sarlang_ray.splits.resolve_objects` decides after every drop), and their parts.
    """

    df = _partition(out, "report", b, ks)
    if df is None or df.empty:
        return {"shared": Counter(), "clipped": [], "clipped_parts": 0}
    parts_of = df[df["clipped"]].groupby("base")["split"].nunique()
    clipped = sorted(parts_of[parts_of > 1].index)
    df = df.assign(label=df["label"].where(~df["clipped"] | df["base"].isin(set(clipped)), df["base"]))
    shared: Counter[str] = Counter()
    for _, splits in df.groupby("label")["split"]:
        s = sorted(set(splits.tolist()))
        for i, x in enumerate(s):
            for y in s[i + 1 :]:
                shared[f"{SPLITS[x]}/{SPLITS[y]}"] += 1
    return {"shared": shared, "clipped": clipped, "clipped_parts": int(parts_of[parts_of > 1].sum())}


def _decide(out: str, k: int, bkeys, bsplit, dropped, clipped) -> list[tuple[str, list[int]]]:
    """Write the decisions of a batch's tiles shards (kept tiles: split and clipped labels); (shard, tiles
    kept per split) of each, in shard order."""
    import numpy as np

    t = _read_index(out, [k], ["tile_id", "shard", "col", "row", "labels"])
    split = _split_of(block_keys(t["col"].to_numpy(), t["row"].to_numpy()), bkeys, bsplit)
    gone, clip = set(dropped), set(clipped)
    tids, shards, labels = t["tile_id"].to_pylist(), t["shard"].to_pylist(), t["labels"].to_pylist()
    by_shard: dict[str, list[int]] = {}
    for i, (tid, shard) in enumerate(zip(tids, shards)):
        if tid not in gone:
            by_shard.setdefault(shard, []).append(i)
    done = []
    for shard, idx in by_shard.items():
        io.write_parquet_atomic(
            decisions_uri(out, shard),
            pa.table(
                {
                    "tile_id": [tids[i] for i in idx],
                    "split": [SPLITS[split[i]] for i in idx],
                    "clipped": [sorted(set(labels[i]) & clip) for i in idx],
                },
                schema=DECISIONS_SCHEMA,
            ),
        )
        done.append((shard, [int(n) for n in np.bincount(split[idx], minlength=len(SPLITS))]))
    return done


NEIGHBOUR_CHUNK = 65_536  # blocks compared at a time (temporary arrays of this length, not of every block)


def _widen(bounds, buffer_m: float):
    """Blocks' bounds (lon/lat) widened by ``buffer_m`` as :func:`~sarlang_ray.splits.candidate_pairs` widens
    a tile's."""
    import numpy as np

    from sarlang_ray.splits import _M_PER_DEG_LAT

    bounds = np.asarray(bounds, dtype=np.float64)  # float32 bounds widened in float64: no rounding inward
    lat = np.maximum(np.abs(bounds[:, 1]), np.abs(bounds[:, 3]))
    dlat = buffer_m / _M_PER_DEG_LAT
    dlon = buffer_m / (_M_PER_DEG_LAT * np.maximum(np.cos(np.radians(np.minimum(lat, 89.9))), 1e-6))
    return np.column_stack(
        [bounds[:, 0] - dlon, bounds[:, 1] - dlat, bounds[:, 2] + dlon, bounds[:, 3] + dlat]
    )


def neighbour_blocks(keys, cols, rows, bounds, block_m: float, buffer_m: float, chunk: int = NEIGHBOUR_CHUNK):
    """Index pairs (a < b, int32) of blocks whose tiles' bounds (lon/lat, ``bounds``: minx, miny, maxx, maxy
    per block), widened by ``buffer_m`` as :func:`~sarlang_ray.splits.candidate_pairs` widens a tile's, meet:
    no tile of two blocks outside these pairs can come within ``buffer_m``. From arrays only (no geometry per
    block): the equal-area grid is cylindrical (x from longitude, y from latitude, both monotonic), so each
    block's bounds cover a range of grid cells around its own, and only blocks within the widest such reach of
    each other are compared, one cell offset at a time, ``chunk`` blocks at a time (the driver's temporaries
    stay the size of a chunk however many blocks there are)."""
    import numpy as np
    from pyproj import Transformer

    from sarlang_ray.splits import EQUAL_AREA

    keys, cols, rows = np.asarray(keys), np.asarray(cols, dtype=np.int64), np.asarray(rows, dtype=np.int64)
    to_grid = Transformer.from_crs("EPSG:4326", EQUAL_AREA, always_xy=True)
    # how many cells a block's widened bounds reach beyond its own cell (the widest, for every block)
    reach = 0
    for lo in range(0, len(keys), chunk):
        wide, c, r = _widen(bounds[lo : lo + chunk], buffer_m), cols[lo : lo + chunk], rows[lo : lo + chunk]
        x0, y0 = to_grid.transform(np.clip(wide[:, 0], -180, 180), np.clip(wide[:, 1], -89.9, 89.9))
        x1, y1 = to_grid.transform(np.clip(wide[:, 2], -180, 180), np.clip(wide[:, 3], -89.9, 89.9))
        reach = int(
            max(
                reach,
                np.max(c - np.floor(np.asarray(x0) / block_m)),
                np.max(np.floor(np.asarray(x1) / block_m) - c),
                np.max(r - np.floor(np.asarray(y0) / block_m)),
                np.max(np.floor(np.asarray(y1) / block_m) - r),
            )
        )
    span = 2 * reach  # a block within the reach of another's widened bounds, whose own bounds reach back
    out_a, out_b = [np.zeros(0, dtype=np.int32)], [np.zeros(0, dtype=np.int32)]
    for lo in range(0, len(keys), chunk):
        wide_a, bounds_a = _widen(bounds[lo : lo + chunk], buffer_m), bounds[lo : lo + chunk]
        for dc in range(-span, span + 1):
            for dr in range(-span, span + 1):
                if (dc, dr) <= (0, 0):
                    # each unordered pair once (the offset and its opposite), never a block with itself
                    continue
                want = block_keys(cols[lo : lo + chunk] + dc, rows[lo : lo + chunk] + dr)
                at = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
                a = np.flatnonzero(keys[at] == want)
                b = at[a]
                wa, ba, bb = wide_a[a], bounds_a[a], bounds[b]
                wb = _widen(bb, buffer_m)
                meet = (
                    (wa[:, 0] <= bb[:, 2])
                    & (bb[:, 0] <= wa[:, 2])
                    & (wa[:, 1] <= bb[:, 3])
                    & (bb[:, 1] <= wa[:, 3])
                ) | (
                    (wb[:, 0] <= ba[:, 2])
                    & (ba[:, 0] <= wb[:, 2])
                    & (wb[:, 1] <= ba[:, 3])
                    & (ba[:, 1] <= wb[:, 3])
                )
                a = a[meet] + lo
                out_a.append(np.minimum(a, b[meet]).astype(np.int32))
                out_b.append(np.maximum(a, b[meet]).astype(np.int32))
    return np.concatenate(out_a), np.concatenate(out_b)


def _remote(fn, **options):
    import ray

    return ray.remote(**{"num_cpus": 1, "max_retries": 3, **options})(fn)


def plan_on_workers(cfg: WorkflowConfig) -> tuple[list[dict], dict]:
    """:func:`plan` for ``split_by: geographic`` without holding tiles in the driver (Ray tasks; same items
    and counts, each item naming its shard's decisions file instead of carrying its tiles' splits).

    1. tasks index batches of tiles shards (``_plan/index/``) and return per-block aggregates (tile count,
       bounds); the driver keeps blocks only, as arrays;
    2. blocks are assigned by :func:`~sarlang_ray.splits.block_runs_arrays` (today's Hilbert runs and ratios;
       the start place whose block shares come closest to the ratios);
    3. neighbouring blocks of different splits (bounds within ``buffer_m``) form connected groups; a task per
       few groups loads their tiles and drops boundary tiles (:func:`~sarlang_ray.splits.ground_drops`);
    4. a group-by on label id (tasks, hash partitions) clips the long labels spanning splits and drops the
       tiles that put a short label in a second split;
    5. tasks write the decisions per tiles shard (``_plan/decisions/``), and compute the leakage report the
       same way (per group of neighbouring blocks, per object id)."""
    import numpy as np
    import pandas as pd
    import ray

    from sarlang_ray.splits import START_CANDIDATES, block_runs_arrays

    e, run_dir = cfg.export, cfg.run.run_dir
    out = io.join(run_dir, "export")
    ratios = {"train": e.train, "val": e.val, "test": e.test}
    tile_root = tables.shard_root(run_dir, "align")
    names = [io.relative(u, tile_root) for u in tables.tiles_table_shards(run_dir)]
    batches = [names[i : i + PLAN_SHARDS_PER_TASK] for i in range(0, len(names), PLAN_SHARDS_PER_TASK)]
    remove_parts(out, PLAN)  # an earlier plan's files: this one writes its own
    index = _remote(_index_batch)
    agg, ks, planned = BlockAggregates(), [], 0
    pending = [index.remote(run_dir, out, k, b, e.block_m) for k, b in enumerate(batches)]
    for i, ref in enumerate(pending):  # one batch's aggregates at a time, merged as they come
        a = ray.get(ref)
        pending[i] = None
        if a["tiles"]:
            planned += a["tiles"]
            ks.append(a["k"])
            agg.add(a["k"], *read_blocks(out, a["k"]))
    del pending
    if not ks:
        return [], {"planned": 0, "written": 0, "rejected": 0, "reasons": {}, "leakage": {}}
    # the batches each block's tiles are in (key-sorted pairs: a block of revisits is in several)
    (keys, sizes, bounds), (pair_key, pair_k) = agg.finish()
    del agg
    cols, rows = (keys >> 32) - (1 << 30), (keys & 0xFFFFFFFF) - (1 << 31)
    # neighbouring blocks (bounds within buffer_m): their tiles are the only ones that can meet
    near_a, near_b = neighbour_blocks(keys, cols, rows, bounds, e.block_m, e.buffer_m)
    del bounds
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    def boundary_units(split):
        """The connected groups that neighbouring blocks of different splits form, packed into task units
        (block keys of each group) with the index batches each unit reads."""
        cross = split[near_a] != split[near_b]
        a, b = near_a[cross], near_b[cross]
        _, comp = connected_components(
            coo_matrix((np.ones(len(a)), (a, b)), shape=(len(keys), len(keys))), directed=False
        )
        on_edge = np.zeros(len(keys), dtype=bool)
        on_edge[a], on_edge[b] = True, True
        groups = pd.DataFrame({"key": keys[on_edge], "comp": comp[on_edge], "n": sizes[on_edge]})
        units, unit, unit_n = [], [], 0
        for _, grp in groups.groupby("comp"):
            unit.append(grp["key"].tolist())
            unit_n += int(grp["n"].sum())
            if unit_n >= PLAN_TILES_PER_UNIT:
                units.append(unit)
                unit, unit_n = [], 0
        if unit:
            units.append(unit)
        unit_ks = []
        for u in units:
            flat = np.asarray([key for cl in u for key in cl], dtype=np.int64)
            lo, hi = np.searchsorted(pair_key, flat, "left"), np.searchsorted(pair_key, flat, "right")
            unit_ks.append(sorted({int(k) for i, j in zip(lo, hi) for k in pair_k[i:j]}))
        return units, unit_ks

    # a few seeded places to start the curve at; keep the one whose kept tiles come closest to the ratios (as
    # the driver's planner: shares of the tiles kept, plus the share dropped), with the ground drops of each
    # start resolved on the workers (boundary tiles only; label objects are settled for the start chosen)
    boundary = _remote(_boundary_unit)
    keys_ref = ray.put(keys)
    base = int(hashlib.sha256(f"{cfg.run.seed}:start".encode()).hexdigest(), 16)
    candidates = []
    for c in range(START_CANDIDATES):
        split = block_runs_arrays(
            cols, rows, sizes, ratios, cfg.run.seed, start=base + c * max(1, len(keys) // START_CANDIDATES)
        )
        units, unit_ks = boundary_units(split)
        ref = ray.put(split)  # the block keys are put once (keys_ref), a start's splits (a byte a block) each
        counted = [
            boundary.remote(out, uk, u, keys_ref, ref, ratios, e.buffer_m, count_only=True)
            for u, uk in zip(units, unit_ks)
        ]
        candidates.append((split, ref, units, unit_ks, counted))
    best = None
    for split, ref, units, unit_ks, counted in candidates:
        lost = np.zeros(len(SPLITS))
        for res in ray.get(counted):
            lost += res["lost"]
        kept = np.bincount(split, weights=sizes, minlength=len(SPLITS)) - lost
        n = max(1, planned)
        miss = (
            sum(
                (kept[i] / n - ratios[s]) ** 2 + (ratios[s] > 0 and kept[i] == 0)
                for i, s in enumerate(SPLITS)
            )
            + lost.sum() / n
        )
        if best is None or miss < best[0]:
            best = (miss, split, ref, units, unit_ks)
    assert best is not None  # START_CANDIDATES >= 1 candidates
    _, split, blocks, units, unit_ks = best
    del candidates, cols, rows
    # the blocks' neighbours and batches: the units hold what is needed
    near_a = near_b = pair_key = pair_k = None
    drops = [
        d
        for res in ray.get(
            [
                boundary.remote(out, uk, u, keys_ref, blocks, ratios, e.buffer_m)
                for u, uk in zip(units, unit_ks)
            ]
        )
        for d in res["drops"]
    ]
    ground = ray.put(np.asarray(sorted(d[0] for d in drops), dtype=object))
    rows = _remote(_label_rows)
    ray.get([rows.remote(out, k, keys_ref, blocks, LABEL_BUCKETS, ground) for k in ks])
    settle = _remote(_settle_labels)
    settled = ray.get([settle.remote(ratios, e.block_m, out, p, ks) for p in range(LABEL_BUCKETS)])
    clipped = sorted(c for s in settled for c in s["clipped"])
    drops += [d for s in settled for d in s["drops"]]
    del settled
    dropped = ray.put(np.asarray(sorted(d[0] for d in drops), dtype=object))
    # the leakage report's label part, by the same group-by on the kept tiles: it also settles which clipped
    # labels still lie in two splits once every drop is known (the others are not clipped)
    ray.get([rows.remote(out, k, keys_ref, blocks, LABEL_BUCKETS, dropped, ray.put(clipped)) for k in ks])
    report_labels = _remote(_report_labels)
    label_rep = ray.get([report_labels.remote(out, p, ks) for p in range(LABEL_BUCKETS)])
    clipped = sorted(c for r in label_rep for c in r["clipped"])
    decide = _remote(_decide)
    decided = [
        ray.get(r) for r in [decide.remote(out, k, keys_ref, blocks, dropped, ray.put(clipped)) for k in ks]
    ]
    ground_rep = ray.get(
        [
            boundary.remote(out, uk, u, keys_ref, blocks, ratios, e.buffer_m, dropped)
            for u, uk in zip(units, unit_ks)
        ]
    )
    kept = np.sum([n for batch in decided for _, n in batch], axis=0)
    pairs = {}
    for i, s in enumerate(SPLITS):
        for t in SPLITS[i + 1 :]:
            p = f"{s}/{t}"
            pairs[p] = {
                "intersection_m2": round(sum(r["report"]["area"][p] for r in ground_rep), 3),
                "tile_pairs_within_buffer": sum(r["report"]["pairs"][p] for r in ground_rep),
                "shared_objects": sum(r["shared"][p] for r in label_rep),
            }
    leakage = {
        "buffer_m": e.buffer_m,
        "pairs": pairs,
        "leak_free": all(p["intersection_m2"] == 0 and p["shared_objects"] == 0 for p in pairs.values()),
        "tiles": {s: int(kept[i]) for i, s in enumerate(SPLITS)},
        "clipped_objects": len(clipped),
        "clipped_parts": sum(r["clipped_parts"] for r in label_rep),
        "split_by": e.split_by,
        "dropped_tiles": len(drops),
        "planner": "workers",
        "blocks": len(keys),
        "boundary_units": len(units),
    }
    io.write_json_atomic(io.join(out, "leakage.json"), leakage)
    io.write_parquet_atomic(
        io.join(out, "errors.parquet"),
        errors_table([error_row("export", tid, kind, why) for tid, kind, why in sorted(drops)]),
    )
    written = int(kept.sum())
    nested = written > e.images_per_prefix
    shards = [(shard, n) for batch in decided for shard, n in batch]
    items = [
        {"index": i, "shard": shard, "decisions": decisions_uri(out, shard), "nested_images": nested}
        for i, (shard, _) in enumerate(shards)
    ]
    counts = {
        "planned": planned,
        "written": written,
        "rejected": len(drops),
        "reasons": dict(Counter(kind for _, kind, _ in drops)),
        "leakage": leakage,
    }
    return items, counts


# ---------------------------------------------------------------- workers: one shard
def _json_item(record: dict) -> str:
    """A record as it appears inside an ``indent=2`` JSON array (the array's own indent added)."""
    return "  " + json.dumps(record, indent=2, sort_keys=True, default=str).replace("\n", "\n  ")


def _csv_row(image: str, caption: str) -> str:
    buf = _io.StringIO()
    csv.writer(buf).writerow([image, caption])  # the dialect of csv.DictWriter: excel, \r\n
    return buf.getvalue()


class ExportShard:
    """Ray Data row function (actor pool): one tiles shard and its annotations -> its PNGs, Parquet shards
    and parts; returns a small manifest row (counters as JSON, the worker that did it)."""

    def __init__(self, run_dir: str, visibility=None):
        from sarlang_ray.annotate.visibility import Visibility

        self.tile_root = tables.shard_root(run_dir, "align")
        self.ann_root = tables.shard_root(run_dir, "annotate")
        self.out = io.join(run_dir, "export")
        self.visibility = visibility or Visibility()

    def read(
        self, name: str, split_of: dict, tile_columns: list[str], pair_columns: list[str]
    ) -> tuple[dict, list]:
        """The shard's tiles (tile id -> row) and its QC-passed pairs of split tiles, with those columns."""
        tiles = {
            t["tile_id"]: t
            for t in io.read_parquet(io.join(self.tile_root, name), columns=tile_columns).to_pylist()
        }
        pairs = [
            p
            for p in io.read_parquet(
                io.join(self.ann_root, name), columns=[*pair_columns, "qc_passed"]
            ).to_pylist()
            if p["qc_passed"] and p["tile_id"] in split_of
        ]
        return tiles, pairs

    def contradictions(self, tiles: dict, pairs: list[dict]) -> str:
        """The contradiction checker (:mod:`sarlang_ray.annotate.consistency`) over the pairs this shard
        exports (their text, backend, and their tiles' GSD and width), as JSON: the card's "left in this
        export" column, summed over shards by the driver instead of read back whole into it."""
        from sarlang_ray.annotate import consistency

        return json.dumps(consistency.check_pairs(pairs, tiles, self.visibility))

    def __call__(self, row: dict) -> dict:
        name = row["shard"]
        if row.get("decisions"):  # planned on the workers: this shard's decisions file
            d = io.read_parquet(row["decisions"]).to_pylist()
            split_of, clipped = {t["tile_id"]: t["split"] for t in d}, {c for t in d for c in t["clipped"]}
        else:
            split_of, clipped = json.loads(row["splits"]), set(json.loads(row.get("clipped") or "[]"))
        done_uri = io.join(self.out, PARTS, "_done", name.replace("/", "__") + ".json")
        if io.exists(done_uri):  # an earlier, interrupted run finished this shard: its files are there
            done = io.read_json(done_uri)
            if "contradictions" not in done:  # finished by a version that did not check there
                done["contradictions"] = self.contradictions(
                    *self.read(name, split_of, CHECK_TILE_COLUMNS, CHECK_PAIR_COLUMNS)
                )
            return {**done, "index": row["index"], "skipped": True}
        tiles, pairs = self.read(
            name,
            split_of,
            [*CHECK_TILE_COLUMNS, "scene_id", "sar_png", "objects", "landcover"],
            [*PAIR_COLUMNS, "backend"],
        )
        nested = bool(row.get("nested_images"))
        stats: dict[str, Counter] = {k: Counter() for k in STATS}
        objects: list[dict] = []
        for tid in sorted({p["tile_id"] for p in pairs}):  # each image once, in the one image folder
            t = tiles[tid]
            io.write_bytes_atomic(io.join(self.out, IMAGES, image_path(t, nested)), t["sar_png"])
            split = split_of[tid]
            objects += [
                {
                    "tile_id": tid,
                    "split": split,
                    "object_id": clipped_id(o["label_id"], split)
                    if o["label_id"] in clipped
                    else o["label_id"],
                    "label_id": o["label_id"],
                    "class": o["class"],
                }
                for o in t["objects"]
            ]
            stats["tiles"][split_of[tid]] += 1
            stats["gsd"][f"{t['gsd_m']:g}"] += 1
            stats["classes"].update(o["class"] for o in t["objects"])
            stats["landcover"].update({k: v for k, v in (t["landcover"] or [])})
        rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
        parts: dict[str, list[str]] = {}  # file under export/ -> this shard's encoded records of it
        for p in pairs:
            split = split_of[p["tile_id"]]
            image = image_path(tiles[p["tile_id"]], nested)
            rows[split].append(
                {
                    **{c: p[c] for c in PAIR_COLUMNS},
                    "split": split,
                    "image": {"bytes": tiles[p["tile_id"]]["sar_png"], "path": image},
                }
            )
            stats["pairs"][split] += 1
            stats["applications"][p["application"]] += 1
            stats["question_types"][p["question_type"]] += 1
            llama, vqa, concise, detailed = assembled_files(split)
            record = {
                "messages": [
                    {"role": "user", "content": "<image>" + p["question"]},
                    {"role": "assistant", "content": p["answer"]},
                ],
                "images": [f"{LLAMA_IMAGES}/{image}"],
                "pair_id": p["pair_id"],
                "application": p["application"],
                "question_type": p["question_type"],
            }
            parts.setdefault(llama, []).append(_json_item(record))
            if p["application"] != "image description":
                parts.setdefault(vqa, []).append(_json_item({**record, "images": [f"SAR_images/{image}"]}))
            if p["kind"] != "vqa":
                parts.setdefault(concise if p["kind"] == "caption_concise" else detailed, []).append(
                    _csv_row(image, p["answer"])
                )
        sizes: dict[str, list[int]] = {}  # file under export/ -> this shard's [records, bytes] of it
        for split, r in rows.items():
            if r:
                data = io.parquet_bytes(pa.Table.from_pylist(r, schema=EXPORT_SCHEMA))
                io.write_bytes_atomic(io.join(self.out, "parquet", split, name.replace("/", "__")), data)
                sizes[parquet_target(split)] = [len(r), len(data)]
        io.write_parquet_atomic(
            io.join(self.out, OBJECTS, name.replace("/", "__")),
            pa.Table.from_pylist(objects, schema=OBJECTS_SCHEMA),
        )
        exported = sorted({p["tile_id"] for p in pairs})
        io.write_parquet_atomic(
            io.join(self.out, TILES, name.replace("/", "__")),
            pa.Table.from_pylist(
                [{"tile_id": t, "scene_id": tiles[t]["scene_id"], "split": split_of[t]} for t in exported],
                schema=TILES_SCHEMA,
            ),
        )
        for target, encoded in parts.items():
            sep = "" if target.endswith(".csv") else ",\n"  # CSV rows end in \r\n; JSON items need commas
            data = sep.join(encoded).encode()
            io.write_bytes_atomic(part_uri(self.out, target, name), data)
            sizes[target] = [len(encoded), len(data)]
        manifest = {
            "shard": name,
            "tiles": sum(stats["tiles"].values()),
            "pairs": len(pairs),
            "parts": json.dumps({t: len(v) for t, v in sorted(parts.items())}),
            "sizes": json.dumps(dict(sorted(sizes.items()))),
            "stats": json.dumps(stats),
            "contradictions": self.contradictions(tiles, pairs),
            "worker": f"{socket.gethostname()}:{os.getpid()}",
        }
        io.write_json_atomic(done_uri, manifest)  # last: the shard is complete
        return {**manifest, "index": row["index"], "skipped": False}


# ---------------------------------------------------------------- assembling the parts
def _pieces(out: str, manifest: list[dict], split: str, target: str) -> list[tuple[str, int, int]]:
    """(uri, records, bytes) of the workers' pieces of ``target`` (a text file's parts, or a split's per-shard
    Parquet files), in shard order (``manifest`` sorted)."""
    pieces = []
    for m in manifest:
        sizes = json.loads(m.get("sizes") or "{}")
        if target.startswith("parquet/"):
            if target in sizes:
                pieces.append((io.join(out, "parquet", split, m["shard"].replace("/", "__")), *sizes[target]))
        # a shard finished by a version that recorded no sizes: 0 bytes
        elif target in json.loads(m["parts"]):
            pieces.append(
                (part_uri(out, target, m["shard"]), *sizes.get(target, [json.loads(m["parts"])[target], 0]))
            )
    return pieces


def _groups(
    pieces: list[tuple[str, int, int]], max_records: int, max_bytes: int
) -> list[list[tuple[str, int, int]]]:
    """Consecutive pieces in groups of at most ``max_records`` records and ``max_bytes`` bytes (a piece larger
    than either is a group of its own): the numbered shards of a file."""
    groups: list[list[tuple[str, int, int]]] = [[]]
    records = size = 0
    for piece in pieces:
        if groups[-1] and (records + piece[1] > max_records or size + piece[2] > max_bytes):
            groups.append([])
            records = size = 0
        groups[-1].append(piece)
        records, size = records + piece[1], size + piece[2]
    return groups


def assembly_jobs(
    out: str, manifest: list[dict], max_records: int = 1_000_000, max_bytes: int = 2**30
) -> list[dict]:
    """The files to write from the workers' pieces, one job each (``manifest`` sorted).

    A file whose records or bytes stay within ``max_records`` and ``max_bytes`` is one file, as published (a
    JSON/CSV file: one job, ``sharded`` false; a split's Parquet: the workers' per-shard files stay as they
    are, no job). Above either, it is written as numbered shards (:func:`shard_names`), one job per shard
    (``sharded`` true: run by Ray tasks, :class:`AssembleFile`), each of consecutive pieces in shard order, so
    the shards read in name order hold the records in the single file's order."""
    jobs = []
    for split in SPLITS:
        for target, fmt in [*assembled_files(split).items(), (parquet_target(split), "parquet")]:
            pieces = _pieces(out, manifest, split, target)
            records, size = sum(p[1] for p in pieces), sum(p[2] for p in pieces)
            if records <= max_records and size <= max_bytes:
                if fmt != "parquet":
                    jobs.append(
                        {
                            "logical": target,
                            "target": io.join(out, target),
                            "format": fmt,
                            "parts": [p[0] for p in pieces],
                            "records": records,
                            "sharded": False,
                        }
                    )
                continue
            groups = _groups(pieces, max_records, max_bytes)
            jobs += [
                {
                    "logical": target,
                    "target": io.join(out, name),
                    "format": fmt,
                    "parts": [p[0] for p in group],
                    "records": sum(p[1] for p in group),
                    "sharded": True,
                }
                for name, group in zip(shard_names(target, len(groups)), groups)
            ]
    return jobs


class _Sink:
    """A write-only file object that hands on what is written to it in chunks and counts the position itself
    (Parquet's footer holds offsets: a truncated BytesIO would report wrong ones)."""

    def __init__(self):
        self.pos, self.chunks, self.closed = 0, [], False

    def write(self, data) -> int:
        data = bytes(data)
        self.chunks.append(data)
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data, self.chunks = b"".join(self.chunks), []
        return data


def _parquet_chunks(parts: list[str]) -> Iterator[bytes]:
    """One Parquet file from several of one schema (the export's, with its Hugging Face metadata), one part in
    memory at a time: each part becomes a row group."""
    import pyarrow.parquet as pq

    sink, writer = _Sink(), None
    for uri in parts:
        table = io.read_parquet(uri)
        if writer is None:
            writer = pq.ParquetWriter(pa.PythonFile(sink, mode="w"), table.schema, compression="zstd")
        writer.write_table(table)
        yield sink.take()
    if writer is not None:
        writer.close()
    yield sink.take()


def assemble(job: dict) -> dict:
    """Stream the parts of one file into it, in order and one part in memory at a time, atomically. JSON
    parts are joined into one array (``[]`` when there are none), CSV parts follow the header, Parquet parts
    become row groups of one file. A shard that an interrupted export already wrote (atomically: whole or
    absent) is kept. Returns the file's path, records and bytes (for ``manifest.json``)."""
    parts = job["parts"]
    if job.get("sharded") and io.exists(job["target"]):
        fs, path = io.filesystem(job["target"])
        return {
            "logical": job["logical"],
            "target": job["target"],
            "records": job["records"],
            "bytes": fs.size(path),
        }
    written = 0

    def counted(chunks: Iterator[bytes]) -> Iterator[bytes]:
        nonlocal written
        for chunk in chunks:
            written += len(chunk)
            yield chunk

    def chunks() -> Iterator[bytes]:
        if job["format"] == "parquet":
            yield from _parquet_chunks(parts)
            return
        if job["format"] == "csv":
            yield CSV_HEADER
            for uri in parts:
                yield io.read_bytes(uri)
            return
        if not parts:
            yield b"[]"
            return
        yield b"[\n"
        for i, uri in enumerate(parts):
            yield (b",\n" if i else b"") + io.read_bytes(uri)
        yield b"\n]"

    io.write_stream_atomic(job["target"], counted(chunks()))
    return {"logical": job["logical"], "target": job["target"], "records": job["records"], "bytes": written}


class AssembleFile:
    """Ray task row class (:func:`sarlang_ray.stages.execution.map`): one numbered shard of a big file,
    written on a worker from its parts (the driver only lists them)."""

    def __call__(self, job: dict) -> dict:
        return assemble(job)


def write_manifest(
    out: str, jobs: list[dict], written: list[dict], manifest: list[dict], nested_images: bool
) -> dict:
    """``export/manifest.json``: every file of the export's logical files (the JSON and CSV files and each
    split's Parquet) with its records and bytes, whether it is sharded, and where the PNGs are; what a tool
    that moves or checks the export reads instead of listing folders. Returns it."""
    files: dict[str, dict] = {}
    for w in written:
        files.setdefault(w["logical"], {"files": []})["files"].append(
            {"path": io.relative(w["target"], out), "records": w["records"], "bytes": w["bytes"]}
        )
    sharded = {j["logical"] for j in jobs if j["sharded"]}
    for split in SPLITS:  # Parquet below the threshold: the workers' per-shard files, as they are
        target = parquet_target(split)
        if target not in sharded:
            files[target] = {
                "files": [
                    {"path": io.relative(uri, out), "records": n, "bytes": b}
                    for uri, n, b in _pieces(out, manifest, split, target)
                ]
            }
    for target, entry in files.items():
        entry["files"].sort(key=lambda f: f["path"])
        entry.update(
            sharded=target in sharded,
            records=sum(f["records"] for f in entry["files"]),
            bytes=sum(f["bytes"] for f in entry["files"]),
        )
    doc = {
        "files": dict(sorted(files.items())),
        "images": {
            "folder": IMAGES,
            "layout": "<scene>/<gsd>m/<tile>.png" if nested_images else "<tile>.png",
        },
    }
    io.write_json_atomic(io.join(out, "manifest.json"), doc)
    return doc


def remove_merged_parquet(out: str, jobs: list[dict]) -> None:
    """Remove the workers' per-shard Parquet files that numbered shards now hold (after every shard is
    written)."""
    for job in jobs:
        if job["sharded"] and job["format"] == "parquet":
            for uri in job["parts"]:
                if io.exists(uri):
                    fs, path = io.filesystem(uri)
                    fs.rm(path)


def remove_parts(out: str, folder: str = PARTS) -> None:
    """Remove ``export/_parts/`` once every file is assembled (or ``folder``: the planner's ``_plan/``)."""
    fs, path = io.filesystem(io.join(out, folder))
    fs.invalidate_cache(path)  # workers wrote there: a listing this process cached may not show it
    if fs.exists(path):
        fs.rm(path, recursive=True)


# ---------------------------------------------------------------- the driver's summary
def merge_stats(manifest: list[dict]) -> dict[str, Counter]:
    """The card's counters, summed over the shards in shard order (keys in order of first appearance)."""
    stats: dict[str, Counter] = {k: Counter() for k in STATS}
    for m in manifest:
        for k, counter in json.loads(m["stats"]).items():
            stats[k].update(counter)
    return stats


def write_dataset_info(out: str, sharded: AbstractSet[str] = frozenset()) -> None:
    """``llamafactory/dataset_info.json``: one ShareGPT dataset per split. A sharded split's ``file_name`` is
    its folder of numbered shards: LLaMA-Factory's loader (``data/loader.py``, ``_load_single_dataset``) loads
    every file of a folder it is given as one dataset."""

    def name(split: str) -> str:
        return (
            f"sarlang_{split}" if f"llamafactory/sarlang_{split}.json" in sharded else f"sarlang_{split}.json"
        )

    info = {
        f"sarlang_{split}": {
            "file_name": name(split),
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
            },
        }
        for split in SPLITS
    }
    io.write_json_atomic(io.join(out, "llamafactory", "dataset_info.json"), info)


def write_card(
    out: str, cfg: WorkflowConfig, stats: dict, counts: dict, leakage: dict, contradictions: dict
) -> None:
    """dataset_card.md with counts, distributions, the leakage report, contradictions (the shards' reports,
    merged) and PNG plots."""
    from sarlang_ray.annotate import consistency

    plt = plots.pyplot()
    charts = {
        "applications.png": ("Pairs per application", stats["applications"]),
        "classes.png": ("Objects per class", stats["classes"]),
        "landcover.png": ("Land cover (sum of tile fractions)", stats["landcover"]),
        "gsd.png": (
            "Tiles per GSD (m)",
            Counter(dict(sorted(stats["gsd"].items(), key=lambda kv: float(kv[0])))),
        ),
    }
    twins = _twin_section(cfg.run.run_dir, out, plt)
    samples = _sample_section(cfg.run.run_dir, out, seed=cfg.run.seed)
    for fname, (title, counter) in charts.items():
        items = list(counter.items()) if fname == "gsd.png" else counter.most_common()
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.bar(
            [f"{k} m" if fname == "gsd.png" else str(k) for k, _ in items],
            [v for _, v in items],
            color="#3b6ea5",
        )
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        plots.save_png(fig, io.join(out, "plots", fname))

    def table(counter: Counter, head: str) -> str:
        rows = "\n".join(f"| {k} | {v:g} |" for k, v in counter.most_common())
        return f"| {head} | count |\n|---|---|\n{rows}\n"

    splits = "\n".join(f"| {s} | {c['tiles']} | {c['pairs']} |" for s, c in counts["splits"].items())
    leaks = "\n".join(
        f"| {k} | {v['intersection_m2']:g} | {v['tile_pairs_within_buffer']} | {v['shared_objects']} |"
        for k, v in leakage["pairs"].items()
    )
    how = {
        "geographic": f"**geographic**: tiles on spatial blocks of {cfg.export.block_m:g} m (equal-area "
        "grid); tiles of "
        f"different splits never share ground nor come closer than {cfg.export.buffer_m:g} m, and no "
        f"label object is in two splits ({leakage['dropped_tiles']} boundary tiles dropped, listed in "
        f"`errors.parquet`; {leakage.get('clipped_objects', 0)} objects longer than a block clipped at "
        "split boundaries, each part with its own id in `objects/`)",
        "scene": "**scene** (weaker): no scene is in two splits, but scenes of the same ground can be",
        "region": "**region** (weaker): no region is in two splits",
    }[cfg.export.split_by]
    qtypes: Counter[str] = Counter()
    for qt, n in stats["question_types"].items():
        qtypes[qt.split("/")[0]] += n
    card = f"""# Dataset card: {cfg.name}

SAR image-text pairs built by sarlang-ray (backend `{cfg.annotate.backend}`), QC-passed pairs only.
Splits {how} (seed {cfg.run.seed}).

| split | tiles | pairs |
|---|---|---|
{splits}

{samples}
## Leakage between splits
Measured on the tiles written ({"no leakage" if leakage["leak_free"] else "**LEAKS**"}): ground area shared by
the footprints of two splits (geodesic), tile pairs that share ground or lie within {leakage["buffer_m"]:g} m,
label objects that appear in both (`leakage.json`).

| splits | shared area (m²) | tile pairs within buffer | shared objects |
|---|---|---|---|
{leaks}

Distinct question types: {counts["question_types"]}.

## Pairs per application
![applications](plots/applications.png)

{table(stats["applications"], "application")}
## Pairs per question family
{table(qtypes, "family")}
{consistency.card_section(cfg.run.run_dir, cfg.annotate, contradictions)}
## Objects per class
![classes](plots/classes.png)

{table(stats["classes"], "class")}
## Land cover
![landcover](plots/landcover.png)

{twins}
## Ground sample distance
![gsd](plots/gsd.png)

{table(stats["gsd"], "GSD (m)")}
## Files
`parquet/<split>/` (Hugging Face `datasets`), `llamafactory/` (ShareGPT JSON + `dataset_info.json`),
`sarlang1m/` (SARLANG-1M layout: `SAR_images/`, `captions/*.csv`, `vqa/*.json`).
"""
    io.write_bytes_atomic(io.join(out, "dataset_card.md"), card.encode())


CARD_SAMPLES = 6  # test tiles in the card's mosaic
CARD_PAIRS = 3  # pairs printed under each
CARD_MAP_TILES = 20000  # footprints drawn at most on the card's split map (a sample beyond)
SPLIT_COLOURS = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c"}


def _exported_shards(out: str) -> list[tuple[str, str]]:
    """(split, tiles shard's membership file under ``export/tiles/``) for every split the shard exported tiles
    to, in name order: the same whether the export's Parquet is one file per shard or merged into numbered
    shards."""
    root = io.join(out, TILES)
    files = sorted(io.glob(root, "*.parquet")) if io.exists(root) else []
    return [
        (split, uri)
        for uri in files
        for split in sorted(
            set(io.read_parquet(uri, columns=["split"])["split"].to_pylist()), key=SPLITS.index
        )
    ]


def _align_shards(run_dir: str) -> dict[str, str]:
    """Export shard file name -> the tiles-table shard it was made from (``<scene>/<name>.parquet`` is
    exported as ``<scene>__<name>.parquet``)."""
    root = tables.shard_root(run_dir, "align")
    return {io.relative(uri, root).replace("/", "__"): uri for uri in tables.tiles_table_shards(run_dir)}


def _draw_samples(run_dir: str, out: str, jobs: list[tuple[str, str]], seed: int) -> None:
    """``plots/samples.png``: each (tiles shard, tile id) of ``jobs`` as SAR | optical twin with its boxes, a
    caption and CARD_PAIRS - 1 of its QC-passed QA pairs under it (a Ray task: it reads the tiles' pixels)."""
    import random
    import textwrap

    import numpy as np

    from sarlang_ray import viz

    plt, rng = plots.pyplot(), random.Random(seed)
    cols = min(3, len(jobs))
    rows = -(-len(jobs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (align_uri, tid) in zip(axes.flat, jobs):
        tile = next(
            t
            for t in io.read_parquet(
                align_uri, columns=["tile_id", "gsd_m", "sar_png", "optical_png", "objects"]
            ).to_pylist()
            if t["tile_id"] == tid
        )
        ann = io.join(
            tables.shard_root(run_dir, "annotate"),
            io.relative(align_uri, tables.shard_root(run_dir, "align")),
        )
        pairs = [
            p
            for p in io.read_parquet(
                ann, columns=["tile_id", "kind", "question", "answer", "qc_passed"]
            ).to_pylist()
            if p["tile_id"] == tid and p["qc_passed"]
        ]
        vqa = [p for p in pairs if p["kind"] == "vqa"]
        chosen = [p for p in pairs if p["kind"] == "caption_concise"][:1] + rng.sample(
            vqa, min(len(vqa), CARD_PAIRS - 1)
        )
        ax.imshow(np.asarray(viz.tile_figure(tile, scale=1)))
        ax.set_title(f"{tid} ({tile['gsd_m']:g} m)\nSAR | optical twin", fontsize=6.5)
        lines = [
            textwrap.shorten(
                f"Q: {p['question']}  A: {p['answer']}" if p["kind"] == "vqa" else f"Caption: {p['answer']}",
                110,
            )
            for p in chosen
        ]
        ax.text(
            0.0,
            -0.02,
            "\n".join(textwrap.fill(x, 62) for x in lines),
            transform=ax.transAxes,
            fontsize=6.5,
            va="top",
            ha="left",
            wrap=True,
        )
    plots.save_png(fig, io.join(out, "plots", "samples.png"))


def _draw_split_map(out: str, jobs: list[tuple[str, str]]) -> str:
    """``plots/split_map.png``: the footprints of the exported tiles (at most CARD_MAP_TILES), coloured by
    split, one panel per region, from each (membership file, tiles shard) of ``jobs``, each read once; returns
    the card's text for it (a Ray task: it reads the tiles shards' footprints)."""
    import numpy as np

    plt = plots.pyplot()
    regions: dict[str, list] = {}
    drawn = 0
    for uri, align_uri in jobs:
        if drawn >= CARD_MAP_TILES:
            break
        split_of = {
            r["tile_id"]: r["split"] for r in io.read_parquet(uri, columns=["tile_id", "split"]).to_pylist()
        }
        for t in io.read_parquet(align_uri, columns=["tile_id", "region", "footprint"]).to_pylist():
            split = split_of.get(t["tile_id"])
            if split and drawn < CARD_MAP_TILES:
                ring = np.asarray(shapely.from_wkb(t["footprint"]).exterior.coords)
                regions.setdefault(t["region"] or "?", []).append((split, ring))
                drawn += 1
    if regions:
        from matplotlib.patches import Patch, Polygon

        fig, axes = plt.subplots(1, len(regions), figsize=(4.2 * len(regions) + 1.6, 4.2), squeeze=False)
        for ax, (region, polys) in zip(axes.flat, sorted(regions.items())):
            for split, ring in polys:
                ax.add_patch(
                    Polygon(
                        ring,
                        closed=True,
                        facecolor=SPLIT_COLOURS[split],
                        edgecolor=SPLIT_COLOURS[split],
                        alpha=0.45,
                        linewidth=0.5,
                        gid=f"tile:{split}",
                    )
                )
            ax.autoscale_view()
            ax.set_aspect(1 / np.cos(np.radians(np.mean([r[:, 1].mean() for _, r in polys]))))
            ax.set_title(f"{region}: {len(polys)} tiles", fontsize=9)
            ax.set_xlabel("longitude", fontsize=7)
            ax.set_ylabel("latitude", fontsize=7)
            ax.tick_params(labelsize=6)
        plots.legend_outside(
            axes.flat[-1],
            handles=[Patch(color=c, alpha=0.6, label=s) for s, c in SPLIT_COLOURS.items()],
            fontsize=8,
        )
        plots.save_png(fig, io.join(out, "plots", "split_map.png"))
        return (
            "## Tiles per split on the map\nFootprints of the exported tiles, coloured by split, one panel "
            "per region"
            + (f" (the first {CARD_MAP_TILES})" if drawn >= CARD_MAP_TILES else "")
            + ": "
            + "; ".join(
                f"{region}: "
                + ", ".join(
                    f"{sp} {n}"
                    for sp, n in sorted(
                        Counter(sp for sp, _ in polys).items(), key=lambda kv: SPLITS.index(kv[0])
                    )
                )
                for region, polys in sorted(regions.items())
            )
            + ".\n\n![split map](plots/split_map.png)\n"
        )
    return ""


def _sample_section(run_dir: str, out: str, seed: int) -> str:
    """The card's pictures: a mosaic of CARD_SAMPLES random test tiles (SAR and optical twin with boxes, a few
    of their pairs under each: ``plots/samples.png``) and the exported tiles' footprints coloured by split,
    one panel per region (``plots/split_map.png``). Read shard by shard: the tiles' pixels of the sample only,
    the footprints of at most CARD_MAP_TILES tiles. The driver picks tile ids from the membership files; Ray
    tasks read the tiles shards (pixels, footprints) and draw."""
    import random

    import ray

    rng = random.Random(seed)
    shards = _exported_shards(out)
    align_of = _align_shards(run_dir)
    if not shards:
        return ""
    text = ""
    test = [uri for split, uri in shards if split == "test"]
    picked: list[tuple[str, str]] = []  # (export shard, tile id): a random shard, then a random tile of it
    for uri in rng.sample(test, len(test)):
        t = io.read_parquet(uri, columns=["tile_id", "split"]).to_pylist()
        ids = sorted({r["tile_id"] for r in t if r["split"] == "test"})
        picked += [(uri, t) for t in rng.sample(ids, min(len(ids), CARD_SAMPLES - len(picked)))]
        if len(picked) >= CARD_SAMPLES:
            break
    if picked:  # the pixels are read and drawn by a Ray worker: the driver reads no image of the tiles table
        jobs = [(align_of[uri.rsplit("/", 1)[-1]], tid) for uri, tid in picked]
        ray.get(ray.remote(num_cpus=1)(_draw_samples).remote(run_dir, out, jobs, seed))
        text += (
            f"## Samples\n{len(picked)} random test tiles (SAR and its optical twin, boxes in class "
            "colours), with "
            f"{CARD_PAIRS} of their pairs each (`sarlang view` browses them all): "
            + ", ".join(f"`{t}`" for _, t in picked)
            + ".\n\n![samples](plots/samples.png)\n\n"
        )
    jobs = [(uri, align_of[uri.rsplit("/", 1)[-1]]) for uri in sorted({uri for _, uri in shards})]
    return text + ray.get(ray.remote(num_cpus=1)(_draw_split_map).remote(out, jobs))


def _twin_section(run_dir: str, out: str, plt) -> str:
    """The card's optical-twin section: how each scene's twin was found, and a histogram of the time gaps
    between scenes and twins found by search (``plots/time_gap.png``), from the scenes table."""
    uri = tables.scenes_uri(run_dir)
    names = set(io.read_parquet(uri).schema.names) if io.exists(uri) else set()
    if "optical_gap_days" not in names:
        return ""
    scenes = io.read_parquet(
        uri, columns=["optical_source", "optical_gap_days", "optical_reason"]
    ).to_pylist()
    how = Counter(s["optical_source"] or f"none ({s['optical_reason'] or 'no rule match'})" for s in scenes)
    gaps = [s["optical_gap_days"] for s in scenes if s["optical_gap_days"] is not None]
    text = "## Optical twins\n" + "\n".join(f"- {k}: {v} scene(s)" for k, v in sorted(how.items())) + "\n"
    if gaps:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.hist(gaps, bins=min(20, max(5, len(gaps))), color="#3b6ea5")
        ax.set_title("Time gap between SAR scene and optical twin")
        ax.set_xlabel("days")
        ax.set_ylabel("scenes")
        plots.save_png(fig, io.join(out, "plots", "time_gap.png"))
        text += (
            f"\nTime gap of the {len(gaps)} twins found by search: median {sorted(gaps)[len(gaps) // 2]:.2f} "
            "days, "
            f"max {max(gaps):.2f} days (per scene in `catalog/scenes.parquet`: `optical_gap_days`).\n\n"
            "![time gap](plots/time_gap.png)\n"
        )
    return text + "\n"


# the release import lives in sarlang_ray.release; these names stay importable from here
from sarlang_ray.release import import_sarlang1m, release_image  # noqa: F401  (re-exported)
