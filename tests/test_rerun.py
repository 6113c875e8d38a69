"""Re-running is a no-op, interrupted stages resume, and the same config gives identical tables."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, demo_config

from sarlang_ray import io, pipeline


def _snapshot(root: str) -> dict[str, tuple[int, str]]:
    """(mtime, sha1) of every file of a run folder but the command logs (logs/: each command writes its
    own)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        if os.path.relpath(dirpath, root).split(os.sep)[0] == "logs":
            continue
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = (
                os.stat(p).st_mtime_ns,
                hashlib.sha1(Path(p).read_bytes()).hexdigest(),
            )
    return out


def _toy_stage(calls: list, name: str = "demo_stage", fail: str | None = None):
    from sarlang_ray.stages.stage import Stage

    def body(cfg):
        calls.append(cfg.tile.tile_size)
        return {"planned": 0, **({"failure": fail} if fail else {})}

    return Stage(name, body, keys=("tile",), needs_ray=False)


def test_a_resumed_stage_sweeps_partial_files_of_killed_writers_only(tmp_path):
    """A writer killed between write and rename leaves ``<shard>.tmp-<hex>``; when the stage resumes (same
    fingerprint, no _SUCCESS.json), such files go once they are old, and young ones (a writer may still be
    at work) and every other file stay."""
    from sarlang_ray.config import load_config
    from sarlang_ray.stages.stage import STARTED, Stage

    cfg = load_config(None, [f"run.run_dir={tmp_path / 'run'}"])
    seen: list = []
    shards = tmp_path / "run" / "demo_stage" / "shards"
    stage = Stage(
        "demo_stage",
        lambda c: seen.append(sorted(p.name for p in shards.iterdir())) or {"planned": 0},
        keys=("tile",),
        needs_ray=False,
    )
    shards.mkdir(parents=True)
    # interrupted earlier
    io.write_json_atomic(stage.marker(cfg, STARTED), {"fingerprint": stage.fingerprint(cfg)})
    stale, young = shards / f"a.parquet.tmp-{'0' * 32}", shards / f"b.parquet.tmp-{'f' * 32}"
    keep = [shards / "a.parquet", shards / "notes.tmp-x", shards / f"c.tmp-{'0' * 32}.parquet"]
    for p in (stale, young, *keep):
        p.write_bytes(b"x")
    hour_ago = os.stat(stale).st_mtime - 3600
    for p in (stale, *keep):
        os.utime(p, (hour_ago, hour_ago))
    stage.run(cfg)
    assert seen == [sorted([young.name, *(p.name for p in keep)])]  # swept before the body ran, shards kept
    assert (tmp_path / "run" / "demo_stage" / "_SUCCESS.json").exists()


def test_a_stage_reruns_only_when_what_it_is_made_from_changes(tmp_path):
    from sarlang_ray.config import load_config

    run_dir = tmp_path / "run"
    calls: list = []
    stage = _toy_stage(calls)
    stage.run(load_config(None, [f"run.run_dir={run_dir}"]))
    (run_dir / "demo_stage" / "old-output.parquet").write_bytes(b"made with tile_size 256")
    # resources only
    stage.run(load_config(None, [f"run.run_dir={run_dir}", "tile.concurrency=1", "tile.num_cpus=0.5"]))
    assert calls == [256] and (run_dir / "demo_stage" / "old-output.parquet").exists()
    stage.run(load_config(None, [f"run.run_dir={run_dir}", "tile.tile_size=128"]))
    assert calls == [256, 128]
    assert not (run_dir / "demo_stage" / "old-output.parquet").exists(), (
        "a recomputed stage starts from nothing"
    )
    stage.run(load_config(None, [f"run.run_dir={run_dir}", "tile.tile_size=128", "run.force=true"]))
    assert calls == [256, 128, 128]


