"""How a stage's work runs on the cluster: one :func:`map` for every data stage.

A stage declares its :class:`Work` (the items, the row class and its constructor arguments, its
:class:`Resources`, whether the row pins a model, how to finish) and ``map(work)`` runs it on one of two
back-ends, chosen by that declared need, never by the stage's name:

* **tasks** (rows that need CPUs only: catalog, tile, align, export, annotate with the template or openai
  backend): one Ray task per item on Ray's pooled worker processes, which stay up between stages; the row
  class is built once per process and kept for the next items (:func:`_instance`), so open datasets, label
  indexes, GDAL's block cache and imports stay warm from one item to the next;
* **actors** (rows that pin a model, or ask for a GPU: annotate with the hf backend or a backend of your own):
  a Ray Data actor pool (:func:`pool`), each actor loading the model once and keeping it for the pool's life.

Both share one contract: the manifest (one small row per item, in item order, spooled to a local file of the
driver, each with the ``node`` id it ran on: :meth:`Manifest.placement` is what a stage's
``_SUCCESS.json`` records), an item whose row raises fails the map with the item named (after cancelling what
is still queued), an item whose worker or node dies is run again (items are idempotent: shards are written
atomically, finished ones skipped), and one progress bar per map (``ray.progress``).

``benchmarks/bench_backends.py`` measured the two on align and annotate (template) at 16x the demo
(docs/architecture.md has the numbers and the decision).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sized
from dataclasses import dataclass, field
from typing import Any

from sarlang_ray import io, reaper

TASKS, ACTORS = "tasks", "actors"
# benchmarks only (benchmarks/bench_backends.py): run every map on this back-end, whatever the work declares
BACKEND_ENV = "SARLANG_MAP_BACKEND"


@dataclass(frozen=True)
class Resources:
    """What one item's worker needs, in the vocabulary every stage section shares.

    ``concurrency``: ``N`` (at most N items at once: N tasks in flight, or a pool of N actors), ``(min, max)``
    (autoscaling: tasks in flight up to ``max``; an actor pool that starts with what the cluster holds now, at
    least ``min``, and grows to ``max``), or None (as wide as the items: Ray runs what the cluster's CPUs hold
    and an autoscaler sees the rest as demand)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_gb: float | None = None
    concurrency: int | tuple[int, int] | None = None

    @classmethod
    def of(cls, section) -> Resources:
        """A stage section's resources, from its keys in the one vocabulary (``config.resource_keys``; the old
        ``max_tasks`` / ``max_actors`` were translated to ``concurrency: [1, max]`` when the config
        loaded)."""
        from sarlang_ray.config import resource_keys

        keys = resource_keys(section)
        c = keys["concurrency"]
        concurrency = (int(c[0]), int(c[1])) if isinstance(c, (list, tuple)) else c
        return cls(
            num_cpus=float(keys["num_cpus"]),
            num_gpus=float(keys["num_gpus"] or 0.0),
            memory_gb=keys["memory_gb"] or None,
            concurrency=concurrency,
        )

    def width(self, n_items: int | None) -> int:
        """Tasks in flight at most."""
        c = self.concurrency
        top = c[1] if isinstance(c, tuple) else c
        return max(1, min(top or n_items or MAX_IN_FLIGHT, n_items or MAX_IN_FLIGHT, MAX_IN_FLIGHT))

    def remote_args(self) -> dict:
        out: dict = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            out["num_gpus"] = self.num_gpus
        if self.memory_gb:
            # Ray's memory resource: the scheduler and autoscaler count it
            out["memory"] = int(self.memory_gb * 2**30)
        return out


@dataclass(frozen=True)
class Work:
    """A stage's work: ``row(*args)`` is built once per worker process (tasks) or actor, then called with each
    item, returning that item's small manifest row. ``finish`` turns the manifest into what ``map`` returns
    (by default the :class:`Manifest` itself)."""

    items: Iterable[Mapping[str, Any]]
    row: type
    args: tuple = ()
    resources: Resources = field(default_factory=Resources)
    # the row loads a model once and keeps it (on a GPU when num_gpus): an actor pool
    holds_model: bool = False
    finish: Callable[[Manifest], Any] | None = None
    progress: bool = False
    max_retries: int = 3  # runs of an item whose worker or node died (never of one whose row raised)
    # items travel through the object store (tasks): Ray keeps a finished task's inline arguments in the
    # driver (~12 KB a page of the streaming catalog), an object it releases once the task is done
    by_reference: bool = False

    @property
    def backend(self) -> str:
        """Where it runs: an actor pool for rows that pin a model or take a GPU, tasks otherwise."""
        forced = os.environ.get(BACKEND_ENV)
        if forced:
            if forced not in (TASKS, ACTORS):
                raise ValueError(f"{BACKEND_ENV}={forced}: expected {TASKS} or {ACTORS}")
            return forced
        return ACTORS if self.holds_model or self.resources.num_gpus else TASKS


