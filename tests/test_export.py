"""Export: leakage-free splits, loadable Parquet, LLaMA-Factory JSON, SARLANG-1M layout and its re-import."""

from __future__ import annotations

import json
import os
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


def _brute_force_leaks(
    tiles: list[dict], split_of: dict[str, str], buffer_m: float
) -> tuple[float, int, int]:
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
        for b in ids[i + 1 :]:
            if split_of[a] == split_of[b]:
                continue
            pb = ops.transform(to_utm, geo[b])
            area += pa_.intersection(pb).area
            near += pa_.distance(pb) < buffer_m
    labels: dict[str, set] = {}
    for t in tiles:
        if t["tile_id"] in split_of:
            labels.setdefault(split_of[t["tile_id"]], set()).update(o["label_id"] for o in t["objects"])
    shared = sum(
        len(labels.get(x, set()) & labels.get(y, set()))
        for x, y in (("train", "val"), ("train", "test"), ("val", "test"))
    )
    return area, near, shared


def test_default_split_is_geographic_with_no_shared_ground_or_objects(exported):
    """Tiles of the two Rotterdam scenes (0.5 m and 5 m, the same city) used to land in train and test."""
    cfg, summary, out = exported
    assert cfg.export.split_by == "geographic"
    split_of = _exported_tiles(out)
    assert set(split_of.values()) == {"train", "val", "test"}, "all three splits hold tiles"
    tiles = pipeline.read_tiles(
        cfg.run.run_dir, columns=["tile_id", "footprint", "crs", "objects"]
    ).to_pylist()
    area, near, shared = _brute_force_leaks(tiles, split_of, cfg.export.buffer_m)
    assert (area, near, shared) == (0.0, 0, 0)
    report = json.loads((out / "leakage.json").read_text())
    assert report["leak_free"] and all(
        p == {"intersection_m2": 0.0, "tile_pairs_within_buffer": 0, "shared_objects": 0}
        for p in report["pairs"].values()
    )
    # boundary tiles dropped are in the errors table, and the counts reconcile
    e = summary["stages"]["export"]
    dropped = [
        r for r in pipeline.read_errors(cfg.run.run_dir).to_pylist() if r["error_class"] == "split_boundary"
    ]
    assert (
        e["planned"] == e["written"] + e["rejected"]
        and e["rejected"] == len(dropped) == report["dropped_tiles"]
    )
    assert e["written"] == len(split_of) and not {r["item"] for r in dropped} & set(split_of)
    assert "## Leakage between splits" in (out / "dataset_card.md").read_text()


def test_the_scene_split_leaks_and_the_report_says_so(exported):
    """The old default: no scene in two splits, yet the same ground in train and test."""
    from sarlang_ray.export import split_inputs
    from sarlang_ray.splits import group_splits, leakage_report

    cfg, _, _ = exported
    candidates = [t for _, t in split_inputs(cfg.run.run_dir)]
    split_of = group_splits(candidates, "scene", {"train": 0.7, "val": 0.1, "test": 0.2}, cfg.run.seed)
    report = leakage_report(candidates, split_of, cfg.export.buffer_m)
    tiles = pipeline.read_tiles(
        cfg.run.run_dir, columns=["tile_id", "footprint", "crs", "objects"]
    ).to_pylist()
    area, _near, shared = _brute_force_leaks(tiles, split_of, cfg.export.buffer_m)
    assert not report["leak_free"] and shared > 0 and area > 0
    assert sum(p["shared_objects"] for p in report["pairs"].values()) == shared
    geodesic = sum(p["intersection_m2"] for p in report["pairs"].values())
    # the report unions footprints per split before intersecting; the brute force sums tile pairs (overlaps
    # within a split count several times there), so the report is at most the pairwise sum
    assert 0 < geodesic <= area * 1.01


def test_splits_are_deterministic_and_follow_the_seed(exported):
    from sarlang_ray.export import split_inputs
    from sarlang_ray.splits import geographic_splits

    cfg, _, _ = exported
    candidates = [t for _, t in split_inputs(cfg.run.run_dir)]
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
    assert set(ds.unique("application")) <= {
        "image description",
        "object identification",
        "object classification",
        "instance counting",
        "region referring",
        "object positioning",
        "others",
    }


