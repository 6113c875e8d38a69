"""benchmarks/size_archive.py: sizing a global archive from the committed benchmark results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import size_archive


def _stage(sized: dict, prefix: str) -> dict:
    return next(r for r in sized["stages"] if r["stage"].startswith(prefix))


def test_measured_inputs_come_from_the_committed_results():
    m = size_archive.measured()
    scale = json.loads((size_archive.RESULTS / "scale.json").read_text())
    assert m["tile_align_cpu_s_per_tile"] == pytest.approx(
        scale["machine"]["cpus"] * scale["fit"]["seconds_per_tile"]
    )
    assert 0 < m["annotate_cpu_s_per_tile"] < m["tile_align_cpu_s_per_tile"]
    assert m["pairs_per_tile"] > 1 and m["train_tokens_per_s_per_h200"] > 1000


def test_archive_work_scales_linearly_and_capped_stages_do_not():
    one, two = size_archive.size(1.0), size_archive.size(2.0)
    assert two["tiles"] == pytest.approx(2 * one["tiles"])
    for prefix in ("tile", "annotate", "captions"):
        assert _stage(two, prefix)["node_hours"] == pytest.approx(2 * _stage(one, prefix)["node_hours"])
    assert _stage(two, "train")["node_hours"] == _stage(one, "train")["node_hours"]  # 1 M pairs cap
    # twice the CPU nodes halve the tile wall time while the stage stays CPU-bound
    wide = size_archive.size(1.0, cpu_nodes=64)
    assert _stage(wide, "tile")["wall_hours"] == pytest.approx(_stage(one, "tile")["wall_hours"] / 2)


def test_the_bottleneck_moves_to_io_on_a_thin_link():
    assert _stage(size_archive.size(1.0), "tile")["bottleneck"].startswith("CPU")
    thin = size_archive.size(1.0, node_gbps=0.01)  # 1.25 MB/s per node: the link, not the CPUs, sets the time
    tile = _stage(thin, "tile")
    assert tile["bottleneck"].startswith("I/O")
    assert tile["node_hours"] == pytest.approx(1e12 / 1.25e6 / 3600)
    small_prompt = size_archive.size(1.0, prompt_tokens_per_tile=10)
    assert "memory bandwidth" in _stage(small_prompt, "captions")["bottleneck"]


def test_cli_prints_one_table_per_size(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert (
        size_archive.main(["--tb", "1", "--tb", "10", "--preset", "umbra-spotlight", "--json", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert text.count("| tile + align |") == 2 and "10 TB of umbra-spotlight" in text
    assert [s["tb"] for s in json.loads(out.read_text())] == [1.0, 10.0]
