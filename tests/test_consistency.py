"""The consistency checker finds every planted contradiction type and blames the planted statement; QC
repairs or rejects it; the demo's template annotations have none (and the old annotator's had); the
annotate stage reports findings per rule and backend in qc_report.json and the dataset card."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from sarlang_ray.annotate.consistency import RULES, check_export, check_pairs, contradictions
from sarlang_ray.annotate.qc import qc_tile
from sarlang_ray.annotate.template import TemplateAnnotator
from sarlang_ray.annotate.visibility import Visibility
from sarlang_ray.config import QCSection

# ---------------------------------------------------------------- planted contradictions, one tile
TILE = {"gsd_m": 2.0, "width": 256}  # cars (4.5 m) are below their 4 px at 2 m; ships, harbours are not
OBJECTS = [{"class": "ship"}] * 3 + [{"class": "harbour"}]  # what the captions name (QC's hallucination rule)


def _vqa(q, a):
    return {"kind": "vqa", "question": q, "answer": a}


def base_pairs() -> list[dict]:
    """A tile's pairs that all agree: three ships in the bottom and bottom right, one harbour in the top left,
    mostly built-up with water."""
    return [
        {
            "kind": "caption_concise",
            "question": "c",
            "answer": "A SAR image of three ships and one harbour near open water.",
        },
        {
            "kind": "caption_detailed",
            "question": "d",
            "answer": "This SAR image at 2 m resolution is mostly built-up (60%) and water (40%). It "
            "contains three ships and one "
            "harbour. The harbour is in the top left of the image. The ships are in the bottom and bottom "
            "right of the image.",
        },
        _vqa("Are any ships visible in this image?", "yes"),  # 2
        _vqa("Is there a bridge in the image?", "no"),  # 3
        _vqa("How many ships are there in the image?", "3"),  # 4
        _vqa("How many harbours can be seen?", "1"),  # 5
        _vqa("Where is the harbour located in the image?", "top left"),  # 6
        _vqa("Does the top left part of the image contain a harbour?", "yes"),  # 7
        _vqa("Can a ship be seen in the bottom area?", "yes"),  # 8
        _vqa("What is the dominant land cover in this image?", "built-up"),  # 9
        _vqa("Which land cover dominates this SAR image?", "built-up"),  # 10
        _vqa("Is there water in the image?", "yes"),  # 11
        _vqa("Are there more ships than harbours?", "yes"),  # 12
        _vqa("How many ships and harbours are there in total?", "4"),  # 13
        _vqa("What is the object in region [100, 850, 330, 890]?", "ship"),  # 14
    ]


def _set(i, q=None, a=None):
    def edit(pairs):
        pairs[i] = {**pairs[i], **({"question": q} if q else {}), **({"answer": a} if a is not None else {})}

    return edit


def _add(q, a):
    return lambda pairs: pairs.append(_vqa(q, a))


def _sentence(i, k, text):
    def edit(pairs):
        parts = re.split(r"(?<=[.!?])\s+", pairs[i]["answer"])
        parts[k] = text
        pairs[i] = {**pairs[i], "answer": " ".join(parts)}

    return edit


# (rule, the edit, the (pair, caption sentence or None) statements expected to be blamed)
PLANTED = {
    "presence: identification no, counts and captions say three": ("presence", _set(2, a="no"), {(2, None)}),
    "presence: a model's words (boats, 'No, there are none.')": (
        "presence",
        _set(2, q="Can you spot any boats in this picture?", a="No, there are none."),
        {(2, None)},
    ),
    "presence: a caption denies what the answers say": (
        "presence",
        _sentence(1, 1, "It contains one harbour but no ships."),
        {(1, 1)},
    ),
    "count: a counting answer": ("count", _set(4, a="5"), {(4, None)}),
    "count: a total": ("count", _set(13, a="6"), {(13, None)}),
    "count: a comparison": ("count", _set(12, a="no"), {(12, None)}),
    "position: no ship where two say there is one": (
        "position",
        _add("Is there a ship in the bottom of the image?", "no"),
        {(15, None)},
    ),
    "position: the one harbour somewhere else": ("position", _set(6, a="bottom right"), {(6, None)}),
    "landcover: the dominant class": ("landcover", _set(9, a="water"), {(9, None)}),
    "landcover: no water, one against one (both blamed)": (
        "landcover",
        _set(11, a="no"),
        {(11, None), (1, 0)},
    ),
    "implied_absence: no building on built-up land": (
        "implied_absence",
        _add("Are any buildings visible in this image?", "no"),
        {(15, None)},
    ),
    "unresolvable: cars at 2 m": ("unresolvable", _add("How many cars are present?", "0"), {(15, None)}),
    "unresolvable: a region box of a ship of 2 px": (
        "unresolvable",
        _add("What is located at [500, 500, 505, 503]?", "ship"),
        {(15, None)},
    ),
}


def test_the_consistent_base_has_no_finding():
    assert contradictions(TILE, base_pairs()) == []
    out, found = qc_tile(base_pairs(), OBJECTS, QCSection(), TILE)
    assert found == [] and all(p["qc_passed"] and p["qc_reasons"] == [] for p in out)


@pytest.mark.parametrize("case", list(PLANTED))
def test_planted_contradiction_is_found_blamed_and_repaired_or_rejected(case):
    rule, edit, blamed = PLANTED[case]
    pairs = base_pairs()
    edit(pairs)
    found = contradictions(TILE, pairs)
    assert {f.rule for f in found} == {rule}, [(f.rule, f.message) for f in found]
    assert {(s.pair, s.sentence) for f in found for s in f.blamed} == blamed

    for mode in ("repair", "reject"):
        out, _ = qc_tile(pairs, OBJECTS, QCSection(contradiction=mode), TILE)
        hit = {i for i, _ in blamed}
        for i, p in enumerate(out):
            if i not in hit:
                assert p["qc_passed"] and p["answer"] == pairs[i]["answer"], (mode, i, p)
                continue
            assert "contradiction" in p["qc_reasons"], (mode, p)
            sentences = {k for j, k in blamed if j == i}
            # a caption loses the blamed sentence, keeps the rest
            if mode == "repair" and sentences != {None}:
                kept = [
                    s
                    for k, s in enumerate(re.split(r"(?<=[.!?])\s+", pairs[i]["answer"]))
                    if k not in sentences
                ]
                assert p["qc_passed"] and p["answer"] == " ".join(kept), (mode, p)
            else:
                assert not p["qc_passed"], (mode, p)
    out, found = qc_tile(pairs, OBJECTS, QCSection(contradiction="off"), TILE)
    assert found == [] and all(p["qc_passed"] for p in out)


def test_unknown_gsd_is_reported_not_judged():
    """An imported release without GSDs: the unresolvable rule cannot judge it, and the report says so."""
    pairs = [{**p, "tile_id": "t1"} for p in base_pairs()] + [
        {**_vqa("How many cars are present?", "0"), "tile_id": "t1"}
    ]
    report = check_pairs(pairs)
    assert report["tiles_without_gsd"] == 1 and report["findings"]["unresolvable"] == 0
    report = check_pairs(pairs, {"t1": TILE})
    assert (
        report["tiles_without_gsd"] == 0
        and report["findings"]["unresolvable"] == 1
        and report["pairs_hit"]["unresolvable"] == 1
    )


# ---------------------------------------------------------------- the demo: template annotations
def _absence_of_buildings(p) -> bool:
    """Whether a pair says there is no building: plain string tests, not the checker's reading."""
    fam, *rest = p["question_type"].split("/")
    if rest[1:2] == ["building"]:
        return (fam == "identification" and p["answer"] == "no") or (fam == "counting" and p["answer"] == "0")
    return p["kind"] != "vqa" and (
        "No labelled objects" in p["answer"] or "without labelled objects" in p["answer"]
    )


