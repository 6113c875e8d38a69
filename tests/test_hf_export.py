"""`sarlang export-hf`: a dataset folder that `datasets.load_dataset(OUT)` reads as it is: three splits with
the export's row counts, images decoded equal to the exported PNGs, a card whose YAML header the Hub reads."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from sarlang_ray import cli


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


def _header(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_load_dataset_reads_the_demo_runs_export(demo_run, tmp_path):
    cfg, _ = demo_run
    run = Path(cfg.run.run_dir)
    out = tmp_path / "hf"
    assert cli.main(["export-hf", str(run), str(out), "--license", "cc-by-4.0"]) == 0
    ds = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    names = {"train": "train", "val": "validation", "test": "test"}
    expected = {
        names[s]: sum(
            pq.ParquetFile(f).metadata.num_rows for f in (run / "export" / "parquet" / s).glob("*.parquet")
        )
        for s in names
    }
    assert {s: ds[s].num_rows for s in ds} == expected and all(expected.values())
    assert isinstance(ds["test"].features["image"], datasets.Image)
    pngs = run / "export" / "sarlang1m" / "SAR_images"
    for split in ds:
        seen = set()
        # every tile once: decoded by datasets, equal pixel for pixel to the exported PNG
        for row in ds[split]:
            if row["tile_id"] in seen:
                continue
            seen.add(row["tile_id"])
            with Image.open(pngs / f"{row['tile_id']}.png") as png:
                assert np.array_equal(np.asarray(row["image"]), np.asarray(png)), row["tile_id"]
        assert seen
    header = _header(out / "README.md")
    assert header["license"] == "cc-by-4.0"
    assert header["configs"][0]["data_files"] == [
        {"split": "train", "path": "data/train-*"},
        {"split": "validation", "path": "data/validation-*"},
        {"split": "test", "path": "data/test-*"},
    ]
    assert {s["name"]: s["num_examples"] for s in header["dataset_info"]["splits"]} == expected
    assert {"name": "image", "dtype": "image"} in header["dataset_info"]["features"]
    card = (out / "README.md").read_text()
    assert "## Leakage" in card and '"leak_free": true' in card and "no leakage measured" in card


def test_an_imported_table_exports_too(tmp_path):
    """An imported SARChat-Bench table: its own splits (train, test), images read from image_uri, no leakage
    claim."""
    from test_sarchat import build_sarchat

    from sarlang_ray import release

    root = tmp_path / "SARChat"
    build_sarchat(root)
    result = release.import_release(str(root))
    table = tmp_path / "pairs.parquet"
    release.write_import(result, str(table))
    out = tmp_path / "hf"
    assert cli.main(["export-hf", str(table), str(out), "--rows-per-shard", "10"]) == 0
    ds = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    splits = result.table["split"].to_pylist()
    assert {s: ds[s].num_rows for s in ds} == {s: splits.count(s) for s in set(splits)}
    assert len(list((out / "data").glob("test-*.parquet"))) > 1  # shards of 10 rows
    uris = dict(zip(result.table["pair_id"].to_pylist(), result.table["image_uri"].to_pylist()))
    for row in ds["test"]:
        with Image.open(uris[row["pair_id"]]) as png:
            assert np.array_equal(np.asarray(row["image"]), np.asarray(png))
    assert set(ds["test"]["task"]) == set(release.SARCHAT_TASKS)
    assert "No leakage report" in (out / "README.md").read_text()
    assert cli.main(["export-hf", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 1
