"""evaluate: score VLMs on the export's test split; a Ray Tune sweep of models x image variants x prompts.

Every point of the sweep (``evaluate.models`` x ``evaluate.images`` x ``evaluate.prompts``) is one Ray Tune
trial. A trial runs batch inference on a Ray Data actor pool (``evaluate.concurrency`` actors with
``num_cpus``/``num_gpus`` each; one model per actor, batched greedy generation) and scores it:

* captions: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap) for the concise and the detailed test sets,
  with PTB tokenisation (``tok``) and without it (``raw``, as SARLANG-1M's released script); one
  prediction per tile and caption kind, all of the tile's captions of that kind as references;
* VQA: accuracy overall, per application and per question type, in ``strict`` and ``sarlang1m`` mode
  (see :mod:`sarlang_ray.metrics`).

The ResultGrid becomes ``evaluate/leaderboard.{md,csv,json}`` and plots, with reference rows: the
majority answer per question type of the train split (a lower bound) and the template oracle (captions
re-written by the template annotator from the tile's objects with another seed; VQA answers recomputed
from the objects, i.e. the references of a template-annotated dataset: an upper bound and a check of the
scorer). The paper's published numbers sit in a separate table (``sarlang_ray/paper_results.json``).
"""

from __future__ import annotations

import io as _io
import json
import logging
import os
import re
import time
from collections import defaultdict
from typing import Any

import pyarrow as pa

from sarlang_ray import io, metrics
from sarlang_ray.config import WorkflowConfig

log = logging.getLogger("sarlang")

META = ["pair_id", "tile_id", "kind", "application", "question_type", "question", "answer"]
CAPTION_KINDS = {"caption_concise": "concise", "caption_detailed": "detailed"}
CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")


def resolve_model(name: str, cfg: WorkflowConfig) -> str:
    """``base`` -> train.model; ``finetuned`` -> the merged model of the train stage; else as given."""
    if name == "base":
        return cfg.train.model
    if name == "finetuned":
        uri = io.join(cfg.run.run_dir, "train", "metrics.json")
        if not io.exists(uri):
            raise FileNotFoundError(f"evaluate.models lists 'finetuned' but {uri} is missing: run the train stage "
                                    "first, or list a model folder / hub name instead")
        return io.read_json(uri)["merged_model"]
    return name


def split_files(cfg: WorkflowConfig, split: str) -> list[str]:
    files = io.glob(io.join(cfg.run.run_dir, "export", "parquet"), f"{split}/*.parquet")
    if not files:
        raise FileNotFoundError(f"no {split} split under {cfg.run.run_dir}/export/parquet: run the export stage "
                                "first (small archives may give no val split; use evaluate.split=test)")
    return files


def select_pairs(table: pa.Table, limit: int | None) -> list[dict]:
    """The pairs a model answers: every VQA pair, one caption prompt per tile and kind (sorted, so every
    trial scores the same pairs); the first ``limit`` only if set."""
    rows = sorted(table.select(META).to_pylist(), key=lambda r: r["pair_id"])
    seen, keep = set(), []
    for r in rows:
        if r["kind"] in CAPTION_KINDS:
            if (r["tile_id"], r["kind"]) in seen:
                continue
            seen.add((r["tile_id"], r["kind"]))
        keep.append(r)
    return keep[:limit] if limit else keep


