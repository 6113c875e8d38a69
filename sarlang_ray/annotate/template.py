"""The `template` annotator: captions and QA for the seven applications, grounded in the tile's labels.

No model: every caption and answer is computed from the tile's objects (class, pixel box, polygon,
orientation) and land-cover fractions, so it is true by construction and tests can recompute it. True of
the labels is not enough: it must also be true of what the pixels can show at the tile's GSD, so classes
too small to resolve are never named, and absence is never asserted where land cover implies the class
(:mod:`sarlang_ray.annotate.visibility`). Phrasings vary per tile (seeded by the tile id); every pair records
its application and a ``question_type`` = ``<family>/<template>/<class>[/<class>]`` so the type space is
countable.

Region boxes in questions are ``[x0, y0, x1, y1]`` on a 0-1000 scale of the tile (x right, y down).
"""

from __future__ import annotations

import math
import random

import numpy as np
import shapely
from numpy.typing import ArrayLike

from sarlang_ray import prompts
from sarlang_ray.annotate.visibility import TileView, Visibility
from sarlang_ray.annotate.vocab import CLASS_WORDS, POSITIONS, box_text, count_phrase, plural, position_of
from sarlang_ray.rows import LabelledTile, ObjectRow

CLASSES = tuple(CLASS_WORDS)
PATTERN_SENTENCE = {
    "in a row": "are arranged in a row",
    "in a grid": "are arranged in a grid",
    "clustered": "are clustered together",
    "scattered": "are scattered",
}
LANDCOVER_PHRASES = {
    "water": "open water",
    "built-up": "a built-up area",
    "vegetation": "vegetated land",
    "bare soil": "bare land",
    "road": "paved surfaces",
    "land": "land",
}
# land-cover names as caption words: never a label class name (QC would read "road" as a road object)
LANDCOVER_WORDS = {"road": "paved surface"}
# land cover that implies a class nobody labelled: said as what the image shows, never as "no buildings"
DENSE_PHRASES = {"built-up": "a dense built-up area", "water": "open water", "vegetation": "dense vegetation"}

IDENTIFICATION = (
    "Is there a {c} in the image?",
    "Does this SAR image contain a {c}?",
    "Can you see any {cs} here?",
    "Are any {cs} visible in this image?",
    "Is a {c} present in the scene?",
    "Do you observe a {c}?",
    "Does the image show at least one {c}?",
    "Is there any {c} in this SAR scene?",
)
COUNTING = (
    "How many {cs} are there in the image?",
    "How many {cs} can be seen?",
    "Count the {cs} in this image.",
    "What is the number of {cs} in the scene?",
    "How many {cs} does this SAR image contain?",
    "Give the number of {cs} visible.",
    "How many {cs} are present?",
    "Tell me how many {cs} appear.",
)
POSITIONING = (
    "Where is the {c} located in the image?",
    "In which part of the image is the {c}?",
    "Where can the {c} be found?",
    "What is the position of the {c}?",
    "Where does the {c} appear?",
    "Which region of the image contains the {c}?",
    "Locate the {c} in the image.",
    "Where is the {c}?",
)
POSITION_YESNO = (
    "Is there a {c} in the {p} of the image?",
    "Does the {p} part of the image contain a {c}?",
    "Can a {c} be seen in the {p} area?",
    "Is any {c} located in the {p}?",
)
REGION = (
    "What is the object in region {b}?",
    "What kind of object is inside the box {b}?",
    "Identify the object within {b}.",
    "Which category does the object in {b} belong to?",
    "What is located at {b}?",
    "Name the object in the region {b}.",
)
CLASSIFICATION = (
    "Which of these categories appears in the image: {opts}?",
    "Which object class is present here: {opts}?",
    "Which of the following can be seen: {opts}?",
    "Select the category visible in this SAR image: {opts}.",
    "What type of object does this image contain: {opts}?",
    "Among {opts}, which one appears in the scene?",
)
SHAPE = (
    "What is the shape of the {c}?",
    "Describe the shape of the {c}.",
    "What shape does the {c} have?",
    "How would you describe the outline of the {c}?",
    "Which shape best describes the {c}?",
)
DIRECTION = (
    "What is the orientation of the {c}?",
    "In which direction is the {c} oriented?",
    "Along which direction does the {c} lie?",
    "How is the {c} aligned?",
    "What direction does the {c} point?",
)
PATTERN = (
    "How are the {cs} arranged?",
    "What pattern do the {cs} form?",
    "Describe the arrangement of the {cs}.",
    "How are the {cs} distributed in the image?",
    "What is the spatial layout of the {cs}?",
)
LANDCOVER = (
    "What is the dominant land cover in this image?",
    "Which land cover type covers most of the image?",
    "What covers the largest part of the scene?",
    "What is the main type of surface in the image?",
    "Which land cover dominates this SAR image?",
    "What kind of terrain is most common here?",
)
WATER = (
    "Is there water in the image?",
    "Does the image contain water?",
    "Is any water body visible?",
    "Can you see water in this scene?",
)
REASONING = (
    "Are there more {as} than {bs}?",
    "Are there fewer {as} than {bs}?",
    "Does the number of {as} exceed the number of {bs}?",
    "Are the {as} more numerous than the {bs}?",
    "Is the count of {as} larger than that of {bs}?",
    "Are there as many {as} as {bs}?",
)
TOTAL = (
    "How many {as} and {bs} are there in total?",
    "What is the total number of {as} and {bs}?",
    "Count the {as} and {bs} together.",
    "How many objects are either {as} or {bs}?",
)


