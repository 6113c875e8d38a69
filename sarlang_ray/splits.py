"""Train / val / test splits without geographic leakage, and the report that measures leakage.

A model scored on ground it was trained on (the same harbour at another GSD, date or polarisation) looks
better than it is. So the default split is **geographic** (the spatial cross-validation of Roberts et al.
2017, and of TorchGeo's grid-cell split helpers), and works on ground footprints rather than on scenes:

1. every tile goes to the spatial block of an equal-area grid (EPSG:6933, ``block_m`` metres a side) that
   holds its footprint's centroid; tiles of one place share a block whatever scene, GSD, date or
   polarisation they come from;
2. blocks are assigned to splits by a seeded hash, each to the split furthest below its target share of
   tiles (:func:`assign_splits`);
3. a tile whose footprint intersects, or comes closer than ``buffer_m`` to, a tile of another split (a tile
   straddling a block boundary, a coarse tile over fine ones) is in conflict; the tiles with the most
   conflicts are dropped until none is left (recorded with the reason, never silently);
4. a label object (by id) shown by tiles of two splits is a conflict whatever the distance
   (:func:`resolve_objects`, tiles indexed by label id): a *long* object (the centroids of the tiles showing
   it lie more than ``block_m`` apart along x or y of the equal-area grid: a motorway, a river) is clipped,
   the part each split's tiles show being an object of that split with its own id
   (:func:`clipped_id`); any other object stays in the split holding most of its tiles, and its tiles in
   other splits are dropped.

``split_by: scene`` and ``region`` are kept as explicit, weaker options: they keep a scene (or region)
whole, but two scenes of the same ground may land in different splits. :func:`leakage_report` measures
any assignment: per pair of splits, the ground area their tiles share, the tile pairs that meet, and the
label objects that appear in both (clipped objects by their clipped ids), and how many objects were clipped.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import Counter, defaultdict
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np
import shapely
from pyproj import Geod, Transformer

SPLITS = ("train", "val", "test")
EQUAL_AREA = "EPSG:6933"  # WGS 84 / NSIDC EASE-Grid 2.0 Global: equal-area, metres, global
_M_PER_DEG_LAT = 110_574.0  # the shortest degree of latitude (at the equator): conservative for search boxes


@dataclass
class SplitTile:
    """What a split needs of a tile: its id and group keys, its ground footprint (EPSG:4326) and CRS, and
    the label objects it shows."""

    tile_id: str
    scene_id: str
    region: str
    footprint: shapely.Polygon  # lon/lat
    crs: str  # a metric CRS of the tile (its grid's), for distances on the ground
    label_ids: frozenset[str]


def assign_splits(group_sizes: dict[str, int], ratios: dict[str, float], seed: int) -> dict[str, str]:
    """Group -> split; deterministic, every group in exactly one split, shares of items near ``ratios``."""
    order = sorted(group_sizes, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    total = sum(group_sizes.values()) or 1
    filled = {s: 0 for s in ratios if ratios[s] > 0}
    out = {}
    for g in order:
        # the split that is furthest below its target share gets the next group
        split = max(filled, key=lambda s: ratios[s] - filled[s] / total)
        out[g] = split
        filled[split] += group_sizes[g]
    return out


def grid_centroids(footprints: list[shapely.Polygon]) -> tuple[np.ndarray, np.ndarray]:
    """x and y (metres, in the equal-area grid's CRS) of each footprint's centroid."""
    if not footprints:
        return np.empty(0), np.empty(0)
    centroids = shapely.centroid(np.asarray(footprints, dtype=object))
    x, y = Transformer.from_crs("EPSG:4326", EQUAL_AREA, always_xy=True).transform(
        shapely.get_x(centroids), shapely.get_y(centroids)
    )
    return np.atleast_1d(x), np.atleast_1d(y)


def block_of(footprints: list[shapely.Polygon], block_m: float) -> list[str]:
    """The equal-area grid block (``"<col>_<row>"``) holding each footprint's centroid."""
    x, y = grid_centroids(footprints)
    return [f"{math.floor(a / block_m)}_{math.floor(b / block_m)}" for a, b in zip(x, y)]


class _Ground:
    """Ground distances between lon/lat footprints, measured in a metric CRS of one of the two tiles."""

    def __init__(self, tiles: list[SplitTile]):
        self.tiles = tiles
        self._projected: dict[tuple[int, str], shapely.Geometry] = {}
        self._transformers: dict[str, Transformer] = {}

    def _in(self, i: int, crs: str) -> shapely.Geometry:
        key = (i, crs)
        if key not in self._projected:
            if crs not in self._transformers:
                self._transformers[crs] = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
            t = self._transformers[crs]
            self._projected[key] = shapely.transform(
                self.tiles[i].footprint, lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1]))
            )
        return self._projected[key]

    def meet(self, i: int, j: int, buffer_m: float) -> bool:
        """Do tiles i and j share ground (interiors overlap) or lie closer than ``buffer_m``?"""
        crs = self.tiles[i].crs
        a, b = self._in(i, crs), self._in(j, crs)
        if buffer_m > 0:
            return a.distance(b) < buffer_m
        return a.intersection(b).area > 0


