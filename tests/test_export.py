"""Export: leakage-free splits, loadable Parquet, LLaMA-Factory JSON, SARLANG-1M layout and its re-import."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from sarlang_ray import pipeline
from sarlang_ray.export import import_sarlang1m
from sarlang_ray.splits import assign_splits


@pytest.fixture(scope="module")
def exported(demo_run):
    cfg, summary = demo_run
    return cfg, summary, Path(cfg.run.run_dir) / "export"


def _exported_tiles(out: Path) -> dict[str, str]:
    """tile id -> split, from the exported Parquet itself."""
    import pyarrow.parquet as pq

    split_of: dict[str, set] = {}
    for f in out.glob("parquet/*/*.parquet"):
        t = pq.read_table(f, columns=["tile_id", "split"])
        for tid, split in zip(t["tile_id"].to_pylist(), t["split"].to_pylist()):
            assert f.parent.name == split
            split_of.setdefault(tid, set()).add(split)
    assert all(len(s) == 1 for s in split_of.values())
    return {tid: next(iter(s)) for tid, s in split_of.items()}


def _brute_force_leaks(tiles: list[dict], split_of: dict[str, str], buffer_m: float) -> tuple[float, int, int]:
    """Every pair of tiles of two different splits, measured directly (no index, no code under test): the
    overlap area on the ground (m², both footprints in the UTM zone of the first), pairs closer than
    ``buffer_m``, and label objects seen in both splits."""
    from pyproj import Transformer
    from shapely import from_wkb, ops

    geo = {t["tile_id"]: from_wkb(t["footprint"]) for t in tiles}
    crs = {t["tile_id"]: t["crs"] for t in tiles}
    area, near = 0.0, 0
    ids = sorted(split_of)
    for i, a in enumerate(ids):
        to_utm = Transformer.from_crs("EPSG:4326", crs[a], always_xy=True).transform
        pa_ = ops.transform(to_utm, geo[a])
        for b in ids[i + 1:]:
            if split_of[a] == split_of[b]:
                continue
            pb = ops.transform(to_utm, geo[b])
            area += pa_.intersection(pb).area
            near += pa_.distance(pb) < buffer_m
    labels: dict[str, set] = {}
    for t in tiles:
        if t["tile_id"] in split_of:
            labels.setdefault(split_of[t["tile_id"]], set()).update(o["label_id"] for o in t["objects"])
    shared = sum(len(labels.get(x, set()) & labels.get(y, set())) for x, y in (("train", "val"), ("train", "test"), ("val", "test")))
    return area, near, shared


def test_default_split_is_geographic_with_no_shared_ground_or_objects(exported):
    """Tiles of the two Rotterdam scenes (0.5 m and 5 m, the same city) used to land in train and test."""
    cfg, summary, out = exported
    assert cfg.export.split_by == "geographic"
    split_of = _exported_tiles(out)
    assert set(split_of.values()) == {"train", "val", "test"}, "all three splits hold tiles"
    tiles = pipeline.read_tiles(cfg.run.run_dir, columns=["tile_id", "footprint", "crs", "objects"]).to_pylist()
    area, near, shared = _brute_force_leaks(tiles, split_of, cfg.export.buffer_m)
    assert (area, near, shared) == (0.0, 0, 0)
    report = json.loads((out / "leakage.json").read_text())
    assert report["leak_free"] and all(p == {"intersection_m2": 0.0, "tile_pairs_within_buffer": 0, "shared_objects": 0}
                                       for p in report["pairs"].values())
    # boundary tiles dropped are in the errors table, and the counts reconcile
    e = summary["stages"]["export"]
    dropped = [r for r in pipeline.read_errors(cfg.run.run_dir).to_pylist() if r["error_class"] == "split_boundary"]
    assert e["planned"] == e["written"] + e["rejected"] and e["rejected"] == len(dropped) == report["dropped_tiles"]
    assert e["written"] == len(split_of) and not {r["item"] for r in dropped} & set(split_of)
    assert "## Leakage between splits" in (out / "dataset_card.md").read_text()


def test_the_scene_split_leaks_and_the_report_says_so(exported):
    """The old default: no scene in two splits, yet the same ground in train and test."""
    from sarlang_ray.export import split_tiles
    from sarlang_ray.splits import group_splits, leakage_report

    cfg, _, _ = exported
    candidates = split_tiles(cfg)
    split_of = group_splits(candidates, "scene", {"train": 0.7, "val": 0.1, "test": 0.2}, cfg.run.seed)
    report = leakage_report(candidates, split_of, cfg.export.buffer_m)
    tiles = pipeline.read_tiles(cfg.run.run_dir, columns=["tile_id", "footprint", "crs", "objects"]).to_pylist()
    area, near, shared = _brute_force_leaks(tiles, split_of, cfg.export.buffer_m)
    assert not report["leak_free"] and shared > 0 and area > 0
    assert sum(p["shared_objects"] for p in report["pairs"].values()) == shared
    geodesic = sum(p["intersection_m2"] for p in report["pairs"].values())
    # the report unions footprints per split before intersecting; the brute force sums tile pairs (overlaps
    # within a split count several times there), so the report is at most the pairwise sum
    assert 0 < geodesic <= area * 1.01


def test_splits_are_deterministic_and_follow_the_seed(exported):
    from sarlang_ray.export import split_tiles
    from sarlang_ray.splits import geographic_splits

    cfg, _, _ = exported
    candidates = split_tiles(cfg)
    ratios = {"train": 0.7, "val": 0.1, "test": 0.2}
    a = geographic_splits(candidates, ratios, 0, 2000.0, 50.0)
    assert a == geographic_splits(list(reversed(candidates)), ratios, 0, 2000.0, 50.0)
    assert a != geographic_splits(candidates, ratios, 1, 2000.0, 50.0)


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
    kept = set(_exported_tiles(out))  # tiles dropped at split boundaries are not exported
    ann = pipeline.read_annotations(str(out.parent), columns=["tile_id", "qc_passed"]).to_pylist()
    assert n == sum(a["qc_passed"] and a["tile_id"] in kept for a in ann) > 0


def test_reimporting_the_sarlang1m_layout_gives_back_the_same_pairs(exported):
    cfg, _, out = exported
    imported = import_sarlang1m(str(out / "sarlang1m")).to_pylist()
    kept = set(_exported_tiles(out))
    ours = [p for p in pipeline.read_annotations(cfg.run.run_dir).to_pylist() if p["qc_passed"] and p["tile_id"] in kept]
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
