"""Sharded exports (issue 31): above export.shard_records / shard_bytes a split's LLaMA-Factory JSON,
SARLANG-1M JSON and CSV and Parquet are numbered shards written by Ray tasks, listed in manifest.json, and the
frameworks read them as one dataset with the records of the single-file export; above export.images_per_prefix
the PNGs go under SAR_images/<scene>/<gsd>m/."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import demo_config

SPLITS = ("train", "val", "test")
SHARD_RECORDS = 100


@pytest.fixture(scope="module")
def sharded(demo_run, tmp_path_factory):
    """The demo's export again, from a copy of its run folder, with shards of at most 100 records and PNGs
    nested from 10 tiles on: (single-file export folder, sharded export folder, counts)."""
    from sarlang_ray.stages import export as export_stage

    cfg, _ = demo_run
    run_dir = tmp_path_factory.mktemp("sharded") / "run"
    for stage in ("catalog", "align", "annotate"):
        shutil.copytree(Path(cfg.run.run_dir) / stage, run_dir / stage)
    counts = export_stage.run(
        demo_config(run_dir, f"export.shard_records={SHARD_RECORDS}", "export.images_per_prefix=10")
    )
    return Path(cfg.run.run_dir) / "export", run_dir / "export", counts


def _llamafactory_load(dataset_dir: Path, name: str, cache: Path):
    """LLaMA-Factory's file handling, reproduced (fast, without its package; its own code reads the shards in
    :func:`test_llamafactorys_own_loader_reads_the_shards_as_the_single_file`): ``data/loader.py``
    ``_load_single_dataset`` (hiyouga/LLaMA-Factory 0.9.5, load_from == "file") joins ``dataset_dir`` and the
    dataset's ``file_name`` from ``dataset_info.json``; a folder
    gives every file in ``os.listdir`` order, whose extensions must map to one builder (``FILEEXT2TYPE``),
    then ``datasets.load_dataset(path=builder, data_files=files, split="train")``."""
    from datasets import load_dataset

    filetypes = {
        "arrow": "arrow",
        "csv": "csv",
        "json": "json",
        "jsonl": "json",
        "parquet": "parquet",
        "txt": "text",
    }
    attr = json.loads((dataset_dir / "dataset_info.json").read_text())[name]
    local_path = os.path.join(dataset_dir, attr["file_name"])
    if os.path.isdir(local_path):
        data_files = [os.path.join(local_path, f) for f in os.listdir(local_path)]
    elif os.path.isfile(local_path):
        data_files = [local_path]
    else:
        raise ValueError(f"File {local_path} not found.")
    builder = filetypes.get(os.path.splitext(data_files[0])[-1][1:])
    assert builder is not None and all(
        filetypes.get(os.path.splitext(f)[-1][1:]) == builder for f in data_files
    )
    return load_dataset(path=builder, data_files=data_files, split="train", cache_dir=str(cache))


LLAMAFACTORY = "llamafactory==0.9.5"  # the release whose data/loader.py the helper above was read from
LF_VENV = Path(__file__).resolve().parents[1] / ".lf-venv"  # ignored by git; built by the fixture below
# run by the LLaMA-Factory venv's Python: its own parser (data/parser.py get_dataset_list reads
# dataset_info.json) and loader (data/loader.py _load_single_dataset: the folder's files through datasets,
# then align_dataset into its standard columns); llamafactory/data/__init__.py is not run (its template module
# imports torchaudio, whose wheels are built for other torch versions; the loader does not use it), nor
# hparams/__init__ (the trainers)
LF_LOAD = """
import json, sys, types
from pathlib import Path
import llamafactory
root = Path(llamafactory.__file__).parent
for sub in ("data", "hparams"):
    pkg = types.ModuleType("llamafactory." + sub)
    pkg.__path__ = [str(root / sub)]
    sys.modules[pkg.__name__] = pkg
from transformers import Seq2SeqTrainingArguments
from llamafactory.data import loader, parser
from llamafactory.hparams.data_args import DataArguments
from llamafactory.hparams.model_args import ModelArguments
cache, out = sys.argv[1], {}
training_args = Seq2SeqTrainingArguments(output_dir=cache)
for arg in sys.argv[2:]:  # dataset_dir:name, each loaded as a training config naming it would
    dataset_dir, name = arg.rsplit(":", 1)
    attr, = parser.get_dataset_list([name], dataset_dir)
    ds = loader._load_single_dataset(
        attr,
        ModelArguments(model_name_or_path="unused", cache_dir=cache),
        DataArguments(dataset_dir=dataset_dir, media_dir=dataset_dir),
        training_args,
    )
    out[arg] = {"load_from": attr.load_from, "file_name": attr.dataset_name, "rows": ds.to_list()}