class Predictor:
    """Ray Data actor: loads one model, answers a batch of pairs with the trial's prompts and image variant."""

    def __init__(self, model: str, image: str, prompt: dict, settings: dict, optical: dict | None = None):
        from sarlang_ray.models import Generator

        self.generator = Generator(model, settings["dtype"], settings["num_gpus"] > 0, settings["batch_size"],
                                   settings["max_pixels"])
        self.image, self.prompt, self.s, self.optical = image, prompt, settings, optical or {}

    def __call__(self, batch: dict) -> dict:
        from sarlang_ray.models import load_image

        jobs = defaultdict(list)  # generation budget -> row indices
        prompts, images = [], []
        for i, (kind, question, tile_id, img) in enumerate(zip(batch["kind"], batch["question"], batch["tile_id"], batch["image"])):
            if kind == "caption_concise":
                prompts.append(self.prompt["caption"])
                jobs[self.s["max_new_tokens_caption"]].append(i)
            elif kind == "caption_detailed":
                prompts.append(self.prompt["detailed"])
                jobs[3 * self.s["max_new_tokens_caption"]].append(i)
            else:
                prompts.append(self.prompt["vqa"].format(question=str(question).rstrip("?. ")))
                jobs[self.s["max_new_tokens_answer"]].append(i)
            png = self.optical.get(tile_id) if self.image == "optical" else img["bytes"]
            images.append(load_image(png, self.s["max_pixels"], self.image))
        predictions = [""] * len(prompts)
        for budget, idx in jobs.items():
            for i, text in zip(idx, self.generator.generate([images[i] for i in idx], [prompts[i] for i in idx], budget)):
                predictions[i] = text
        return {"pair_id": batch["pair_id"], "prediction": predictions}


def prompt_dict(prompt) -> dict:
    """An ``evaluate.prompts`` entry as the plain dict a trial and ``predict`` take."""
    return {"name": prompt.name, "caption": prompt.caption, "detailed": prompt.detailed, "vqa": prompt.vqa}


def predict(cfg: WorkflowConfig, model: str, image: str, prompt: dict, pairs: list[dict]) -> dict[str, str]:
    """pair_id -> prediction for ``pairs``, by a Ray Data actor pool over the split's Parquet files."""
    import ray

    ev = cfg.evaluate
    wanted = {p["pair_id"] for p in pairs}
    optical = None
    if image == "optical":  # the RGB twin from the tiles table (an input upper bound, not a SAR result)
        from sarlang_ray.pipeline import read_tiles

        tiles = {p["tile_id"] for p in pairs}
        optical = {t["tile_id"]: t["optical_png"] for t in read_tiles(cfg.run.run_dir, ["tile_id", "optical_png"]).to_pylist()
                   if t["tile_id"] in tiles and t["optical_png"]}
    settings = {"dtype": ev.dtype, "num_gpus": ev.num_gpus, "batch_size": ev.batch_size, "max_pixels": cfg.run.max_pixels,
                "max_new_tokens_caption": ev.max_new_tokens_caption, "max_new_tokens_answer": ev.max_new_tokens_answer}
    ray.data.DataContext.get_current().enable_progress_bars = cfg.ray.progress
    ds = io.parquet_dataset(split_files(cfg, ev.split), ["pair_id", "tile_id", "kind", "question", "image"],
                            keep=lambda r: r["pair_id"] in wanted)  # light reads: a trial holds almost no CPU
    num_cpus = io.pool_cpus(ev.concurrency, ev.num_cpus, ray.cluster_resources().get("CPU", 1.0))
    if num_cpus != ev.num_cpus:
        log.warning("evaluate: %d actors x %.2g CPUs would leave no CPU for the reads feeding them; each actor asks "
                    "for %.3g CPUs instead (lower evaluate.num_cpus or evaluate.concurrency, or add nodes, to "
                    "silence this)", ev.concurrency, ev.num_cpus, num_cpus)
    out = ds.map_batches(Predictor, fn_constructor_args=(model, image, prompt, settings, optical), batch_size=ev.batch_size * 4,
                         compute=ray.data.ActorPoolStrategy(size=ev.concurrency), num_cpus=num_cpus, num_gpus=ev.num_gpus)
    return {r["pair_id"]: r["prediction"] for r in out.take_all()}


JUDGE_PROMPT = ("You grade answers to questions about a remote sensing image.\nQuestion: {question}\n"
                "Reference answer: {truth}\nPredicted answer: {prediction}\nDoes the predicted answer have the same "
                "meaning as the reference (semantic meaning, not exact wording; synonyms count)? Reply yes or no.")


