"""How a stage's work runs on the cluster: the pool sizer, the manifest spool, item blocks and the Ray task
machinery with its per-process instance cache."""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter, OrderedDict
from collections.abc import Iterable

from sarlang_ray import io, reaper


def placement(manifest: Iterable[dict]) -> dict:
    """Items per node id of a map_tasks manifest (a stage marker's ``placement``: where the stage ran)."""
    return dict(sorted(Counter(m["node"] for m in manifest).items()))

def pool(n_items: int, concurrency: int | None, max_actors: int | None = None, num_cpus: float = 1.0,
         num_gpus: float = 0.0):
    """The actor pool of a stage: ``concurrency`` actors when set, else an autoscaling pool.

    The autoscaling pool starts with the actors the cluster's CPUs (and GPUs) fit now and may grow to ``max_actors``
    (default: one per work item). Ray Data adds actors as resources appear and, on a cluster with an
    autoscaler, asks it for the nodes that pending actors need, so a cluster that starts from zero workers
    (or has no GPU node yet) grows for the stage instead of running it on one actor.

    A fixed pool's actor holds one work item at a time while items are few per actor: items are whole
    scenes or shards (seconds to minutes each), so an item queued on a busy actor would wait while another
    actor idles. With four or more items per actor it holds two: the next item waits on the actor instead
    of in the driver, which on a busy node reaches a finished actor only after a gap (0.1 to 0.2 s per item
    measured on a saturated 2-core node), and the tail can lose at most one item's time. An autoscaling
    pool's actor holds two: Ray Data grows a pool only when its actors are over-subscribed (above 175 % of
    one item each), so a queued second item is the signal that more actors are wanted.
    """
    import ray

    def fixed(size: int):
        return ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=2 if n_items >= 4 * size else 1)

    if concurrency:
        return fixed(min(concurrency, n_items))
    have = ray.cluster_resources()
    fits = [have.get("CPU", 0) / num_cpus] if num_cpus else []
    fits += [have.get("GPU", 0) / num_gpus] if num_gpus else []
    now = max(1, int(min(fits, default=1)))  # actors the cluster holds now (at least one: it asks for a node)
    top = max(1, min(max_actors or n_items, n_items))
    if top <= now:  # everything fits now: a fixed pool
        return fixed(top)
    return ray.data.ActorPoolStrategy(min_size=now, max_size=top, max_tasks_in_flight_per_actor=2)


MAX_BLOCKS = 1024  # map_items: blocks of items at most (more when the cluster has more than 1024 / 16 CPUs)


class Manifest:
    """The manifest rows of a map, spooled to a local temporary file of the driver as they arrive instead of
    collected in its memory (one JSON line each); iterable any number of times, each pass reading the file."""

    def __init__(self):
        import tempfile
        import weakref

        fd, self.path = tempfile.mkstemp(prefix="sarlang-manifest-", suffix=".jsonl")
        self._file = os.fdopen(fd, "wb")
        self._rows = 0
        self._finalizer = weakref.finalize(self, _remove_file, self._file, self.path)  # at the latest when collected

    def close(self) -> None:
        """Remove the spool file now."""
        self._finalizer()

    def append(self, row: dict) -> None:
        self._file.write(json.dumps(row, default=_plain_json).encode() + b"\n")
        self._rows += 1

    def __len__(self) -> int:
        return self._rows

    def __iter__(self):
        self._file.flush()
        with open(self.path, "rb") as f:
            for line in f:
                yield json.loads(line)


def _plain_json(value):
    """numpy values of a Ray Data row as JSON (``tolist`` covers scalars and arrays)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _remove_file(handle, path: str) -> None:
    handle.close()
    with contextlib.suppress(OSError):
        os.remove(path)


def item_blocks(n_items: int) -> int:
    """Blocks for ``n_items`` work items: one per item up to ``MAX_BLOCKS`` (few items of seconds to minutes each:
    balance matters), then ``MAX_BLOCKS`` (or 16 per cluster CPU, if more) of consecutive items. The driver pays
    Ray Data's scheduling per block (~4.5 ms measured), so its cost stops growing with items; an actor takes a
    block at a time, so the tail is at most one block's items (n / 1024)."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0)) if ray.is_initialized() else 0
    return max(1, min(n_items, max(MAX_BLOCKS, 16 * cpus)))


