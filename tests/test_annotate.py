"""The template annotator's answers are checkably true; QC catches planted errors; failures are contained."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from sarlang_ray import pipeline
from sarlang_ray.stages import annotate as annotate_stage
from sarlang_ray.annotate.qc import apply_qc, check_text
from sarlang_ray.annotate.template import (
    TemplateAnnotator, direction_of, pattern_of, question_type_space, shape_of,
)
from sarlang_ray.annotate.vocab import APPLICATIONS, CLASS_WORDS
from sarlang_ray.config import QCSection


@pytest.fixture(scope="module")
def annotated(demo_run):
    cfg, summary = demo_run
    tiles = {t["tile_id"]: t for t in pipeline.read_tiles(cfg.run.run_dir, columns=["tile_id", "width", "objects", "landcover"]).to_pylist()}
    pairs = pipeline.read_annotations(cfg.run.run_dir).to_pylist()
    return cfg, summary, tiles, pairs


def _cell(box, size):
    """The 3 x 3 cell of a box centre, computed here independently of the annotator."""
    names = [["top left", "top", "top right"], ["left", "center", "right"], ["bottom left", "bottom", "bottom right"]]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return names[min(2, int(cy * 3 // size))][min(2, int(cx * 3 // size))]


def _number(n: int) -> str:
    words = "zero one two three four five six seven eight nine ten eleven twelve".split()
    return words[n] if n < len(words) else str(n)


def test_every_application_is_covered_and_identification_is_balanced(annotated):
    _, summary, _, pairs = annotated
    apps = Counter(p["application"] for p in pairs if p["qc_passed"])
    assert set(apps) == set(APPLICATIONS)
    ident = [p["answer"] for p in pairs if p["question_type"].startswith("identification/")]
    assert 0.4 <= ident.count("yes") / len(ident) <= 0.6
    assert summary["stages"]["annotate"]["planned"] == summary["stages"]["annotate"]["written"] + summary["stages"]["annotate"]["rejected"]


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
            listed = re.search(r": (.*?)[?.]$", p["question"]) or re.search(r"^Among (.*?), which", p["question"])
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
            listed = re.search(r"It contains (.*?)\.", a).group(1)
            for cls, n in counts.items():  # every class with its true count, as words up to twelve
                assert f"{_number(n)} {CLASS_WORDS[cls][0] if n != 1 else cls}" in listed, (cls, n, listed)
        checked[fam] += 1
    for fam in ("identification", "counting", "positioning", "region", "classification", "reasoning", "landcover", "caption"):
        assert checked[fam] >= 5, checked


def test_geometry_facts():
    from shapely.geometry import Point, box

    assert shape_of(Point(0, 0).buffer(10, 64).wkb) == "circular"
    assert shape_of(box(0, 0, 40, 8).wkb) == "elongated"
    assert shape_of(box(0, 0, 20, 14).wkb) == "rectangular"
    assert direction_of(0) == "east-west" and direction_of(90) == "north-south" and direction_of(45) == "northeast-southwest"
    assert pattern_of([(10, 50), (60, 50), (110, 50), (160, 50)], 256) == "in a row"
    assert pattern_of([(x, y) for x in (20, 80, 140) for y in (30, 120)], 256) == "in a grid"
    assert pattern_of([(100, 100), (104, 98), (99, 107), (108, 103)], 256) == "clustered"
    assert pattern_of([(10, 200), (120, 30), (240, 140), (60, 90)], 256) == "scattered"


@pytest.mark.parametrize("text, rule, repaired", [
    ("Three red ships moored along the harbour quay.", "colour", "Three ships moored along the harbour quay."),
    ("Five ships moored along the harbour quay today.", "count", "Three ships moored along the harbour quay today."),
    ("Three ships and two airplanes at the harbour.", "hallucination", None),
    ("Some objects.", "vague", None),
])
def test_qc_catches_each_planted_error(text, rule, repaired):
    counts = Counter({"ship": 3, "harbour": 1})
    out, hits = check_text(text, "caption_concise", counts, QCSection())
    assert rule in hits and out == repaired


def test_qc_reject_modes_and_duplicates():
    counts = Counter({"ship": 3})
    out, hits = check_text("Five ships on the open sea.", "caption_concise", counts, QCSection(count="reject"))
    assert out is None and hits == ["count"]
    out, hits = check_text("Three green ships on the sea.", "caption_concise", counts, QCSection(colour="reject"))
    assert out is None and hits == ["colour"]
    objs = [{"class": "ship"}] * 3
    pairs = [{"kind": "vqa", "question": "How many ships?", "answer": "3"}, {"kind": "vqa", "question": "how many ships", "answer": "3"}]
    qc = apply_qc(pairs, objs, QCSection())
    assert [p["qc_passed"] for p in qc] == [True, False] and qc[1]["qc_reasons"] == ["duplicate"]
    near = [{"kind": "caption_concise", "question": "q", "answer": "Three ships moored at the long harbour quay today."},
            {"kind": "caption_concise", "question": "q", "answer": "Three ships moored at the long harbour quay, today!"},
            {"kind": "caption_concise", "question": "q", "answer": "An urban area with three ships and one harbour."}]
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
    flaky = load_config(None, [f"run.run_dir={run_dir}", "annotate.backend=annotate_backends:FlakyBackend", "ray.progress=false"])
    counts = annotate_stage.run(flaky)
    errors = [e for e in pipeline.read_errors(str(run_dir)).to_pylist() if e["stage"] == "annotate"]
    classes = Counter(e["error_class"] for e in errors)
    assert classes["backend_error"] > 0 and classes["malformed_output"] > 0
    assert all("HTTP 500" in e["message"] for e in errors if e["error_class"] == "backend_error")
    assert counts["planned"] == counts["written"] + counts["rejected"] and counts["written"] > 0
    assert counts["rejected"] == len(errors)
    annotated_tiles = set(pipeline.read_annotations(str(run_dir), columns=["tile_id"])["tile_id"].to_pylist())
    assert not annotated_tiles & {e["item"] for e in errors}