class OpenAIJudge:
    """The published rule's last step: an LLM on an OpenAI-compatible endpoint (``annotate.openai``:
    base_url, model, key from the environment variable named there, timeout, retries) decides whether a
    prediction means the reference. A call that fails after its retries counts as wrong and is counted."""

    def __init__(self, cfg: WorkflowConfig):
        from sarlang_ray.annotate.openai_backend import OpenAIAnnotator

        self.client = OpenAIAnnotator(cfg.annotate)
        self.calls = self.failures = 0

    def __call__(self, question: str, truth: str, prediction: str) -> bool:
        from sarlang_ray.annotate.openai_backend import BackendError

        self.calls += 1
        try:
            reply = self.client._chat([{"role": "user", "content": JUDGE_PROMPT.format(
                question=question, truth=truth, prediction=prediction)}])
        except BackendError:
            self.failures += 1
            return False
        return reply.strip().lower().lstrip("\"'*").startswith("yes")


class EmbeddingJudge:
    """A local judge for the published rule's last step: a sentence encoder (``evaluate.judge_model``: any
    Hugging Face encoder, hub name or folder, e.g. ``sentence-transformers/all-MiniLM-L6-v2``) embeds the
    reference and the prediction (mean of the last hidden states over real tokens, L2-normalised); the
    prediction is right when their cosine similarity is at least ``evaluate.judge_threshold``. No network,
    no API key, deterministic; weaker than an LLM at negation ("no ships" vs "ships")."""

    def __init__(self, model: str, threshold: float, device: str = "cpu"):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = io.local_copy(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, use_safetensors=True).to(device).eval()
        self.threshold, self.device, self.torch = threshold, device, torch
        self.calls = self.failures = 0
        self._cache: dict[str, Any] = {}

    def embed(self, texts: list[str]):
        """L2-normalised sentence embeddings of ``texts`` (one row each), cached per text."""
        new = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if new:
            batch = self.tokenizer(new, padding=True, truncation=True, max_length=64, return_tensors="pt").to(self.device)
            with self.torch.no_grad():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = self.torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)
            self._cache.update(zip(new, pooled.float().cpu()))
        return self.torch.stack([self._cache[t] for t in texts])

    def similarity(self, truth: str, prediction: str) -> float:
        a, b = self.embed([truth, prediction])
        return float(a @ b)

    def __call__(self, question: str, truth: str, prediction: str) -> bool:
        self.calls += 1
        if not prediction.strip():
            return False
        return self.similarity(truth, prediction) >= self.threshold


def make_judge(cfg: WorkflowConfig):
    """The judge ``evaluate.judge`` names (None for off)."""
    ev = cfg.evaluate
    if ev.judge == "openai":
        return OpenAIJudge(cfg)
    if ev.judge == "embedding":
        return EmbeddingJudge(ev.judge_model, ev.judge_threshold)
    return None


def score(pairs: list[dict], predictions: dict[str, str], refs: dict[tuple, list[str]], judge=None) -> dict:
    """Caption metrics (concise/detailed x tok/raw) and VQA accuracy (strict and sarlang1m, and ``judge``
    when a judge is given) of predictions.

    ``refs``: (tile_id, kind) -> every reference caption of that tile and kind in the split."""
    out: dict = {"n_pairs": len(pairs)}
    for kind, short in CAPTION_KINDS.items():
        prompts = [p for p in pairs if p["kind"] == kind]  # one per tile (select_pairs)
        if not prompts:
            continue
        preds = {p["tile_id"]: predictions.get(p["pair_id"], "") for p in prompts}
        references = {p["tile_id"]: refs[(p["tile_id"], kind)] for p in prompts}
        for tokenize, tag in ((True, "tok"), (False, "raw")):
            for name, value in metrics.caption_scores(references, preds, tokenize=tokenize).items():
                out[f"{short}_{name}_{tag}"] = value
    vqa = [{**p, "prediction": predictions.get(p["pair_id"], "")} for p in pairs if p["kind"] not in CAPTION_KINDS]
    if vqa:
        modes = {"strict": None, "sarlang1m": None, **({"judge": judge} if judge is not None else {})}
        calls, failures = (judge.calls, judge.failures) if judge is not None else (0, 0)
        for mode, by in modes.items():
            acc = metrics.vqa_accuracy(vqa, mode=mode, judge=by)
            out[f"vqa_{mode}"] = acc["accuracy"]
            out[f"vqa_{mode}_per_application"] = {a: v["accuracy"] for a, v in acc["per_application"].items()}
            out[f"vqa_{mode}_per_question_type"] = {q: v["accuracy"] for q, v in acc["per_question_type"].items()}
        if judge is not None:  # one judge may score several rows: count this row's calls only
            out["judge_calls"], out["judge_failures"] = judge.calls - calls, judge.failures - failures
        out["n_vqa"] = len(vqa)
    return out