def question_type_space() -> set[str]:
    """Every question type the template annotator can emit over the class vocabulary."""
    types: set[str] = set()
    for fam, templates in (
        ("identification", IDENTIFICATION),
        ("counting", COUNTING),
        ("positioning", POSITIONING),
        ("shape", SHAPE),
        ("direction", DIRECTION),
        ("pattern", PATTERN),
    ):
        types |= {f"{fam}/t{i}/{c}" for i in range(len(templates)) for c in CLASSES}
    types |= {
        f"position_yesno/t{i}/{c}/{p}" for i in range(len(POSITION_YESNO)) for c in CLASSES for p in POSITIONS
    }
    types |= {
        f"reasoning/t{i}/{a}/{b}" for i in range(len(REASONING)) for a in CLASSES for b in CLASSES if a != b
    }
    types |= {f"total/t{i}/{a}/{b}" for i in range(len(TOTAL)) for a in CLASSES for b in CLASSES if a < b}
    types |= {f"region/t{i}" for i in range(len(REGION))} | {
        f"classification/t{i}" for i in range(len(CLASSIFICATION))
    }
    types |= {f"landcover/t{i}" for i in range(len(LANDCOVER))} | {f"water/t{i}" for i in range(len(WATER))}
    return types


# ---------------------------------------------------------------- geometry facts
def shape_of(polygon_wkb: bytes) -> str:
    """circular, rectangular, elongated, cross-shaped or irregular (from the pixel polygon)."""
    poly = shapely.from_wkb(polygon_wkb)
    if poly.area <= 0:
        return "irregular"
    circularity = 4 * math.pi * poly.area / poly.length**2
    rect = poly.minimum_rotated_rectangle
    x, y = rect.exterior.coords.xy
    sides = sorted([math.dist((x[0], y[0]), (x[1], y[1])), math.dist((x[1], y[1]), (x[2], y[2]))])
    aspect = sides[1] / max(sides[0], 1e-9)
    rectangularity = poly.area / max(rect.area, 1e-9)
    convexity = poly.area / max(poly.convex_hull.area, 1e-9)
    if circularity >= 0.85:
        return "circular"
    if rectangularity >= 0.85:
        return "elongated" if aspect >= 3 else "rectangular"
    if convexity < 0.7 and aspect < 2:
        return "cross-shaped"
    return "irregular"


