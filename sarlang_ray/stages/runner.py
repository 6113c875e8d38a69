"""What every stage shares, in one place: fingerprints, skip / resume / redo, markers, actor pools, tasks.

A stage is a :class:`Stage`: a name, the stages it reads (``inputs``), the config keys it reads (``keys``, a
tuple or a function of the config: annotate reads only its backend's section) and a body ``cfg -> counts``.
Running one:

* its **fingerprint** is a hash of those config values (resources such as ``concurrency``, ``num_cpus`` or
  progress bars left out) and of the fingerprints its inputs recorded on disk, i.e. of what it is really
  made from;
* ``<stage>/_SUCCESS.json`` with the same fingerprint: the stage is up to date, a no-op;
* ``<stage>/_STARTED.json`` with the same fingerprint but no ``_SUCCESS.json``: an interrupted run, resumed
  shard by shard (finished shards are kept);
* anything else (a changed key, a changed input, ``run.force=true``, a marker from an older version): the
  stage's folder is cleared and the stage recomputed; the markers of every stage made from it are removed
  first, so the run folder never claims a stale stage is finished.

This is the run-cache model of DVC and Snakemake (outputs keyed by the parameters and input hashes that
made them), with two differences that fit a pipeline of sharded tables: the unit that is kept is the
stage (with shard-level resume inside it), and inputs are identified by their producer's fingerprint,
not by hashing terabytes of shards. Raw archive files are identified by their paths, not their bytes:
a scene replaced in place under the same name needs ``run.force=true``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sarlang_ray import io, reaper
from sarlang_ray.config import WorkflowConfig

log = logging.getLogger("sarlang")

ORDER = ("synth", "catalog", "tile", "align", "annotate", "export", "train", "evaluate")
SUCCESS, STARTED = "_SUCCESS.json", "_STARTED.json"
FINGERPRINT_VERSION = 1  # bump when the meaning of a stage's output changes for the same config
# field names (at any level of a stage's keys) that only say how fast or where a stage runs, never what it
# writes. Not `name`: a prompt's name is the leaderboard's label (train.name, where checkpoints go, is
# train's own ignore). docs/architecture.md has the table of what each key redoes (tests/test_fingerprints.py)
RESOURCE_KEYS = frozenset({
    "concurrency", "num_cpus", "num_gpus", "max_actors", "max_tasks", "memory_gb", "max_concurrent_trials", "cpus_per_worker", "progress", "num_to_keep",
    "max_failures", "storage_path", "max_concurrency", "timeout_s", "max_retries", "backoff_s", "raster_reader",
    "gdal_cache_mb", "preprocess_cpus", "prefetch_batches", "cpus_per_replica", "accelerator_type", "gpu_memory_utilization",
    "api_key_env",  # names the variable that holds a key, never the key
})


class StageFailed(RuntimeError):
    """A stage ran but its work failed (a failed trial, nothing planned): the command exits non-zero."""


def _select(cfg: WorkflowConfig, path: str):
    obj = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _plain(value, ignore: frozenset[str], path: str = "", drop: frozenset[str] = frozenset()):
    """A config value as plain JSON data, resource keys (field names) and the fields at ``drop`` (dotted
    paths) left out at every level."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name), ignore, f"{path}.{f.name}", drop) for f in dataclasses.fields(value)
                if f.name not in ignore and f"{path}.{f.name}" not in drop}
    if isinstance(value, dict):
        return {str(k): _plain(v, ignore, path, drop) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_plain(v, ignore, path, drop) for v in value]
    return value


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline: what it reads, what config makes it, and its body."""

    name: str
    body: Callable[[WorkflowConfig], dict]
    inputs: tuple[str, ...] = ()  # stages whose outputs this one reads
    # the config paths the stage reads ("tile", "run.seed", ...), or a function of the config that gives them
    # (annotate reads only its selected backend's section)
    keys: tuple[str, ...] | Callable[[WorkflowConfig], tuple[str, ...]] = ()
    ignore: frozenset[str] = field(default_factory=frozenset)  # more resource keys (field names), for this stage only
    drop: frozenset[str] = field(default_factory=frozenset)  # paths under ``keys`` the stage does not read
    needs_ray: bool = True
    # the body that redoes only the items of the stage's errors table, keeping the rest (run.retry_errors=true on a
    # finished stage); None: the stage cannot, and keeps its rejects (run.force=true redoes it all)
    retry: Callable[[WorkflowConfig], dict] | None = None

    # ------------------------------------------------------------ where
    def folder(self, cfg: WorkflowConfig) -> str:
        return cfg.synth.out_dir if self.name == "synth" else io.join(cfg.run.run_dir, self.name)

    def marker(self, cfg: WorkflowConfig, which: str = SUCCESS) -> str:
        return io.join(self.folder(cfg), which)

    # ------------------------------------------------------------ what it is made from
    def read_keys(self, cfg: WorkflowConfig) -> tuple[str, ...]:
        """The config paths this stage reads under ``cfg``."""
        return self.keys(cfg) if callable(self.keys) else self.keys

    def settings(self, cfg: WorkflowConfig) -> dict:
        """The config values that change this stage's output."""
        ignore = RESOURCE_KEYS | self.ignore
        return {k: _plain(_select(cfg, k), ignore, k, self.drop) for k in self.read_keys(cfg)
                if k.rsplit(".", 1)[-1] not in ignore and k not in self.drop}

    def input_fingerprints(self, cfg: WorkflowConfig) -> dict[str, str | None]:
        """The fingerprint each input stage recorded on disk (None: not made in this run folder)."""
        out = {}
        for name in self.inputs:
            if name == "synth" and cfg.catalog.archive != cfg.synth.out_dir:
                continue  # the archive is the user's own, not the synthetic one
            marker = registry()[name].read_marker(cfg)
            out[name] = output_id(marker) if marker else None
        return out

    def fingerprint(self, cfg: WorkflowConfig) -> dict:
        made_from = {"version": FINGERPRINT_VERSION, "stage": self.name, "config": self.settings(cfg),
                     "inputs": self.input_fingerprints(cfg)}
        text = json.dumps(made_from, sort_keys=True, default=str)
        return {"value": hashlib.sha256(text.encode()).hexdigest()[:16], **made_from}

    def read_marker(self, cfg: WorkflowConfig, which: str = SUCCESS) -> dict | None:
        uri = self.marker(cfg, which)
        if not io.exists(uri):
            return None
        marker = io.read_json(uri)
        return marker if isinstance(marker.get("fingerprint"), dict) else None  # an older version's marker: stale

    def status(self, cfg: WorkflowConfig) -> str:
        """``done`` (up to date), ``stale`` (finished, but from other settings or inputs) or ``missing``."""
        done = self.read_marker(cfg)
        if done is None:
            return "stale" if io.exists(self.marker(cfg)) else "missing"
        return "done" if done["fingerprint"]["value"] == self.fingerprint(cfg)["value"] else "stale"

    # ------------------------------------------------------------ running
    def run(self, cfg: WorkflowConfig) -> dict:
        """Run the stage if it is not up to date (or, with ``run.retry_errors=true``, redo the items it rejected);
        its counts either way."""
        fp = self.fingerprint(cfg)
        done = self.read_marker(cfg)
        if done is not None and done["fingerprint"]["value"] == fp["value"] and not cfg.run.force:
            if not (cfg.run.retry_errors and done.get("rejected")):
                return counts_of(done)
            if self.retry is None:
                log.warning("%s: run.retry_errors=true, but this stage cannot redo single items: its %d rejected items "
                            "stay (its errors table says why; run.force=true redoes the whole stage)", self.name, done["rejected"])
                return counts_of(done)
            log.info("%s: retrying the %d items of its errors table; the %d written ones are kept", self.name,
                     done["rejected"], done.get("written", 0))
            self._prepare(cfg)
            # one more remake of this output: the stages made from it see a new input, and a resume keeps the count
            fp = {**fp, "retries": done["fingerprint"].get("retries", 0) + 1}
            io.write_json_atomic(self.marker(cfg, STARTED), {"fingerprint": fp})
            fs, path = io.filesystem(self.marker(cfg))
            fs.rm(path)  # until the retry ends, the stage is unfinished: an interrupted one resumes, shard by shard
            return self._execute(cfg, fp, self.retry)
        self._prepare(cfg)
        started = self.read_marker(cfg, STARTED)
        resume = started is not None and started["fingerprint"]["value"] == fp["value"] and not cfg.run.force
        if resume and started["fingerprint"].get("retries"):  # an interrupted retry: its outputs are partly remade
            fp = {**fp, "retries": started["fingerprint"]["retries"]}
        if not resume:
            if done is not None or started is not None or io.exists(self.marker(cfg)):
                log.info("%s: %s; recomputing it", self.name, describe_change(done or started, fp))
            clear(self.folder(cfg), owned=self.name != "synth" or io.exists(self.marker(cfg)) or started is not None)
            io.write_json_atomic(self.marker(cfg, STARTED), {"fingerprint": fp})
        else:
            swept = io.sweep_partial(self.folder(cfg))
            if swept:
                log.info("%s: resuming; removed %d partial files left by killed writers", self.name, len(swept))
        return self._execute(cfg, fp, self.body)

    def _prepare(self, cfg: WorkflowConfig) -> None:
        """What comes before touching the stage's folder: Ray (the run folder may be the wrong kind of storage for
        its cluster), and the removal of the success markers of every stage made from this one."""
        if self.needs_ray:
            ensure_ray(cfg)
            check_storage(cfg)
        invalidate_downstream(cfg, self.name)

    def _execute(self, cfg: WorkflowConfig, fp: dict, body: Callable[[WorkflowConfig], dict]) -> dict:
        """Run ``body`` on a stage folder that is ready for it; write the success marker with its counts."""
        t0 = time.time()
        counts = body(cfg)
        counts["seconds"] = round(time.time() - t0, 2)
        placement = counts.pop("placement", None)  # where the work ran: recorded in the marker, not a count
        if problem := counts.pop("failure", None):  # the body finished its outputs, but its work failed
            raise StageFailed(f"{self.name}: {problem}")
        io.write_json_atomic(self.marker(cfg), {**counts, **({"placement": placement} if placement else {}), "fingerprint": fp})
        return counts