def caption_refs(table: pa.Table) -> dict[tuple, list[str]]:
    refs: dict[tuple, list[str]] = defaultdict(list)
    for r in table.select(["tile_id", "kind", "answer"]).to_pylist():
        if r["kind"] in CAPTION_KINDS:
            refs[(r["tile_id"], r["kind"])].append(r["answer"])
    return refs


def slug(*parts: str) -> str:
    return "__".join(re.sub(r"[^A-Za-z0-9._-]+", "_", p.rstrip("/").rsplit("/", 1)[-1] if "/" in p else p)[:60] for p in parts)


def _trial(config: dict, cfg: WorkflowConfig) -> None:
    """One Ray Tune trial: inference for one (model, image variant, prompt), scored, predictions saved."""
    from ray import tune

    table = io.read_parquet(split_files(cfg, cfg.evaluate.split), columns=META)
    pairs = select_pairs(table, cfg.evaluate.limit_pairs)
    model = resolve_model(config["model"], cfg)
    t0 = time.time()
    predictions = predict(cfg, model, config["image"], config["prompt"], pairs)
    seconds = time.time() - t0
    result = score(pairs, predictions, caption_refs(table), make_judge(cfg))
    name = slug(config["model"], config["image"], config["prompt"]["name"])
    rows = [{**p, "prediction": predictions.get(p["pair_id"], "")} for p in pairs]
    io.write_parquet_atomic(io.join(cfg.run.run_dir, "evaluate", "predictions", f"{name}.parquet"), pa.Table.from_pylist(rows))
    tune.report({**result, "model": config["model"], "model_path": model, "image": config["image"],
                 "prompt": config["prompt"]["name"], "seconds": seconds, "samples_per_s": len(pairs) / max(seconds, 1e-9)})


def baseline_rows(cfg: WorkflowConfig, table: pa.Table) -> list[dict]:
    """The reference rows: majority answer (lower bound) and template oracle (upper bound)."""
    from sarlang_ray.annotate.stage import TILE_COLUMNS
    from sarlang_ray.annotate.template import TemplateAnnotator
    from sarlang_ray.pipeline import read_tiles

    pairs, refs, rows = select_pairs(table, cfg.evaluate.limit_pairs), caption_refs(table), []
    judge = make_judge(cfg) if cfg.evaluate.baselines else None  # judged like the models' rows (vqa_judge)
    if "majority" in cfg.evaluate.baselines:
        train = io.read_parquet(split_files(cfg, "train"), columns=["kind", "question_type", "answer"]).to_pylist()
        majority = metrics.majority_answers([r for r in train if r["kind"] not in CAPTION_KINDS])
        common = {k: metrics.majority_answers([{"question_type": k, "answer": r["answer"]} for r in train if r["kind"] == k]).overall
                  for k in CAPTION_KINDS if any(r["kind"] == k for r in train)}
        preds = {p["pair_id"]: common.get(p["kind"], "") if p["kind"] in CAPTION_KINDS else majority[p["question_type"]] for p in pairs}
        rows.append({**score(pairs, preds, refs, judge), "model": "majority answer (lower bound)", "image": "-", "prompt": "-"})
    if "oracle" in cfg.evaluate.baselines:
        tile_ids = {p["tile_id"] for p in pairs}
        tiles = [t for t in read_tiles(cfg.run.run_dir, TILE_COLUMNS).to_pylist() if t["tile_id"] in tile_ids]
        rewrite = TemplateAnnotator(seed=cfg.run.seed + 1)
        captions = {}
        for tile in tiles:
            for pair in rewrite.annotate(tile):
                if pair["kind"] in CAPTION_KINDS:
                    captions.setdefault((tile["tile_id"], pair["kind"]), pair["answer"])
        preds = {p["pair_id"]: captions.get((p["tile_id"], p["kind"]), "") if p["kind"] in CAPTION_KINDS else p["answer"]
                 for p in pairs}
        rows.append({**score(pairs, preds, refs, judge), "model": "template oracle (upper bound)", "image": "-", "prompt": "-"})
    return rows