def map_items(items: list[dict], fn, constructor_args: tuple, concurrency: int | None, num_cpus: float,
              num_gpus: float = 0.0, max_actors: int | None = None, memory_gb: float | None = None) -> Manifest:
    """Map a row function over small work items on an actor pool; the small manifest rows it returns stream
    into a :class:`Manifest` (a local file of the driver), in item order. Items go in blocks
    (:func:`item_blocks`): one per item for up to ``MAX_BLOCKS`` items, then consecutive items per block, so the
    driver's cost per item falls as items grow (``benchmarks/bench_scale_plan.py``). ``memory_gb`` reserves
    memory per actor (Ray's ``memory`` resource), so the scheduler and the autoscaler count it."""
    import ray

    manifest = Manifest()
    if not items:
        return manifest
    blocks = item_blocks(len(items))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    extra = {"memory": int(memory_gb * 2**30)} if memory_gb else {}
    mapped = ds.map(fn, fn_constructor_args=constructor_args, compute=pool(blocks, concurrency, max_actors, num_cpus, num_gpus),
                    num_cpus=num_cpus, num_gpus=num_gpus, **extra)
    for row in mapped.iter_rows():
        manifest.append(row)
    return manifest


# ---------------------------------------------------------------- work items as Ray tasks
# In each worker process, the row functions of the last few map_tasks calls (constructed once per process, kept
# across tasks: open datasets, GDAL's block cache and imports stay warm from one item to the next).
_INSTANCES: OrderedDict[str, object] = OrderedDict()
KEEP_INSTANCES = 4
MAX_IN_FLIGHT = 4096  # tasks submitted ahead of the results (the autoscaler's demand); the rest wait in the driver


def _instance(key: str, spec: list):
    """This process's instance of a map_tasks row function (``spec``: ``[ref of (class, args)]``, nested so that
    Ray passes the reference instead of resolving it for every task)."""
    import ray

    inst = _INSTANCES.get(key)
    if inst is None:
        cls, args = ray.get(spec[0])
        inst = _INSTANCES[key] = cls(*args)
        while len(_INSTANCES) > KEEP_INSTANCES:
            _, old = _INSTANCES.popitem(last=False)
            if callable(close := getattr(old, "close", None)):
                close()
    _INSTANCES.move_to_end(key)
    return inst


def _run_item(key: str, spec: list, item: dict) -> dict:
    import ray

    with reaper.cancel_ends_worker():  # the instance's first item imports its domain's libraries
        return {**_instance(key, spec)(item), "node": ray.get_runtime_context().get_node_id()}


def task_name(cls) -> str:
    """The name of map_tasks' tasks for a row class: what ``ray list tasks`` shows, and the worker's process title
    (``ray::<name>``) while one runs."""
    return f"sarlang.{cls.__name__}"


