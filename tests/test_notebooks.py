"""The notebooks run top to bottom on the sample archive (nbclient, a real kernel) and are committed clean."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _execute(name: str, run_dir: str) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    old = os.environ.get("SARLANG_RUN_DIR")
    os.environ["SARLANG_RUN_DIR"] = run_dir  # the kernel inherits it
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
        ).execute()
    finally:
        os.environ.pop("SARLANG_RUN_DIR") if old is None else os.environ.__setitem__("SARLANG_RUN_DIR", old)
    return nb


def _images(nb) -> int:
    return sum(
        "image/png" in out.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(
                out.get("text", "")
                + str(out.get("data", {}).get("text/plain", ""))
                + str(out.get("data", {}).get("text/markdown", ""))
            )
    return "\n".join(parts)


def test_notebooks_are_committed_without_outputs():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["01_explore_archive.ipynb", "02_annotations_qc.ipynb", "03_training_leaderboard.ipynb"]
    for name in names:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert all(
            not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code"
        ), name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["01_explore_archive.ipynb", "02_annotations_qc.ipynb"])
def test_data_notebooks_execute(name, demo_run):
    cfg, summary = demo_run
    nb = _execute(name, cfg.run.run_dir)
    assert _images(nb) >= 2  # a footprint map / bar chart and a tile picture
    text = _text(nb)
    if name.startswith("01"):
        assert f"{summary['stages']['align']['written']} tiles" in text
        # the map per region draws one polygon per tile, in its split's colour (counted on the axes' artists)
        assert _drawn_footprints(text) == _footprints_by_region(Path(cfg.run.run_dir))
    else:
        assert "passed QC" in text and "object identification" in text
        assert "/view/tile.html#" in text  # where the viewer shows the same tile


def _drawn_footprints(text: str) -> dict:
    """{(region, split): polygons} from notebook 01's "<region>: <split> <n>, ... tile footprints drawn"
    lines."""
    import re

    out = {}
    for region, body in re.findall(r"^(\S+): (.+) tile footprints drawn$", text, flags=re.MULTILINE):
        for split, n in re.findall(r"(train|val|test|not exported) (\d+)", body):
            out[(region, split)] = int(n)
    return out


def _footprints_by_region(run_dir: Path) -> dict:
    """The same counts from the tables (pyarrow): tiles per region, split from the export's Parquet shards."""
    from collections import Counter

    import pyarrow.parquet as pq

    split_of = {}
    for split in ("train", "val", "test"):
        files = sorted((run_dir / "export" / "parquet" / split).glob("*.parquet"))
        if files:
            split_of.update(
                dict.fromkeys(pq.read_table(files, columns=["tile_id"])["tile_id"].to_pylist(), split)
            )
    tiles = pq.read_table(
        sorted((run_dir / "align" / "shards").glob("*/*.parquet")), columns=["tile_id", "region"]
    ).to_pylist()
    return dict(Counter((t["region"], split_of.get(t["tile_id"], "not exported")) for t in tiles))


@pytest.mark.slow
def test_leaderboard_notebook_executes(trained_run):
    cfg, _ = trained_run
    nb = _execute("03_training_leaderboard.ipynb", cfg.run.run_dir)
    assert _images(nb) >= 2  # loss curve, per-application bars
    text = _text(nb)
    assert "Leaderboard" in text and "majority answer" in text and "finetuned" in text
    assert "/view/leaderboard.html" in text