def test_demo_template_annotations_have_no_contradiction_and_the_old_annotator_had(demo_run):
    """The export passes the checker (run independently of the annotator). The annotator as it was (every
    labelled object visible, land cover ignored) denied buildings on built-up land and asked about cars at
    10 m: the checker finds exactly the built-up tiles where it did."""
    from sarlang_ray import pipeline

    cfg, _ = demo_run
    report = check_export(cfg.run.run_dir)
    assert report["tiles"] > 0 and set(report["findings"].values()) == {0}, report["findings"]
    card = (Path(cfg.run.run_dir) / "export" / "dataset_card.md").read_text()
    assert "| implied_absence | template | 0 | 0 |" in card and "car <= 1.12 m" in card

    tiles = pipeline.read_tiles(
        cfg.run.run_dir, ["tile_id", "gsd_m", "width", "objects", "landcover"]
    ).to_pylist()
    everything = Visibility(
        class_size_m={c: 1e6 for c in Visibility().class_size_m},
        min_size_px={c: 1e-9 for c in Visibility().class_size_m},
        implied_by={},
    )
    old = TemplateAnnotator(visibility=everything)
    pairs = [{**p, "tile_id": t["tile_id"], "gsd_m": t["gsd_m"]} for t in tiles for p in old.annotate(t)]
    report = check_pairs(pairs, {t["tile_id"]: t for t in tiles})
    stated = {}  # land cover the captions state: the dominant class, and the second from 10 %
    for t in tiles:
        ranked = sorted(dict(t["landcover"]).items(), key=lambda kv: -kv[1])
        stated[t["tile_id"]] = {ranked[0][0]} | (
            {ranked[1][0]} if len(ranked) > 1 and ranked[1][1] >= 0.1 else set()
        )
    denials = Counter(
        p["tile_id"] for p in pairs if "built-up" in stated[p["tile_id"]] and _absence_of_buildings(p)
    )
    found = Counter()
    for tid in {p["tile_id"] for p in pairs}:
        tile_pairs = [p for p in pairs if p["tile_id"] == tid]
        found[tid] = sum(
            f.rule == "implied_absence" for f in contradictions({"gsd_m": tile_pairs[0]["gsd_m"]}, tile_pairs)
        )
    assert len(denials) >= 10 and +found == denials  # the same tiles, one finding per denying pair
    assert report["findings"]["implied_absence"] == sum(denials.values())
    assert report["findings"]["unresolvable"] > 0
    assert any(
        e["message"].startswith("car named at 10 m") for e in report["examples"]["unresolvable"]
    ) or any(e["message"].startswith("car named at") for e in report["examples"]["unresolvable"])


