"""SARChat-Bench-2M, as published and scored the way its authors score it.

The small release here is built in its published layout (github.com/JimmyMa99/SARChat: one ms-swift JSON per
task and split, ``SARChat_<task>_<split>.json`` as its ``infer/swift-eval.py`` lists them; records of
``messages`` + ``images``; the README's six tasks; the training set as one mixed file, here in ms-swift's
``query``/``response`` form), with several box conventions in the answers and some malformed records. Expected
values come from the test's own bookkeeping and from shapely, never from the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import box as shapely_box

from sarlang_ray import boxes, evaluate, release

# the release's file task names -> the README's six tasks (the layout's own labels)
FILE_TASKS = {
    "classify": "classification",
    "describe": "description",
    "classify_count": "counting",
    "classify_grounding_single": "grounding",
    "classify_grounding_multi": "grounding",
    "classify_identify_single": "identification",
    "classify_identify_multi": "identification",
    "classify_refer_single": "referring",
    "classify_refer_multi": "referring",
}
TAGS = {
    "classification": "cls",
    "description": "describe",
    "counting": "count",
    "grounding": "grounding",
    "identification": "identify",
    "referring": "refer",
}
SIZES = [(512, 512), (800, 600), (640, 480)]  # the images' (width, height)


def _png(path: Path, seed: int, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _question(task: str, i: int) -> tuple[str, str]:
    """(question, answer) of record i of a task, answers in the release's forms (boxes in pixels,
    {<x1><y1><x2><y2>})."""
    w, h = SIZES[i % 3]
    b = (40 + 10 * i, 30 + 5 * i, min(w - 1, 200 + 10 * i), min(h - 1, 180 + 7 * i))
    one = "{{<{}><{}><{}><{}>}}".format(*b)
    return {
        "classification": (
            "What is the category of the target in this SAR image?",
            ["ship", "aircraft", "car"][i % 3],
        ),
        "description": (
            "Describe the image in detail.",
            f"There are {i + 1} ships moored in a harbour near the coast.",
        ),
        "counting": ("How many ships are there in the image?", str(i + 1)),
        "grounding": (f"Give the bounding box of the ship number {i}.", one),
        "identification": ("Is there an aircraft in the image?", ["yes", "no"][i % 2]),
        "referring": (
            f"Locate {i % 2 + 1} ship(s).",
            one if i % 2 == 0 else one + f" and {{<{b[0] + 150}><{b[1] + 100}><{b[2] + 150}><{b[3] + 100}>}}",
        ),
    }[task]


def build_sarchat(root: Path, n: int = 3) -> dict:
    """The release; returns the bookkeeping: every record's (file, index) -> expected task or error class."""
    for i in range(n):
        _png(root / "images" / f"{i:07d}.png", i, SIZES[i % 3])
    expected: dict[str, str] = {}  # "file#index" -> task, or "error:<class>"
    for name, task in FILE_TASKS.items():
        recs = []
        for i in range(n):
            q, a = _question(task, i)
            recs.append(
                {
                    "messages": [
                        {"role": "user", "content": f"<image>[{TAGS[task]}] {q}"},
                        {"role": "assistant", "content": a},
                    ],
                    "images": [f"images/{i:07d}.png"],
                }
            )
            expected[f"SARChat_{name}_test.json#{i}"] = task
        # malformed: no assistant turn; an image that is not there; a path leaving the release
        if name == "classify_count":
            recs.append(
                {
                    "messages": [{"role": "user", "content": "<image>[count] How many?"}],
                    "images": ["images/0000000.png"],
                }
            )
            recs.append(
                {
                    "messages": [
                        {"role": "user", "content": "<image>[count] How many?"},
                        {"role": "assistant", "content": "2"},
                    ],
                    "images": ["images/9999999.png"],
                }
            )
            recs.append(
                {
                    "messages": [
                        {"role": "user", "content": "<image>[count] How many?"},
                        {"role": "assistant", "content": "2"},
                    ],
                    "images": ["../outside.png"],
                }
            )
            expected.update(
                {
                    f"SARChat_{name}_test.json#{n}": "error:malformed_release",
                    f"SARChat_{name}_test.json#{n + 1}": "error:missing_image",
                    f"SARChat_{name}_test.json#{n + 2}": "error:unsafe_path",
                }
            )
        (root / f"SARChat_{name}_test.json").write_text(json.dumps(recs))
    # the training set: one mixed file, tasks only in the tags, ms-swift's query/response form
    train = []
    for k, task in enumerate(TAGS):
        q, a = _question(task, k % n)
        train.append(
            {"query": f"<image>[{TAGS[task]}] {q}", "response": a, "images": [f"images/{k % n:07d}.png"]}
        )
        expected[f"SARChat_total_task_train.json#{k}"] = task
    # no tag
    train.append({"query": "<image>What is this?", "response": "ship", "images": ["images/0000000.png"]})
    expected[f"SARChat_total_task_train.json#{len(TAGS)}"] = "error:unknown_task"
    (root / "SARChat_total_task_train.json").write_text(json.dumps(train))
    return expected