def direction_of(angle_deg: float) -> str:
    """Compass axis of a long object (tiles are north-up: image x is east)."""
    a = angle_deg % 180
    if a < 22.5 or a >= 157.5:
        return "east-west"
    if a < 67.5:
        return "northeast-southwest"
    if a < 112.5:
        return "north-south"
    return "northwest-southeast"


def pattern_of(centres: ArrayLike, size: int) -> str:
    """Arrangement of >= 3 object centres: in a row, in a grid, clustered or scattered."""
    pts = np.asarray(centres, dtype=float)
    centred = pts - pts.mean(axis=0)
    _, sv, _ = np.linalg.svd(centred, full_matrices=False)
    spread = sv / math.sqrt(len(pts))
    if spread[0] > 0 and spread[1] < max(0.05 * spread[0], 0.01 * size):
        return "in a row"
    tol = 0.03 * size

    def groups(v: np.ndarray) -> int:
        v = np.sort(v)
        return 1 + int((np.diff(v) > tol).sum())

    gx, gy = groups(pts[:, 0]), groups(pts[:, 1])
    if len(pts) >= 4 and gx >= 2 and gy >= 2 and gx * gy <= 1.5 * len(pts) and gx * gy >= len(pts):
        return "in a grid"
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    if d.min(axis=1).mean() < 0.08 * size and np.ptp(pts, axis=0).max() < 0.5 * size:
        return "clustered"
    return "scattered"


def _centre(o: ObjectRow) -> tuple[float, float]:
    b = o["bbox_xyxy"]
    return ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)


# ---------------------------------------------------------------- the annotator
def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