def test_llamafactory_json_is_well_formed(exported):
    _, _summary, out = exported
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
    ours = [
        p
        for p in pipeline.read_annotations(cfg.run.run_dir).to_pylist()
        if p["qc_passed"] and p["tile_id"] in kept
    ]
    key = lambda p: (
        p["tile_id"],
        p["kind"],
        p["application"],
        p["question_type"],
        p["question"],
        p["answer"],
    )
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
    proc = subprocess.run(
        [sys.executable, "-m", "sarlang_ray", "import", str(out / "sarlang1m"), str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
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


# ---------------------------------------------------------------- the export runs per shard on Ray workers
def _expected_files(cfg) -> dict[str, bytes]:
    """What the export must write, computed here from the tiles and annotations tables alone, the way the old
    serial exporter did (records in shard order, then pair order; whole-list ``json.dumps``;
    ``csv.DictWriter``): the assembled JSON/CSV files, every Parquet shard and every PNG, path under export/
    -> bytes."""
    import csv
    import io as _io

    import pyarrow as pa

    from sarlang_ray import io, tables
    from sarlang_ray.export import EXPORT_SCHEMA, PAIR_COLUMNS, split_inputs
    from sarlang_ray.splits import SPLITS, geographic_splits

    e = cfg.export
    split_of, _, _ = geographic_splits(
        [t for _, t in split_inputs(cfg.run.run_dir)],
        {"train": e.train, "val": e.val, "test": e.test},
        cfg.run.seed,
        e.block_m,
        e.buffer_m,
    )
    llama = {s: [] for s in SPLITS}
    captions = {(k, s): [] for k in ("concise", "detailed") for s in SPLITS}
    files: dict[str, bytes] = {}
    root = tables.shard_root(cfg.run.run_dir, "align")
    for uri in tables.tiles_table_shards(cfg.run.run_dir):
        name = io.relative(uri, root)
        png = dict(zip(*io.read_parquet(uri, columns=["tile_id", "sar_png"]).to_pydict().values()))
        pairs = [
            p
            for p in io.read_parquet(
                io.join(tables.shard_root(cfg.run.run_dir, "annotate"), name)
            ).to_pylist()
            if p["qc_passed"] and p["tile_id"] in split_of
        ]
        rows = {s: [] for s in SPLITS}
        for p in pairs:
            split, image = split_of[p["tile_id"]], f"{p['tile_id']}.png"
            files[f"sarlang1m/SAR_images/{image}"] = png[p["tile_id"]]
            rows[split].append(
                {
                    **{c: p[c] for c in PAIR_COLUMNS},
                    "split": split,
                    "image": {"bytes": png[p["tile_id"]], "path": image},
                }
            )
            llama[split].append(
                {
                    "messages": [
                        {"role": "user", "content": "<image>" + p["question"]},
                        {"role": "assistant", "content": p["answer"]},
                    ],
                    "images": [f"images/{image}"],
                    "pair_id": p["pair_id"],
                    "application": p["application"],
                    "question_type": p["question_type"],
                }
            )
            if p["kind"] != "vqa":
                captions[(p["kind"].split("_")[1], split)].append({"image": image, "caption": p["answer"]})
        for split, r in rows.items():
            if r:
                files[f"parquet/{split}/{name.replace('/', '__')}"] = io.parquet_bytes(
                    pa.Table.from_pylist(r, schema=EXPORT_SCHEMA)
                )
    for split in SPLITS:

        def dump(records: list[dict], folder: str) -> bytes:
            images = [{**r, "images": [r["images"][0].replace("images/", folder)]} for r in records]
            return json.dumps(images, indent=2, sort_keys=True).encode()

        files[f"llamafactory/sarlang_{split}.json"] = dump(llama[split], "../sarlang1m/SAR_images/")
        files[f"sarlang1m/vqa/vqa_{split}.json"] = dump(
            [r for r in llama[split] if r["application"] != "image description"], "SAR_images/"
        )
        for kind in ("concise", "detailed"):
            buf = _io.StringIO()
            w = csv.DictWriter(buf, fieldnames=["image", "caption"])
            w.writeheader()
            w.writerows(captions[(kind, split)])
            files[f"sarlang1m/captions/{kind}_{split}.csv"] = buf.getvalue().encode()
    return files


def test_the_files_are_those_the_tables_give(exported):
    """Every assembled JSON/CSV file, Parquet shard and PNG, byte for byte, as computed from the tables
    directly; the JSON files are valid and hold exactly the QC-passed pairs of the split tiles."""
    cfg, summary, out = exported
    expected = _expected_files(cfg)
    written = {
        str(f.relative_to(out))
        for top in ("parquet", "sarlang1m", "llamafactory")
        for f in (out / top).rglob("*")
        if f.is_file()
    }
    assert written - {"llamafactory/dataset_info.json"} == set(expected)
    for path, data in sorted(expected.items()):
        assert (out / path).read_bytes() == data, path
    pairs = sum(
        len(json.loads((out / f"llamafactory/sarlang_{s}.json").read_text()))
        for s in ("train", "val", "test")
    )
    assert pairs == sum(c["pairs"] for c in summary["stages"]["export"]["splits"].values()) > 0
    assert not (out / "_parts").exists(), "per-shard parts are removed once assembled"


def test_each_png_is_written_once_and_both_layouts_name_it(exported):
    _, _, out = exported
    pngs = [f for f in out.rglob("*.png") if "plots" not in f.parts]
    tiles = set(_exported_tiles(out))
    assert sorted(f.name for f in pngs) == sorted(f"{t}.png" for t in tiles), (
        "one file per exported tile, no copies"
    )
    assert {f.parent for f in pngs} == {out / "sarlang1m" / "SAR_images"} and not (
        out / "llamafactory" / "images"
    ).exists()
    # LLaMA-Factory joins image paths to media_dir, which defaults to dataset_dir (export/llamafactory)
    used = set()
    for split in ("train", "val", "test"):
        for r in json.loads((out / "llamafactory" / f"sarlang_{split}.json").read_text()):
            used.add((out / "llamafactory" / r["images"][0]).resolve())
        for r in json.loads((out / "sarlang1m" / "vqa" / f"vqa_{split}.json").read_text()):
            assert (out / "sarlang1m" / r["images"][0]).resolve() in {f.resolve() for f in pngs}
    assert used == {f.resolve() for f in pngs}


def test_workers_export_the_shards_and_a_second_export_is_byte_identical(exported, tmp_path, monkeypatch):
    """The export of a copy of the run folder: the driver reads no shard of the tiles table (Ray tasks plan
    the split) and writes no PNG, Parquet shard or part (the actors do), and every file equals the first
    export's."""
    import shutil

    import pyarrow.parquet as pq
    from conftest import demo_config

    from sarlang_ray import io
    from sarlang_ray.stages import export as export_stage

    cfg, _, out = exported
    run_dir = tmp_path / "run"
    for stage in ("catalog", "align", "annotate"):
        shutil.copytree(Path(cfg.run.run_dir) / stage, run_dir / stage)
    reads, writes = [], []
    read_parquet, write_bytes = io.read_parquet, io.write_bytes_atomic
    monkeypatch.setattr(
        io,
        "read_parquet",
        lambda uris, columns=None: reads.append((uris, columns)) or read_parquet(uris, columns),
    )
    monkeypatch.setattr(
        io, "write_bytes_atomic", lambda uri, data: writes.append(uri) or write_bytes(uri, data)
    )
    counts = export_stage.run(demo_config(run_dir))
    monkeypatch.undo()

    tile_reads = [c for u, c in reads if "/align/shards/" in str(u)]
    assert not tile_reads, (
        f"the split is planned by Ray tasks (export.planner=workers): the driver reads {tile_reads}"
    )
    assert not [
        u for u in writes if "/plots/" not in u and (u.endswith((".png", ".part")) or "/parquet/" in u)
    ]
    again = run_dir / "export"
    assert counts["shards"] > 1 and len(list(again.glob("sarlang1m/SAR_images/*.png"))) == counts["written"]

    def files(root: Path) -> set[str]:
        return {str(f.relative_to(root)) for f in root.rglob("*") if f.is_file()}

    assert files(again) == files(out)
    for path in sorted(files(out) - {"_SUCCESS.json", "errors.parquet"}):
        assert (again / path).read_bytes() == (out / path).read_bytes(), path
    # rows carry the time
    untimed = [pq.read_table(d / "errors.parquet").drop_columns(["time"]) for d in (again, out)]
    assert untimed[0].equals(untimed[1])


def test_an_interrupted_export_resumes_finished_shards(exported, tmp_path):
    """A shard whose parts were all written (its ``_parts/_done`` record) is not exported again on resume."""
    import shutil

    from conftest import demo_config

    from sarlang_ray import export
    from sarlang_ray.stages import execution
    from sarlang_ray.stages.execution import Work

    cfg, _, _ = exported
    run_dir = tmp_path / "run"
    for stage in ("align", "annotate"):
        shutil.copytree(Path(cfg.run.run_dir) / stage, run_dir / stage)
    items, _ = export.plan(demo_config(run_dir))
    first = list(execution.map(Work(items[:1], export.ExportShard, (str(run_dir),))))
    again = sorted(
        execution.map(Work(items[:2], export.ExportShard, (str(run_dir),))), key=lambda m: m["index"]
    )
    assert [m["skipped"] for m in again] == [True, False] and again[0]["stats"] == first[0]["stats"]
    assert str(os.getpid()) not in {m["worker"].rsplit(":", 1)[1] for m in first + again}, (
        "shards are exported by Ray workers"
    )


def test_a_stream_write_is_all_or_nothing(tmp_path):
    from sarlang_ray.io import write_stream_atomic

    target = tmp_path / "f.json"

    def broken():
        yield b"[\n"
        raise OSError("disk gone")

    with pytest.raises(OSError):
        write_stream_atomic(str(target), broken())
    assert list(tmp_path.iterdir()) == []
    write_stream_atomic(str(target), iter([b"[", b"1", b"]"]))
    assert target.read_bytes() == b"[1]" and list(tmp_path.iterdir()) == [target]


@pytest.mark.slow
def test_export_to_s3_equals_the_local_export(exported, s3):
    """Run folder on s3:// (SeaweedFS): workers write the shards there and the files are streamed together
    there (one upload each), equal to the local export."""
    import fsspec
    from conftest import demo_config

    from sarlang_ray.stages import export as export_stage

    cfg, summary, out = exported
    fs = fsspec.filesystem("s3")
    for stage in ("catalog", "align", "annotate"):
        fs.put(str(Path(cfg.run.run_dir) / stage), f"sarlang/export-run/{stage}", recursive=True)
    counts = export_stage.run(demo_config(Path("unused"), "run.run_dir=s3://sarlang/export-run"))
    assert counts["splits"] == summary["stages"]["export"]["splits"]
    remote = "sarlang/export-run/export"
    names = {p[len(remote) + 1 :] for p in fs.find(remote)}
    local = {str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()}
    assert names == local
    for path in sorted(local - {"_SUCCESS.json", "errors.parquet"}):
        assert fs.cat_file(f"{remote}/{path}") == (out / path).read_bytes(), path


def test_importing_our_llamafactory_folder_names_the_folder_to_import_instead(exported):
    """`sarlang import export/llamafactory` cannot follow the records' ``../sarlang1m/SAR_images/`` paths (a
    release must not point outside itself, tests/test_security.py): every record is refused, and the
    reason names the sibling folder that holds the same pairs with their images; importing that one works."""
    from sarlang_ray import release

    _, _, out = exported
    refused = release.import_release(str(out / "llamafactory"))
    errors = refused.errors.to_pylist()
    records = sum(len(json.loads(p.read_text())) for p in (out / "llamafactory").glob("sarlang_*.json"))
    assert refused.table.num_rows == 0 and len(errors) == records > 0
    assert {e["error_class"] for e in errors} == {"unsafe_path"}
    assert all(f"sarlang import {out}/sarlang1m OUT.parquet" in e["message"] for e in errors), errors[0][
        "message"
    ]
    followed = release.import_release(f"{out}/sarlang1m")
    assert followed.errors.num_rows == 0 and followed.table.num_rows >= records


def test_one_reason_rejecting_more_than_the_share_warns_in_the_summary(exported, tmp_path):
    """run.warn_reject_share below the export's share of split_boundary drops: the export warns, the
    marker keeps the reasons and the summary prints the warning under the stage; at the default share, not."""
    import shutil

    from conftest import demo_config

    cfg, summary, _ = exported
    e = summary["stages"]["export"]
    assert (
        e["rejected"] > 0
        and e["rejects_by_reason"] == {"split_boundary": e["rejected"]}
        and "warnings" not in e
    )
    run_dir = tmp_path / "run"
    for stage in ("catalog", "tile", "align", "annotate"):
        shutil.copytree(Path(cfg.run.run_dir) / stage, run_dir / stage)
    share = e["rejected"] / e["planned"] / 2
    again = pipeline.run(demo_config(run_dir, f"run.warn_reject_share={share}", "run.stages=[export]"))
    warning = (
        f"export: {e['rejected']} of {e['planned']} planned items ({e['rejected'] / e['planned']:.0%}) "
        "rejected "
        f"as split_boundary (more than run.warn_reject_share={share:g})"
    )
    assert [w.split(";")[0] for w in again["stages"]["export"]["warnings"]] == [warning]
    assert f"  !! WARNING {warning}" in pipeline.format_summary(again)
    marker = json.loads((run_dir / "export" / "_SUCCESS.json").read_text())
    assert marker["warnings"] == again["stages"]["export"]["warnings"]


def _exported_objects(out: Path, tiles: dict[str, dict], split_of: dict[str, str]) -> list[dict]:
    """(tile, split, object id, label id) of every object of every exported tile: from ``export/objects/``,
    checked against the tiles table; an export without that folder (older code) exports each object under
    its label id."""
    import pyarrow.parquet as pq

    files = sorted(out.glob("objects/*.parquet"))
    if not files:
        return [
            {"tile_id": tid, "split": s, "object_id": o["label_id"], "label_id": o["label_id"]}
            for tid, s in split_of.items()
            for o in tiles[tid]["objects"]
        ]
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert sorted((r["tile_id"], r["label_id"]) for r in rows) == sorted(
        (tid, o["label_id"]) for tid in split_of for o in tiles[tid]["objects"]
    ), "every object of every exported tile"
    assert all(split_of[r["tile_id"]] == r["split"] for r in rows)
    return rows


def test_a_long_road_across_split_blocks_is_in_no_two_splits(demo_run, tmp_path):
    """A 12 m wide road drawn from a val tile of Shanghai's 10 m scene through the 1 m scene (test), several
    kilometres and many tiles across 2 km blocks, with the default split: by brute force over the exported
    tiles, no object id (original or clipped) is in two splits. The road is longer than a block, so it is
    clipped: one part per split it crosses, each under its own id (before, tiles of val and test far apart
    both showed the road under one id, and the report said leak-free)."""
    import shutil

    import geopandas as gpd
    from conftest import demo_config
    from pyproj import Transformer
    from shapely import from_wkb
    from shapely.geometry import LineString
    from shapely.ops import transform

    from sarlang_ray.splits import EQUAL_AREA

    def clipped_id(label: str, split: str) -> str:  # as docs/export.md states it
        return f"{label}~{split}"

    cfg, _ = demo_run
    out0 = Path(cfg.run.run_dir) / "export"
    split0 = _exported_tiles(out0)
    t0 = {
        t["tile_id"]: t
        for t in pipeline.read_tiles(
            cfg.run.run_dir, columns=["tile_id", "scene_id", "gsd_m", "footprint"]
        ).to_pylist()
    }
    fine = [
        t for tid, t in t0.items() if t["scene_id"].startswith("shanghai_1m") and split0.get(tid) == "test"
    ]
    coarse = [
        t for tid, t in t0.items() if t["scene_id"].startswith("shanghai_10m") and split0.get(tid) == "val"
    ]
    assert fine and coarse, "the demo's Shanghai has test tiles (1 m scene) and val tiles (10 m scene)"
    centre = from_wkb(min(fine, key=lambda t: t["tile_id"])["footprint"]).centroid
    start = min((from_wkb(t["footprint"]).centroid for t in coarse), key=lambda c: c.distance(centre))
    utm = Transformer.from_crs("EPSG:4326", "EPSG:32651", always_xy=True)
    a, b = transform(utm.transform, start), transform(utm.transform, centre)
    road = LineString([(a.x, a.y), (b.x + 0.5 * (b.x - a.x), b.y + 0.5 * (b.y - a.y))]).buffer(
        6, cap_style="flat"
    )
    assert road.length / 2 > 2 * cfg.export.block_m  # blocks long

    run_dir = tmp_path / "run"
    shutil.copytree(Path(cfg.run.run_dir) / "archive", run_dir / "archive")
    gpd.GeoDataFrame({"class": ["road"]}, geometry=[road], crs="EPSG:32651").to_crs(4326).to_parquet(
        run_dir / "archive" / "labels" / "long_road.parquet"
    )
    road_id = "labels/long_road.parquet#feature=0"
    run = demo_config(run_dir, "run.stages=[catalog,tile,align,annotate,export]")
    assert run.export.split_by == "geographic" and run.export.block_m == 2000
    pipeline.run(run)

    out = run_dir / "export"
    split_of = _exported_tiles(out)
    tiles = {
        t["tile_id"]: t
        for t in pipeline.read_tiles(str(run_dir), columns=["tile_id", "footprint", "objects"]).to_pylist()
    }
    on_road = {tid for tid in split_of if road_id in {o["label_id"] for o in tiles[tid]["objects"]}}
    assert len(on_road) >= 8 and len({split_of[t] for t in on_road}) >= 2, (
        "the road is exported in tiles of two splits"
    )

    # brute force over the exported tiles: every object id and the splits whose tiles show it
    rows = _exported_objects(out, tiles, split_of)
    splits_of_id: dict[str, set] = {}
    for r in rows:
        splits_of_id.setdefault(r["object_id"], set()).add(r["split"])
    crossing = {i: sorted(s) for i, s in splits_of_id.items() if len(s) > 1}
    print(
        f"road in {len(on_road)} exported tiles of splits {sorted({split_of[t] for t in on_road})}; "
        f"{len(splits_of_id)} object ids; in two splits: {crossing}"
    )
    assert crossing == {}, f"object ids in two splits: {crossing}"
    clipped = {r["label_id"] for r in rows if r["object_id"] != r["label_id"]}
    assert not clipped & set(splits_of_id), "a clipped object is never exported under its original id"
    for r in rows:
        if r["label_id"] in clipped:
            assert r["object_id"] == clipped_id(r["label_id"], r["split"])
    road_parts = {r["object_id"] for r in rows if r["label_id"] == road_id}
    assert road_parts == {clipped_id(road_id, s) for s in {split_of[t] for t in on_road}}

    # a clipped object is longer than a block: its exported tiles' centroids lie more than block_m apart
    to_grid = Transformer.from_crs("EPSG:4326", EQUAL_AREA, always_xy=True)
    for label in clipped:
        xy = [
            to_grid.transform(*from_wkb(tiles[r["tile_id"]]["footprint"]).centroid.coords[0])
            for r in rows
            if r["label_id"] == label
        ]
        spans = [max(v[k] for v in xy) - min(v[k] for v in xy) for k in (0, 1)]
        assert max(spans) > run.export.block_m, (label, spans)
    report = json.loads((out / "leakage.json").read_text())
    assert report["leak_free"] and report["clipped_objects"] == len(clipped) >= 1
    assert report["clipped_parts"] == len(
        {(r["label_id"], r["split"]) for r in rows if r["label_id"] in clipped}
    )
    assert sum(p["shared_objects"] for p in report["pairs"].values()) == 0


def _row_of_tiles(n: int, labels) -> list:
    """``n`` tiles of ~110 m in a row ~300 m apart (lon 4 E, lat 52 N: across several 2 km blocks); tile i
    shows the label ids ``labels(i)``."""
    import shapely

    from sarlang_ray.splits import SplitTile

    return [
        SplitTile(
            f"t{i:02d}",
            "s",
            "r",
            shapely.box(4.0 + i * 0.0045, 52.0, 4.0015 + i * 0.0045, 52.001),
            "EPSG:32631",
            frozenset(labels(i)),
        )
        for i in range(n)
    ]


def test_objects_shared_at_any_distance_are_clipped_when_long_and_dropped_when_short():
    """The review's case (40 tiles ~300 m apart sharing one label: before, splits 28/4/8 with the label in
    all three and leak_free false) and short objects of three neighbouring tiles across block boundaries;
    checked by brute force over every tile kept: no object id in two splits."""
    from sarlang_ray.splits import geographic_splits, leakage_report, object_ids

    ratios = {"train": 0.7, "val": 0.1, "test": 0.2}
    for labels, long_ in (
        (lambda i: {"road"}, True),
        (lambda i: {f"o{j}" for j in range(i - 2, i + 1)}, False),
    ):
        tiles = _row_of_tiles(60, labels)
        kept, dropped, clipped = geographic_splits(tiles, ratios, 0, 2000.0, 50.0)
        assert set(kept.values()) == {"train", "val", "test"}
        seen: dict[str, set] = {}
        for t in tiles:
            if t.tile_id in kept:
                for i in object_ids(t, kept[t.tile_id], clipped):
                    seen.setdefault(i, set()).add(kept[t.tile_id])
        assert all(len(s) == 1 for s in seen.values()), {i: s for i, s in seen.items() if len(s) > 1}
        report = leakage_report(tiles, kept, 50.0, clipped)
        assert report["leak_free"] and report["clipped_objects"] == len(clipped)
        if long_:  # one road over 18 km: clipped into one part per split, nothing dropped for it
            assert clipped == {"road"} and not dropped and report["clipped_parts"] == 3
            assert seen.keys() == {"road~train", "road~val", "road~test"}
        else:  # objects of ~700 m: never clipped; their tiles in the minority split are dropped, and say why
            assert not clipped and dropped and {kind for kind, _ in dropped.values()} == {"split_object"}
            assert all("shows label object" in why for _, why in dropped.values())
            assert len(kept) + len(dropped) == len(tiles)