@pytest.fixture(scope="module")
def sarchat(tmp_path_factory):
    root = tmp_path_factory.mktemp("sarchat") / "SARChat"
    return root, build_sarchat(root)


def test_every_record_is_imported_with_its_task_or_in_the_errors_table(sarchat):
    root, expected = sarchat
    result = release.import_release(str(root))
    rows = result.table.to_pylist()
    errors = {e["item"]: e for e in result.errors.to_pylist()}
    imported: dict[str, set] = {}
    for r in rows:  # one turn per record: the row's file is "<file>#<record>"
        imported.setdefault(r["file"], set()).add(r["task"])
    for item, want in expected.items():
        if want.startswith("error:"):
            assert item in errors and errors[item]["error_class"] == want[6:], (item, errors.get(item))
            assert item not in imported
        else:
            assert imported.get(item) == {want}, (item, imported.get(item))  # the layout's own label
            assert item not in errors
    assert len(imported) + len(errors) == len(expected)
    t = result.totals
    assert t["records"] == len(expected) == t["imported"] + t["rejected"] and t["rejected"] == 4
    assert set(result.table["task"].to_pylist()) == set(release.SARCHAT_TASKS)
    described = [r for r in rows if r["task"] == "description"]
    assert described and all(r["kind"].startswith("caption_") for r in described)
    assert "unknown_task" in release.format_report(result)
    split = {r["file"].split("#")[0]: r["split"] for r in rows}
    assert split["SARChat_total_task_train.json"] == "train" and split["SARChat_classify_test.json"] == "test"


def _shapely_iou(a, b) -> float:
    pa, pb = shapely_box(*a), shapely_box(*b)
    return pa.intersection(pb).area / pa.union(pb).area


# (prediction text, the pixel boxes the test means by it or None when it must be wrong before any IoU, reason)
W, H = 800, 600
TRUTH = (100, 100, 300, 250)


def _cases():
    def n1000(b):
        return [
            round(b[0] * 1000 / W),
            round(b[1] * 1000 / H),
            round(b[2] * 1000 / W),
            round(b[3] * 1000 / H),
        ]

    near, far, half = (110, 105, 310, 260), (250, 200, 420, 380), (100, 100, 300, 160)
    q = n1000(near)
    return [
        ("[110, 105, 310, 260]", near, None),
        ("The ship is at [250, 200, 420, 380].", far, None),
        (
            "<box>[[{}, {}, {}, {}]]</box>".format(*n1000(near)),
            [v * s / 1000 for v, s in zip(n1000(near), (W, H, W, H))],
            None,
        ),
        (
            "<|box_start|>({},{}),({},{})<|box_end|>".format(*q),
            [v * s / 1000 for v, s in zip(q, (W, H, W, H))],
            None,
        ),
        ("[0.1375, 0.175, 0.3875, 0.4333]", (0.1375 * W, 0.175 * H, 0.3875 * W, 0.4333 * H), None),
        ("{<100><100><300><160>}", half, None),
        ("[700, 500, 900, 650]", None, "outside"),  # reaches outside the 800 x 600 image
        ("<box>[[900, 900, 1200, 1100]]</box>", None, "outside"),
        ("[300, 250, 100, 100]", None, "degenerate"),
        ("a ship near the top left", None, "no_box"),
        ("", None, "no_box"),
        ("[110, 105, 310, 260] [10, 10, 50, 50]", None, "count"),
    ]


def test_box_iou_scoring_equals_shapely_on_hand_made_predictions():
    truth = "{{<{}><{}><{}><{}>}}".format(*TRUTH)
    for text, meant, reason in _cases():
        ok, why, value = boxes.box_correct(text, truth, W, H)
        if meant is None:
            assert not ok and why == reason, (text, why)
            continue
        expect = _shapely_iou(meant, TRUTH)
        assert value == pytest.approx(expect, abs=1e-9), text
        assert ok == (expect >= 0.5) and (why is None) == ok, (text, expect, why)
    # two truth boxes: matched one to one whatever the order
    two = "{<100><100><300><250>} {<400><300><600><500>}"
    ok, _, value = boxes.box_correct("[405, 310, 600, 500] and [100, 100, 300, 250]", two, W, H)
    assert ok and value == pytest.approx(_shapely_iou((405, 310, 600, 500), (400, 300, 600, 500)))
    assert boxes.box_correct("[100, 100, 300, 250]", two, W, H)[1] == "count"
    # a model writing plain brackets on a 0-1000 scale is read so when told
    ok, _, value = boxes.box_correct("[125, 167, 375, 417]", truth, W, H, frame="norm1000")
    assert ok and value == pytest.approx(_shapely_iou((100, 100.2, 300, 250.2), TRUTH))