def map(work: Work) -> Any:  # the one way a stage runs its items (stages call execution.map)
    """Run ``work``'s items on the back-end its declared need chooses (module docstring); the manifest rows,
    in item order, each with the ``node`` it ran on, passed to ``work.finish`` when set."""
    manifest = (_actors if work.backend == ACTORS else _tasks)(work)
    return work.finish(manifest) if work.finish else manifest


def placement(*manifests: Manifest, weight: str | None = None) -> dict:
    """Where a stage's items ran (its marker's ``placement``): per node id, the address it registered with the
    cluster (``NodeManagerAddress``) and the items it ran (``weight``: a manifest column to add up instead,
    such as the scenes of a catalog page)."""
    import ray

    total: Counter = Counter()
    for m in manifests:
        if weight is None:
            total.update(m.nodes)
        else:
            for row in m:
                total[row["node"]] += row[weight]
    ips = {n["NodeID"]: n.get("NodeManagerAddress") for n in ray.nodes()} if total else {}
    return {node: {"ip": ips.get(node), "items": n} for node, n in sorted(total.items())}


# ---------------------------------------------------------------- the manifest
class Manifest:
    """The manifest rows of a map, spooled to a local temporary file of the driver as they arrive (pickled,
    one record each) instead of collected in its memory; iterable any number of times, each pass reading the
    file. Counts the items per node id as they arrive (:func:`placement`)."""

    def __init__(self) -> None:
        import tempfile
        import weakref

        fd, self.path = tempfile.mkstemp(prefix="sarlang-manifest-", suffix=".pkl")
        self._file = os.fdopen(fd, "wb")
        self._rows = 0
        self.nodes: Counter = Counter()
        # at the latest when collected
        self._finalizer = weakref.finalize(self, _remove_file, self._file, self.path)

    def close(self) -> None:
        """Remove the spool file now."""
        self._finalizer()

    def append(self, row: dict) -> None:
        if "node" in row:
            self.nodes[row["node"]] += 1
        pickle.dump(row, self._file, protocol=pickle.HIGHEST_PROTOCOL)
        self._rows += 1

    def __len__(self) -> int:
        return self._rows

    def __iter__(self):
        self._file.flush()
        with open(self.path, "rb") as f:
            for _ in range(self._rows):
                yield pickle.load(f)


def _plain_value(value):
    """A value of a Ray Data row as plain Python (numpy scalars and arrays through ``tolist``), as a task's
    is."""
    return value.tolist() if hasattr(value, "tolist") else value


def _remove_file(handle, path: str) -> None:
    handle.close()
    with contextlib.suppress(OSError):
        os.remove(path)


def _where() -> dict:
    """The node this worker runs on."""
    import ray

    return {"node": ray.get_runtime_context().get_node_id()}


def _item_failed(cls, item: Mapping[str, Any], exc: BaseException) -> str:
    return f"{task_name(cls)} failed on item {_describe(item)}: {exc}"


def _deaths() -> tuple[type[BaseException], ...]:
    """Ray's errors that say a worker process (an actor's, a task's) or its node died."""
    import ray

    return (ray.exceptions.ActorDiedError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)


def _is_death(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what it was raised from) says a worker process or its node died."""
    deaths = _deaths()
    while exc is not None:
        if isinstance(exc, deaths):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class WorkerDied(RuntimeError):
    """An item's worker process (or its node) died on every one of its runs."""


def _died(exc: BaseException, retries: int) -> WorkerDied:
    return WorkerDied(
        f"its worker died on each of its {retries + 1} runs ({type(exc).__name__}): a crash or an "
        "out-of-memory kill that this item causes; the worker's log (python-core-worker-*.log in the Ray "
        "session's logs) has the cause; give the stage more memory (memory_gb) if the node's OOM killer "
        "ended it"
    )


def _progress(work: Work, total: int | None):
    if not work.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=task_name(work.row), unit="item")


