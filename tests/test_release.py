"""Importing releases as published: SARLANG-1M's layout (both record forms, mixed CSV headers, JSON twins,
SARDet images kept apart, a missing image), the paper's seven applications from the question text,
SARChat-Bench's ms-swift JSON, and the loud failures (a zip, renamed folders)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sarlang_ray import cli, release
from sarlang_ray.errors import ItemError

# Realistic phrasings of every application (the paper's templates and the README's descriptions: "Is there a
# ... ?", "How many ...", "What is the object present in the area [x1, y1, x2, y2]?", SARVQA1's "The classes
# are: ..." prefixes), with the application each must get. None: a question no rule should claim.
QUESTIONS = {
    "object identification": [
        "Is there a ship in this SAR image?",
        "Are there any storage tanks in the image?",
        "Does the image contain an aircraft?",
        "Is an airport visible in this image?",
        "Can you find a bridge in this image?",
        "Is there a harbor in the scene?",
        "Are there vehicles in the image?",
        "Do you see any oil tanks?",
        "Does this image include a playground?",
        "Is a swimming pool present?",
        "Are any ships present in the picture?",
        "Is there a tennis court in the image?",
    ],
    "instance counting": [
        "How many ships are in the image?",
        "How many storage tanks can you count?",
        "How many aircraft are parked in the image?",
        "Count the number of cars in the image.",
        "What is the number of bridges in this image?",
        "How many buildings are there?",
        "How many harbors are visible?",
        "Please count the vehicles in this SAR image.",
        "How many tanks are present in the image?",
        "How many planes are there in this picture?",
        "What is the count of ships?",
        "How many swimming pools are in the scene?",
    ],
    "object classification": [
        "What is the predominant object category in this image?",
        "What type of object is mostly present in the image?",
        "What kind of target dominates this SAR image?",
        "Which category do most objects in this image belong to?",
        "What is the main category of objects in the image?",
        "The classes are: tank, car, aircraft, harbor, bridge, ship. What is the main object in the image?",
        "What objects can be seen in this image?",
        "What is the most common object in the scene?",
        "Classify the main object in this image.",
        "Which class best describes the objects in the image?",
        "What is the primary target category?",
        "What category does the main target belong to?",
    ],
    "region referring": [
        "What is the object present in the area [0.12, 0.34, 0.56, 0.78]?",
        "What is located in the region [120, 45, 310, 200]?",
        "Which category is in the bounding box [23, 56, 89, 120]?",
        "What object is at [0.5, 0.5, 0.7, 0.9]?",
        "Identify the object in the region (10, 20, 200, 220).",
        "What can be found within the box [1, 2, 3, 4]?",
        (
            "The classes are: tank, car, aircraft, harbor, bridge, ship. "
            "What is the object in the area [0.1, 0.2, 0.3, 0.4]?"
        ),
        "What is the category of the target in [450, 120, 600, 300]?",
        "Name the object inside <120><45><310><200>.",
        "What type of object lies in area [0.25, 0.25, 0.75, 0.75]?",
        "Which object occupies the region [12, 34, 56, 78]?",
        "Tell me what is in the box [0.0, 0.0, 0.5, 0.5].",
    ],
    "object positioning": [
        "Where is the ship located in the image?",
        "Where are the storage tanks?",
        "The classes are: top, center, bottom, left, right. Where is the aircraft?",
        "In which part of the image is the bridge located?",
        "What is the location of the harbor in this image?",
        "Where can the airplanes be found?",
        "Which side of the image is the ship on?",
        "Is the bridge in the upper part of the image?",
        "Where is the largest building?",
        "In what area of the image are the tanks located?",
        "Locate the vehicles in the image.",
        "Are the ships in the left half of the image?",
    ],
    "others": [
        "What is the shape of the storage tank?",
        "What is the orientation of the runway?",
        "In which direction is the ship heading?",
        "How are the buildings arranged?",
        "What is the predominant land cover?",
        "What type of land use is shown in this image?",
        "Why are the ships clustered near the coast?",
        "What might be the purpose of this facility?",
        "Is the area mostly covered by vegetation?",
        "What is the size of the largest ship?",
        "Are there more cars than buildings?",
        "Is there water in the image?",
    ],
    None: ["Hello, what do you think?"],
}
ANSWERS = {
    "object identification": ["yes", "no"],
    "instance counting": ["3", "1", "0", "2"],
    "object classification": ["ship", "aircraft", "storage tank"],
    "region referring": ["ship", "car", "bridge"],
    "object positioning": ["top", "left", "center", "bottom"],
    "others": ["circular", "north-south", "in a row", "yes"],
    None: ["no idea"],
}


def _png(path: Path, seed: int, suffix: str = ".png") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 24), dtype=np.uint8)
    Image.fromarray(pixels).save(path.with_suffix(suffix))


def _llamafactory(question: str, answer: str, image: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"<image>{question}"},
            {"role": "assistant", "content": answer},
        ],
        "images": [image],
    }


def _sharegpt(question: str, answer: str, image: str) -> dict:
    return {
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "images": [image],
    }


def build_release(root: Path) -> dict:
    """A small SARLANG-1M release in the published layout, and what importing it must give.

    ``root/SARLANG-1M``: preprocessed PNGs under SARimages_preprocessed/SARimages/, one original TIF, Text/
    unpacked (captions: Caption-training.csv with its JSON twin, Caption_test.csv with a spaced "Image Name ,
    Caption" header, a headerless Caption_test1.csv; VQA: SARVQA1 in LLaMA-Factory form naming SARDet-100K
    images, SARVQA2 in ShareGPT form); ``root/SARDet_100K/JPEGImages/{train,test}/``: the SARDet images,
    apart. One SARVQA2 record names an image that is nowhere, one SARVQA1 record a SARDet image that is not
    there, one record is malformed. Every question of QUESTIONS appears once in a test file and once in a
    train file."""
    rel = root / "SARLANG-1M"
    images = rel / "SARimages_preprocessed" / "SARimages"
    names = [f"France_Nice_{i}.png" for i in range(6)]
    for i, n in enumerate(names):
        _png(images / n, i)
    _png(rel / "SARimages_original" / "France_Nice_0.tif", 0, ".tif")
    sardet = root / "SARDet_100K" / "JPEGImages"
    for i, split in enumerate(("train", "test")):
        for k in range(2):
            _png(sardet / split / f"{9787 + 10 * i + k:07d}.jpg", 100 + 10 * i + k, ".jpg")
    text = rel / "Text"
    cap = text / "caption"
    cap.mkdir(parents=True)
    training = [
        (
            "France_Nice_0.png",
            "Describe the content of this image in one sentence.",
            "A harbour with two ships.",
        ),
        (
            "France_Nice_1.png",
            "Describe this image in detail.",
            (
                "This SAR image shows a dense urban area with many bright buildings along a river, a bridge "
                "crossing it in "
                "the middle and several storage tanks near the bottom edge. Roads cut the blocks into a grid."
            ),
        ),
        (
            "France_Nice_2.png",
            "Describe the content of this image in one sentence.",
            "An airport with parked aircraft.",
        ),
    ]
    (cap / "Caption-training.json").write_text(
        json.dumps([_llamafactory(p, c, f"SARimages/{n}") for n, p, c in training])
    )
    (cap / "Caption-training.csv").write_text(
        "Image Name,Caption\n" + "".join(f"{n},{c}\n" for n, _, c in training)
    )
    complex_ = [
        (
            "France_Nice_3.png",
            (
                "A detailed view of a container port: rows of containers, cranes along the quay and "
                "three large ships moored at the piers, with a breakwater closing the basin."
            ),
        ),
        (
            "France_Nice_4.png",
            (
                "Farmland fills the image with regular rectangular fields, a narrow road runs from the "
                "top left corner to the bottom right one and a few isolated farm buildings stand "
                "beside it."
            ),
        ),
    ]
    (cap / "Caption_test.csv").write_text(
        " Image Name , Caption \n" + "".join(f'{n},"{c}"\n' for n, c in complex_)
    )
    concise = [
        ("France_Nice_3.png", "A port with ships at the quay."),
        ("France_Nice_4.png", "Fields crossed by a road."),
        ("France_Nice_5.png", "A bridge over a river."),
    ]
    (cap / "Caption_test1.csv").write_text("".join(f"{n},{c}\n" for n, c in concise))
    vqa = {"train": text / "VQA" / "train", "test": text / "VQA" / "test"}
    expected_apps = []
    records = Counter()
    for split, folder in vqa.items():
        folder.mkdir(parents=True)
        v1, v2 = [], []
        for app, questions in QUESTIONS.items():
            for i, q in enumerate(questions):
                # train and test answers differ
                answer = ANSWERS[app][(i + (split == "test")) % len(ANSWERS[app])]
                if i % 2:  # SARVQA1: SARDet-100K images, LLaMA-Factory form
                    v1.append(
                        _llamafactory(q, answer, f"{9787 + 10 * (split == 'test') + i // 2 % 2:07d}.jpg")
                    )
                else:  # SARVQA2: SpaceNet6 / DFC2023 / OEM-SAR images, ShareGPT form
                    v2.append(_sharegpt(q, answer, f"SARimages/{names[i % 6]}"))
                expected_apps.append((q, app or release.UNKNOWN))
        if split == "test":
            # nowhere
            v2.append(_sharegpt("How many ships are in the image?", "2", "SARimages/SV_Darwin_missing.png"))
            # a SARDet image not there
            v1.append(_llamafactory("Is there a ship in the image?", "yes", "0099999.jpg"))
            v1.append({"images": ["0009797.jpg"]})  # malformed: no messages
        (folder / f"SARVQA1_{split}.json").write_text(json.dumps(v1))
        (folder / f"SARVQA2_{split}.json").write_text(json.dumps(v2))
        records[f"SARVQA1_{split}"], records[f"SARVQA2_{split}"] = len(v1), len(v2)
    return {
        "root": rel,
        "sardet": sardet,
        "records": sum(records.values()) + len(training) + len(complex_) + len(concise),
        "rejected": 3,
        "questions": expected_apps,
        "vqa_test": records["SARVQA1_test"] + records["SARVQA2_test"] - 3,
        "captions_test": {"caption_detailed": len(complex_), "caption_concise": len(concise)},
    }


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    built = build_release(root)
    out = root / "import" / "pairs.parquet"
    return built, out


def test_the_published_release_imports_every_record_or_an_error_row(imported, capsys):
    built, out = imported
    rc = cli.main(["import", str(built["root"]), str(out), "--sardet", str(built["sardet"])])
    text = capsys.readouterr().out
    assert rc == 0, text
    pairs = pq.read_table(out).to_pylist()
    errors = pq.read_table(str(out).replace(".parquet", ".errors.parquet")).to_pylist()
    report = json.loads(Path(str(out).replace(".parquet", ".report.json")).read_text())

    # every record is a pair or an error row; per file records = imported + rejected
    files = [f for f in report["files"] if not f.get("skipped")]
    assert all(f["records"] == f["imported"] + f["rejected"] for f in files)
    totals = report["totals"]
    assert totals["records"] == built["records"] and totals["rejected"] == built["rejected"] == len(errors)
    assert totals["pairs"] == len(pairs) == totals["imported"]  # one user/assistant turn per record here
    assert f"records {built['records']} = imported {built['records'] - 3} + rejected 3" in text
    by_class = Counter(e["error_class"] for e in errors)
    assert by_class == {"missing_image": 2, "malformed_release": 1}
    missing = {e["item"]: e["message"] for e in errors if e["error_class"] == "missing_image"}
    assert any(k.startswith("Text/VQA/test/SARVQA2_test.json#") for k in missing)
    sardet_msg = next(m for k, m in missing.items() if "SARVQA1" in k)
    assert "0099999.jpg" in sardet_msg and "--sardet" in sardet_msg
    assert next(e for e in errors if e["error_class"] == "malformed_release")["item"].startswith(
        "Text/VQA/test/SARVQA1_test.json#"
    )

    # twins, CSV columns found from mixed headers (and none), what each row came from
    skipped = [f for f in report["files"] if f.get("skipped")]
    assert [f["file"] for f in skipped] == ["Text/caption/Caption-training.csv"]
    cols = {f["file"].rsplit("/", 1)[-1]: f.get("columns") for f in files}
    assert cols["Caption_test.csv"] == "image = 'Image Name' (column 0), text = 'Caption' (column 1)"
    assert cols["Caption_test1.csv"] == "image = column 0, text = column 1 (no header)"
    assert "columns: image = 'Image Name' (column 0)" in text and "(no header)" in text
    assert {p["source"] for p in pairs} == {"SARVQA1", "SARVQA2", "training", "complex", "concise"}
    kinds = Counter((p["source"], p["kind"], p["split"]) for p in pairs if p["kind"] != "vqa")
    assert kinds == {
        ("training", "caption_concise", "train"): 2,
        ("training", "caption_detailed", "train"): 1,
        ("complex", "caption_detailed", "test"): 2,
        ("concise", "caption_concise", "test"): 3,
    }

    # images: found by name in the preprocessed folder, SARDet ones in their own folder, every one exists
    assert all(Path(p["image_uri"]).is_file() for p in pairs)
    sardet_rows = [p for p in pairs if p["source"] == "SARVQA1"]
    assert sardet_rows and all(p["image_uri"].startswith(str(built["sardet"])) for p in sardet_rows)
    assert all(
        "SARimages_preprocessed/SARimages/" in p["image_uri"] for p in pairs if p["source"] == "SARVQA2"
    )

    # applications: the expected one for every question; unknown < 2 %, counted and shown
    got = {(p["question"], p["split"]): p["application"] for p in pairs if p["kind"] == "vqa"}
    wrong = [
        (q, app, got[(q, s)])
        for s in ("train", "test")
        for q, app in built["questions"]
        if got.get((q, s), app) != app
    ]
    assert not wrong, wrong
    apps = report["applications"]
    # the one nonsense question, in train and test
    assert apps["unknown"] == 2 and apps["unknown_rate"] < 0.02
    assert apps["unknown_examples"] == ["Hello, what do you think?"]
    assert "unknown application: 2 of" in text and "Hello, what do you think?" in text


def test_classify_question_types_carry_the_object():
    assert release.classify_question("How many storage tanks can you count?") == (
        "instance counting",
        "counting/storage tank",
    )
    assert release.classify_question("Is there a ship in this SAR image?") == (
        "object identification",
        "identification/ship",
    )
    assert release.classify_question("[refer] Locate 1 aircraft.") == ("object positioning", "positioning")
    assert release.classify_question("") == (release.UNKNOWN, release.UNKNOWN)


def test_a_zip_renamed_folders_and_nothing_importable_are_loud(tmp_path, capsys):
    """The failures of the old import: a folder that only holds Text.zip, and a release whose images are all
    elsewhere: one says to unpack, the other exits 1 naming why, instead of writing 0 pairs silently."""
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    (zipped / "Text.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    with pytest.raises(ItemError, match="Text.zip: unpack it in place") as info:
        release.import_release(str(zipped))
    assert info.value.error_class == "not_a_release"
    assert cli.main(["import", str(zipped), str(tmp_path / "a.parquet")]) == 2
    assert "Unpack the release archive first" in capsys.readouterr().err

    orphan = tmp_path / "orphan" / "Text" / "VQA" / "test"
    orphan.mkdir(parents=True)
    (orphan / "SARVQA2_test.json").write_text(
        json.dumps([_llamafactory("How many ships?", "2", "SARimages/x.png")])
    )
    rc = cli.main(["import", str(tmp_path / "orphan"), str(tmp_path / "b.parquet")])
    captured = capsys.readouterr()
    assert rc == 1 and "no pair could be imported" in captured.err and "missing_image: 1" in captured.out


def test_sarchat_bench_ms_swift_json_imports_the_same_way(tmp_path):
    """SARChat-Bench-2M (github.com/JimmyMa99/SARChat): one ms-swift JSON per task and split
    (SARChat_<task>_test.json, as its infer/swift-eval.py lists them), records with messages + images,
    questions led by a task tag ("[refer] Locate 1 aircraft." -> "{<393><426><470><494>} (bottom right)", as
    its training logs show). Built here in that layout, with SARDet-style images beside it."""
    root = tmp_path / "sarchat"
    for i in range(3):
        _png(root / "images" / f"{i:07d}.jpg", i, ".jpg")
    tasks = {
        "classify": (
            "[cls] What is the category of the target in this SAR image?",
            "ship",
            "object classification",
        ),
        "classify_count": ("[count] How many ships are there in the image?", "3", "instance counting"),
        "classify_identify_single": (
            "[identify] Is there an aircraft in the image?",
            "no",
            "object identification",
        ),
        "classify_refer_single": (
            "[refer] Locate 1 aircraft.",
            "{<393><426><470><494>} (bottom right)",
            "object positioning",
        ),
        "classify_grounding_single": (
            "[grounding] What is the object in {<393><426><470><494>}?",
            "aircraft",
            "region referring",
        ),
        "describe": (
            "[describe] Describe the image in detail.",
            "Three ships moored in a harbour.",
            "image description",
        ),
    }
    for task, (q, a, _) in tasks.items():
        recs = [
            {
                "messages": [
                    {"role": "user", "content": f"<image>\n{q}"},
                    {"role": "assistant", "content": a},
                ],
                "images": [f"images/{i:07d}.jpg"],
            }
            for i in range(3)
        ]
        (root / f"SARChat_{task}_test.json").write_text(json.dumps(recs))
    result = release.import_release(str(root))
    rows = result.table.to_pylist()
    assert result.totals == {"records": 18, "imported": 18, "rejected": 0, "pairs": 18}
    by_source = {r["source"]: r for r in rows}
    assert set(by_source) == {f"SARChat:{t}" for t in tasks}
    for task, (_, a, app) in tasks.items():
        r = by_source[f"SARChat:{task}"]
        assert r["application"] == app and r["answer"] == a and r["split"] == "test", (task, r)
    assert by_source["SARChat:describe"]["kind"] == "caption_detailed"
    assert all(Path(r["image_uri"]).is_file() for r in rows)


def test_old_imports_still_work():
    from sarlang_ray import export

    assert (
        export.import_sarlang1m is release.import_sarlang1m and export.release_image is release.release_image
    )


def test_the_rules_agree_with_our_own_recorded_applications(demo_run):
    """Our export records each pair's application; the rules, reading only the question, give the same one for
    every VQA pair of the demo (the template annotator's phrasings of all seven applications)."""
    cfg, _ = demo_run
    table = release.import_release(str(Path(cfg.run.run_dir) / "export" / "sarlang1m")).table.to_pylist()
    vqa = [r for r in table if r["kind"] == "vqa"]
    disagree = [
        (r["question"], r["application"], release.classify_question(r["question"])[0])
        for r in vqa
        if release.classify_question(r["question"])[0] != r["application"]
    ]
    assert len(vqa) > 300 and len({r["application"] for r in vqa}) == 6
    assert len(disagree) <= 0.02 * len(vqa), disagree[:10]