def run_evaluate(cfg: WorkflowConfig) -> dict:
    """The Ray Tune sweep, the baselines, the leaderboard files and plots; returns the leaderboard."""
    from ray import tune

    ev = cfg.evaluate
    table = io.read_parquet(split_files(cfg, ev.split), columns=META)
    storage_fs, storage = io.arrow_filesystem(ev.storage_path or io.join(cfg.run.run_dir, "evaluate", "tune"))
    space = {"model": tune.grid_search(list(ev.models)), "image": tune.grid_search(list(ev.images)),
             "prompt": tune.grid_search([prompt_dict(p) for p in ev.prompts])}
    # a trial only drives its Ray Data actor pool, which holds the CPUs/GPUs: the trial itself asks for little
    tuner = tune.Tuner(tune.with_resources(tune.with_parameters(_trial, cfg=cfg), {"cpu": 0.01}), param_space=space,
                       tune_config=tune.TuneConfig(max_concurrent_trials=ev.max_concurrent_trials),
                       run_config=tune.RunConfig(name="sweep", storage_path=storage, storage_filesystem=storage_fs, verbose=0))
    grid = tuner.fit()
    rows, failed = [], []
    for result in grid:
        if result.error is not None:
            cfgp = result.config or {}
            failed.append({"model": cfgp.get("model"), "image": cfgp.get("image"),
                           "prompt": (cfgp.get("prompt") or {}).get("name"), "error": str(result.error).splitlines()[-1][:300]})
            continue
        rows.append({k: v for k, v in result.metrics.items() if not k.startswith(("time", "timestamp", "training_iteration",
                     "date", "pid", "hostname", "node_ip", "done", "trial_id", "experiment", "iterations", "config"))})
    rows += baseline_rows(cfg, table)
    board = write_leaderboard(cfg, rows, failed)
    return board


def _rank_key(cfg: WorkflowConfig):
    return lambda r: -(r.get(f"vqa_{cfg.evaluate.vqa_mode}") or 0.0)


def write_leaderboard(cfg: WorkflowConfig, rows: list[dict], failed: list[dict]) -> dict:
    """evaluate/leaderboard.{json,csv,md} and plots/{vqa_per_application,captions}.png."""
    import pandas as pd

    out = io.join(cfg.run.run_dir, "evaluate")
    rows = sorted(rows, key=_rank_key(cfg))
    board = {"split": cfg.evaluate.split, "vqa_mode": cfg.evaluate.vqa_mode, "rows": rows, "failed": failed,
             "paper": paper_results(), "plots": [io.join(out, "plots", "vqa_per_application.png"), io.join(out, "plots", "captions.png")]}
    io.write_json_atomic(io.join(out, "leaderboard.json"), board)
    flat = pd.json_normalize(rows, sep=".")
    io.write_bytes_atomic(io.join(out, "leaderboard.csv"), flat.to_csv(index=False).encode())
    io.write_bytes_atomic(io.join(out, "leaderboard.md"), format_leaderboard(board).encode())
    _plots(rows, cfg.evaluate.vqa_mode, out)
    return board


def paper_results() -> dict:
    with open(os.path.join(os.path.dirname(__file__), "paper_results.json")) as f:
        return json.load(f)


