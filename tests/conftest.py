"""Shared fixtures: one Ray for the whole session (127.0.0.1), the demo run, the real SAR data folder."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

# Ctrl-C and ray.cancel (a SIGINT to the worker) reach the processes the tests start only if SIGINT is not
# ignored: a shell that runs pytest in the background (`make test &`, nohup, some CI runners) ignores it,
# and an ignored signal stays ignored in every process started from there (Ray's raylet and workers
# included), so the interrupt and cancellation tests fail. Python's own handler, as in a foreground run.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray Train's controller polls its workers every 2 s by default: a finished (or killed) worker group is seen
# up to 2 s late, and the group's shutdown waits on the same poll (~3.5 s of every training run, measured).
# The tests train about a dozen times; a quarter-second poll costs nothing on a one-machine cluster.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# and it starts an actor that watches for spot-instance preemption (a process of its own, ~1.2 CPU-s per
# training run here): no test preempts a node
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray ends a task worker idle for 1 s once the node has more worker processes than CPUs (always, with Ray
# Train's and Ray Data's actors beside them), and starts a fresh one, its imports paid again, for the next
# task a moment later: every epoch of a training run did so. Idle workers kept 10 s: a demo run went from
# 35 to 27 worker processes and ~10 % fewer CPU-seconds (measured)
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "10000")

# the S3 test server's endpoint must be in the environment before Ray starts (workers inherit it)
import s3_server
from demo_cli import demo_command

# (a pytest-xdist worker inherits the controller's environment: each worker has its own server and ports)
for _k, _v in s3_server.ENV.items():
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ[_k] = _v
    else:
        os.environ.setdefault(_k, _v)

# the key the local OpenAI-compatible test server expects (workers read it from their environment)
TEST_OPENAI_KEY = "sk-sarlang-test-0123456789"
os.environ.setdefault("SARLANG_TEST_OPENAI_KEY", TEST_OPENAI_KEY)

REPO = Path(__file__).resolve().parents[1]
# Ray workers import test helpers (tests/annotate_backends.py) by module name: put tests/ on their path
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p
)
REAL_SAR = REPO.parent / "shared" / "data" / "real_sar"


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def demo_config(run_dir: Path, *overrides: str):
    from sarlang_ray.config import load_config

    return load_config(
        str(REPO / "workflows" / "demo.yaml"),
        # the data stages; train and evaluate are tested on a copy of the export (fixture trained_run)
        [
            f"run.run_dir={run_dir}",
            f"synth.out_dir={run_dir}/archive",
            "ray.progress=false",
            "run.stages=[synth,catalog,tile,align,annotate,export]",
            *overrides,
        ],
    )


@pytest.fixture(scope="session")
def demo_run(ray_session, tmp_path_factory):
    """The demo workflow, run once for the session: (config, summary)."""
    from sarlang_ray import pipeline

    cfg = demo_config(tmp_path_factory.mktemp("demo") / "run")
    summary = pipeline.run(cfg)
    return cfg, summary


@pytest.fixture(scope="session")
def real_sar() -> Path:
    if not REAL_SAR.is_dir():
        pytest.skip(
            f"real SAR test data not found at {REAL_SAR} (it lives in ../shared/data/real_sar beside the "
            "repo)"
        )
    return REAL_SAR


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 with bucket `sarlang`; stopped at the end of the session."""
    server = s3_server.WeedMini(tmp_path_factory.mktemp("weed"), "sarlang")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> str:
    """A tiny LLaVA-style VLM written offline with save_pretrained (what `sarlang model init-tiny` does)."""
    from sarlang_ray.tiny_models import init_tiny_vlm

    return init_tiny_vlm(str(tmp_path_factory.mktemp("models") / "tiny-vlm"))


@pytest.fixture(scope="session")
def made_run(tmp_path_factory):
    """What `make run` runs, once for the session: ``sarlang run workflows/demo.yaml`` in a process of its
    own (its own local Ray, progress bars and all; the run folder moved out of the repository), the whole
    demo from the synthetic archive to the leaderboard: (run folder, exit code, terminal output). The
    terminal's test reads the output; the trained demo's tests read the run folder."""
    import subprocess

    run_dir = tmp_path_factory.mktemp("made") / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DATA_DISABLE_PROGRESS_BARS")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        demo_command(run_dir, run_dir / "archive"),
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=1200,
        check=False,
    )
    return run_dir, proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def trained_run(made_run, ray_session):
    """The demo fine-tuned (tiny VLM, full, 3 epochs) and evaluated, as `make run` left it: (config,
    summary). Tests that run more stages on a copy of it use the session's Ray."""
    import json

    from sarlang_ray.config import load_config

    run_dir, rc, out = made_run
    assert rc == 0, f"`sarlang run workflows/demo.yaml` failed:\n{out[-3000:]}"
    cfg = load_config(
        str(REPO / "workflows" / "demo.yaml"),
        [f"run.run_dir={run_dir}", f"synth.out_dir={run_dir}/archive", "ray.progress=false"],
    )
    return cfg, json.loads((run_dir / "summary.json").read_text())


# ---------------------------------------------------------------- test tiers
# `make test-fast` runs the tests marked `fast`: those that need no Ray, no demo run and no server. The mark
# is derived here from the fixtures a test uses (transitively); a module that starts its own cluster or server
# without a fixture says so with `pytestmark = pytest.mark.needs_ray`. In the fast tier
# (SARLANG_TEST_TIER=fast) starting Ray or a test server raises, so a test that was classified wrongly fails
# loudly instead of slowing the tier down.
HEAVY_FIXTURES = frozenset({"ray_session", "demo_run", "made_run", "trained_run", "s3", "tiny_vlm"})
FAST_TIER = os.environ.get("SARLANG_TEST_TIER") == "fast"


# `make test` spreads the suite over both cores (`pytest -n 2 --dist loadgroup`): each xdist worker has its
# own Ray and its own demo run (the data stages: ~12 s). The tests of the trained demo (what `make run` makes,
# ~110 s) are one group, kept on one worker, so that the demo runs once per session, not once per worker.
# Tests marked `serial` interrupt or kill something at a chosen moment; they run first, with no other Ray
# beside them (only the fast tier, in one process), so that no other test's Ray moves that moment.


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    from _pytest.nodeid import coerce_node_id

    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if not HEAVY_FIXTURES & used and item.get_closest_marker("needs_ray") is None:
            item.add_marker(pytest.mark.fast)
        if {"made_run", "trained_run"} & used and getattr(config.option, "loadgroup", False):
            # what pytest-xdist does for an `xdist_group` mark (its scheduler keeps the nodeids that end in
            # the same "@group" on one worker); xdist 3.8 sets `item._nodeid`, which pytest 9.2 no longer
            # reads, so the mark alone groups nothing
            item._id = coerce_node_id(f"{item.nodeid}@trained_run")
    # the slow tests first (a stable sort: otherwise in file order): pytest-xdist hands out the tests in this
    # order, so the last ones are short and both workers finish close together, instead of one running a
    # 60 s training test alone at the end
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(
            f"{what} in the fast test tier: give the test the fixture it needs (ray_session, s3, ...) "
            "or mark its module `pytestmark = pytest.mark.needs_ray`"
        )

    return refuse


if FAST_TIER:
    import ray
    import ray.cluster_utils

    ray.init = _refuse("ray.init")
    ray.cluster_utils.Cluster.__init__ = _refuse("a Ray cluster")
    s3_server.WeedMini.start = _refuse("the S3 test server")
