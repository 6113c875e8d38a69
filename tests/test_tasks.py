"""stages.execution.map: work items as Ray tasks on pooled worker processes (rows that need CPUs only), or on
an actor pool (rows that pin a model); both with the same manifest contract."""

from __future__ import annotations

import itertools
import os
import signal

import pytest

from sarlang_ray.stages import execution
from sarlang_ray.stages.execution import ACTORS, TASKS, Resources, Work, task_name


def map_tasks(items, cls, args, concurrency=None):
    return execution.map(Work(items, cls, args, Resources(concurrency=concurrency)))


def test_the_back_end_follows_the_declared_need_not_the_stage():
    assert Work([], dict).backend == TASKS
    assert Work([], dict, holds_model=True).backend == ACTORS
    assert Work([], dict, resources=Resources(num_gpus=1)).backend == ACTORS


def test_resources_from_a_sections_keys():
    from sarlang_ray.config import load_config

    cfg = load_config(
        None, ["tile.concurrency=3", "align.max_actors=5", "annotate.num_gpus=1", "annotate.memory_gb=2"]
    )
    assert Resources.of(cfg.tile) == Resources(num_cpus=1.0, concurrency=3)
    assert Resources.of(cfg.align).concurrency == (1, 5)
    assert Resources.of(cfg.annotate) == Resources(num_cpus=1.0, num_gpus=1.0, memory_gb=2.0)
    # the defaults: one CPU, no GPU, none reserved, the cluster decides
    assert Resources.of(cfg.export) == Resources()
    cfg = load_config(None, ["catalog.concurrency=[2, 6]", "export.num_cpus=0.5", "export.memory_gb=1.5"])
    assert Resources.of(cfg.catalog).concurrency == (2, 6)
    assert Resources.of(cfg.export) == Resources(num_cpus=0.5, memory_gb=1.5)
    assert (
        Resources(concurrency=(1, 5)).width(100) == 5
        and Resources().width(7) == 7
        and Resources(concurrency=2).width(None) == 2
    )


@pytest.mark.parametrize("holds_model", [False, True], ids=["tasks", "actors"])
def test_both_back_ends_keep_item_order_record_the_node_and_name_a_failed_item(
    ray_session, tmp_path, holds_model
):
    import ray
    from task_rows import Recorder

    node = ray.get_runtime_context().get_node_id()
    out = execution.map(
        Work(
            ({"i": i} for i in range(12)) if not holds_model else [{"i": i} for i in range(12)],
            Recorder,
            (str(tmp_path), 0.0),
            holds_model=holds_model,
        )
    )
    assert [r["i"] for r in out] == list(range(12)) and {r["node"] for r in out} == {node}
    assert os.getpid() not in {r["pid"] for r in out}
    # this one node
    assert execution.placement(out) == {node: {"ip": ray.util.get_node_ip_address(), "items": 12}}
    items = [{"i": i, "fail": i == 3} for i in range(6)]
    with pytest.raises(RuntimeError) as info:
        execution.map(Work(items, Recorder, (str(tmp_path), 0.0), holds_model=holds_model))
    message = str(info.value)
    assert task_name(Recorder) in message and '"i": 3' in message and "item 3 is bad on purpose" in message


def test_results_come_back_in_item_order_with_one_instance_per_worker_process(ray_session, tmp_path):
    import ray
    from task_rows import Recorder

    items = [{"i": i} for i in range(24)]
    out = map_tasks(items, Recorder, (str(tmp_path), 0.02))
    assert [r["i"] for r in out] == list(range(24))
    assert {r["node"] for r in out} == {ray.get_runtime_context().get_node_id()}
    pids = [r["pid"] for r in out]
    assert os.getpid() not in pids  # ran in Ray's workers, not in the driver
    constructed = (tmp_path / "constructed.txt").read_text().split()
    # one instance per process that ran items, however many items it ran (not one per item)
    assert sorted(constructed) == sorted({str(p) for p in pids})
    assert len(constructed) < len(items)

    # a second map (another stage, other arguments): new instances, in the same worker processes
    again = map_tasks(items[:8], Recorder, (str(tmp_path), 0.0))
    assert {r["pid"] for r in again} <= set(pids)
    assert len((tmp_path / "constructed.txt").read_text().split()) == len(constructed) + len(
        {r["pid"] for r in again}
    )


def test_concurrency_caps_the_items_running_at_once(ray_session, tmp_path):
    from task_rows import Recorder

    out = map_tasks([{"i": i} for i in range(6)], Recorder, (str(tmp_path), 0.15), concurrency=1)
    spans = sorted((r["started_at"], r["finished_at"]) for r in out)
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(spans)), spans  # never two at once
    wide = map_tasks([{"i": i} for i in range(6)], Recorder, (str(tmp_path), 0.3))
    spans = sorted((r["started_at"], r["finished_at"]) for r in wide)
    # without a cap, the node's 2 CPUs overlap
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans)), spans


def test_an_error_in_a_row_fails_the_map_and_names_the_item(ray_session, tmp_path):
    from task_rows import Recorder

    items = [{"i": i, "fail": i == 3} for i in range(8)]
    with pytest.raises(RuntimeError) as info:
        map_tasks(items, Recorder, (str(tmp_path), 0.0))
    message = str(info.value)
    assert task_name(Recorder) in message and '"i": 3' in message and "item 3 is bad on purpose" in message


