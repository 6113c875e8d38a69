"""The demo's command line, for the tests and the benchmarks that run it in a process of their own. Nothing
happens on import (unlike conftest, which sets the test session's environment)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def demo_command(run_dir: Path | str, archive: Path | str, *overrides: str) -> list[str]:
    """The command line of ``sarlang run workflows/demo.yaml`` (what `make run` runs) into ``run_dir``, the
    archive synthesised into (or read from) ``archive``, in a process of its own."""
    return [
        sys.executable,
        "-m",
        "sarlang_ray",
        "run",
        str(REPO / "workflows" / "demo.yaml"),
        f"run.run_dir={run_dir}",
        f"synth.out_dir={archive}",
        *overrides,
    ]
