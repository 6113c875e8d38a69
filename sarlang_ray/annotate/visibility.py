"""What the pixels of a tile can show: which classes and which objects are resolvable at its GSD.

Labels come from footprints drawn at any resolution; a tile shows them at its ground sample distance.
A car (4.5 m) is a handful of pixels at 1 m and less than one at 10 m, so a question about it at 10 m
tests nothing a model could see, and a benchmark built from it marks a correct model wrong. Two numbers
per class decide (``annotate.class_size_m`` and ``annotate.min_size_px``, defaults justified in
docs/annotate.md):

* a class is **resolvable at a GSD** when a typical instance (``class_size_m``) spans at least
  ``min_size_px`` pixels: ``class_size_m / gsd >= min_size_px``. Questions and caption words about a class
  that is not resolvable are never written, neither "yes" nor "no";
* an **object is seen** when its class is resolvable and its own visible extent (the largest distance
  across its pixel polygon) is at least ``min_size_px``. An object that is labelled but not seen
  (a 10 m boat at 5 m, a sliver cut by the tile edge) makes its class' count in the tile uncertain, so
  the class is named but not counted, and its absence is never asserted.

Land cover says what the labels may not: a tile that is 40 % built-up holds buildings whether or not
anyone drew them (``annotate.implied_by``). Absence of an implied class is never asserted there.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import shapely

from sarlang_ray.config import AnnotateSection
from sarlang_ray.rows import LabelledTile, ObjectRow


def object_size_px(obj: ObjectRow) -> float:
    """Largest distance across the object's (visible, clipped) pixel polygon: its Feret diameter.

    For a car 4.6 x 1.9 m that is its diagonal, ~5 m; for a road segment its length. Computed on the
    convex hull's vertices (the diameter is always between two of them)."""
    geom = shapely.from_wkb(obj["polygon"]) if obj.get("polygon") else None
    if geom is None or geom.is_empty:
        x0, y0, x1, y1 = obj["bbox_xyxy"]
        return math.hypot(x1 - x0, y1 - y0)
    pts = np.asarray(shapely.get_coordinates(geom.convex_hull), dtype=float)
    if len(pts) < 2:
        return 0.0
    d = pts[:, None, :] - pts[None, :, :]
    return float(np.sqrt((d**2).sum(-1)).max())


@dataclass(frozen=True)
class TileView:
    """One tile as its pixels show it (see the module docstring for the terms).

    ``seen``: the objects that can be seen, in label order; ``counts``: seen objects per class;
    ``countable``: classes with seen objects and no hidden one (exact counts are true of the pixels);
    ``hidden``: classes with labelled objects too small to see; ``askable_absent``: classes with no labelled
    object that are resolvable at this GSD and not implied by land cover (their absence can be asserted);
    ``implied``: classes implied by land cover and not seen (never asserted absent); ``unresolvable``:
    classes not resolvable at this GSD (never named)."""

    seen: list[ObjectRow]
    counts: Counter
    countable: frozenset[str]
    hidden: frozenset[str]
    askable_absent: tuple[str, ...]
    implied: dict[str, str]  # class -> land-cover class that implies it
    unresolvable: frozenset[str]


# the annotate keys that Visibility.from_config reads (a stage that builds one keys them)
VISIBILITY_KEYS = (
    "annotate.class_size_m",
    "annotate.min_size_px",
    "annotate.implied_by",
    "annotate.implied_min_fraction",
)


@dataclass(frozen=True)
class Visibility:
    """Per-class resolvability and land-cover implications (from the ``annotate`` config section)."""

    class_size_m: dict[str, float] = field(default_factory=lambda: dict(AnnotateSection().class_size_m))
    min_size_px: dict[str, float] = field(default_factory=lambda: dict(AnnotateSection().min_size_px))
    implied_by: dict[str, str] = field(default_factory=lambda: dict(AnnotateSection().implied_by))
    implied_min_fraction: float = AnnotateSection.implied_min_fraction

    @classmethod
    def from_config(cls, cfg: AnnotateSection) -> Visibility:
        return cls(
            dict(cfg.class_size_m), dict(cfg.min_size_px), dict(cfg.implied_by), cfg.implied_min_fraction
        )

    def max_gsd(self, cls: str) -> float:
        """The coarsest GSD (m) at which ``cls`` is resolvable."""
        return self.class_size_m[cls] / self.min_size_px[cls]

    def resolvable(self, cls: str, gsd_m: float | None) -> bool:
        """Whether a typical ``cls`` spans ``min_size_px`` pixels at ``gsd_m``; an unknown GSD (an imported
        release without one) cannot be judged and counts as resolvable (reports say how many were
        unjudged)."""
        if gsd_m is None or cls not in self.class_size_m:
            return True
        return self.class_size_m[cls] / gsd_m >= self.min_size_px[cls] - 1e-9

    def is_seen(self, obj: ObjectRow, gsd_m: float) -> bool:
        cls = obj["class"]
        return self.resolvable(cls, gsd_m) and object_size_px(obj) >= self.min_size_px.get(cls, 0.0) - 1e-9

    def implied(self, landcover: Iterable[tuple[str, float]] | None) -> dict[str, str]:
        """Classes (-> the land-cover class) that land cover covering >= implied_min_fraction implies."""
        lc = dict(landcover or ())
        return {c: l for c, l in self.implied_by.items() if lc.get(l, 0.0) >= self.implied_min_fraction}

    def view(self, tile: LabelledTile, classes: tuple[str, ...]) -> TileView:
        """The tile's objects of ``classes`` as its pixels show them at its GSD."""
        gsd = tile["gsd_m"]
        objects = [o for o in tile["objects"] if o["class"] in classes]
        labelled = Counter(o["class"] for o in objects)
        seen = [o for o in objects if self.is_seen(o, gsd)]
        counts = Counter(o["class"] for o in seen)
        hidden = frozenset(c for c in labelled if labelled[c] > counts.get(c, 0))
        unresolvable = frozenset(c for c in classes if not self.resolvable(c, gsd))
        implied = {
            c: l for c, l in self.implied(tile.get("landcover")).items() if c in classes and not counts.get(c)
        }
        askable_absent = tuple(
            c for c in sorted(classes) if not labelled.get(c) and c not in unresolvable and c not in implied
        )
        return TileView(
            seen,
            counts,
            frozenset(c for c in counts if c not in hidden),
            hidden,
            askable_absent,
            implied,
            unresolvable,
        )