# ---------------------------------------------------------------- back-end: an actor pool (Ray Data)
def pool(
    n_items: int,
    concurrency: int | None,
    max_actors: int | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    min_actors: int = 1,
):
    """The actor pool of a stage: ``concurrency`` actors when set, else an autoscaling pool.

    The autoscaling pool starts with the actors the cluster's CPUs (and GPUs) fit now (at least
    ``min_actors``) and may grow to ``max_actors`` (default: one per work item). Ray Data adds actors as
    resources appear and, on a cluster with an autoscaler, asks it for the nodes that pending actors need, so
    a cluster that starts from zero workers (or has no GPU node yet) grows for the stage instead of running it
    on one actor.

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
        return ray.data.ActorPoolStrategy(
            size=size, max_tasks_in_flight_per_actor=2 if n_items >= 4 * size else 1
        )

    if concurrency:
        return fixed(min(concurrency, n_items))
    have = ray.cluster_resources()
    fits = [have.get("CPU", 0) / num_cpus] if num_cpus else []
    fits += [have.get("GPU", 0) / num_gpus] if num_gpus else []
    # actors the cluster holds now (at least one: it asks for a node)
    now = max(1, min_actors, int(min(fits, default=1)))
    top = max(1, min(max_actors or n_items, n_items))
    if top <= now:  # everything fits now: a fixed pool
        return fixed(top)
    return ray.data.ActorPoolStrategy(min_size=now, max_size=top, max_tasks_in_flight_per_actor=2)


# the actor pool: blocks of items at most (more when the cluster has more than 1024 / 16 CPUs)
MAX_BLOCKS = 1024


def item_blocks(n_items: int) -> int:
    """Blocks for ``n_items`` work items: one per item up to ``MAX_BLOCKS`` (few items of seconds to minutes
    each: balance matters), then ``MAX_BLOCKS`` (or 16 per cluster CPU, if more) of consecutive items. The
    driver pays Ray Data's scheduling per block (~4.5 ms measured), so its cost stops growing with items; an
    actor takes a block at a time, so the tail is at most one block's items (n / 1024)."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0)) if ray.is_initialized() else 0
    return max(1, min(n_items, max(MAX_BLOCKS, 16 * cpus)))


class _ActorRow:
    """An actor's row: ``cls(*args)`` built once per actor; each item's row with where it ran, or an error
    that names the item."""

    def __init__(self, cls, args: tuple):
        self.cls = cls
        self.inst = cls(*args)
        self.where = _where()

    def __call__(self, item: dict) -> dict:
        try:
            return {**self.inst(item), **self.where}
        except Exception as exc:
            raise RuntimeError(_item_failed(self.cls, item, exc)) from exc


def _actors(work: Work) -> Manifest:
    """The items in blocks (:func:`item_blocks`: one per item up to ``MAX_BLOCKS``, then consecutive items per
    block, so the driver's cost per item stops growing) on an actor pool (:func:`pool`); rows stream into the
    manifest in item order (Ray Data's ``preserve_order``, set here as the stages' Ray connection sets it)."""
    import ray

    manifest = Manifest()
    items = work.items if isinstance(work.items, list) else list(work.items)
    if not items:
        return manifest
    r = work.resources
    blocks = item_blocks(len(items))
    c = r.concurrency
    fixed, top = (c, None) if isinstance(c, int) else (None, c[1] if c else None)
    low = c[0] if isinstance(c, tuple) else 1
    # the manifest is in item order
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    # named as the row class: Ray Data's operator and actors read Map(<row class>) in the dashboard and
    # process titles
    actor = type(work.row.__name__, (_ActorRow,), {"__qualname__": work.row.__name__})
    mapped = ds.map(
        actor,
        fn_constructor_args=(work.row, work.args),
        compute=pool(blocks, fixed, top, r.num_cpus, r.num_gpus, low),
        # the tasks' retry rule: an item whose worker died runs again at most max_retries times (Ray Data's
        # default, -1 for both, restarts an actor that an item kills again and again: the stage never ends)
        max_restarts=work.max_retries,
        max_task_retries=work.max_retries,
        **r.remote_args(),
    )
    bar = _progress(work, len(items))
    rows = iter(mapped.iter_rows())  # a generator: closing it shuts the pool's executor down
    failed = None
    try:
        for row in rows:
            manifest.append({k: _plain_value(v) for k, v in row.items()})
            if bar is not None:
                bar.update(1)
    except Exception as exc:  # Ray Data wraps the row's error: keep the line that names the item
        failed = next((line.strip() for line in str(exc).splitlines() if "failed on item" in line), None)
        if failed is None and _is_death(exc):
            # a block's items are not named by Ray Data's error; one of them killed its actor every time
            failed = f"{task_name(work.row)} failed on one of its items: {_died(exc, work.max_retries)}"
        if failed is None:
            raise
        failed = failed[failed.index(task_name(work.row)) :] if task_name(work.row) in failed else failed
    finally:
        with contextlib.suppress(Exception):
            # a generator (iter of one); an interrupt or a failed row: stop the pool's executor, nothing more
            # of this map runs
            rows.close()  # type: ignore[attr-defined]
        if bar is not None:
            bar.close()
    if failed is not None:
        # raised outside the handler, so it does not hold Ray Data's error (whose traceback holds the executor
        # and its actors, and their CPUs, for as long as the caller keeps the error)
        del rows, mapped, ds
        import gc

        gc.collect()
        raise RuntimeError(failed)
    return manifest


