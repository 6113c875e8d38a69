"""Box answers everywhere: our own positioning / region pairs whose answer is a box are scored by IoU like
SARChat-Bench's, in `sarlang evaluate` and in a harness's predictions (`sarlang score-bench`); a box in the
question only (region referring: box -> class) stays a text answer. Expected values from shapely."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from shapely.geometry import box as shapely_box

from sarlang_ray import boxes, evaluate, harness

W, H = 256, 256


def _iou(a, b) -> float:
    return shapely_box(*a).intersection(shapely_box(*b)).area / shapely_box(*a).union(shapely_box(*b)).area


def _pairs():
    """Our export's rows: positioning answers as pixel boxes, a region question (box in the question) ->
    class."""
    truth = (40, 60, 120, 140)
    rows = [
        (
            "p0",
            "object positioning",
            "Where is the ship? Give its box.",
            "[40, 60, 120, 140]",
            "[44, 58, 124, 150]",
        ),
        (
            "p1",
            "object positioning",
            "Where is the ship? Give its box.",
            "[40, 60, 120, 140]",
            "[90, 100, 200, 220]",
        ),
        (
            "p2",
            "object positioning",
            "Where is the ship? Give its box.",
            "[40, 60, 120, 140]",
            "<box>[[156, 234, 469, 547]]</box>",
        ),
        (
            "p3",
            "object positioning",
            "Where is the ship? Give its box.",
            "[40, 60, 120, 140]",
            "[200, 200, 300, 300]",
        ),
        ("r0", "region referring", "What is the object in region [156, 234, 469, 547]?", "ship", "ship"),
        (
            "r1",
            "region referring",
            "What is the object in region [156, 234, 469, 547]?",
            "ship",
            "[40, 60, 120, 140]",
        ),
    ]
    pairs = [
        {
            "pair_id": p,
            "tile_id": "t",
            "kind": "vqa",
            "application": a,
            "question_type": a.split()[-1],
            "question": q,
            "answer": t,
        }
        for p, a, q, t, _ in rows
    ]
    meant = {
        "p0": (44, 58, 124, 150),
        "p1": (90, 100, 200, 220),
        "p2": (156 * W / 1000, 234 * H / 1000, 469 * W / 1000, 547 * H / 1000),
    }
    expect = {p: _iou(m, truth) >= 0.5 for p, m in meant.items()} | {"p3": False, "r0": True, "r1": False}
    return pairs, {p: pred for p, *_, pred in rows}, expect


def test_our_box_answers_are_scored_by_iou_in_strict_and_by_substring_in_sarlang1m():
    pairs, preds, expect = _pairs()
    assert [boxes.is_box_answer(p["answer"]) for p in pairs] == [True] * 4 + [False] * 2
    out = evaluate.score(pairs, preds, {}, None, {"sizes": {p["pair_id"]: (W, H) for p in pairs[:4]}})
    assert out["vqa_strict_per_application"]["object positioning"] == pytest.approx(
        sum(expect[p] for p in ("p0", "p1", "p2", "p3")) / 4
    )
    assert out["vqa_strict_per_application"]["region referring"] == 0.5
    assert out["box_pairs"] == 4 and out["box_failures"] == {
        "outside": 1,
        "iou": sum(not expect[p] for p in ("p0", "p1", "p2")),
    }
    # the published SARLANG-1M rule is a substring test, box or not: no prediction holds the truth box's text
    assert out["vqa_sarlang1m_per_application"]["object positioning"] == 0.0
    with pytest.raises(ValueError, match="image size is unknown"):
        evaluate.score(pairs, preds, {}, None, {})


def test_a_harness_prediction_file_scores_box_answers_by_iou(tmp_path):
    """`sarlang score-bench` on a VLMEvalKit prediction file with the exported TSV's task and box_size
    columns."""
    pairs, preds, expect = _pairs()
    rows = [
        {
            "index": i,
            "pair_id": p["pair_id"],
            "tile_id": "t",
            "kind": "vqa",
            "answer": p["answer"],
            "category": p["application"],
            "l2-category": p["question_type"],
            "raw_question": p["question"],
            "references": json.dumps([p["answer"]]),
            "task": "referring" if p["pair_id"].startswith("p") else "",
            "box_size": json.dumps([W, H]) if p["pair_id"].startswith("p") else "",
            "prediction": preds[p["pair_id"]],
        }
        for i, p in enumerate(pairs)
    ]
    path = tmp_path / "model_sarlang.tsv"
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    out = harness.score_predictions(str(path))
    box = ("p0", "p1", "p2", "p3")
    assert out["sarchat"]["referring"] == pytest.approx(sum(expect[p] for p in box) / 4)
    assert out["vqa_strict"] == pytest.approx(sum(expect.values()) / len(expect))