def test_checker_runs_on_an_imported_release(demo_run):
    """The SARLANG-1M-layout release of the demo, read back: no GSD in it, so the tiles table supplies it."""
    from sarlang_ray import pipeline
    from sarlang_ray.export import import_sarlang1m

    cfg, _ = demo_run
    imported = import_sarlang1m(str(Path(cfg.run.run_dir) / "export" / "sarlang1m")).to_pylist()
    tiles = {
        t["tile_id"]: t
        for t in pipeline.read_tiles(cfg.run.run_dir, ["tile_id", "gsd_m", "width"]).to_pylist()
    }
    report = check_pairs(imported, tiles)
    assert report["pairs"] == len(imported) > 0 and report["tiles_without_gsd"] == 0
    assert set(report["findings"].values()) == {0}
    from sarlang_ray.annotate.template import IDENTIFICATION

    identification = re.compile(
        "|".join(
            "^" + re.escape(t).replace(r"\{c\}", ".+").replace(r"\{cs\}", ".+") + "$" for t in IDENTIFICATION
        )
    )
    flipped = [dict(p) for p in imported]
    yes = {}  # the first identification "yes" of each tile
    for p in flipped:
        if p["kind"] == "vqa" and p["answer"] == "yes" and identification.match(p["question"]):
            yes.setdefault(p["tile_id"], p)
    assert len(yes) >= 5
    for p in list(yes.values())[:5]:  # five tiles whose captions (and counts) say the class is there
        p["answer"] = "no"
    report = check_pairs(flipped, tiles)
    assert report["findings"]["presence"] == 5 and report["tiles_with_findings"] == 5


# ---------------------------------------------------------------- the annotate stage and the card
class PlantingBackend:
    """The template annotator plus planted errors a model makes (importable by Ray workers): on built-up
    tiles "no" to buildings; at 10 m "0" cars (which the pixels cannot show); and one identification "yes"
    (not of a building) flipped to "no"."""

    name = "planted"

    def __init__(self, cfg=None):
        self.inner = TemplateAnnotator()

    def annotate(self, tile):
        return plant(self.inner.annotate(tile), tile)[0]


