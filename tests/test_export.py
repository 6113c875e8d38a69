"""Export: leakage-free splits, loadable Parquet, LLaMA-Factory JSON, SARLANG-1M layout and its re-import."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from sarlang_ray import pipeline
from sarlang_ray.export import assign_splits, import_sarlang1m


@pytest.fixture(scope="module")
def exported(demo_run):
    cfg, summary = demo_run
    return cfg, summary, Path(cfg.run.run_dir) / "export"


def test_no_scene_in_two_splits(exported):
    cfg, summary, out = exported
    import pyarrow.parquet as pq

    scene_splits: dict[str, set] = {}
    for f in out.glob("parquet/*/*.parquet"):
        t = pq.read_table(f, columns=["scene_id", "split"])
        for sid, split in zip(t["scene_id"].to_pylist(), t["split"].to_pylist()):
            scene_splits.setdefault(sid, set()).add(split)
            assert f.parent.name == split
    assert scene_splits and all(len(s) == 1 for s in scene_splits.values())
    assert len({next(iter(s)) for s in scene_splits.values()}) >= 2


def test_split_assignment_is_deterministic_and_near_the_ratios():
    sizes = {f"scene{i}": 10 + i for i in range(40)}
    ratios = {"train": 0.7, "val": 0.1, "test": 0.2}
    a, b = assign_splits(sizes, ratios, 1), assign_splits(sizes, ratios, 1)
    assert a == b and set(a) == set(sizes)
    share = Counter()
    for g, s in a.items():
        share[s] += sizes[g]
    total = sum(sizes.values())
    for s, r in ratios.items():
        assert abs(share[s] / total - r) < 0.05
    assert assign_splits(sizes, ratios, 2) != a


def test_parquet_loads_with_hf_datasets_and_decodes_images(exported):
    datasets = pytest.importorskip("datasets")
    cfg, summary, out = exported
    files = sorted(str(f) for f in out.glob("parquet/train/*.parquet"))
    ds = datasets.load_dataset("parquet", data_files={"train": files}, split="train")
    assert len(ds) == summary["stages"]["export"]["splits"]["train"]["pairs"] > 0
    row = ds[0]
    assert row["image"].size == (cfg.tile.tile_size, cfg.tile.tile_size) and row["question"] and row["answer"]
    assert set(ds.unique("application")) <= {"image description", "object identification", "object classification",
                                              "instance counting", "region referring", "object positioning", "others"}


def test_llamafactory_json_is_well_formed(exported):
    _, summary, out = exported
    info = json.loads((out / "llamafactory" / "dataset_info.json").read_text())
    assert info["sarlang_train"]["formatting"] == "sharegpt"
    n = 0
    for split in ("train", "val", "test"):
        records = json.loads((out / "llamafactory" / f"sarlang_{split}.json").read_text())
        for r in records:
            placeholders = sum(m["content"].count("<image>") for m in r["messages"])
            assert placeholders == len(r["images"]) == 1
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
            assert (out / "llamafactory" / r["images"][0]).exists()
        n += len(records)
    passed = sum(pipeline.read_annotations(str(out.parent), columns=["qc_passed"])["qc_passed"].to_pylist())
    assert n == passed


def test_reimporting_the_sarlang1m_layout_gives_back_the_same_pairs(exported):
    cfg, _, out = exported
    imported = import_sarlang1m(str(out / "sarlang1m")).to_pylist()
    ours = [p for p in pipeline.read_annotations(cfg.run.run_dir).to_pylist() if p["qc_passed"]]
    key = lambda p: (p["tile_id"], p["kind"], p["application"], p["question_type"], p["question"], p["answer"])  # noqa: E731
    assert sorted(map(key, imported)) == sorted(map(key, ours))
    assert all(Path(p["image_uri"]).exists() for p in imported)
    assert {p["split"] for p in imported} <= {"train", "val", "test"}


def test_import_cli_writes_an_annotations_table(exported, tmp_path):
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from sarlang_ray.annotate.stage import ANNOTATION_SCHEMA

    _, _, out = exported
    target = tmp_path / "imported.parquet"
    proc = subprocess.run([sys.executable, "-m", "sarlang_ray", "import", str(out / "sarlang1m"), str(target)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pq.read_table(target)
    assert set(ANNOTATION_SCHEMA.names) <= set(table.column_names) and table.num_rows > 0


def test_dataset_card_has_counts_and_plots(exported):
    _, _, out = exported
    card = (out / "dataset_card.md").read_text()
    for heading in ("Pairs per application", "Objects per class", "Ground sample distance", "| train |"):
        assert heading in card
    for png in ("applications", "classes", "landcover", "gsd"):
        assert (out / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