def _fmt(value, pct: bool = False) -> str:
    if value is None or value != value:
        return "-"
    return f"{100 * value:.1f}" if pct else f"{value:.3f}"


def format_leaderboard(board: dict) -> str:
    """The leaderboard as Markdown: our rows, failed trials, then the paper's published numbers apart."""
    mode = board["vqa_mode"]
    apps = sorted({a for r in board["rows"] for a in r.get(f"vqa_{mode}_per_application", {})})
    head = ["#", "model", "image", "prompt", f"VQA % ({mode})", "VQA % (sarlang1m)" if mode == "strict" else "VQA % (strict)",
            *apps, "concise B-4", "concise METEOR", "concise R-L", "concise CIDEr", "detailed CIDEr"]
    other = "sarlang1m" if mode == "strict" else "strict"
    lines = [f"## Leaderboard ({board['split']} split; VQA rule `{mode}`; captions with PTB tokenisation)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(board["rows"], 1):
        per_app = r.get(f"vqa_{mode}_per_application", {})
        cells = [str(i), str(r["model"]), str(r["image"]), str(r["prompt"]), _fmt(r.get(f"vqa_{mode}"), True),
                 _fmt(r.get(f"vqa_{other}"), True), *[_fmt(per_app.get(a), True) for a in apps],
                 _fmt(r.get("concise_bleu_4_tok")), _fmt(r.get("concise_meteor_tok")), _fmt(r.get("concise_rouge_l_tok")),
                 _fmt(r.get("concise_cider_tok")), _fmt(r.get("detailed_cider_tok"))]
        lines.append("| " + " | ".join(cells) + " |")
    if board["failed"]:
        lines += ["", "### Failed trials", ""] + [f"- {f['model']} / {f['image']} / {f['prompt']}: {f['error']}" for f in board["failed"]]
    paper = board["paper"]
    lines += ["", "### Published SARLANG-1M numbers (for comparison; not computed here)", "",
              "The paper (arXiv 2504.03254) scores VQA with a GPT-4o-mini judge after the substring rule, on its own",
              "test set: not comparable with the rows above. Sources and caveats: `sarlang_ray/paper_results.json`.", "",
              "| model | setting | VQA % overall | source |", "|---|---|---|---|"]
    for r in paper.get("vqa", []):
        lines.append(f"| {r['model']} | {r.get('setting', '')} | {r.get('overall', '-')} | {r.get('source_ref', '').split(' (')[0]} |")
    return "\n".join(lines) + "\n"


def _plots(rows: list[dict], mode: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def save(fig, name):
        buf = _io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        io.write_bytes_atomic(io.join(out, "plots", name), buf.getvalue())

    labels = [f"{r['model'].rstrip('/').rsplit('/', 1)[-1][:28]} / {r['image']} / {r['prompt']}" for r in rows]
    apps = sorted({a for r in rows for a in r.get(f"vqa_{mode}_per_application", {})})
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(apps) + 2), 3.8))
    width = 0.8 / max(1, len(rows))
    for i, (r, label) in enumerate(zip(rows, labels)):
        per = r.get(f"vqa_{mode}_per_application", {})
        ax.bar(np.arange(len(apps)) + i * width, [100 * per.get(a, 0) for a in apps], width, label=label)
    ax.set_xticks(np.arange(len(apps)) + 0.4 - width / 2, apps, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"VQA accuracy % ({mode})")
    ax.legend(fontsize=7)
    save(fig, "vqa_per_application.png")
    names = ["bleu_1", "bleu_4", "meteor", "rouge_l", "cider"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, kind in zip(axes, ("concise", "detailed")):
        for i, (r, label) in enumerate(zip(rows, labels)):
            ax.bar(np.arange(len(names)) + i * width, [r.get(f"{kind}_{n}_tok") or 0 for n in names], width, label=label)
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
        ax.set_title(f"{kind} captions")
    axes[0].legend(fontsize=7)
    save(fig, "captions.png")
