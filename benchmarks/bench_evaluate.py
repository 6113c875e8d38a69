"""Evaluation throughput: inference samples/s on a Ray Data actor pool, and the time to score 10,000 captions.

    .venv/bin/python benchmarks/bench_evaluate.py     # writes benchmarks/results/evaluate.json

Scoring: 10,000 (reference, prediction) caption pairs built from the demo export's captions (each
prediction is another tile's caption of the same kind, so scores are neither 0 nor 1), scored with
``metrics.caption_scores`` with PTB tokenisation (Java tokenizer + METEOR) and without; plus 10,000 VQA
answers with ``metrics.vqa_accuracy`` in both modes. Inference: ``evaluate.predict`` (the code a Tune trial
runs) of the tiny VLM over the demo's train split (761 pairs; more than the test split's 392) with 1 and 2
actors; each pass starts its own actor pool. ``samples_per_s_end_to_end`` includes pool start-up and model
load, as a trial sees it; ``samples_per_s_steady`` is the marginal rate against a 16-pair pass.
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import REPO, export_dir

from sarlang_ray import evaluate, io, metrics
from sarlang_ray.config import load_config


def scoring(run: Path, n: int = 10_000) -> dict:
    table = io.read_parquet(
        sorted(str(p) for p in (run / "export" / "parquet").glob("*/*.parquet")),
        columns=["kind", "answer", "question_type", "application"],
    ).to_pylist()
    captions = [r["answer"] for r in table if r["kind"] == "caption_concise"]
    rng = random.Random(0)
    refs = {str(i): [captions[i % len(captions)]] for i in range(n)}
    preds = {str(i): rng.choice(captions) for i in range(n)}
    out = {"captions": n}
    for tokenize, tag in ((True, "ptb_tokenised"), (False, "raw")):
        t0 = time.time()
        scores = metrics.caption_scores(refs, preds, tokenize=tokenize)
        out[f"seconds_{tag}"] = round(time.time() - t0, 2)
        out[f"cider_{tag}"] = round(scores["cider"], 4)
    vqa = [r for r in table if r["kind"] == "vqa"]
    rows = [{**vqa[i % len(vqa)], "prediction": rng.choice(vqa)["answer"]} for i in range(n)]
    for mode in ("strict", "sarlang1m"):
        t0 = time.time()
        metrics.vqa_accuracy(rows, mode=mode)
        out[f"vqa_seconds_{mode}"] = round(time.time() - t0, 3)
    return out


def inference(run: Path, work: Path, small: int = 16) -> list[dict]:
    """For 1 and 2 actors: a pass over ``small`` pairs and one over the whole train split (761 pairs),
    each with a fresh actor pool. End to end = pairs / seconds of the big pass (pool start-up and model
    load included, as a trial sees it); steady state = the marginal rate between the two passes, which
    cancels the fixed start-up cost."""
    import ray

    from sarlang_ray.tiny_models import init_tiny_vlm

    model = init_tiny_vlm(str(work / "model"))
    results = []
    for actors in (1, 2):
        cfg = load_config(
            None,
            [
                f"run.run_dir={run}",
                f"evaluate.concurrency={actors}",
                "ray.progress=false",
                "evaluate.num_cpus=1",
                "evaluate.split=train",
            ],
        )
        prompt = evaluate.prompt_dict(cfg.evaluate.prompts[0])
        every = evaluate.select_pairs(
            io.read_parquet(evaluate.split_files(cfg, "train"), columns=evaluate.META), None
        )
        timings = {}
        for pairs in (every[:small], every):
            t0 = time.time()
            predictions = evaluate.predict(cfg, model, "sar", prompt, pairs)
            timings[len(pairs)] = time.time() - t0
            assert len(predictions) == len(pairs)
        n, t = len(every), timings[len(every)]
        results.append(
            {
                "actors": actors,
                "pairs": n,
                "seconds": round(t, 2),
                "samples_per_s_end_to_end": round(n / t, 1),
                "seconds_small_pass": round(timings[small], 2),
                "samples_per_s_steady": round((n - small) / (t - timings[small]), 1),
            }
        )
        print(results[-1])
    ray.shutdown()
    return results


def main() -> int:
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    run = export_dir(work)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "inference_tiny_vlm": inference(run, work),
        "scoring": scoring(run),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    out = REPO / "benchmarks" / "results" / "evaluate.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