def map_tasks(items: list[dict], cls, constructor_args: tuple, concurrency: int | None = None, num_cpus: float = 1.0,
              max_tasks: int | None = None, memory_gb: float | None = None, progress: bool = False,
              max_retries: int = 3) -> list[dict]:
    """Map a row class over small work items as Ray tasks; the manifest rows come back in item order, each with
    the ``node`` it ran on.

    For stages whose items are descriptors and whose results are small (catalog: scene rows; tile: shards
    written by the workers, manifest rows back): nothing flows
    between operators, so Ray Data's streaming executor only adds its scheduling loop, and its actor pools a
    worker start per actor per stage (1.6-2.2 s on a 2-core node). Tasks run on Ray's pooled worker processes,
    which stay up between stages; ``cls(*constructor_args)`` is built once per process (:func:`_instance`).

    * ``concurrency``: at most this many items at once (a fixed width); else up to ``max_tasks`` (default: every
      item, at most ``MAX_IN_FLIGHT``) are submitted together, so Ray runs as many as the cluster's CPUs hold and
      an autoscaler sees the rest as demand and adds nodes for it;
    * a task whose worker or node dies is run again (``max_retries``): items must be idempotent (shards written
      atomically, finished ones skipped); an exception raised by the row function fails the map, with the
      item it came from, after cancelling what is still queued (an interrupt too, on a cluster);
    * ``memory_gb`` reserves memory per task (Ray's ``memory`` resource), for the scheduler and the autoscaler.
    """
    import ray

    if not items:
        return []
    spec = ray.put((cls, constructor_args))
    options = {"num_cpus": num_cpus, "max_retries": max_retries, "name": task_name(cls)}
    if memory_gb:
        options["memory"] = int(memory_gb * 2**30)
    remote = ray.remote(_run_item).options(**options)
    width = max(1, min(concurrency or max_tasks or len(items), len(items), MAX_IN_FLIGHT))
    results: list[dict | None] = [None] * len(items)
    pending: dict = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc=task_name(cls), unit="item")
    try:
        next_item = 0
        while next_item < len(items) or pending:
            while next_item < len(items) and len(pending) < width:
                pending[remote.remote(spec.hex(), [spec], items[next_item])] = next_item
                next_item += 1
            refs = list(pending)
            ray.wait(refs, num_returns=1)
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)  # every result ready by now, in one pass
            for ref in done:
                index = pending.pop(ref)
                try:
                    results[index] = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    raise RuntimeError(f"{task_name(cls)} failed on item {_describe(items[index])}: {exc}") from exc
                if bar is not None:
                    bar.update(1)
    except BaseException as exc:
        # nothing more of this map runs: a row failed, or Ctrl-C / SIGTERM on a driver connected to a cluster.
        # Not on an interrupt of a local Ray this process started: the same Ctrl-C (sent to the process group)
        # kills its workers, and a cancel racing their deaths can abort the driver in Ray 2.60's task manager
        # (RAY_CHECK "Tried to complete task that was not pending"); the driver's exit ends that Ray anyway
        if isinstance(exc, Exception) or not reaper.started_local_ray():
            for ref in pending:
                ray.cancel(ref)
        raise
    finally:
        if bar is not None:
            bar.close()
    return results


def _describe(item: dict) -> str:
    """A work item in an error message: its identifying keys, not its payload."""
    short = {k: v for k, v in item.items() if not (isinstance(v, str) and len(v) > 200)}
    return json.dumps(short, default=str)[:500]


def shard_items(root: str) -> list[dict]:
    """One work item per shard under ``root`` (``<scene>/<name>.parquet``), named relative to it."""
    return [{"shard": io.relative(u, root)} for u in io.glob(root, "*/*.parquet")] if io.exists(root) else []


# per-shard counters (JSON objects in the manifest rows) summed into the stage's marker, where the run summary
# reads them: the summary never reads a shard
SUMMED = {"gsds": "tiles_per_gsd", "classes": "objects_per_class", "applications": "pairs_per_application"}


def totals(manifest: Iterable[dict]) -> dict:
    """The stage's counts from its manifest rows, in one pass (a :class:`Manifest` is read from its file, never
    held whole)."""
    out = {"shards": 0, "planned": 0, "written": 0, "rejected": 0, "skipped_shards": 0}
    retried, summed = None, {}
    for m in manifest:
        out["shards"] += 1
        for key in ("planned", "written", "rejected"):
            out[key] += m[key]
        out["skipped_shards"] += bool(m["skipped"])
        if "retried" in m:
            retried = (retried or 0) + (m["retried"] or 0)
        for field_ in SUMMED:
            if field_ in m:
                summed.setdefault(field_, Counter()).update(json.loads(m[field_] or "{}"))
    if retried is not None:
        out["retried"] = retried
    for field_, name in SUMMED.items():
        if field_ in summed:
            out[name] = dict(summed[field_].most_common())
    return out