def test_an_interrupted_stage_with_another_config_is_not_resumed(tmp_path):
    """Shards written under other settings must not be skipped as if they were this run's."""
    from sarlang_ray.config import load_config
    from sarlang_ray.stages.stage import STARTED

    run_dir = tmp_path / "run"
    old = load_config(None, [f"run.run_dir={run_dir}"])
    stage = _toy_stage([])
    io.write_json_atomic(stage.marker(old, STARTED), {"fingerprint": stage.fingerprint(old)})
    (run_dir / "demo_stage" / "half-done.parquet").write_bytes(b"256 px")
    stage.run(load_config(None, [f"run.run_dir={run_dir}", "tile.tile_size=128"]))
    assert not (run_dir / "demo_stage" / "half-done.parquet").exists()


def test_a_stage_whose_work_failed_raises_and_is_not_marked_done(tmp_path):
    from sarlang_ray.config import load_config
    from sarlang_ray.stages.stage import StageFailed

    cfg = load_config(None, [f"run.run_dir={tmp_path / 'run'}"])
    with pytest.raises(StageFailed, match="nothing to do here"):
        _toy_stage([], fail="nothing to do here").run(cfg)
    assert not (tmp_path / "run" / "demo_stage" / "_SUCCESS.json").exists()


@pytest.fixture
def demo_copy(demo_run, tmp_path):
    """A copy of the demo run's stage folders (the archive stays where it is: its path is part of the
    catalog's config) and the config that made them, pointed at the copy."""
    import shutil

    cfg, _ = demo_run
    run_dir = tmp_path / "run"
    shutil.copytree(
        cfg.run.run_dir, run_dir, ignore=lambda d, names: ["archive"] if d == cfg.run.run_dir else []
    )
    overrides = [f"synth.out_dir={cfg.synth.out_dir}"]
    return run_dir, overrides


def test_changing_a_tile_key_redoes_tile_and_every_stage_after_it(demo_copy):
    """`sarlang tile workflows/demo.yaml tile.tile_size=128` on a finished demo run (as the README shows)."""
    import json

    import pyarrow.parquet as pq

    from sarlang_ray import cli

    run_dir, overrides = demo_copy
    before = {
        s: io.read_json(str(run_dir / s / "_SUCCESS.json"))["fingerprint"]["value"]
        for s in ("catalog", "tile", "align", "annotate", "export")
    }
    argv = [
        "tile",
        str(REPO / "workflows" / "demo.yaml"),
        f"run.run_dir={run_dir}",
        *overrides,
        "ray.progress=false",
        "run.stages=[synth,catalog,tile,align,annotate,export]",
    ]
    assert cli.main([*argv, "tile.tile_size=128"]) == 0
    after = {s: io.read_json(str(run_dir / s / "_SUCCESS.json"))["fingerprint"]["value"] for s in before}
    assert after["catalog"] == before["catalog"]
    assert all(after[s] != before[s] for s in ("tile", "align", "annotate", "export")), (before, after)
    for stage in ("tile", "align"):
        widths = {
            w
            for f in (run_dir / stage / "shards").glob("*/*.parquet")
            for w in pq.read_table(f, columns=["width"])["width"].to_pylist()
        }
        assert widths == {128}, (stage, widths)
    assert "tile_size: 128" in (run_dir / "config.yaml").read_text()
    image = pq.read_table(
        next((run_dir / "export" / "parquet" / "train").glob("*.parquet")), columns=["image"]
    )["image"][0]
    import io as _io

    from PIL import Image

    assert Image.open(_io.BytesIO(image["bytes"].as_py())).size == (128, 128)
    summary = json.loads((run_dir / "summary.json").read_text())
    n_tiles = sum(pq.read_metadata(f).num_rows for f in (run_dir / "align" / "shards").glob("*/*.parquet"))
    assert summary["stages"]["align"]["written"] == n_tiles == sum(summary["tiles_per_gsd"].values())

    # only a resource key changed: nothing is redone, nothing is rewritten
    snapshot = _snapshot(str(run_dir))
    assert cli.main([*argv, "tile.tile_size=128", "tile.concurrency=1", "align.num_cpus=0.5"]) == 0
    changed = {k for k, v in _snapshot(str(run_dir)).items() if snapshot.get(k) != v} - {
        "summary.json",
        "config.yaml",
    }
    assert not changed, changed


