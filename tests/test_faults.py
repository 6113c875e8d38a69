"""Faults: a Ray worker killed mid-stage, and `sarlang run` interrupted mid-stage, lose and duplicate nothing.

Every test compares its tables file by file with one uninterrupted reference run of the same small workflow
(same archive, same config): Ray Data retries the killed worker's tasks on a restarted actor, shards have
deterministic names and are written atomically, and a re-run skips the shards that are already there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
from conftest import REPO, demo_config
from demo_cli import demo_command

from sarlang_ray import io, pipeline
from sarlang_ray.stages import annotate as annotate_stage
from sarlang_ray.stages import tile as tile_stage

# every test here interrupts or kills at a chosen moment: run alone (make test), where no other test's load
# moves that moment
pytestmark = pytest.mark.serial

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

STAGES = ["synth", "catalog", "tile", "align", "annotate"]
# small enough for CI (38 shards of at most 4 tiles per stage), large enough that a stage is still
# running when the first shard lands (one annotate actor: template captions take milliseconds a shard)
SMALL = [
    "tile.gsds_m=[1.0,5.0]",
    "tile.tile_size=128",
    "tile.tiles_per_shard=4",
    "annotate.concurrency=1",
    "ray.num_cpus=2",
    "ray.progress=false",
    f"run.stages=[{','.join(STAGES)}]",
]


def _config(run_dir: Path, archive: Path):
    return demo_config(run_dir, f"synth.out_dir={archive}", *SMALL)


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """The small workflow, run once without faults: its config."""
    root = tmp_path_factory.mktemp("faults")
    cfg = _config(root / "reference", root / "archive")
    pipeline.run(cfg)
    return cfg


def _shards(run_dir: str, stage: str) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in Path(run_dir, stage, "shards").glob("*/*.parquet"))


def _contents(run_dir: str, stage: str) -> dict[str, str]:
    """What every file a stage wrote holds: its sha1, or for errors tables their rows less the ``time``
    column (when a rejection was recorded). _SUCCESS.json aside: that holds timings."""
    root = Path(run_dir, stage)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "_SUCCESS.json" and ".tmp-" not in p.name:
            rel = str(p.relative_to(root))
            if "errors" in rel:
                out[rel] = repr(io.read_parquet(str(p)).drop_columns(["time"]).to_pylist())
            else:
                out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def _counts(run_dir: str, stage: str) -> dict:
    done = io.read_json(os.path.join(run_dir, stage, "_SUCCESS.json"))
    return {k: v for k, v in done.items() if k not in ("seconds", "skipped_shards", "placement")}


def _assert_same_as_reference(run_dir: str, ref_dir: str, stages: list[str]) -> None:
    # a process killed inside io.write_bytes_atomic leaves its temporary file (nothing can remove it at
    # SIGKILL); readers never see one (they read *.parquet), and its shard must have been written in full
    for tmp in Path(run_dir).rglob("*.tmp-*"):
        assert not tmp.name.endswith((".parquet", ".json")), f"{tmp}: readers would take it for a table"
        assert tmp.with_name(tmp.name.split(".tmp-")[0]).exists(), f"{tmp} was never completed"
    for stage in stages:
        ours, theirs = _contents(run_dir, stage), _contents(ref_dir, stage)
        assert ours.keys() == theirs.keys(), (stage, sorted(ours.keys() ^ theirs.keys()))
        differ = [name for name in ours if ours[name] != theirs[name]]
        assert not differ, f"{stage}: files differ from the uninterrupted run: {differ}"
        assert _counts(run_dir, stage) == _counts(ref_dir, stage), stage
    if "align" in stages:  # the tiles table: every tile once
        ids = pipeline.read_tiles(run_dir, columns=["tile_id"])["tile_id"].to_pylist()
        assert len(ids) == len(set(ids)) == _counts(ref_dir, "align")["written"]
    if "annotate" in stages:
        pairs = pipeline.read_annotations(run_dir, columns=["pair_id"])["pair_id"].to_pylist()
        assert len(pairs) == len(set(pairs)) == _counts(ref_dir, "annotate")["pairs"]["planned"]


# ---------------------------------------------------------------- a worker killed mid-stage
class KillBusyWorker(threading.Thread):
    """SIGKILL one of this process's Ray workers while it runs an item of the stage (its process title is
    ``busy_title``), once the stage has written its first shard. Only descendants of this process are
    candidates (other Ray clusters may run on the same machine)."""

    def __init__(self, busy_title: str, run_dir: str, stage: str):
        super().__init__(daemon=True)
        self.busy_title = busy_title
        self.run_dir, self.stage = run_dir, stage
        self.stop = threading.Event()
        self.victim: psutil.Process | None = None
        self.shards_at_kill = -1

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            if _shards(self.run_dir, self.stage):
                for proc in me.children(recursive=True):
                    try:
                        busy = " ".join(proc.cmdline()).startswith(self.busy_title)
                    except psutil.Error:
                        continue
                    if busy:
                        proc.kill()
                        self.victim = proc
                        self.shards_at_kill = len(_shards(self.run_dir, self.stage))
                        return
            time.sleep(0.01)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(timeout=10)


def _assert_killed_mid_stage(killer: KillBusyWorker, ref_dir: str) -> None:
    assert killer.victim is not None, f"no busy {killer.busy_title} worker was found to kill"
    assert not _alive(killer.victim)
    # the kill landed while shards were still to be written (else it tested nothing)
    assert 0 < killer.shards_at_kill < len(_shards(ref_dir, killer.stage)), killer.shards_at_kill


def _alive(proc: psutil.Process) -> bool:
    """Running, and not a zombie (a container's PID 1 may never reap orphans)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _copy_stages(src: str, dst: Path, stages: list[str]) -> None:
    for stage in stages:
        shutil.copytree(Path(src, stage), dst / stage)


@pytest.mark.slow
def test_killing_a_tile_worker_mid_stage_loses_and_duplicates_no_tile(reference, tmp_path):
    cfg = _config(tmp_path / "run", Path(reference.synth.out_dir))
    _copy_stages(reference.run.run_dir, tmp_path / "run", ["catalog"])
    from sarlang_ray.stages.execution import task_name
    from sarlang_ray.tiling import TileChunk

    with KillBusyWorker(
        f"ray::{task_name(TileChunk)}", cfg.run.run_dir, "tile"
    ) as killer:  # a task's process title
        counts = tile_stage.run(cfg)
    _assert_killed_mid_stage(killer, reference.run.run_dir)
    assert counts["planned"] == counts["written"] + counts["rejected"]
    _assert_same_as_reference(cfg.run.run_dir, reference.run.run_dir, ["tile"])
    ids = [
        t
        for uri in io.glob(os.path.join(cfg.run.run_dir, "tile", "shards"), "*/*.parquet")
        for t in io.read_parquet(uri, columns=["tile_id"])["tile_id"].to_pylist()
    ]
    assert len(ids) == len(set(ids)) == counts["written"]


@pytest.mark.slow
def test_killing_an_annotate_worker_mid_stage_loses_and_duplicates_no_pair(reference, tmp_path):
    cfg = _config(tmp_path / "run", Path(reference.synth.out_dir))
    _copy_stages(reference.run.run_dir, tmp_path / "run", ["catalog", "tile", "align"])
    from sarlang_ray.annotate.stage import AnnotateShard
    from sarlang_ray.stages.execution import task_name

    # the template backend holds no model: its shards are Ray tasks, the worker titled
    # ray::sarlang.AnnotateShard
    with KillBusyWorker(f"ray::{task_name(AnnotateShard)}", cfg.run.run_dir, "annotate") as killer:
        counts = annotate_stage.run(cfg)
    _assert_killed_mid_stage(killer, reference.run.run_dir)
    assert counts["planned"] == counts["written"] + counts["rejected"]
    # shards, errors and qc_report.json (rule hits of every shard, retried ones included) as uninterrupted
    _assert_same_as_reference(cfg.run.run_dir, reference.run.run_dir, ["annotate"])


# ---------------------------------------------------------------- `sarlang run` interrupted mid-stage
def _sarlang_run(
    run_dir: Path, archive: Path, interrupt: tuple[signal.Signals, str] | None = None
) -> tuple[int, str]:
    """Run ``sarlang run`` with its own local Ray; with ``interrupt=(signal, stage)``, send the signal once
    ``stage`` has written its first shard: SIGINT to the process group (as Ctrl-C in a terminal does),
    SIGTERM to the driver (as ``kill`` or a scheduler does). Returns the exit code and the output; every
    process the run started must be gone within 30 s of its end."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = demo_command(run_dir, archive, *SMALL)
    log = run_dir.with_suffix(f".{len(list(run_dir.parent.glob('*.log')))}.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
    tree: dict[int, psutil.Process] = {}
    try:
        driver = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree.update((p.pid, p) for p in driver.children(recursive=True))
            except psutil.Error:
                pass
            if interrupt and _shards(str(run_dir), interrupt[1]):
                tree.update((p.pid, p) for p in driver.children(recursive=True))
                sig = interrupt[0]
                os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
                break
            time.sleep(0.02)
        try:
            rc = proc.wait(timeout=60 if interrupt else 600)
        except subprocess.TimeoutExpired:
            pytest.fail(
                "sarlang run still running "
                f"{'60 s after ' + interrupt[0].name if interrupt else 'after 600 s'}"
            )
        alive = _left_after(tree.values(), 30)
        assert not alive, f"processes left running after the run ended: {[(p.pid, p.name()) for p in alive]}"
    finally:  # whatever happened, nothing this test started stays behind
        _kill_all(proc, tree.values())
    return rc, log.read_text()


def _left_after(procs, seconds: float) -> list[psutil.Process]:
    """The processes still alive after waiting up to ``seconds`` for all of them to end."""
    deadline = time.time() + seconds
    while (alive := [p for p in procs if _alive(p)]) and time.time() < deadline:
        time.sleep(0.1)
    return alive


def _kill_all(proc: subprocess.Popen, procs) -> None:
    if proc.poll() is None:
        proc.kill()
    for p in procs:
        if _alive(p):
            with contextlib.suppress(psutil.Error):
                p.kill()


@pytest.mark.slow
def test_an_interrupted_run_resumes_where_it_stopped_with_identical_tables(reference, tmp_path):
    run_dir, archive, ref = tmp_path / "run", Path(reference.synth.out_dir), reference.run.run_dir
    total = {stage: len(_shards(ref, stage)) for stage in ("tile", "annotate")}

    # Ctrl-C while tiling
    rc, out = _sarlang_run(run_dir, archive, (signal.SIGINT, "tile"))
    assert rc != 0 and "KeyboardInterrupt" in out, out[-3000:]
    assert (run_dir / "catalog" / "_SUCCESS.json").exists() and not (
        run_dir / "tile" / "_SUCCESS.json"
    ).exists()
    tiled = len(_shards(str(run_dir), "tile"))
    assert 0 < tiled < total["tile"], (tiled, total)

    # SIGTERM while annotating: tiling resumed and finished first
    rc, out = _sarlang_run(run_dir, archive, (signal.SIGTERM, "annotate"))
    assert rc != 0, out[-3000:]
    assert (run_dir / "align" / "_SUCCESS.json").exists() and not (
        run_dir / "annotate" / "_SUCCESS.json"
    ).exists()
    annotated = len(_shards(str(run_dir), "annotate"))
    assert 0 < annotated < total["annotate"], (annotated, total)

    # to the end
    rc, out = _sarlang_run(run_dir, archive)
    assert rc == 0, out[-3000:]
    summary = io.read_json(str(run_dir / "summary.json"))
    # each interrupted stage skipped exactly the shards it had written, and redid only the rest
    assert summary["stages"]["tile"]["skipped_shards"] == tiled
    assert summary["stages"]["annotate"]["skipped_shards"] == annotated
    _assert_same_as_reference(str(run_dir), ref, ["catalog", "tile", "align", "annotate"])


# a driver that starts its own local Ray as `sarlang run` does, then keeps it busy
_BUSY_DRIVER = """
import time, ray
from sarlang_ray.config import load_config
from sarlang_ray.stages.cluster import ensure_ray
ensure_ray(load_config(None, ["ray.num_cpus=1", "ray.progress=false"]))
@ray.remote
def nap():
    time.sleep(0.2)
while True:
    ray.get(nap.remote())
"""


@pytest.mark.slow
@pytest.mark.needs_ray  # the driver subprocess starts a local Ray
@pytest.mark.parametrize("how,attempts", [("ctrl-c", 3), ("kill -9", 2)])
def test_a_driver_ended_while_its_local_rays_agents_start_leaves_no_process_behind(how, attempts):
    """The driver ends in the first seconds of a run, while the raylet's dashboard and runtime-env agents are
    still starting: the raylet dies with it, and on Ray 2.60 an agent that has not yet registered never
    notices (it stayed behind as an orphan of init in CI). Ctrl-C (SIGINT to the process group): the
    driver's exit hook (``cluster.stop_local_ray``) ends them. ``kill -9`` of the driver alone (as an
    out-of-memory kill, or Ray aborting the driver, which runs no exit hook): its watcher
    (``reaper.start_watcher``) does. The driver ends the moment the agents exist, each time."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for attempt in range(attempts):
        proc = subprocess.Popen(
            [sys.executable, "-c", _BUSY_DRIVER],
            env=env,
            cwd=REPO,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        tree: dict[int, psutil.Process] = {}
        try:
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None:
                with contextlib.suppress(psutil.Error):
                    tree.update((p.pid, p) for p in psutil.Process(proc.pid).children(recursive=True))
                names = set()
                for p in tree.values():
                    with contextlib.suppress(psutil.Error):
                        names.add(p.name())
                if {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names:
                    break
                time.sleep(0.01)
            else:
                pytest.fail(f"the local Ray's agents did not start (driver rc {proc.poll()})")
            if how == "ctrl-c":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                proc.kill()
            assert proc.wait(timeout=60) != 0
            alive = _left_after(tree.values(), 30)
            assert not alive, (attempt, [(p.pid, p.name()) for p in alive])
        finally:
            _kill_all(proc, tree.values())
