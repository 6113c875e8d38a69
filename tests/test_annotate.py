"""The template annotator's answers are checkably true of the labels and of what the pixels can show; QC
catches planted errors; failures are contained."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest

from sarlang_ray import pipeline
from sarlang_ray.annotate.qc import apply_qc, check_text
from sarlang_ray.annotate.template import (
    TemplateAnnotator,
    direction_of,
    pattern_of,
    question_type_space,
    shape_of,
)
from sarlang_ray.annotate.vocab import APPLICATIONS, CLASS_WORDS
from sarlang_ray.config import QCSection
from sarlang_ray.stages import annotate as annotate_stage


@pytest.fixture(scope="module")
def annotated(demo_run):
    cfg, summary = demo_run
    tiles = {
        t["tile_id"]: t
        for t in pipeline.read_tiles(
            cfg.run.run_dir, columns=["tile_id", "gsd_m", "width", "objects", "landcover"]
        ).to_pylist()
    }
    pairs = pipeline.read_annotations(cfg.run.run_dir).to_pylist()
    return cfg, summary, tiles, pairs


def _cell(box, size):
    """The 3 x 3 cell of a box centre, computed here independently of the annotator."""
    names = [
        ["top left", "top", "top right"],
        ["left", "center", "right"],
        ["bottom left", "bottom", "bottom right"],
    ]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return names[min(2, int(cy * 3 // size))][min(2, int(cx * 3 // size))]


def _number(n: int) -> str:
    words = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
    ]
    return words[n] if n < len(words) else str(n)


# the documented defaults, restated here (not read from the code under test): metres of a typical instance,
# pixels it must span
SIZE_M = {
    "ship": 40,
    "aircraft": 35,
    "car": 4.5,
    "storage tank": 20,
    "bridge": 40,
    "harbour": 200,
    "building": 20,
    "road": 100,
}
MIN_PX = {
    "ship": 3,
    "aircraft": 6,
    "car": 4,
    "storage tank": 4,
    "bridge": 3,
    "harbour": 5,
    "building": 4,
    "road": 5,
}


def _extent_px(obj) -> float:
    """Largest distance between two vertices of the object's pixel polygon (brute force over all pairs)."""
    import numpy as np
    import shapely

    pts = shapely.get_coordinates(shapely.from_wkb(obj["polygon"]))
    return float(np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)).max())


def _visible(tile) -> tuple[Counter, Counter, set]:
    """Per class: labelled objects, objects the pixels can show; and the classes resolvable at the tile's
    GSD."""
    resolvable = {c for c in SIZE_M if SIZE_M[c] / tile["gsd_m"] >= MIN_PX[c]}
    labelled = Counter(o["class"] for o in tile["objects"])
    seen = Counter(
        o["class"]
        for o in tile["objects"]
        if o["class"] in resolvable and _extent_px(o) >= MIN_PX[o["class"]]
    )
    return labelled, seen, resolvable


def _names(text: str) -> set[str]:
    """Classes a text names (singular or plural, any synonym), by plain word search."""
    words = {w for w in re.findall(r"[a-z]+(?: tanks?)?", text.lower())}
    return {c for c, (pl, syns) in CLASS_WORDS.items() if words & set(syns)}


def test_every_application_is_covered_and_identification_is_balanced(annotated):
    _, summary, _, pairs = annotated
    apps = Counter(p["application"] for p in pairs if p["qc_passed"])
    assert set(apps) == set(APPLICATIONS)
    ident = [p["answer"] for p in pairs if p["question_type"].startswith("identification/")]
    assert 0.4 <= ident.count("yes") / len(ident) <= 0.6
    assert (
        summary["stages"]["annotate"]["planned"]
        == summary["stages"]["annotate"]["written"] + summary["stages"]["annotate"]["rejected"]
    )


def test_question_type_space_exceeds_one_thousand(annotated):
    assert len(question_type_space()) >= 1000
    _, _, _, pairs = annotated
    assert {p["question_type"] for p in pairs if p["kind"] == "vqa"} <= question_type_space()