print(json.dumps(out))
"""


@pytest.fixture(scope="session")
def llamafactory_python():
    """A Python with LLaMA-Factory's package, in its own venv under the worktree: ``pip install --no-deps`` of
    the pinned release (its requirements pin transformers, datasets and peft below this project's), the
    project venv's packages visible through a ``.pth`` file (so torch and datasets are the project's,
    unchanged)."""
    import site
    import subprocess
    import sys

    python = LF_VENV / "bin" / "python"
    marker = LF_VENV / f"{LLAMAFACTORY}.installed"
    if not marker.exists():
        shutil.rmtree(LF_VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(LF_VENV)], check=True)
        purelib = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        Path(purelib, "_sarlang_project.pth").write_text(site.getsitepackages()[0] + "\n")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(python),
                "install",
                "--no-deps",
                "-q",
                "--disable-pip-version-check",
                LLAMAFACTORY,
            ],
            check=False,
            capture_output=True,
            text=True,
        )
        if done.returncode:
            if any(
                w in done.stderr
                for w in (
                    "NewConnectionError",
                    "Network is unreachable",
                    "No matching distribution",
                    "Temporary failure in name resolution",
                )
            ):
                pytest.skip(f"PyPI unreachable, {LLAMAFACTORY} not installed: {done.stderr.strip()[-300:]}")
            raise RuntimeError(f"pip install {LLAMAFACTORY} into {LF_VENV} failed: {done.stderr}")
        marker.touch()
    return python


def _llamafactory_rows(python: Path, datasets: list[tuple[Path, str]], cache: Path) -> dict:
    """What LLaMA-Factory's loader gives for each (dataset_dir, dataset name), by "dataset_dir:name"; one
    process (its imports take most of the time)."""
    import subprocess

    args = [f"{d}:{name}" for d, name in datasets]
    done = subprocess.run(
        [str(python), "-c", LF_LOAD, str(cache), *args],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_llamafactorys_own_loader_reads_the_shards_as_the_single_file(sharded, llamafactory_python, tmp_path):
    """LLaMA-Factory 0.9.5's own code (installed from PyPI in .lf-venv) reads the sharded split through our
    dataset_info.json: its parser takes the folder as a file dataset, its loader loads every shard as one
    dataset and converts it (ShareGPT columns and tags, images resolved against media_dir) to the same rows as
    the single-file export gives, with the same PNGs behind the image paths."""
    single, out, _ = sharded
    records_of = {s: json.loads((single / "llamafactory" / f"sarlang_{s}.json").read_text()) for s in SPLITS}
    big = [s for s in SPLITS if len(records_of[s]) > SHARD_RECORDS]
    assert big  # at least one split was sharded
    loaded = _llamafactory_rows(
        llamafactory_python,
        [(d / "llamafactory", f"sarlang_{s}") for s in big for d in (out, single)],
        tmp_path,
    )
    for split in big:
        records = records_of[split]
        got = loaded[f"{out / 'llamafactory'}:sarlang_{split}"]
        want = loaded[f"{single / 'llamafactory'}:sarlang_{split}"]
        assert got["load_from"] == "file" and got["file_name"] == f"sarlang_{split}"  # the folder of shards
        assert want["file_name"] == f"sarlang_{split}.json"
        rows, expected = got["rows"], want["rows"]
        assert len(rows) == len(expected) == len(records)

        def key(r):  # the loader lists a folder in os.listdir order: compare the rows, not their order
            return json.dumps({k: v for k, v in r.items() if k != "_images"}, sort_keys=True), Path(
                r["_images"][0]
            ).name

        rows, expected = sorted(rows, key=key), sorted(expected, key=key)
        assert [key(r) for r in rows] == [key(r) for r in expected]
        # the prompt and answer of each record, in its order of the single file (the converter's own columns)
        assert sorted(r["_prompt"][0]["content"] + r["_response"][0]["content"] for r in rows) == sorted(
            r["messages"][0]["content"] + r["messages"][1]["content"] for r in records
        )
        for a, b in zip(rows, expected):  # the images resolved to files that exist, and hold the same PNG
            assert (
                Path(a["_images"][0]).is_file()
                and Path(a["_images"][0]).read_bytes() == Path(b["_images"][0]).read_bytes()
            )


def _image_bytes(root: Path, paths: list[str]) -> list[bytes]:
    return [(root / p).resolve().read_bytes() for p in paths]


def _same_records(
    single: list[dict], sharded: list[dict], single_root: Path, sharded_root: Path, key: str = "images"
):
    """The same records in the same order, but for where their images are; those are the same PNGs."""
    assert len(single) == len(sharded) > 0
    for a, b in zip(single, sharded):
        assert {k: v for k, v in a.items() if k != key} == {k: v for k, v in b.items() if k != key}
        assert [Path(p).name for p in a[key]] == [Path(p).name for p in b[key]]
        assert _image_bytes(single_root, a[key]) == _image_bytes(sharded_root, b[key])


def test_big_files_are_numbered_shards_that_read_as_the_single_file(sharded, tmp_path):
    from datasets import load_dataset

    single, out, counts = sharded
    assert counts["written"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    align = single.parent / "align" / "shards"
    shard_of = {
        tid: str(f.relative_to(align))
        for f in align.rglob("*.parquet")
        for tid in pq.read_table(f, columns=["tile_id"])["tile_id"].to_pylist()
    }
    info = json.loads((out / "llamafactory" / "dataset_info.json").read_text())
    for split in SPLITS:
        records = json.loads((single / "llamafactory" / f"sarlang_{split}.json").read_text())
        folder = out / "llamafactory" / f"sarlang_{split}"
        if len(records) <= SHARD_RECORDS:  # small files stay one file, as published
            assert not folder.exists() and info[f"sarlang_{split}"]["file_name"] == f"sarlang_{split}.json"
            continue
        shards = sorted(folder.iterdir())
        assert len(shards) > 1 and not (out / "llamafactory" / f"sarlang_{split}.json").exists()
        assert info[f"sarlang_{split}"]["file_name"] == f"sarlang_{split}"
        # a shard holds whole tiles shards' records: at most SHARD_RECORDS, unless one tiles shard has more
        for p in shards:
            held = json.loads(p.read_text())
            assert (
                len(held) <= SHARD_RECORDS or len({shard_of[r["pair_id"].split("#")[0]] for r in held}) == 1
            ), p
        # the shards in name order are the single file's records in its order (json, and datasets' reader)
        joined = [r for p in shards for r in json.loads(p.read_text())]
        _same_records(records, joined, single / "llamafactory", out / "llamafactory")
        hf = load_dataset("json", data_files=[str(p) for p in shards], split="train", cache_dir=str(tmp_path))
        assert hf["pair_id"] == [r["pair_id"] for r in records] and hf["messages"] == [
            r["messages"] for r in records
        ]
        # LLaMA-Factory's own file handling, from dataset_info.json: one dataset, the same records (any order)
        lf = _llamafactory_load(out / "llamafactory", f"sarlang_{split}", tmp_path)
        by_id = {r["pair_id"]: r for r in lf}
        assert len(lf) == len(records) and set(by_id) == {r["pair_id"] for r in records}
        _same_records(
            records, [by_id[r["pair_id"]] for r in records], single / "llamafactory", out / "llamafactory"
        )
        # the manifest lists those shards, with their records and bytes
        entry = manifest["files"][f"llamafactory/sarlang_{split}.json"]
        assert entry["sharded"] and entry["records"] == len(records)
        assert [f["path"] for f in entry["files"]] == [str(p.relative_to(out)) for p in shards]
        assert [f["bytes"] for f in entry["files"]] == [p.stat().st_size for p in shards]
        # the SARLANG-1M layout: VQA JSON and caption CSVs, the same way
        vqa = json.loads((single / "sarlang1m" / "vqa" / f"vqa_{split}.json").read_text())
        vqa_shards = (
            sorted((out / "sarlang1m" / "vqa" / f"vqa_{split}").glob("*.json"))
            if len(vqa) > SHARD_RECORDS
            else [out / "sarlang1m" / "vqa" / f"vqa_{split}.json"]
        )
        _same_records(
            vqa,
            [r for p in vqa_shards for r in json.loads(p.read_text())],
            single / "sarlang1m",
            out / "sarlang1m",
        )
        for kind in ("concise", "detailed"):
            rows = list(
                csv.DictReader((single / "sarlang1m" / "captions" / f"{kind}_{split}.csv").open(newline=""))
            )
            target = out / "sarlang1m" / "captions" / f"{kind}_{split}"
            files = (
                sorted(target.glob("*.csv")) if len(rows) > SHARD_RECORDS else [target.with_suffix(".csv")]
            )
            got = load_dataset(
                "csv", data_files=[str(f) for f in files], split="train", cache_dir=str(tmp_path)
            ).to_list()
            _same_records(
                [{**r, "image": [r["image"]]} for r in rows],
                [{**r, "image": [r["image"]]} for r in got],
                single / "sarlang1m" / "SAR_images",
                out / "sarlang1m" / "SAR_images",
                key="image",
            )
    # Parquet: numbered shards in parquet/<split>/ (nothing else there), the single export's rows in its order
    for split in SPLITS:
        before = sorted((single / "parquet" / split).glob("*.parquet"))
        after = sorted((out / "parquet" / split).glob("*.parquet"))
        a = pq.read_table(before).to_pylist()
        b = load_dataset(
            "parquet", data_files=[str(p) for p in after], split="train", cache_dir=str(tmp_path)
        )
        assert len(b) == len(a) and b["pair_id"] == [r["pair_id"] for r in a]
        raw = pq.read_table(after).to_pylist()
        assert [{**r, "image": r["image"]["bytes"]} for r in raw] == [
            {**r, "image": r["image"]["bytes"]} for r in a
        ]
        if len(a) > SHARD_RECORDS:
            assert all("-of-" in p.name for p in after) and len(after) > 1
            assert manifest["files"][f"parquet/{split}.parquet"]["sharded"]
        assert manifest["files"][f"parquet/{split}.parquet"]["records"] == len(a)
    assert not (out / "_parts").exists()


def test_pngs_spread_under_scene_and_gsd_prefixes(sharded):
    single, out, _ = sharded
    flat = {p.name: p.read_bytes() for p in (single / "sarlang1m" / "SAR_images").glob("*.png")}
    nested = sorted((out / "sarlang1m" / "SAR_images").rglob("*.png"))
    assert len(nested) == len(flat) > 10 and {p.name: p.read_bytes() for p in nested} == flat
    tiles = {
        t["tile_id"]: t
        for t in pq.read_table(
            sorted((single.parent / "align" / "shards").rglob("*.parquet")),
            columns=["tile_id", "scene_id", "gsd_m"],
        ).to_pylist()
    }
    for p in nested:  # SAR_images/<scene>/<gsd>m/<tile>.png, from the tiles table
        t = tiles[p.stem]
        assert p.relative_to(out / "sarlang1m" / "SAR_images").parts == (
            t["scene_id"],
            f"{t['gsd_m']:g}m",
            p.name,
        )
    assert json.loads((out / "manifest.json").read_text())["images"]["layout"] == "<scene>/<gsd>m/<tile>.png"


def test_a_small_export_keeps_the_published_single_files(demo_run):
    cfg, _ = demo_run
    out = Path(cfg.run.run_dir) / "export"
    manifest = json.loads((out / "manifest.json").read_text())
    assert not any(e["sharded"] for e in manifest["files"].values())
    for split in SPLITS:
        assert (out / "llamafactory" / f"sarlang_{split}.json").is_file()
        assert (out / "sarlang1m" / "vqa" / f"vqa_{split}.json").is_file()
    assert {p.parent.name for p in (out / "sarlang1m" / "SAR_images").rglob("*.png")} == {"SAR_images"}
    for target, entry in manifest["files"].items():
        for f in entry["files"]:
            assert (out / f["path"]).stat().st_size == f["bytes"], target


def test_a_sharded_export_keeps_the_card_pictures_and_each_tiles_split(sharded):
    """The card and `sarlang view` find each exported tile's split in export/tiles/ (named like the tiles
    shard), which a sharded export keeps although its per-shard Parquet is merged away: the same tiles and
    splits as the exported Parquet rows read here, and the card still has its mosaic of test tiles."""
    import re

    _, out, _ = sharded
    rows = pq.read_table(
        sorted((out / "parquet").rglob("*.parquet")), columns=["tile_id", "split"]
    ).to_pylist()
    merged = [d for d in (out / "parquet").iterdir() if not any("__" in p.name for p in d.glob("*.parquet"))]
    assert merged  # a split above the threshold: its per-shard files were merged into numbered shards
    member = pq.read_table(sorted((out / "tiles").glob("*.parquet"))).to_pylist()
    assert len(member) == len({m["tile_id"] for m in member})
    assert {m["tile_id"]: m["split"] for m in member} == {r["tile_id"]: r["split"] for r in rows}
    card = (out / "dataset_card.md").read_text()
    assert "![samples](plots/samples.png)" in card and (out / "plots" / "samples.png").stat().st_size > 10_000
    line = next(x for x in card.splitlines() if "random test tiles" in x)
    shown = re.findall(r"`([^`]+)`", line.split(":", 1)[1])
    assert shown and {s for s in shown} <= {r["tile_id"] for r in rows if r["split"] == "test"}
