"""No empty files (issue 31): a chunk writes its errors table and its contradiction findings only when they
have rows, and every reader (the errors table, the run summary, a resumed stage) takes a missing file as none.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from conftest import demo_config

from sarlang_ray import pipeline, tables
from sarlang_ray.errors import error_row

SIDE_FILES = {"tile": ["errors"], "align": ["errors", "label_errors"], "annotate": ["errors", "findings"]}


def _side_files(run: Path) -> dict[str, list[Path]]:
    return {
        f"{stage}/{d}": sorted(p for p in (run / stage / d).rglob("*") if p.is_file())
        for stage, dirs in SIDE_FILES.items()
        for d in dirs
    }


def _rows(path: Path) -> int:
    return len(json.loads(path.read_text())) if path.suffix == ".json" else pq.read_metadata(path).num_rows


def test_chunks_without_rows_write_no_side_file(demo_run):
    cfg, summary = demo_run
    run = Path(cfg.run.run_dir)
    files = _side_files(run)
    # every side file that exists holds rows: an empty one is never written
    assert all(_rows(p) > 0 for fs in files.values() for p in fs), {
        k: [str(p) for p in v] for k, v in files.items()
    }
    # align and annotate reject nothing on the demo (brute force: every tile of every shard came through), so
    # they wrote no errors or findings file at all, where before each of their shards wrote two or three
    for stage, before in (("align", "tile"), ("annotate", "align")):
        for shard in sorted((run / stage / "shards").rglob("*.parquet")):
            name = shard.relative_to(run / stage / "shards")
            ids_in = set(
                pq.read_table(run / before / "shards" / name, columns=["tile_id"])["tile_id"].to_pylist()
            )
            ids_out = set(pq.read_table(shard, columns=["tile_id"])["tile_id"].to_pylist())
            assert ids_in == ids_out, name
    assert files["align/errors"] == [] and files["annotate/errors"] == [] and files["annotate/findings"] == []
    # the tile stage rejects the demo's nodata tiles in some chunks only: files for those chunks, none for the
    # rest
    n_chunks = len(list((run / "tile" / "shards").rglob("*.parquet")))
    assert 0 < len(files["tile/errors"]) < n_chunks
    # the errors table reads what there is, and agrees with the summary (made from the workers' counts)
    errors = tables.read_errors(str(run)).to_pylist()
    by_reason = Counter(f"{e['stage']}:{e['error_class']}" for e in errors if e["stage"] != "catalog")
    assert dict(by_reason) == summary["rejects_by_reason"]
    assert sum(_rows(p) for p in files["tile/errors"]) == summary["stages"]["tile"]["rejected"] > 0
    # one stage's errors, or the table one file at a time: the same rows
    assert tables.read_errors(str(run), "tile").to_pylist() == [e for e in errors if e["stage"] == "tile"]
    assert tables.read_errors(str(run), "annotate").num_rows == 0
    assert sorted(r["item"] for t in tables.iter_errors(str(run)) for r in t.to_pylist()) == sorted(
        e["item"] for e in errors
    )
    names = [
        str(p.relative_to(run / "tile" / "shards"))
        for p in sorted((run / "tile" / "shards").rglob("*.parquet"))
    ]
    assert (
        tables.shard_error_reasons(str(run), "tile", names) == summary["stages"]["tile"]["rejects_by_reason"]
    )


def test_resumed_stages_count_shards_without_side_files(demo_run, tmp_path):
    """An interrupted align and annotate, resumed: every shard is already written and has no errors or
    findings file; the resumed stages count them again from the shards alone, to the same totals."""
    cfg, summary = demo_run
    run = tmp_path / "run"
    shutil.copytree(cfg.run.run_dir, run, ignore=shutil.ignore_patterns("export", "summary.json"))
    for stage in ("align", "annotate"):
        (
            run / stage / "_SUCCESS.json"
        ).unlink()  # _STARTED.json stays: an interrupted stage, resumed shard by shard
    again = pipeline.run(
        demo_config(run, "run.stages=[align,annotate]", f"synth.out_dir={cfg.synth.out_dir}")
    )
    for stage in ("align", "annotate"):
        got, want = again["stages"][stage], summary["stages"][stage]
        assert got["skipped_shards"] == got["shards"] == want["shards"] > 0
        assert {k: got[k] for k in ("planned", "written", "rejected", "rejects_by_reason")} == {
            k: want[k] for k in ("planned", "written", "rejected", "rejects_by_reason")
        }
    report = json.loads((run / "annotate" / "qc_report.json").read_text())
    assert set(report["contradictions"]["findings"].values()) == {0}
    assert _side_files(run)["annotate/errors"] == [] and _side_files(run)["annotate/findings"] == []


def test_a_chunk_that_no_longer_rejects_removes_its_old_file(tmp_path):
    """A retry that fixed every tile of a chunk leaves no stale errors file behind (readers would count its
    rows)."""
    uri = str(tmp_path / "errors" / "scene" / "0p5m-00000.parquet")
    tables.write_errors(uri, [error_row("annotate", "t1", "backend_error", "failed")])
    assert [r["item"] for r in tables.read_error_rows(uri)] == ["t1"]
    tables.write_errors(uri, [])
    assert not Path(uri).exists() and tables.read_error_rows(uri) == []
    tables.write_errors(uri, [])  # nothing there, nothing to remove
    assert not Path(uri).exists()
