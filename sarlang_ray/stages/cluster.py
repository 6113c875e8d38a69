"""The Ray connection of a run: connect to the configured cluster or start a local Ray (and end it at exit),
and refuse a run folder the cluster's nodes cannot all see."""

from __future__ import annotations

import contextlib
import os

from sarlang_ray import io, reaper
from sarlang_ray.config import WorkflowConfig


class StageFailed(RuntimeError):
    """A stage ran but its work failed (a failed trial, nothing planned): the command exits non-zero."""


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
            ray.init(
                address="local",
                num_cpus=cfg.ray.num_cpus,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                **kwargs,
            )
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
            f"run.run_dir={cfg.run.run_dir} is a local path, but the Ray cluster has {len(nodes)} nodes: "
            "each would "
            "write its shards to its own disk. Use storage every node sees (run.run_dir=s3://BUCKET/PREFIX "
            "or gs://...), "
            "or, if that path is a shared file system mounted on every node (NFS, EFS, Lustre), set "
            "run.shared_fs=true."
        )