def test_every_template_answer_is_true(annotated):
    _, _, tiles, pairs = annotated
    checked = Counter()
    for p in pairs:
        tile = tiles[p["tile_id"]]
        objs, size = tile["objects"], tile["width"]
        counts = Counter(o["class"] for o in objs)
        fam, *rest = p["question_type"].split("/")
        classes = rest[1:]
        a = p["answer"]
        if fam == "identification":
            assert a == ("yes" if counts[classes[0]] else "no")
        elif fam == "counting":
            assert int(a) == counts[classes[0]]
        elif fam == "total":
            assert int(a) == counts[classes[0]] + counts[classes[1]]
        elif fam == "positioning":
            (o,) = [o for o in objs if o["class"] == classes[0]]
            assert a == _cell(o["bbox_xyxy"], size)
        elif fam == "position_yesno":
            cells = {_cell(o["bbox_xyxy"], size) for o in objs if o["class"] == classes[0]}
            assert a == ("yes" if classes[1] in cells else "no")
        elif fam == "region":
            box = [int(v) for v in re.search(r"\[(\d+), (\d+), (\d+), (\d+)\]", p["question"]).groups()]
            match = [o for o in objs if [round(v / size * 1000) for v in o["bbox_xyxy"]] == box]
            assert match and a in {o["class"] for o in match}
        elif fam == "classification":
            listed = re.search(r": (.*?)[?.]$", p["question"]) or re.search(
                r"^Among (.*?), which", p["question"]
            )
            options = re.split(r", | or ", listed.group(1))
            assert counts[a] > 0 and all(counts[o] == 0 for o in options if o != a)
        elif fam == "reasoning":
            na, nb = counts[classes[0]], counts[classes[1]]
            q = p["question"]
            truth = na == nb if "as many" in q else (na < nb if "fewer" in q else na > nb)
            assert a == ("yes" if truth else "no"), q
        elif fam == "water":
            assert a == ("yes" if dict(tile["landcover"]).get("water", 0) >= 0.05 else "no")
        elif fam == "landcover":
            lc = dict(tile["landcover"])
            assert lc[a] == max(lc.values())
        elif p["kind"] == "caption_detailed" and counts:
            labelled, seen, _ = _visible(tile)
            listed = re.search(r"It contains (.*?)\.", a)
            for cls, n in labelled.items():
                # every object visible: the class with its true count, as words up to twelve
                if seen[cls] == n:
                    assert f"{_number(n)} {CLASS_WORDS[cls][0] if n != 1 else cls}" in listed.group(1), (
                        cls,
                        n,
                        a,
                    )
                elif seen[cls]:  # some too small to see: named, not counted
                    assert cls in _names(a) and not re.search(rf"\d+ {CLASS_WORDS[cls][0]}", a), (cls, a)
                else:  # none visible: not named at all
                    assert cls not in _names(a), (cls, a)
        checked[fam] += 1
    for fam in (
        "identification",
        "counting",
        "positioning",
        "region",
        "classification",
        "reasoning",
        "landcover",
        "caption",
    ):
        assert checked[fam] >= 5, checked


def test_geometry_facts():
    from shapely.geometry import Point, box

    assert shape_of(Point(0, 0).buffer(10, 64).wkb) == "circular"
    assert shape_of(box(0, 0, 40, 8).wkb) == "elongated"
    assert shape_of(box(0, 0, 20, 14).wkb) == "rectangular"
    assert (
        direction_of(0) == "east-west"
        and direction_of(90) == "north-south"
        and direction_of(45) == "northeast-southwest"
    )
    assert pattern_of([(10, 50), (60, 50), (110, 50), (160, 50)], 256) == "in a row"
    assert pattern_of([(x, y) for x in (20, 80, 140) for y in (30, 120)], 256) == "in a grid"
    assert pattern_of([(100, 100), (104, 98), (99, 107), (108, 103)], 256) == "clustered"
    assert pattern_of([(10, 200), (120, 30), (240, 140), (60, 90)], 256) == "scattered"