def output_id(marker: dict) -> str:
    """What the stages made from this one record as its fingerprint: the marker's, changed by every retry of its
    errors (``run.retry_errors=true`` remakes part of the output with the same config and inputs)."""
    fp = marker["fingerprint"]
    if not fp.get("retries"):
        return fp["value"]
    return hashlib.sha256(f"{fp['value']}+retry{fp['retries']}".encode()).hexdigest()[:16]


def counts_of(marker: dict) -> dict:
    """A marker's counts, without its fingerprint and placement."""
    return {k: v for k, v in marker.items() if k not in ("fingerprint", "placement")}


def placement(manifest: Iterable[dict]) -> dict:
    """Items per node id of a map_tasks manifest (a stage marker's ``placement``: where the stage ran)."""
    return dict(sorted(Counter(m["node"] for m in manifest).items()))


def describe_change(old: dict | None, new: dict) -> str:
    """Which config keys or inputs differ between a marker and a fingerprint, for the log."""
    if old is None or not isinstance(old.get("fingerprint"), dict):
        return "no record of what it was made from"
    before = old["fingerprint"]
    changes = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a != b:
            changes.append(f"{path}: {a!r} -> {b!r}")

    walk(before.get("config"), new["config"], "")
    for name in sorted(set(before.get("inputs", {})) | set(new["inputs"])):
        if before.get("inputs", {}).get(name) != new["inputs"].get(name):
            changes.append(f"input {name} was remade")
    return "changed: " + "; ".join(changes[:8]) if changes else "made by another version"