def test_a_stage_run_alone_makes_the_stale_stages_before_it(demo_copy):
    from sarlang_ray.config import load_config

    run_dir, overrides = demo_copy
    cfg = load_config(
        str(REPO / "workflows" / "demo.yaml"),
        [f"run.run_dir={run_dir}", *overrides, "run.stages=[synth,catalog,tile,align,annotate,export]"],
    )
    assert pipeline.plan(cfg, ["align"]) == ["align", "annotate", "export"]
    assert pipeline.plan(cfg, ["export"]) == ["export"]
    changed = load_config(
        str(REPO / "workflows" / "demo.yaml"),
        [
            f"run.run_dir={run_dir}",
            *overrides,
            "tile.tile_size=64",
            "run.stages=[synth,catalog,tile,align,annotate,export]",
        ],
    )
    assert pipeline.plan(changed, ["align"]) == ["tile", "align", "annotate", "export"]


def test_rerunning_a_finished_tile_stage_writes_nothing(demo_run):
    cfg, summary = demo_run
    before = _snapshot(cfg.run.run_dir)
    again = pipeline.run(cfg, ["tile", "align"])
    after = _snapshot(cfg.run.run_dir)
    changed = {k for k in after if before.get(k) != after[k]} - {"summary.json", "config.yaml"}
    assert not changed, changed
    assert again["stages"]["tile"] == summary["stages"]["tile"]