def test_score_gives_six_sarchat_columns_and_counts_box_parse_failures():
    """score() on hand-made predictions: per task the accuracy counted here by hand and shapely; the parse
    failures reported."""
    pairs, predictions, tasks, sizes, expect = [], {}, {}, {}, {}
    truth = "{{<{}><{}><{}><{}>}}".format(*TRUTH)
    for i, (text, meant, _) in enumerate(_cases()):
        for task in ("grounding", "referring"):
            pid = f"{task}-{i}"
            pairs.append(
                {
                    "pair_id": pid,
                    "tile_id": f"t{i}",
                    "kind": "vqa",
                    "application": "object positioning",
                    "question_type": "positioning",
                    "question": "Locate the ship.",
                    "answer": truth,
                }
            )
            predictions[pid], tasks[pid], sizes[pid] = text, task, (W, H)
            expect.setdefault(task, []).append(meant is not None and _shapely_iou(meant, TRUTH) >= 0.5)
    for i, (pred, ans) in enumerate([("3", "3"), ("There are 3 ships.", "3"), ("4", "3"), ("three", "3")]):
        pid = f"count-{i}"
        pairs.append(
            {
                "pair_id": pid,
                "tile_id": "c",
                "kind": "vqa",
                "application": "instance counting",
                "question_type": "counting",
                "question": "How many ships?",
                "answer": ans,
            }
        )
        predictions[pid], tasks[pid] = pred, "counting"
    for i, (pred, ans, task) in enumerate(
        [
            ("Ship.", "ship", "classification"),
            ("aircraft", "ship", "classification"),
            ("Yes, there is.", "yes", "identification"),
            ("no", "yes", "identification"),
        ]
    ):
        pid = f"{task}-x{i}"
        pairs.append(
            {
                "pair_id": pid,
                "tile_id": "c",
                "kind": "vqa",
                "application": "object classification",
                "question_type": "classification",
                "question": "What is it?",
                "answer": ans,
            }
        )
        predictions[pid], tasks[pid] = pred, task
    refs = {}
    for i, text in enumerate(["three ships in a harbour", "an airport with two runways and aircraft"]):
        pairs.append(
            {
                "pair_id": f"d{i}",
                "tile_id": f"t{i}",
                "kind": "caption_detailed",
                "application": "image description",
                "question_type": "caption/detailed",
                "question": "Describe.",
                "answer": text,
            }
        )
        predictions[f"d{i}"], tasks[f"d{i}"], refs[(f"t{i}", "caption_detailed")] = (
            text,
            "description",
            [text],
        )
    out = evaluate.score(pairs, predictions, refs, None, {"tasks": tasks, "sizes": sizes})
    sc = out["sarchat"]
    assert list(sc) == list(release.SARCHAT_TASKS)
    for task in ("grounding", "referring"):
        assert sc[task] == pytest.approx(sum(expect[task]) / len(expect[task]))
    assert (
        sc["counting"] == pytest.approx(3 / 4) and sc["classification"] == 0.5 and sc["identification"] == 0.5
    )
    # description: the caption metrics of the task's pairs (here every caption: the same as the detailed
    # set's)
    assert out["sarchat_description"]["bleu_1"] == pytest.approx(1.0) and out["sarchat_n"]["description"] == 2
    assert sc["description"] == pytest.approx(out["detailed_cider_tok"]) and sc["description"] > 0
    reasons = [r for _, m, r in _cases() if m is None]
    assert out["box_parse_failures"] == 2 * sum(r in ("no_box", "outside", "degenerate") for r in reasons)
    assert out["box_failures"]["outside"] == 2 * reasons.count("outside")
    # the strict column scores box answers by IoU too; the published sarlang1m rule keeps its substring test
    box_right = sum(expect["grounding"]) * 2
    strict_right = out["vqa_strict"] * out["n_vqa"]
    assert strict_right == pytest.approx(box_right + 3 + 1 + 1)
    md = "\n".join(evaluate.sarchat_section([{"model": "m", "image": "sar", "prompt": "p", **out}]))
    assert all(f" {t} " in md for t in release.SARCHAT_TASKS)


