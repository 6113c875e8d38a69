"""Ray Train samples/s before and after moving preprocessing into Ray Data (issue 14).

    .venv/bin/python benchmarks/bench_train_preprocess.py  # -> benchmarks/results/train_preprocess.json

*Before*: ``sarlang_ray/train.py`` as committed at ``--before`` (default ``HEAD``; read with ``git show`` into
a temporary module): each worker decodes the PNGs, renders the chat template and calls the processor twice
per pair inside its training loop. *After*: the working tree's ``train.py``: ``Preprocess`` actors in Ray
Data ``map_batches`` do all of that ahead of the workers, which only pad, concatenate and move tensors;
with the per-epoch shuffle (``train.shuffle=true``, the default) and without it (to show what the shuffle
costs). Same Ray session, model (the tiny LLaVA-style VLM, widened so compute is not negligible), data (the
demo export's training split, its first ``--pairs`` pairs), method (LoRA), batch and worker setup; the
variants alternate ``--repeats`` times and the best of each counts. Samples/s is the pipeline's own figure
(pairs / seconds of the training loop, the held-out pass excluded) over the epochs after the first; the
wall time of each whole stage is reported beside it. The machine's load average is recorded: on a shared
machine the absolute numbers move, the ratio within one run is the figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_train import export_dir

from sarlang_ray import pipeline
from sarlang_ray.config import load_config


def before_module(rev: str):
    """``sarlang_ray/train.py`` at git revision ``rev`` as a module Ray pickles by value (workers cannot
    import it by name)."""
    import ray.cloudpickle

    source = subprocess.run(
        ["git", "show", f"{rev}:sarlang_ray/train.py"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="train-before-")) / "train_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("train_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_before"] = module
    spec.loader.exec_module(module)
    ray.cloudpickle.register_pickle_by_value(module)
    return module


def one_run(
    variant: str, run_train, export_run: Path, work: Path, model: str, args, overrides: list[str]
) -> dict:
    import sarlang_ray.train

    run_dir = work / variant
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(export_run / "export", run_dir / "export")
    cfg = load_config(
        None,
        [
            f"run.run_dir={run_dir}",
            f"train.model={model}",
            f"train.batch_size={args.batch}",
            f"train.epochs={args.epochs}",
            f"train.limit_pairs={args.pairs}",
            "train.lr=1e-3",
            "train.num_to_keep=1",
            "ray.progress=false",
            *overrides,
        ],
    )
    real = sarlang_ray.train.run_train
    sarlang_ray.train.run_train = run_train  # the stage imports run_train when it runs
    try:
        load0, t0 = os.getloadavg()[0], time.time()
        pipeline.run(cfg, ["train"])
        wall = time.time() - t0
    finally:
        sarlang_ray.train.run_train = real
    history = json.loads((run_dir / "train" / "metrics.json").read_text())["history"]
    rates = [h["samples_per_s"] for h in history if "samples_per_s" in h]
    return {
        "variant": variant,
        "samples_per_s_per_epoch": rates,
        "steady_samples_per_s": sum(rates[1:]) / len(rates[1:]),
        "stage_wall_s": wall,
        "load_average_1min": [load0, os.getloadavg()[0]],
        "val_loss": [h["val_loss"] for h in history],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=96, help="training pairs per epoch")
    ap.add_argument("--batch", type=int, default=8, help="pairs per step")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--before", default="HEAD", help="git revision of the before train.py")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_preprocess.json"))
    args = ap.parse_args()

    import sarlang_ray.train as after
    from sarlang_ray.tiny_models import init_tiny_vlm

    work = Path(tempfile.mkdtemp(prefix="bench-train-preprocess-"))
    export_run = export_dir(work)
    size = {"image_size": 64} if "image_size" in inspect.signature(init_tiny_vlm).parameters else {}
    model = init_tiny_vlm(str(work / "model"), hidden=256, layers=4, **size)
    old = before_module(args.before)
    variants = [
        ("before", old.run_train, []),
        ("after", after.run_train, []),
        ("after_no_shuffle", after.run_train, ["train.shuffle=false"]),
    ]
    runs: dict[str, list] = {v: [] for v, _, _ in variants}
    for r in range(args.repeats):
        for variant, fn, overrides in variants:
            runs[variant].append(one_run(variant, fn, export_run, work, model, args, overrides))
            print(
                f"repeat {r} {variant}: {runs[variant][-1]['steady_samples_per_s']:.2f} samples/s, "
                f"stage {runs[variant][-1]['stage_wall_s']:.0f} s",
                flush=True,
            )
    best = {v: max(rs, key=lambda x: x["steady_samples_per_s"]) for v, rs in runs.items()}
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "setup": {
            "model": "tiny LLaVA-style VLM (init_tiny_vlm hidden 256, 4 layers)",
            "method": "lora r=8 all-linear",
            "pairs_per_epoch": args.pairs,
            "batch": args.batch,
            "epochs": args.epochs,
            "repeats": args.repeats,
            "workers": "1 Ray Train worker, 1 CPU; Ray on 2 CPUs",
            "before": args.before,
        },
        "best": best,
        "after_over_before": best["after"]["steady_samples_per_s"] / best["before"]["steady_samples_per_s"],
        "after_no_shuffle_over_before": best["after_no_shuffle"]["steady_samples_per_s"]
        / best["before"]["steady_samples_per_s"],
        "all_runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("after_over_before", "after_no_shuffle_over_before")}, indent=2))
    import ray

    ray.shutdown()


if __name__ == "__main__":
    main()
