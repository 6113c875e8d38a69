"""The README's cluster recipe end to end: ``ray start --head``, then ``ray job submit --working-dir . --
sarlang run ...`` through the Ray Jobs API of that head, polled to SUCCEEDED, outputs checked.

The head is a second Ray on this machine, next to the session's in-process Ray (``ray_session`` in
conftest), and must not touch it:

- ``ray start --temp-dir=X`` writes its address to ``X/ray_current_cluster``, not to the default
  ``/tmp/ray/ray_current_cluster`` that a bare ``ray.init()`` reads, and ``RAY_ADDRESS`` is only set in
  the subprocesses' environment: a ``ray.init()`` in this process never attaches to the head (Ray 2.60;
  were a bare ``ray.init()`` to scan running GCS processes too, as ray-project/ray#55597 proposes, the
  order would still protect it: ``ray_session`` is set up before or after this test, never during it).
- every port it opens is a free one picked here (the defaults 8265, 52365, ... could be taken).
- it runs with ``--block`` and is stopped with SIGTERM, which tears down exactly that node's processes.
  ``ray stop`` is never used: it kills every Ray process on the machine, the session's included.

Needs the Ray Jobs API, i.e. ``ray[default]`` (dashboard, job agent), a declared dependency in
``pyproject.toml``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from ray_heads import BIN, HeadStartFailed
from ray_heads import ray_head as _ray_head

from sarlang_ray import io, pipeline

REPO = Path(__file__).resolve().parents[1]
# what the job does not need (the upload limit of a working_dir is 500 MiB; this leaves ~0.5 MiB)
EXCLUDES = [
    ".git",
    ".venv",
    "runs",
    "**/__pycache__",
    ".pytest_cache",
    "*.egg-info",
    "benchmarks/work",
    "*.tif",
    "*.tiff",
    "*.tmp-*",
]
JOB_TIMEOUT_S = 600


pytestmark = [
    pytest.mark.slow,
    pytest.mark.needs_ray,  # `ray start --head` in a subprocess
    pytest.mark.timeout(1500),  # up to 3 head starts (180 s each) + the job (600 s) on a loaded machine
]


@pytest.fixture
def ray_head(tmp_path):
    """A running head, started up to three times: on a loaded machine the raylet can miss Ray's fixed
    30 s registration window during startup ("The current node timed out during startup")."""
    for attempt in range(1, 4):
        try:
            with _ray_head(tmp_path / f"ray_start_{attempt}.log") as head:
                yield head
                return
        except HeadStartFailed as exc:
            if attempt == 3:
                pytest.fail(f"ray start failed three times; last: {exc}")


def test_ray_job_submit_runs_the_workflow_on_a_started_cluster(ray_head, tmp_path):
    import ray
    from ray.job_submission import JobStatus, JobSubmissionClient

    url, env, temp_dir = ray_head
    head_gcs = Path(temp_dir, "ray_current_cluster").read_text().strip()
    default_file = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
    assert not (default_file.exists() and default_file.read_text().strip() == head_gcs), (
        "ray start wrote its address where a bare ray.init() would find it"
    )
    session_gcs = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    assert session_gcs != head_gcs

    run_dir = tmp_path / "run"
    submission_id = f"sarlang-test-{os.getpid()}-{int(time.time())}"
    entrypoint = [
        "sarlang",
        "run",
        "workflows/demo.yaml",
        f"run.run_dir={run_dir}",
        f"synth.out_dir={run_dir}/archive",
        "run.stages=[synth,catalog,tile,align]",
        "synth.scene_size_px=256",
        "tile.tile_size=128",
        "ray.progress=false",
    ]
    submit = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        url,
        "--submission-id",
        submission_id,
        "--no-wait",
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"excludes": EXCLUDES}),
        "--",
        *entrypoint,
    ]
    out = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, f"{shlex.join(submit)}\n{out.stdout}\n{out.stderr}"

    client = JobSubmissionClient(url)
    deadline = time.time() + JOB_TIMEOUT_S
    while (status := client.get_job_status(submission_id)) not in (
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    ):
        if time.time() > deadline:
            client.stop_job(submission_id)
            pytest.fail(
                f"job {submission_id} still {status} after {JOB_TIMEOUT_S} s:\n"
                f"{client.get_job_logs(submission_id)[-5000:]}"
            )
        time.sleep(2)
    logs_cmd = [str(BIN / "ray"), "job", "logs", submission_id, "--address", url]
    logs = subprocess.run(logs_cmd, env=env, capture_output=True, text=True, timeout=120, check=False).stdout
    assert status == JobStatus.SUCCEEDED, f"job {submission_id} {status}:\n{logs[-5000:]}"

    # the driver attached to the head (RAY_ADDRESS set by the job supervisor), it did not start a Ray of its
    # own
    details = next(j for j in client.list_jobs() if j.submission_id == submission_id)
    assert details.driver_info is not None, details  # set when the job's driver registers with the head's GCS
    assert "Started a local Ray instance" not in logs, logs[-3000:]

    # the summary was printed and written, and counts reconcile stage by stage
    assert f"== sarlang run 'demo' -> {run_dir}" in logs and "scenes: 4" in logs, logs[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["scenes"] == 4 and len(pipeline.read_scenes(str(run_dir))) == 4
    for stage in ("catalog", "tile", "align"):
        c = summary["stages"][stage]
        assert c["planned"] == c["written"] + c["rejected"], (stage, c)
    tiles = pipeline.read_tiles(str(run_dir), columns=["tile_id"])
    assert tiles.num_rows == summary["stages"]["align"]["written"] > 0
    assert len(set(tiles["tile_id"].to_pylist())) == tiles.num_rows
    assert sum(summary["tiles_per_gsd"].values()) == tiles.num_rows
    assert io.exists(str(run_dir / "config.yaml")) and (run_dir / "archive" / "_SUCCESS.json").exists()

    # the session's in-process Ray (if this session started one) is still the same, working cluster
    if session_gcs is not None:
        assert ray.get_runtime_context().gcs_address == session_gcs
        assert ray.get(ray.remote(lambda: 1).remote()) == 1