@pytest.mark.slow
def test_one_command_evaluates_a_model_on_sarchat(ray_session, tiny_vlm, sarchat, tmp_path, capsys):
    """`sarlang import` then `sarlang evaluate workflows/sarchat.yaml` with the tiny offline VLM: the
    leaderboard's SARChat section has the six task columns and the command exits 0; a model that cannot load
    fails its row and the command exits non-zero."""
    from conftest import REPO

    from sarlang_ray import cli

    root, expected = sarchat
    pairs = tmp_path / "pairs.parquet"
    assert cli.main(["import", str(root), str(pairs)]) == 0
    capsys.readouterr()
    common = [
        f"train.model={tiny_vlm}",
        "ray.progress=false",
        "evaluate.max_new_tokens_caption=4",
        "evaluate.max_new_tokens_answer=4",
        f"evaluate.dataset={pairs}",
    ]
    rc = cli.main(
        ["evaluate", str(REPO / "workflows" / "sarchat.yaml"), f"run.run_dir={tmp_path / 'run'}", *common]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    header = next(
        line for line in out.splitlines() if line.startswith("| model | image | prompt | classification")
    )
    assert [c.strip() for c in header.strip("|").split("|")][3:9] == [
        "classification %",
        "description (CIDEr)",
        "counting %",
        "grounding %",
        "identification %",
        "referring %",
    ]
    board = json.loads((tmp_path / "run" / "evaluate" / "leaderboard.json").read_text())
    row = board["rows"][0]
    n_test = {
        t: sum(1 for k, v in expected.items() if v == t and "_test" in k) for t in release.SARCHAT_TASKS
    }
    assert row["sarchat_n"] == {t: n for t, n in n_test.items() if t != "description"} | {"description": 3}
    assert row["box_pairs"] == n_test["grounding"] + n_test["referring"]
    assert (
        sum(row["box_failures"].get(k, 0) for k in ("no_box", "degenerate", "outside", "count", "iou"))
        + round(
            (row["sarchat"]["grounding"] * n_test["grounding"])
            + row["sarchat"]["referring"] * n_test["referring"]
        )
        == row["box_pairs"]
    )

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    rc = cli.main(
        [
            "evaluate",
            str(REPO / "workflows" / "sarchat.yaml"),
            f"run.run_dir={tmp_path / 'run2'}",
            *common,
            f"evaluate.models=[{broken}]",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 1 and "1 trial(s) failed" in captured.err


def test_the_exported_harness_task_scores_sarchat_like_sarlang_evaluate(sarchat, tmp_path):
    """export-bench's samples carry each pair's task and (box pairs) image size: the lmms-eval aggregation of
    perfect predictions gives 100 % on every task, and a box shifted off the truth is wrong there too."""
    from conftest import REPO

    from sarlang_ray import harness
    from sarlang_ray.config import load_config

    root, _ = sarchat
    pairs = tmp_path / "pairs.parquet"
    release.write_import(release.import_release(str(root)), str(pairs))
    cfg = load_config(
        str(REPO / "workflows" / "sarchat.yaml"),
        [f"run.run_dir={tmp_path / 'run'}", f"evaluate.dataset={pairs}"],
    )
    samples = harness.bench_samples(cfg)
    assert {s["task"] for s in samples} == set(release.SARCHAT_TASKS)
    box = [s for s in samples if boxes.is_box_answer(s["answer"])]
    assert box and all(json.loads(s["box_size"]) == list(SIZES[int(s["tile_id"]) % 3]) for s in box)
    keys = dict(harness._metric_keys(samples, "strict"))
    assert {f"sarchat_{t}" for t in release.SARCHAT_TASKS} <= keys.keys()
    items = [
        {
            **{
                k: s[k]
                for k in (
                    "pair_id",
                    "tile_id",
                    "kind",
                    "application",
                    "question_type",
                    "question",
                    "answer",
                    "task",
                    "box_size",
                )
            },
            "references": s["references"],
            "prediction": s["answer"],
        }
        for s in samples
    ]
    for t in ("classification", "counting", "grounding", "identification", "referring"):
        assert harness.aggregate(items, keys[f"sarchat_{t}"]) == 1.0, t
    shifted = [
        {**i, "prediction": "[0, 0, 10, 10]"} if boxes.is_box_answer(i["answer"]) else i for i in items
    ]
    assert harness.aggregate(shifted, keys["sarchat_grounding"]) == 0.0