# ---------------------------------------------------------------- back-end: tasks on pooled workers
# In each worker process, the row functions of the last few maps (constructed once per process, kept across
# tasks: open datasets, GDAL's block cache and imports stay warm from one item to the next).
_INSTANCES: OrderedDict[str, object] = OrderedDict()
KEEP_INSTANCES = 4
# tasks submitted ahead of the results (the autoscaler's demand); the rest wait in the driver
MAX_IN_FLIGHT = 4096


def _instance(key: str, spec: list):
    """This process's instance of a map_tasks row function (``spec``: ``[ref of (class, args)]``, nested so
    that Ray passes the reference instead of resolving it for every task)."""
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


def _run_item(key: str, spec: list, item: Mapping[str, Any]) -> dict:
    with reaper.cancel_ends_worker():  # the instance's first item imports its domain's libraries
        return {**_instance(key, spec)(item), **_where()}


def task_name(cls) -> str:
    """The name of map_tasks' tasks for a row class: what ``ray list tasks`` shows, and the worker's process
    title (``ray::<name>``) while one runs."""
    return f"sarlang.{cls.__name__}"


def _tasks(work: Work) -> Manifest:
    """One Ray task per item, at most ``Resources.width`` in flight (the items may be a stream: they are drawn
    as tasks finish); the rows are written to the manifest in item order (a result that comes early waits for
    the ones before it, at most the width of them).

    Nothing flows between operators here, so Ray Data's streaming executor would only add its scheduling loop,
    and its actor pools a worker start per actor per stage (1.6-2.2 s on a 2-core node)."""
    import ray

    manifest = Manifest()
    items = iter(work.items)
    total = len(work.items) if isinstance(work.items, Sized) else None
    if total == 0:
        return manifest
    cls = work.row
    spec = ray.put((cls, work.args))
    options = {**work.resources.remote_args(), "max_retries": work.max_retries, "name": task_name(cls)}
    remote = ray.remote(_run_item).options(**options)
    width = work.resources.width(total)
    pending: dict = {}  # ref -> (index, item)
    early: dict[int, dict] = {}  # finished rows waiting for the ones before them
    next_index = next_out = 0
    exhausted = False
    bar = _progress(work, total)
    try:
        while True:
            while not exhausted and len(pending) < width:
                item = next(items, None)
                if item is None:
                    exhausted = True
                    break
                arg = ray.put(item) if work.by_reference else item  # a top-level reference: Ray resolves it
                pending[remote.remote(spec.hex(), [spec], arg)] = (next_index, item)
                del arg
                next_index += 1
            if not pending:
                break
            refs = list(pending)
            ray.wait(refs, num_returns=1)
            # every result ready by now, in one pass
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in done:
                index, item = pending.pop(ref)
                try:
                    early[index] = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    raise RuntimeError(_item_failed(cls, item, exc)) from exc
                except _deaths() as exc:
                    raise RuntimeError(_item_failed(cls, item, _died(exc, work.max_retries))) from exc
                if bar is not None:
                    bar.update(1)
            while next_out in early:
                manifest.append(early.pop(next_out))
                next_out += 1
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
    return manifest


def _describe(item: Mapping[str, Any]) -> str:
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
    """The stage's counts from its manifest rows, in one pass (a :class:`Manifest` is read from its file,
    never held whole)."""
    out: dict[str, Any] = {"shards": 0, "planned": 0, "written": 0, "rejected": 0, "skipped_shards": 0}
    retried: int | None = None
    summed: dict[str, Counter] = {}
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