def candidate_pairs(tiles: list[SplitTile], buffer_m: float) -> np.ndarray:
    """Index pairs (i < j) of tiles whose lon/lat bounds, widened by ``buffer_m`` (conservatively), meet."""
    if len(tiles) < 2:
        return np.empty((0, 2), dtype=np.int64)
    footprints = np.asarray([t.footprint for t in tiles], dtype=object)
    bounds = shapely.bounds(footprints)
    lat = np.maximum(np.abs(bounds[:, 1]), np.abs(bounds[:, 3]))
    dlat = buffer_m / _M_PER_DEG_LAT
    dlon = buffer_m / (_M_PER_DEG_LAT * np.maximum(np.cos(np.radians(np.minimum(lat, 89.9))), 1e-6))
    boxes = shapely.box(bounds[:, 0] - dlon, bounds[:, 1] - dlat, bounds[:, 2] + dlon, bounds[:, 3] + dlat)
    tree = shapely.STRtree(footprints)
    src, dst = tree.query(boxes, predicate="intersects")
    keep = src < dst
    return np.column_stack([src[keep], dst[keep]])


def hilbert_index(x: int, y: int, order: int = 32) -> int:
    """Position of cell (x, y) (non-negative) on a Hilbert curve over a 2**order grid: cells close on the
    curve are close on the ground, so consecutive runs of blocks form compact regions."""
    d, s = 0, 1 << (order - 1)
    while s > 0:
        rx, ry = int(x & s > 0), int(y & s > 0)
        d += s * s * ((3 * rx) ^ ry)
        if ry == 0:  # rotate the quadrant
            if rx == 1:
                x, y = s - 1 - x, s - 1 - y
            x, y = y, x
        s >>= 1
    return d


def hilbert_indexes(x: np.ndarray, y: np.ndarray, order: int = 32) -> np.ndarray:
    """:func:`hilbert_index` of many cells at once (numpy, uint64): the same positions, for block arrays."""
    x, y = np.asarray(x, dtype=np.uint64).copy(), np.asarray(y, dtype=np.uint64).copy()
    d = np.zeros(x.shape, dtype=np.uint64)
    s = 1 << (order - 1)
    while s > 0:
        su = np.uint64(s)
        rx, ry = ((x & su) > 0).astype(np.uint64), ((y & su) > 0).astype(np.uint64)
        d += su * su * ((np.uint64(3) * rx) ^ ry)
        rot = ry == 0
        flip = rot & (rx == 1)
        x[flip], y[flip] = su - np.uint64(1) - x[flip], su - np.uint64(1) - y[flip]
        x[rot], y[rot] = y[rot], x[rot].copy()
        s >>= 1
    return d