def clear(folder: str, owned: bool = True) -> None:
    """Remove a stage's previous outputs (a recompute starts from nothing, so no old shard is skipped)."""
    if not owned or not io.exists(folder):
        return
    fs, path = io.filesystem(folder)
    fs.rm(path, recursive=True)


def downstream(name: str) -> list[str]:
    """Every stage made (directly or not) from ``name``, in pipeline order."""
    stages, out, frontier = registry(), [], {name}
    for other in ORDER:
        if set(stages[other].inputs) & frontier:
            out.append(other)
            frontier.add(other)
    return out


def invalidate_downstream(cfg: WorkflowConfig, name: str) -> None:
    """Remove the success markers of every stage made from ``name``: they are about to be stale."""
    stages = registry()
    for other in downstream(name):
        uri = stages[other].marker(cfg)
        if io.exists(uri):
            fs, path = io.filesystem(uri)
            fs.rm(path)


def registry() -> dict[str, Stage]:
    """Every stage by name (imported on first use: the stage modules import this one)."""
    import importlib

    return {name: importlib.import_module(f"sarlang_ray.stages.{name}").STAGE for name in ORDER}


# ---------------------------------------------------------------- Ray wiring shared by the stages
def ensure_ray(cfg: WorkflowConfig) -> None:
    """Connect to the configured cluster (or RAY_ADDRESS), or start a local Ray on 127.0.0.1; either way (a
    Ray the caller started included) set the Ray Data options the stages rely on.

    ``run.raster_reader`` reaches the workers through the job's environment (``runtime_env``), so it applies
    when this function starts the connection; a Ray initialised by the caller keeps its workers' own
    (``SARLANG_RASTER_READER``, default gdal)."""
    import ray

    reader_env = io.use_raster_reader(cfg.run.raster_reader)
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict = {"log_to_driver": True}
        if cfg.run.raster_reader != "gdal":  # the default needs nothing: no runtime_env for the common case
            kwargs["runtime_env"] = {"env_vars": reader_env}
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, **kwargs)
        else:
            # address="local": always a new local Ray, never one a `ray start` left on this machine
            import atexit

            # both before ray.init: a Ctrl-C can come while it starts the processes. atexit is last in, first
            # out, so the hook runs after ray.init's own shutdown hook (when there is one). Once per process,
            # however many local Rays it starts: one scan at exit finds them all. The watcher covers the
            # deaths that run no exit hook (SIGKILL, an abort)
            reaper.start_watcher()
            atexit.unregister(stop_local_ray)
            atexit.register(stop_local_ray)
            ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.ray.progress
    ctx.execution_options.preserve_order = True  # deterministic manifests


def stop_local_ray(grace_s: float = 5.0) -> list[int]:
    """Shut down the local Ray this process started, then end every process of it still running (see
    :mod:`sarlang_ray.reaper`: on Ray 2.60 ``ray.shutdown`` leaves a raylet agent that had not yet registered
    when Ctrl-C killed the raylet); returns their pids."""
    import ray

    with contextlib.suppress(Exception):  # an init cut short may leave nothing to shut down
        ray.shutdown()
    return reaper.end_session(os.getpid(), grace_s)


def check_storage(cfg: WorkflowConfig) -> None:
    """Refuse a local ``run_dir`` on a cluster of more than one node: workers would write shards to their
    own disks, where the driver (and Ray Train) never finds them.

    Raises:
        StageFailed: with what to do instead.
    """
    import ray

    if io.is_remote(cfg.run.run_dir) or cfg.run.shared_fs:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        raise StageFailed(
            f"run.run_dir={cfg.run.run_dir} is a local path, but the Ray cluster has {len(nodes)} nodes: each would "
            "write its shards to its own disk. Use storage every node sees (run.run_dir=s3://BUCKET/PREFIX or gs://...), "
            "or, if that path is a shared file system mounted on every node (NFS, EFS, Lustre), set run.shared_fs=true.")


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