@pytest.mark.parametrize(
    "text, rule, repaired",
    [
        (
            "Three red ships moored along the harbour quay.",
            "colour",
            "Three ships moored along the harbour quay.",
        ),
        (
            "Five ships moored along the harbour quay today.",
            "count",
            "Three ships moored along the harbour quay today.",
        ),
        ("Three ships and two airplanes at the harbour.", "hallucination", None),
        ("Some objects.", "vague", None),
    ],
)
def test_qc_catches_each_planted_error(text, rule, repaired):
    counts = Counter({"ship": 3, "harbour": 1})
    out, hits = check_text(text, "caption_concise", counts, QCSection())
    assert rule in hits and out == repaired


def test_qc_reject_modes_and_duplicates():
    counts = Counter({"ship": 3})
    out, hits = check_text(
        "Five ships on the open sea.", "caption_concise", counts, QCSection(count="reject")
    )
    assert out is None and hits == ["count"]
    out, hits = check_text(
        "Three green ships on the sea.", "caption_concise", counts, QCSection(colour="reject")
    )
    assert out is None and hits == ["colour"]
    objs = [{"class": "ship"}] * 3
    pairs = [
        {"kind": "vqa", "question": "How many ships?", "answer": "3"},
        {"kind": "vqa", "question": "how many ships", "answer": "3"},
    ]
    qc = apply_qc(pairs, objs, QCSection())
    assert [p["qc_passed"] for p in qc] == [True, False] and qc[1]["qc_reasons"] == ["duplicate"]
    near = [
        {
            "kind": "caption_concise",
            "question": "q",
            "answer": "Three ships moored at the long harbour quay today.",
        },
        {
            "kind": "caption_concise",
            "question": "q",
            "answer": "Three ships moored at the long harbour quay, today!",
        },
        {
            "kind": "caption_concise",
            "question": "q",
            "answer": "An urban area with three ships and one harbour.",
        },
    ]
    qc = apply_qc(near, objs + [{"class": "harbour"}], QCSection())
    assert [p["qc_passed"] for p in qc] == [True, False, True]


def test_template_captions_pass_their_own_qc(annotated):
    _, _, _, pairs = annotated
    captions = [p for p in pairs if p["kind"] != "vqa"]
    assert captions and all(p["qc_passed"] for p in captions), [p for p in captions if not p["qc_passed"]][:3]


def test_failing_backend_loses_only_its_tiles(demo_run, tmp_path):
    """Exceptions and malformed output go to the errors table; the other tiles are annotated."""
    import shutil

    from sarlang_ray.config import load_config

    cfg, _ = demo_run
    run_dir = tmp_path / "flaky"
    shutil.copytree(cfg.run.run_dir, run_dir, ignore=shutil.ignore_patterns("annotate", "archive"))
    flaky = load_config(
        None,
        [f"run.run_dir={run_dir}", "annotate.backend=annotate_backends:FlakyBackend", "ray.progress=false"],
    )
    counts = annotate_stage.run(flaky)
    errors = [e for e in pipeline.read_errors(str(run_dir)).to_pylist() if e["stage"] == "annotate"]
    classes = Counter(e["error_class"] for e in errors)
    assert classes["backend_error"] > 0 and classes["malformed_output"] > 0
    assert all("HTTP 500" in e["message"] for e in errors if e["error_class"] == "backend_error")
    assert counts["planned"] == counts["written"] + counts["rejected"] and counts["written"] > 0
    assert counts["rejected"] == len(errors)
    annotated_tiles = set(pipeline.read_annotations(str(run_dir), columns=["tile_id"])["tile_id"].to_pylist())
    assert not annotated_tiles & {e["item"] for e in errors}