def test_an_interrupted_stage_resumes_without_duplicates(demo_copy):
    from sarlang_ray.config import load_config
    from sarlang_ray.stages import tile

    run_dir, overrides = demo_copy
    cfg = load_config(
        str(REPO / "workflows" / "demo.yaml"),
        [
            f"run.run_dir={run_dir}",
            *overrides,
            "ray.progress=false",
            "run.stages=[synth,catalog,tile,align,annotate,export]",
        ],
    )
    done = io.read_json(str(run_dir / "tile" / "_SUCCESS.json"))
    shards = io.glob(io.join(cfg.run.run_dir, "tile", "shards"), "*/*.parquet")
    lost = shards[len(shards) // 2]
    os.remove(lost)  # as if the run died before this shard was written
    os.remove(io.join(cfg.run.run_dir, "tile", "_SUCCESS.json"))
    counts = tile.run(cfg)
    assert counts["skipped_shards"] == counts["shards"] - 1  # only the missing shard was redone
    assert os.path.exists(lost)
    assert {k: counts[k] for k in ("planned", "written", "rejected")} == {
        k: done[k] for k in ("planned", "written", "rejected")
    }
    ids = [
        t
        for f in io.glob(io.join(cfg.run.run_dir, "tile", "shards"), "*/*.parquet")
        for t in io.read_parquet(f, columns=["tile_id"])["tile_id"].to_pylist()
    ]
    assert len(ids) == len(set(ids)) == done["written"]


def test_the_summary_is_made_from_the_markers_alone(demo_copy):
    """Every shard, errors table and the scenes table unreadable after the run: the summary of the next
    command (a no-op) still has the right counts, so it read none of them (the workers counted; the markers
    hold the sums)."""
    import collections

    from sarlang_ray.config import load_config

    run_dir, overrides = demo_copy
    tiles = pipeline.read_tiles(str(run_dir), columns=["gsd_m", "objects"]).to_pylist()
    pairs = pipeline.read_annotations(str(run_dir), columns=["application", "qc_passed"]).to_pylist()
    errors = pipeline.read_errors(str(run_dir)).to_pylist()
    truth = {
        "scenes": len(pipeline.read_scenes(str(run_dir))),
        "tiles_per_gsd": collections.Counter(f"{t['gsd_m']:g} m" for t in tiles),
        "objects_per_class": collections.Counter(o["class"] for t in tiles for o in t["objects"]),
        "pairs_per_application": collections.Counter(p["application"] for p in pairs if p["qc_passed"]),
        "rejects_by_reason": collections.Counter(f"{e['stage']}:{e['error_class']}" for e in errors),
    }
    assert all(truth.values())
    broken = [
        p for stage in ("catalog", "tile", "align", "annotate") for p in (run_dir / stage).rglob("*.parquet")
    ]
    for p in broken:
        p.write_bytes(b"not parquet")
    cfg = load_config(
        str(REPO / "workflows" / "demo.yaml"),
        [
            f"run.run_dir={run_dir}",
            *overrides,
            "ray.progress=false",
            "run.stages=[synth,catalog,tile,align,annotate,export]",
        ],
    )
    summary = pipeline.run(cfg)
    assert {k: summary[k] for k in truth} == {
        k: v if isinstance(v, int) else dict(v) for k, v in truth.items()
    }
    assert "tiles per GSD: " + ", ".join(
        f"{k}: {v}" for k, v in summary["tiles_per_gsd"].items()
    ) in pipeline.format_summary(summary)
    assert all(p.read_bytes() == b"not parquet" for p in broken)  # nothing was redone


def test_a_summary_that_fails_does_not_hide_why_the_stage_failed(ray_session, tmp_path):
    """The summary runs in a ``finally``: an error of its own (here a marker it cannot read) is logged, and
    the command reports the stage's failure."""
    from sarlang_ray.config import load_config
    from sarlang_ray.stages import StageFailed

    (tmp_path / "empty" / "sar").mkdir(parents=True)
    # the catalog rejects it: no usable scene
    (tmp_path / "empty" / "sar" / "scene.tif").write_bytes(b"not a GeoTIFF")
    (tmp_path / "run" / "tile").mkdir(parents=True)
    (tmp_path / "run" / "tile" / "_SUCCESS.json").write_text("{not json")
    cfg = load_config(
        None,
        [
            f"run.run_dir={tmp_path / 'run'}",
            f"catalog.archive={tmp_path / 'empty'}",
            "run.stages=[catalog]",
            "ray.progress=false",
        ],
    )
    with pytest.raises(StageFailed, match="^catalog: "):
        pipeline.run(cfg)


@pytest.mark.slow
def test_same_seed_gives_identical_tables(demo_run, tmp_path):
    cfg, _ = demo_run
    cfg2 = demo_config(tmp_path / "run2")
    pipeline.run(cfg2)
    for stage in ("tile", "align"):
        a = io.glob(io.join(cfg.run.run_dir, stage, "shards"), "*/*.parquet")
        b = io.glob(io.join(cfg2.run.run_dir, stage, "shards"), "*/*.parquet")
        assert [Path(x).relative_to(cfg.run.run_dir) for x in a] == [
            Path(x).relative_to(cfg2.run.run_dir) for x in b
        ]
        for x, y in zip(a, b):
            assert Path(x).read_bytes() == Path(y).read_bytes(), x


@pytest.mark.slow
def test_cli_runs_the_workflow_on_the_session_cluster(ray_session, tmp_path):
    """`sarlang run workflows/demo.yaml ...` as a user types it, attached to the running Ray cluster
    (RAY_ADDRESS), with a relative run folder and command-line overrides: the data stages and the
    end-of-command summary. The whole recipe (train, evaluate, leaderboard) through the CLI is
    tests/test_view_terminal.py's `make run`."""
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    run_dir = tmp_path / "runs" / "cli"  # given relative to the working directory, as the demo does
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sarlang_ray",
            "run",
            str(REPO / "workflows/demo.yaml"),
            "run.run_dir=runs/cli",
            "synth.out_dir=runs/cli/archive",
            "synth.scene_size_px=256",
            "tile.tile_size=128",
            "ray.progress=false",
            "run.stages=[synth,catalog,tile,align,annotate,export]",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiles per GSD" in proc.stdout and "objects per class" in proc.stdout
    assert "pairs per application" in proc.stdout
    assert (run_dir / "config.yaml").read_text().count("tile_size: 128") == 1
    assert (run_dir / "summary.json").exists() and (run_dir / "export" / "dataset_card.md").exists()
    marker = json.loads((run_dir / "export" / "_SUCCESS.json").read_text())  # in the folder given relatively
    assert marker["written"] > 0 and marker["planned"] == marker["written"] + marker["rejected"], marker
    assert not (run_dir / "train").exists()  # run.stages from the command line replaced the workflow's list