@pytest.mark.parametrize("holds_model", [False, True], ids=["tasks", "actors"])
def test_a_worker_that_dies_mid_item_is_replaced_and_the_item_run_again(ray_session, tmp_path, holds_model):
    from task_rows import Dies

    out = execution.map(Work([{"i": i} for i in range(6)], Dies, (str(tmp_path), 2), holds_model=holds_model))
    assert [r["i"] for r in out] == list(range(6))
    died = (tmp_path / "ran-2").read_text().split()
    assert len(died) == 2 and died[0] != died[1]  # the item ran twice, the second time in another process
    assert all(len((tmp_path / f"ran-{i}").read_text().split()) == 1 for i in (0, 1, 3, 4, 5))


@pytest.mark.parametrize("holds_model", [False, True], ids=["tasks", "actors"])
def test_an_item_that_kills_every_worker_fails_the_map_after_the_same_retries_on_both_back_ends(
    ray_session, tmp_path, holds_model
):
    """One retry rule for both back-ends: an item whose worker dies runs 1 + max_retries times, then the map
    fails saying so (Ray Data's own default restarts an actor without end: the stage never finished)."""
    from task_rows import Dies

    items = [{"i": i} for i in range(4)]
    with pytest.raises(RuntimeError, match="died on each of its 3 runs") as info:
        execution.map(Work(items, Dies, (str(tmp_path), 2, True), holds_model=holds_model, max_retries=2))
    assert task_name(Dies) in str(info.value)
    if not holds_model:  # a task is one item: the error names it
        assert '{"i": 2}' in str(info.value)
    assert len((tmp_path / "ran-2").read_text().split()) == 3


@pytest.mark.serial  # Ctrl-C while items are queued: alone, so that load does not empty the queue first
@pytest.mark.parametrize("own_local_ray", [False, True])
def test_ctrl_c_cancels_what_is_queued_unless_the_driver_ends_its_own_local_ray(
    ray_session, tmp_path, monkeypatch, own_local_ray
):
    """Connected to a Ray it did not start (a cluster; here the tests' session Ray), an interrupted map
    cancels its tasks. On a local Ray the driver started itself, it cancels nothing: the Ctrl-C that reached
    the driver reached that Ray's workers too (one process group), a cancel racing their deaths can abort the
    driver in Ray 2.60, and the driver's exit ends that Ray anyway."""
    from sarlang_ray import reaper

    monkeypatch.setattr(reaper, "_WATCHER", object() if own_local_ray else None)
    assert reaper.started_local_ray() is own_local_ray
    # Python's own SIGINT handler, as in a fresh `sarlang run` (a Ray Tune or Train run in this process
    # before may have left another: reaper.sigint_kept)
    with reaper.sigint_kept():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _interrupt_a_map(tmp_path, own_local_ray)


def _interrupt_a_map(tmp_path, own_local_ray: bool) -> None:
    import _thread
    import threading
    import time

    from task_rows import Sleeper

    items = [{"i": i} for i in range(8)]  # 8 s of work on the session's 2 CPUs: 4 s

    def ctrl_c_mid_item():  # as Ctrl-C: SIGINT handled in the main thread, while the first items sleep
        while not list(tmp_path.glob("started-*")):
            time.sleep(0.01)
        time.sleep(0.3)
        _thread.interrupt_main()

    threading.Thread(target=ctrl_c_mid_item, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        map_tasks(items, Sleeper, (str(tmp_path), 1.0))
    # uncancelled, all 8 are done within 4 s of the start
    deadline = time.time() + (15 if own_local_ray else 6)
    while len(list(tmp_path.glob("done-*"))) < len(items) and time.time() < deadline:
        time.sleep(0.2)
    done = len(list(tmp_path.glob("done-*")))
    if own_local_ray:
        assert done == len(items)  # nothing cancelled: the tasks submitted ran to their end
    else:
        # at most the two running at the interrupt and the next two: the rest cancelled
        assert done <= 4, done
        # a task cancelled while it ran ended its worker process (reaper.cancel_ends_worker): Ray does not
        # reuse a process an interrupt may have left half-initialised
        cut = [
            int((tmp_path / f"started-{i}").read_text())
            for i in range(len(items))
            if (tmp_path / f"started-{i}").exists() and not (tmp_path / f"done-{i}").exists()
        ]
        assert cut and not [p for p in cut if _running(p)], cut


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_tile_stage_records_where_its_chunks_ran(demo_run):
    """The tile marker's ``placement``: every chunk (one shard each) counted once, on this one-node Ray's
    node; it is not one of the stage's counts."""
    import ray

    from sarlang_ray import io
    from sarlang_ray.stages.stage import counts_of

    cfg, summary = demo_run
    marker = io.read_json(io.join(cfg.run.run_dir, "tile", "_SUCCESS.json"))
    shards = io.glob(io.join(cfg.run.run_dir, "tile", "shards"), "*/*.parquet")
    assert marker["placement"] == {
        ray.get_runtime_context().get_node_id(): {"ip": ray.util.get_node_ip_address(), "items": len(shards)}
    }
    assert marker["shards"] == len(shards)
    assert "placement" not in counts_of(marker) and "placement" not in summary["stages"]["tile"]