class TemplateAnnotator:
    """Grounded captions and QA. ``annotate(tile)`` returns pair dicts; it never needs a GPU.

    Every statement is true of the tile's labels *and* of what its pixels can show (``visibility``): classes
    too small to resolve at the tile's GSD are never named, classes with objects too small to see are
    named but not counted, and absence is asserted only of classes that are resolvable, unlabelled and not
    implied by land cover (see :mod:`sarlang_ray.annotate.visibility`)."""

    name = "template"

    def __init__(
        self,
        seed: int = 0,
        identification_pairs: int = 2,
        max_per_family: int = 3,
        visibility: Visibility | None = None,
    ):
        self.seed, self.identification_pairs, self.max_per_family = seed, identification_pairs, max_per_family
        self.visibility = visibility or Visibility()

    def annotate(self, tile: LabelledTile) -> list[dict]:
        rng = random.Random(f"{self.seed}:{tile['tile_id']}")
        size = tile["width"]
        view = self.visibility.view(tile, CLASSES)
        landcover = dict(tile.get("landcover") or [])
        pairs = [self._concise(rng, view, landcover), self._detailed(rng, tile, view, landcover, size)]
        pairs += self._vqa(rng, view, landcover, size)
        return pairs

    # captions -------------------------------------------------------------
    @staticmethod
    def _pair(kind, application, qtype, question, answer) -> dict:
        return {
            "kind": kind,
            "application": application,
            "question_type": qtype,
            "question": question,
            "answer": answer,
        }

    @staticmethod
    def _thing(view: TileView, cls: str) -> str:
        """ "three ships" for a countable class, "roads" for one with objects too small to count."""
        return count_phrase(cls, view.counts[cls]) if cls in view.countable else plural(cls)

    def _concise(self, rng, view: TileView, landcover) -> dict:
        lc = max(landcover, key=landcover.get) if landcover else None
        where = LANDCOVER_PHRASES.get(lc, "the scene") if lc else "the scene"
        # uncounted classes first: "roads and two ships", never "two ships and roads" (a count for roads)
        top = sorted((c for c, _ in view.counts.most_common(2)), key=lambda c: c in view.countable)
        if not top:
            variants = [
                f"A SAR image of {where}.",
                f"SAR view of {where} without labelled objects.",
                f"{where[0].upper() + where[1:]} seen by radar.",
            ]
            text = rng.choice(variants)
            # absence of what may be there: not said
            if text == variants[1] and (view.implied or view.hidden):
                text = variants[0]
        else:
            things = " and ".join(self._thing(view, c) for c in top)
            text = rng.choice(
                [
                    f"A SAR image of {things} in {where}.",
                    f"{things[0].upper() + things[1:]} in {where}.",
                    f"Radar view of {where} with {things}.",
                ]
            )
        return self._pair(
            "caption_concise", "image description", "caption/concise", prompts.CAPTION_CONCISE, text
        )

    def _detailed(self, rng, tile, view: TileView, landcover, size) -> dict:
        parts = []
        if landcover:
            ranked = sorted(landcover.items(), key=lambda kv: -kv[1])
            word = lambda name: LANDCOVER_WORDS.get(name, name)
            lc_text = f"{word(ranked[0][0])} ({ranked[0][1]:.0%})"
            if len(ranked) > 1 and ranked[1][1] >= 0.1:
                lc_text += f" and {word(ranked[1][0])} ({ranked[1][1]:.0%})"
            parts.append(f"This SAR image at {tile['gsd_m']:g} m resolution is mostly {lc_text}.")
        else:
            parts.append(f"This SAR image has a ground resolution of {tile['gsd_m']:g} m.")
        counted = [c for c, _ in view.counts.most_common() if c in view.countable]
        uncounted = [c for c, _ in view.counts.most_common() if c not in view.countable]
        if counted:
            parts.append(f"It contains {_join([count_phrase(c, view.counts[c]) for c in counted])}.")
        if uncounted:
            also = "are also visible" if counted else "are visible"
            parts.append(
                f"{_join([plural(c) for c in uncounted]).capitalize()} {also}, some of them too small to "
                "count."
            )
        # what the image shows, no claim about unlabelled objects
        for lc_class in sorted(set(view.implied.values())):
            plain = LANDCOVER_PHRASES.get(lc_class, lc_class)
            if landcover.get(lc_class, 0.0) >= 0.5:
                parts.append(f"Most of it is {DENSE_PHRASES.get(lc_class, plain)}.")
            else:
                parts.append(f"Part of it is {plain}.")
        if not view.counts and not view.implied:
            parts.append(
                "No labelled objects are visible."
                if not view.hidden
                else f"No labelled object is large enough to be seen at {tile['gsd_m']:g} m."
            )
        for cls in counted[:3]:
            n = view.counts[cls]
            places = sorted(
                {position_of(o["bbox_xyxy"], size) for o in view.seen if o["class"] == cls},
                key=POSITIONS.index,
            )
            where = (
                f"in the {' and '.join(places)} of the image" if len(places) <= 3 else "spread over the image"
            )
            parts.append(f"The {plural(cls, n)} {'is' if n == 1 else 'are'} {where}.")
            if n >= 3:
                pattern = pattern_of([_centre(o) for o in view.seen if o["class"] == cls], size)
                parts.append(f"The {plural(cls)} {PATTERN_SENTENCE[pattern]}.")
        return self._pair(
            "caption_detailed",
            "image description",
            "caption/detailed",
            prompts.CAPTION_DETAILED,
            " ".join(parts),
        )

    # VQA ------------------------------------------------------------------
    def _vqa(self, rng, view: TileView, landcover, size) -> list[dict]:
        """Questions the pixels can answer: positives about seen objects, counts only of countable classes,
        negatives only about classes whose absence is assertable (``view.askable_absent``)."""
        out = []
        objects, counts = view.seen, view.counts
        present = sorted(counts)
        countable = sorted(view.countable)
        absent = list(view.askable_absent)
        add = lambda app, fam, i, q, a, *classes: out.append(
            self._pair("vqa", app, "/".join([fam, f"t{i}", *classes]), q, a)
        )

        def pick(templates):
            i = rng.randrange(len(templates))
            return i, templates[i]

        # identification: as many yes as no, negatives from classes whose absence the pixels can show
        k = min(self.identification_pairs, len(present), len(absent))
        for cls, ans in [(c, "yes") for c in rng.sample(present, k)] + [
            (c, "no") for c in rng.sample(absent, k)
        ]:
            i, t = pick(IDENTIFICATION)
            add("object identification", "identification", i, t.format(c=cls, cs=plural(cls)), ans, cls)
        # counting (plus one absent class: 0)
        for cls in rng.sample(countable, min(self.max_per_family, len(countable))) + rng.sample(
            absent, min(1, len(absent))
        ):
            i, t = pick(COUNTING)
            add("instance counting", "counting", i, t.format(cs=plural(cls)), str(counts.get(cls, 0)), cls)
        # classification: exactly one option present
        if present and len(absent) >= 2:
            cls = rng.choice(present)
            opts = rng.sample(absent, 2) + [cls]
            rng.shuffle(opts)
            i, t = pick(CLASSIFICATION)
            add(
                "object classification",
                "classification",
                i,
                t.format(opts=", ".join(opts[:-1]) + " or " + opts[-1]),
                cls,
            )
        # region referring: box -> class, seen objects only
        for o in rng.sample(objects, min(self.max_per_family, len(objects))):
            i, t = pick(REGION)
            add("region referring", "region", i, t.format(b=box_text(o["bbox_xyxy"], size)), o["class"])
        # positioning: single instances -> where; yes/no at a position (classes with no hidden instance)
        singles = [c for c in countable if counts[c] == 1]
        for cls in rng.sample(singles, min(self.max_per_family, len(singles))):
            o = next(o for o in objects if o["class"] == cls)
            i, t = pick(POSITIONING)
            add(
                "object positioning",
                "positioning",
                i,
                t.format(c=cls),
                position_of(o["bbox_xyxy"], size),
                cls,
            )
        if countable:
            cls = rng.choice(countable)
            where = {position_of(o["bbox_xyxy"], size) for o in objects if o["class"] == cls}
            p = rng.choice(POSITIONS)
            i, t = pick(POSITION_YESNO)
            add(
                "object positioning",
                "position_yesno",
                i,
                t.format(c=cls, p=p),
                "yes" if p in where else "no",
                cls,
                p,
            )
        # others: shape and direction of single instances, pattern of groups, land cover, reasoning
        for cls in rng.sample(singles, min(2, len(singles))):
            o = next(o for o in objects if o["class"] == cls)
            shape = shape_of(o["polygon"])
            i, t = pick(SHAPE)
            add("others", "shape", i, t.format(c=cls), shape, cls)
            if shape == "elongated" and o["visible_fraction"] >= 0.999:
                i, t = pick(DIRECTION)
                add("others", "direction", i, t.format(c=cls), direction_of(o["angle_deg"]), cls)
        groups = [c for c in countable if counts[c] >= 3]
        for cls in rng.sample(groups, min(2, len(groups))):
            i, t = pick(PATTERN)
            add(
                "others",
                "pattern",
                i,
                t.format(cs=plural(cls)),
                pattern_of([_centre(o) for o in objects if o["class"] == cls], size),
                cls,
            )
        if landcover:
            i, t = pick(LANDCOVER)
            add("others", "landcover", i, t, max(landcover, key=landcover.get))
            i, t = pick(WATER)
            add("others", "water", i, t, "yes" if landcover.get("water", 0) >= 0.05 else "no")
        if countable:
            a = rng.choice(countable)
            others = [c for c in countable + absent if c != a]
            if others:
                b = rng.choice(sorted(others))
                i, t = pick(REASONING)
                na, nb = counts.get(a, 0), counts.get(b, 0)
                answer = [na > nb, na < nb, na > nb, na > nb, na > nb, na == nb][i]
                add(
                    "others",
                    "reasoning",
                    i,
                    t.format(**{"as": plural(a), "bs": plural(b)}),
                    "yes" if answer else "no",
                    a,
                    b,
                )
            if len(countable) >= 2:
                a, b = sorted(rng.sample(countable, 2))
                i, t = pick(TOTAL)
                add(
                    "others",
                    "total",
                    i,
                    t.format(**{"as": plural(a), "bs": plural(b)}),
                    str(counts[a] + counts[b]),
                    a,
                    b,
                )
        return out