def test_no_question_about_a_class_below_its_resolvable_size(annotated):
    """A class is only asked about or named at a GSD where a typical instance spans its minimum pixels; the
    objects a question points at (region boxes, single instances) span them too. The demo holds such
    classes (cars at 2-10 m, aircraft, storage tanks and buildings at 10 m), so the test is not empty."""
    _, _, tiles, pairs = annotated
    unseen_labels = sum(_visible(t)[0][c] - _visible(t)[1][c] for t in tiles.values() for c in _visible(t)[0])
    assert unseen_labels > 100, unseen_labels
    by_tile: dict[str, list] = {}
    for p in pairs:
        by_tile.setdefault(p["tile_id"], []).append(p)
    asked = Counter()
    for tid, tile_pairs in by_tile.items():
        tile = tiles[tid]
        labelled, seen, resolvable = _visible(tile)
        for p in tile_pairs:
            fam, *rest = p["question_type"].split("/")
            named = set(rest[1:]) & set(CLASS_WORDS) | _names(p["question"] + " " + p["answer"])
            if fam == "landcover":  # its answers are land-cover names ("road" = paved surface), not objects
                named = set()
            assert named <= resolvable, (tile["gsd_m"], named - resolvable, p["question"], p["answer"])
            asked.update((c, tile["gsd_m"]) for c in named)
            if fam == "region":  # the box is a seen object's: its diagonal spans at least the class minimum
                x0, y0, x1, y1 = (
                    int(v) for v in re.search(r"\[(\d+), (\d+), (\d+), (\d+)\]", p["question"]).groups()
                )
                assert math.hypot(x1 - x0, y1 - y0) * tile["width"] / 1000 + 1 >= MIN_PX[p["answer"]], p[
                    "question"
                ]
            if fam in ("counting", "total", "positioning", "position_yesno", "pattern", "reasoning"):
                # counts and places only where every object is seen
                for cls in set(rest[1:]) & set(CLASS_WORDS):
                    assert seen[cls] == labelled[cls], (fam, cls, labelled[cls], seen[cls])
    assert asked[("car", 1.0)] and asked[("ship", 10.0)] and not asked[("car", 10.0)], asked


def test_absence_is_never_asserted_where_land_cover_implies_the_class(annotated):
    """Built-up land without a building label (the port and airport of the demo: 38 of 76 tiles are > 50 %
    built-up without one): no pair says there is no building, and the caption says what the image shows."""
    _, _, tiles, pairs = annotated
    implied = {
        tid
        for tid, t in tiles.items()
        if dict(t["landcover"]).get("built-up", 0) >= 0.1
        and not any(o["class"] == "building" for o in t["objects"])
    }
    assert len(implied) >= 38
    for p in pairs:
        if p["tile_id"] not in implied:
            continue
        _, *rest = p["question_type"].split("/")
        # neither asked nor offered
        assert "building" not in set(rest[1:]) | _names(p["question"]), p["question"]
        assert "without labelled objects" not in p["answer"] and "No labelled object" not in p["answer"], p[
            "answer"
        ]
        if p["kind"] == "caption_detailed" and dict(tiles[p["tile_id"]]["landcover"])["built-up"] >= 0.5:
            assert "Most of it is a dense built-up area." in p["answer"], p["answer"]


def test_resolvability_follows_the_config(annotated):
    """annotate.min_size_px per class: ships made unresolvable everywhere vanish from every pair."""
    from sarlang_ray.annotate.visibility import Visibility
    from sarlang_ray.config import load_config

    _, _, tiles, _ = annotated
    a = load_config(None, ["annotate.min_size_px.ship=1000"]).annotate
    annotator = TemplateAnnotator(visibility=Visibility.from_config(a))
    with_ships = [t for t in tiles.values() if any(o["class"] == "ship" for o in t["objects"])]
    assert with_ships
    for t in with_ships:
        for p in annotator.annotate(t):
            assert "ship" not in _names(p["question"] + " " + p["answer"]), p
    with pytest.raises(ValueError, match="annotate.min_size_px.boat names an unknown class"):
        load_config(None, ["annotate.min_size_px.boat=3"])
    with pytest.raises(ValueError, match="annotate.class_size_m.car must be > 0"):
        load_config(None, ["annotate.class_size_m.car=0"])