def plant(pairs: list[dict], tile: dict) -> tuple[list[dict], Counter]:
    """The pairs with errors planted, and how many of each rule were planted (the expected findings)."""
    pairs, planted = [dict(p) for p in pairs], Counter()
    detailed = next(p["answer"] for p in pairs if p["kind"] == "caption_detailed")
    m = re.search(r"built-up \((\d+)%\)", detailed)
    # buildings: 20 m / 4 px
    if m and int(m.group(1)) >= 10 and "building" not in detailed and tile["gsd_m"] <= 5:
        pairs.append(
            {
                "kind": "vqa",
                "application": "object identification",
                "question_type": "planted/absence",
                "question": "Are any buildings visible in this image?",
                "answer": "no",
            }
        )
        planted["implied_absence"] += 1
    if tile["gsd_m"] >= 10:
        # unanswerable at 10 m
        pairs.append(
            {
                "kind": "vqa",
                "application": "instance counting",
                "question_type": "planted/cars",
                "question": "How many cars are there in the image?",
                "answer": "0",
            }
        )
        planted["unresolvable"] += 1
    for p in pairs:
        if (
            p["question_type"].startswith("identification/")
            and p["answer"] == "yes"
            and "building" not in p["question_type"]
        ):
            p["answer"] = "no"
            planted["presence"] += 1
            break
    return pairs, planted


@pytest.mark.slow
def test_annotate_stage_reports_planted_model_errors_per_rule_and_backend(demo_run, tmp_path):
    from sarlang_ray import pipeline
    from sarlang_ray.config import load_config
    from sarlang_ray.stages import annotate as annotate_stage
    from sarlang_ray.stages import export as export_stage

    cfg, _ = demo_run
    run_dir = tmp_path / "planted"
    shutil.copytree(cfg.run.run_dir, run_dir, ignore=shutil.ignore_patterns("annotate", "export", "archive"))
    planted_cfg = load_config(
        None,
        [f"run.run_dir={run_dir}", "annotate.backend=test_consistency:PlantingBackend", "ray.progress=false"],
    )
    annotate_stage.run(planted_cfg)

    tiles = pipeline.read_tiles(
        str(run_dir), ["tile_id", "gsd_m", "width", "objects", "landcover"]
    ).to_pylist()
    expected = Counter()
    for t in tiles:
        expected += plant(TemplateAnnotator().annotate(t), t)[1]
    assert all(expected[r] > 0 for r in ("implied_absence", "unresolvable", "presence")), expected
    report = json.loads((run_dir / "annotate" / "qc_report.json").read_text())["contradictions"]
    assert report["by_backend"] == {"planted": {r: expected[r] for r in report["findings"]}}
    assert all(len(report["examples"][r]) == 3 for r in expected)
    ann = pipeline.read_annotations(str(run_dir)).to_pylist()
    planted_pairs = [p for p in ann if p["question_type"].startswith("planted/")]
    assert len(planted_pairs) == expected["implied_absence"] + expected["unresolvable"]
    assert all(not p["qc_passed"] and "contradiction" in p["qc_reasons"] for p in planted_pairs)

    export_stage.run(planted_cfg)
    card = (run_dir / "export" / "dataset_card.md").read_text()
    for rule in ("implied_absence", "unresolvable"):
        assert f"| {rule} | planted | {expected[rule]} | 0 |" in card, card
    assert set(check_export(str(run_dir))["findings"].values()) == {0}

    # QC's contradiction rule off: the planted errors are exported, and the card's "left in this export"
    # column (the export shards' reports, summed in the driver) is what the checker finds reading the
    # exported files back whole
    kept_cfg = load_config(
        None,
        [
            f"run.run_dir={run_dir}",
            "annotate.backend=test_consistency:PlantingBackend",
            "annotate.qc.contradiction='off'",
            "ray.progress=false",
        ],
    )
    annotate_stage.run(kept_cfg)
    export_stage.run(kept_cfg)
    card = (run_dir / "export" / "dataset_card.md").read_text()
    read_back = check_export(str(run_dir))
    assert read_back["by_backend"]["planted"]["implied_absence"] > 0
    assert read_back["by_backend"]["planted"]["unresolvable"] > 0
    for rule in RULES:
        assert re.search(
            rf"\| {rule} \| planted \| [^|]+ \| {read_back['by_backend']['planted'][rule]} \|", card
        ), card
    tiles_line = f"{read_back['tiles_with_findings']} of\n{read_back['tiles']} exported tiles with a finding"
    assert tiles_line in card, card