def block_runs_arrays(
    cols: np.ndarray,
    rows: np.ndarray,
    sizes: np.ndarray,
    ratios: dict[str, float],
    seed: int,
    start: int | None = None,
) -> np.ndarray:
    """:func:`block_runs` on block arrays (column, row, tile count of each block): the index in ``SPLITS`` of
    each block's split, the same assignment, without a dict of block names (a driver holds blocks as
    arrays)."""
    names = [s for s in SPLITS if ratios.get(s, 0) > 0]
    names = sorted(names, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    out = np.zeros(len(cols), dtype=np.int8)
    if not len(cols):
        return out
    x, y = np.asarray(cols, dtype=np.int64) + (1 << 30), np.asarray(rows, dtype=np.int64) + (1 << 30)
    # in chunks: the curve's ~10 temporaries per cell stay the size of a chunk, not of every block
    step = 65_536
    h = np.concatenate([hilbert_indexes(x[i : i + step], y[i : i + step]) for i in range(0, len(x), step)])
    order = np.argsort(h, kind="stable")
    if start is None:
        start = int(hashlib.sha256(f"{seed}:start".encode()).hexdigest(), 16)
    order = np.roll(order, -(start % len(order)))
    total = float(sizes.sum()) or 1.0
    sz = np.asarray(sizes, dtype=np.float64)[order]
    code = [SPLITS.index(s) for s in names]
    filled, k, bound, n = 0.0, 0, ratios[names[0]] * total, len(order)
    chosen = np.empty(n, dtype=np.int8)
    for i in range(n):
        while k < len(names) - 1 and (filled + sz[i] / 2 > bound or n - i <= len(names) - 1 - k):
            k += 1
            bound += ratios[names[k]] * total
        chosen[i] = code[k]
        filled += sz[i]
    out[order] = chosen
    return out


def block_runs(
    block_sizes: dict[str, int], ratios: dict[str, float], seed: int, start: int | None = None
) -> dict[str, str]:
    """Block -> split: blocks in Hilbert order (started at ``start``, else a seeded place), cut into one
    contiguous run per split sized by ``ratios`` (in items), so each split is a few compact regions and
    boundaries are few."""

    def cell(block: str) -> tuple[int, int]:
        col, row = (int(v) for v in block.split("_"))
        return col + (1 << 30), row + (1 << 30)

    order = sorted(block_sizes, key=lambda b: hilbert_index(*cell(b)))
    if not order:
        return {}
    if start is None:
        start = int(hashlib.sha256(f"{seed}:start".encode()).hexdigest(), 16)
    start %= len(order)
    order = order[start:] + order[:start]
    names = [s for s in SPLITS if ratios.get(s, 0) > 0]
    # which region comes first
    names = sorted(names, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    total = sum(block_sizes.values()) or 1
    out, filled, k = {}, 0.0, 0
    bound = ratios[names[0]] * total
    for i, b in enumerate(order):
        left = len(order) - i
        # move on once this split has its share, keeping at least one block for every split still to come
        while k < len(names) - 1 and (filled + block_sizes[b] / 2 > bound or left <= len(names) - 1 - k):
            k += 1
            bound += ratios[names[k]] * total
        out[b] = names[k]
        filled += block_sizes[b]
    return out


def geographic_splits(
    tiles: list[SplitTile], ratios: dict[str, float], seed: int, block_m: float, buffer_m: float
) -> tuple[dict[str, str], dict[str, tuple[str, str]], set[str]]:
    """Tile id -> split; tile id -> (error class, why) of each dropped tile; and the ids of the label objects
    clipped at split boundaries (the module docstring says how)."""
    footprints = [t.footprint for t in tiles]
    blocks = block_of(footprints, block_m)
    sizes = dict(Counter(blocks))
    meeting = meeting_pairs(tiles, buffer_m)
    objects = ObjectIndex(tiles, block_m)
    # a few seeded places to start the curve at; keep the one whose kept tiles come closest to the ratios
    base = int(hashlib.sha256(f"{seed}:start".encode()).hexdigest(), 16)
    best = None
    for k in range(START_CANDIDATES):
        block_split = block_runs(sizes, ratios, seed, start=base + k * max(1, len(sizes) // START_CANDIDATES))
        kept, dropped, clipped = _resolve(
            [block_split[b] for b in blocks], meeting, tiles, ratios, buffer_m, objects
        )
        shares = Counter(kept.values())
        n = max(1, len(tiles))
        miss = (
            sum((shares[s] / n - r) ** 2 + (r > 0 and shares[s] == 0) for s, r in ratios.items())
            + len(dropped) / n
        )
        if best is None or miss < best[0]:
            best = (miss, kept, dropped, clipped)
    assert best is not None  # START_CANDIDATES >= 1 tries
    return best[1], best[2], best[3]


START_CANDIDATES = 8  # seeded start places tried along the Hilbert curve
BOUNDARY, OBJECT = "split_boundary", "split_object"  # why a tile was dropped: ground, or a label object


def clipped_id(label_id: str, split: str) -> str:
    """The id of the part of a clipped label object that lies in ``split``'s tiles."""
    return f"{label_id}~{split}"


class ObjectIndex:
    """Tiles indexed by label id (each label's tile indexes, in tile order), and the long labels: those whose
    tiles' centroids lie more than ``block_m`` apart along x or y of the equal-area grid. Linear in the
    number of (tile, label) pairs: no pair of tiles is ever compared."""

    def __init__(self, tiles: list[SplitTile], block_m: float):
        self.tiles: dict[str, list[int]] = defaultdict(list)
        for i, t in enumerate(tiles):
            for label in t.label_ids:
                self.tiles[label].append(i)
        x, y = grid_centroids([t.footprint for t in tiles])
        self.long = {
            label
            for label, idx in self.tiles.items()
            if len(idx) > 1 and max(np.ptp(x[idx]), np.ptp(y[idx])) > block_m
        }


def resolve_objects(
    split: list[str],
    dropped: dict[int, tuple[str, str]],
    tiles: list[SplitTile],
    ratios: dict[str, float],
    objects: ObjectIndex,
) -> set[str]:
    """Make every label object live in one split: objects in order of their id; one whose kept tiles lie in
    more than one split is clipped when it is long (its id is returned), else it stays in the split that
    holds most of its kept tiles (ties: the larger target share, then the name) and its tiles in the other
    splits are dropped (added to ``dropped``). A drop never adds an object to a split, so an object settled
    earlier stays settled."""
    for label in sorted(objects.tiles):
        if label in objects.long:
            continue  # clipped below, once every drop is known
        kept = [i for i in objects.tiles[label] if i not in dropped]
        counts = Counter(split[i] for i in kept)
        if len(counts) < 2:
            continue
        home = max(counts, key=lambda s: (counts[s], ratios[s], s))
        for i in kept:
            if split[i] != home:
                dropped[i] = (
                    OBJECT,
                    (
                        f"tile {tiles[i].tile_id} (split {split[i]}) shows label object {label}, which "
                        f"{counts[home]} "
                        f"tile(s) of split {home} also show; dropped so that the object lives in one split "
                        "(it spans "
                        "less than export.block_m, so it is not clipped). A larger export.block_m means "
                        "fewer split boundaries."
                    ),
                )
    return {
        label
        for label in objects.long
        if len({split[i] for i in objects.tiles[label] if i not in dropped}) > 1
    }


def _resolve(
    split: list[str],
    meeting: list[tuple[int, int]],
    tiles: list[SplitTile],
    ratios: dict[str, float],
    buffer_m: float,
    objects: ObjectIndex,
) -> tuple[dict[str, str], dict[str, tuple[str, str]], set[str]]:
    """Drop tiles until no two tiles of different splits meet, then settle the label objects
    (:func:`resolve_objects`); (tile id -> split, tile id -> (error class, why), clipped label ids)."""
    dropped = ground_drops(split, meeting, tiles, ratios, buffer_m)
    clipped = resolve_objects(split, dropped, tiles, ratios, objects)
    return (
        {t.tile_id: s for i, (t, s) in enumerate(zip(tiles, split)) if i not in dropped},
        {tiles[i].tile_id: why for i, why in dropped.items()},
        clipped,
    )


def ground_drops(
    split: list[str],
    meeting: list[tuple[int, int]],
    tiles: list[SplitTile],
    ratios: dict[str, float],
    buffer_m: float,
) -> dict[int, tuple[str, str]]:
    """The tiles dropped so that no two tiles of different splits meet (index -> (error class, why)): the most
    costly first, greedily. Tiles that meet no tile of another split never enter, so running it on any set of
    tiles that holds every conflict of a connected group of conflicts gives that group's drops."""
    conflicts: dict[int, set[int]] = defaultdict(set)
    for i, j in meeting:
        if split[i] != split[j]:
            conflicts[i].add(j)
            conflicts[j].add(i)

    def cost(i: int) -> tuple:
        # drop from the split with the larger target first (it can spare tiles), then the most conflicted
        # tile, then the larger footprint; the id makes it deterministic
        return (-ratios[split[i]], -len(conflicts[i]), -tiles[i].footprint.area, tiles[i].tile_id)

    dropped: dict[int, tuple[str, str]] = {}
    heap = [(cost(i), i) for i in conflicts]
    heapq.heapify(heap)
    while heap:
        key, i = heapq.heappop(heap)
        if not conflicts.get(i):
            continue
        if key != cost(i):  # its conflicts changed since it was queued
            heapq.heappush(heap, (cost(i), i))
            continue
        others = sorted({split[j] for j in conflicts[i]})
        dropped[i] = (
            BOUNDARY,
            (
                f"tile {tiles[i].tile_id} (split {split[i]}) shares ground with, or lies within "
                f"export.buffer_m={buffer_m:g} m of, {len(conflicts[i])} tile(s) of split(s) "
                f"{', '.join(others)}; dropped so "
                "that no ground is in two splits. A larger export.block_m means fewer split boundaries."
            ),
        )
        for j in conflicts.pop(i):
            conflicts[j].discard(i)
            heapq.heappush(heap, (cost(j), j))
    return dropped


def meeting_pairs(tiles: list[SplitTile], buffer_m: float) -> list[tuple[int, int]]:
    """Index pairs (i < j) of tiles that share ground (interiors overlap) or lie closer than ``buffer_m``
    (label objects shared at any distance are :func:`resolve_objects`' business)."""
    ground = _Ground(tiles)
    return [(i, j) for i, j in candidate_pairs(tiles, buffer_m).tolist() if ground.meet(i, j, buffer_m)]


def group_splits(tiles: list[SplitTile], by: str, ratios: dict[str, float], seed: int) -> dict[str, str]:
    """The weaker splits: whole scenes (``by="scene"``) or regions (``by="region"``) per split."""
    key = (lambda t: t.region) if by == "region" else (lambda t: t.scene_id)
    group_split = assign_splits(dict(Counter(key(t) for t in tiles)), ratios, seed)
    return {t.tile_id: group_split[key(t)] for t in tiles}


def object_ids(tile: SplitTile, split: str, clipped: AbstractSet[str] = frozenset()) -> set[str]:
    """The ids of the label objects a tile of ``split`` shows, clipped objects by their clipped id."""
    return {clipped_id(label, split) if label in clipped else label for label in tile.label_ids}


def leakage_report(
    tiles: list[SplitTile],
    tile_split: dict[str, str],
    buffer_m: float,
    clipped: AbstractSet[str] = frozenset(),
) -> dict:
    """Per pair of splits: ground area their tiles share (m², geodesic, of the union of each split's
    footprints), tile pairs that share ground or lie closer than ``buffer_m``, and label objects in both (a
    clipped object by the id of each of its parts: :func:`clipped_id`); and how many objects were clipped."""
    geod = Geod(ellps="WGS84")
    placed = [t for t in tiles if t.tile_id in tile_split]
    by_split = {s: [t for t in placed if tile_split[t.tile_id] == s] for s in SPLITS}
    unions = {s: shapely.union_all([t.footprint for t in ts]) if ts else None for s, ts in by_split.items()}
    labels = {
        s: set().union(*(object_ids(t, s, clipped) for t in ts)) if ts else set()
        for s, ts in by_split.items()
    }
    meeting: Counter = Counter()
    for i, j in meeting_pairs(placed, buffer_m):
        a, b = tile_split[placed[i].tile_id], tile_split[placed[j].tile_id]
        if a != b:
            meeting[tuple(sorted((a, b)))] += 1
    pairs = {}
    for k, a in enumerate(SPLITS):
        for b in SPLITS[k + 1 :]:
            area = 0.0
            union_a, union_b = unions[a], unions[b]
            if union_a is not None and union_b is not None:
                shared = union_a.intersection(union_b)
                area = abs(geod.geometry_area_perimeter(shared)[0]) if not shared.is_empty else 0.0
            pairs[f"{a}/{b}"] = {
                "intersection_m2": round(area, 3),
                "tile_pairs_within_buffer": meeting[(min(a, b), max(a, b))],
                "shared_objects": len(labels[a] & labels[b]),
            }
    return {
        "buffer_m": buffer_m,
        "pairs": pairs,
        "leak_free": all(p["intersection_m2"] == 0 and p["shared_objects"] == 0 for p in pairs.values()),
        "tiles": {s: len(ts) for s, ts in by_split.items()},
        "clipped_objects": len(clipped),
        "clipped_parts": len(
            {(label, tile_split[t.tile_id]) for t in placed for label in t.label_ids & clipped}
        ),
    }
