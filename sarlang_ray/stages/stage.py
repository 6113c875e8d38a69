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

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sarlang_ray import io
from sarlang_ray.config import WorkflowConfig
from sarlang_ray.stages.cluster import StageFailed, check_storage, ensure_ray

log = logging.getLogger("sarlang")

__all__ = [
    "ORDER",
    "RESOURCE_KEYS",
    "STARTED",
    "SUCCESS",
    "Stage",
    "StageFailed",
    "counts_of",
    "downstream",
    "invalidate_downstream",
    "registry",
]

ORDER = ("synth", "catalog", "tile", "align", "annotate", "export", "train", "evaluate")
SUCCESS, STARTED = "_SUCCESS.json", "_STARTED.json"
FINGERPRINT_VERSION = 1  # bump when the meaning of a stage's output changes for the same config
# field names (at any level of a stage's keys) that only say how fast or where a stage runs, never what it
# writes. Not `name`: a prompt's name is the leaderboard's label (train.name, where checkpoints go, is
# train's own ignore). docs/architecture.md has the table of what each key redoes (tests/test_fingerprints.py)
RESOURCE_KEYS = frozenset(
    {
        "concurrency",
        "num_cpus",
        "num_gpus",
        "max_actors",
        "max_tasks",
        "memory_gb",
        "max_concurrent_trials",
        "cpus_per_worker",
        "progress",
        "num_to_keep",
        "max_failures",
        "storage_path",
        "max_concurrency",
        "timeout_s",
        "max_retries",
        "backoff_s",
        "raster_reader",
        "gdal_cache_mb",
        "preprocess_cpus",
        "prefetch_batches",
        "cpus_per_replica",
        "accelerator_type",
        "gpu_memory_utilization",
        "api_key_env",  # names the variable that holds a key, never the key
    }
)


def _select(cfg: WorkflowConfig, path: str):
    obj = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _plain(value, ignore: frozenset[str], path: str = "", drop: frozenset[str] = frozenset()):
    """A config value as plain JSON data, resource keys (field names) and the fields at ``drop`` (dotted
    paths) left out at every level."""
    if dataclasses.is_dataclass(value):
        return {
            f.name: _plain(getattr(value, f.name), ignore, f"{path}.{f.name}", drop)
            for f in dataclasses.fields(value)
            if f.name not in ignore and f"{path}.{f.name}" not in drop
        }
    if isinstance(value, dict):
        return {
            str(k): _plain(v, ignore, path, drop) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
        }
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
    # more resource keys (field names), for this stage only
    ignore: frozenset[str] = field(default_factory=frozenset)
    drop: frozenset[str] = field(default_factory=frozenset)  # paths under ``keys`` the stage does not read
    needs_ray: bool = True
    # the body that redoes only the items of the stage's errors table, keeping the rest (run.retry_errors=true
    # on a finished stage); None: the stage cannot, and keeps its rejects (run.force=true redoes it all)
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
        return {
            k: _plain(_select(cfg, k), ignore, k, self.drop)
            for k in self.read_keys(cfg)
            if k.rsplit(".", 1)[-1] not in ignore and k not in self.drop
        }

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
        made_from = {
            "version": FINGERPRINT_VERSION,
            "stage": self.name,
            "config": self.settings(cfg),
            "inputs": self.input_fingerprints(cfg),
        }
        text = json.dumps(made_from, sort_keys=True, default=str)
        return {"value": hashlib.sha256(text.encode()).hexdigest()[:16], **made_from}

    def read_marker(self, cfg: WorkflowConfig, which: str = SUCCESS) -> dict | None:
        uri = self.marker(cfg, which)
        if not io.exists(uri):
            return None
        marker = io.read_json(uri)
        # an older version's marker: stale
        return marker if isinstance(marker.get("fingerprint"), dict) else None

    def status(self, cfg: WorkflowConfig) -> str:
        """``done`` (up to date), ``stale`` (finished, but from other settings or inputs) or ``missing``."""
        done = self.read_marker(cfg)
        if done is None:
            return "stale" if io.exists(self.marker(cfg)) else "missing"
        return "done" if done["fingerprint"]["value"] == self.fingerprint(cfg)["value"] else "stale"

    # ------------------------------------------------------------ running
    def run(self, cfg: WorkflowConfig) -> dict:
        """Run the stage if it is not up to date (or, with ``run.retry_errors=true``, redo the items it
        rejected); its counts either way."""
        fp = self.fingerprint(cfg)
        done = self.read_marker(cfg)
        if done is not None and done["fingerprint"]["value"] == fp["value"] and not cfg.run.force:
            if not (cfg.run.retry_errors and done.get("rejected")):
                return counts_of(done)
            if self.retry is None:
                log.warning(
                    "%s: run.retry_errors=true, but this stage cannot redo single items: its %d rejected "
                    "items "
                    "stay (its errors table says why; run.force=true redoes the whole stage)",
                    self.name,
                    done["rejected"],
                )
                return counts_of(done)
            log.info(
                "%s: retrying the %d items of its errors table; the %d written ones are kept",
                self.name,
                done["rejected"],
                done.get("written", 0),
            )
            self._prepare(cfg)
            # one more remake of this output: the stages made from it see a new input, and a resume keeps the
            # count
            fp = {**fp, "retries": done["fingerprint"].get("retries", 0) + 1}
            io.write_json_atomic(self.marker(cfg, STARTED), {"fingerprint": fp})
            fs, path = io.filesystem(self.marker(cfg))
            # until the retry ends, the stage is unfinished: an interrupted one resumes, shard by shard
            fs.rm(path)
            return self._execute(cfg, fp, self.retry)
        self._prepare(cfg)
        started = self.read_marker(cfg, STARTED)
        resume = started is not None and started["fingerprint"]["value"] == fp["value"] and not cfg.run.force
        # an interrupted retry: its outputs are partly remade
        if resume and started is not None and started["fingerprint"].get("retries"):
            fp = {**fp, "retries": started["fingerprint"]["retries"]}
        if not resume:
            if done is not None or started is not None or io.exists(self.marker(cfg)):
                log.info("%s: %s; recomputing it", self.name, describe_change(done or started, fp))
            clear(
                self.folder(cfg),
                owned=self.name != "synth" or io.exists(self.marker(cfg)) or started is not None,
            )
            io.write_json_atomic(self.marker(cfg, STARTED), {"fingerprint": fp})
        else:
            swept = io.sweep_partial(self.folder(cfg))
            if swept:
                log.info(
                    "%s: resuming; removed %d partial files left by killed writers", self.name, len(swept)
                )
        return self._execute(cfg, fp, self.body)

    def _prepare(self, cfg: WorkflowConfig) -> None:
        """What comes before touching the stage's folder: Ray (the run folder may be the wrong kind of storage
        for its cluster), and the removal of the success markers of every stage made from this one."""
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
        io.write_json_atomic(
            self.marker(cfg), {**counts, **({"placement": placement} if placement else {}), "fingerprint": fp}
        )
        return counts


def output_id(marker: dict) -> str:
    """What the stages made from this one record as its fingerprint: the marker's, changed by every retry of
    its errors (``run.retry_errors=true`` remakes part of the output with the same config and inputs)."""
    fp = marker["fingerprint"]
    if not fp.get("retries"):
        return fp["value"]
    return hashlib.sha256(f"{fp['value']}+retry{fp['retries']}".encode()).hexdigest()[:16]


def counts_of(marker: dict) -> dict:
    """A marker's counts, without its fingerprint and placement."""
    return {k: v for k, v in marker.items() if k not in ("fingerprint", "placement")}


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
