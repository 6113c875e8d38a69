"""evaluate: score VLMs on a split of ``evaluate.dataset``; a Ray Tune sweep of models x image variants x
prompts.

The dataset is this run's export (``export``, the default), a pairs table written by ``sarlang import`` (the
SARLANG-1M release as published, SARChat-Bench, any LLaMA-Factory JSON set; :mod:`sarlang_ray.release`), or a
LLaMA-Factory JSON file read the same way (:func:`prepare_datasets`); :func:`read_split` gives a split's rows
whichever it is. ``evaluate.vqa_mode=auto`` ranks by ``strict`` on our export and by ``sarlang1m`` (the
published rule) on anything else.

Every point of the sweep (``evaluate.models`` x ``evaluate.images`` x ``evaluate.prompts``) is one Ray Tune
trial. A trial runs batch inference on a Ray Data actor pool (``evaluate.engine=hf``: ``evaluate.concurrency``
actors with ``num_cpus``/``num_gpus`` each; one model per actor, batched greedy generation; or
``evaluate.engine=vllm``: Ray Data LLM's vLLM engine replicas, ``evaluate.vllm``, docs/vllm.md) and scores it:

* captions: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap) for the concise and the detailed test sets,
  with PTB tokenisation (``tok``) and without it (``raw``, as SARLANG-1M's released script); one
  prediction per tile and caption kind, all of the tile's captions of that kind as references;
* VQA: accuracy overall, per application and per question type, in ``strict`` and ``sarlang1m`` mode
  (see :mod:`sarlang_ray.metrics`).

The ResultGrid becomes ``evaluate/leaderboard.{md,csv,json}`` and plots, with reference rows: the
majority answer per question type of the train split (a lower bound) and the template oracle (captions
re-written by the template annotator from the tile's objects with another seed; VQA answers recomputed
from the objects by the template annotator with the annotate stage's seed: the references of a
template-annotated dataset, an upper bound and a check of the scorer). A reference row that cannot be
computed (no tiles table, tiles without objects, questions the template annotator does not ask) is left
out with a note. A failed trial does not stop the sweep: it is listed with its root exception (class and
message, dug out from under Ray's wrappers), and the evaluate stage fails once the leaderboard is written.
The paper's published numbers sit in a separate table (``sarlang_ray/paper_results.json``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa

from sarlang_ray import io, metrics, plots, reaper
from sarlang_ray.annotate.vocab import APPLICATIONS
from sarlang_ray.config import WorkflowConfig, resource_keys
from sarlang_ray.tables import ANNOTATE_TILE_COLUMNS, tiles_table_shards

log = logging.getLogger("sarlang")

META = ["pair_id", "tile_id", "kind", "application", "question_type", "question", "answer"]
CAPTION_KINDS = {"caption_concise": "concise", "caption_detailed": "detailed"}
ENGINES = ("hf", "vllm")  # evaluate.engine: transformers generate on an actor pool, or vLLM on Ray Data LLM
CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")


def resolve_model(name: str, cfg: WorkflowConfig) -> str:
    """``base`` -> train.model; ``finetuned`` -> the merged model of the train stage; else as given."""
    if name == "base":
        return cfg.train.model
    if name == "finetuned":
        uri = io.join(cfg.run.run_dir, "train", "metrics.json")
        if not io.exists(uri):
            raise FileNotFoundError(
                f"evaluate.models lists 'finetuned' but {uri} is missing: run the train stage "
                "first, or list a model folder / hub name instead"
            )
        return io.read_json(uri)["merged_model"]
    return name


def split_files(cfg: WorkflowConfig, split: str) -> list[str]:
    """The Parquet files that hold the ``split``: our export's ``export/parquet/<split>/*.parquet``, or (an
    imported release, a LLaMA-Factory JSON dataset: ``evaluate.dataset``) the dataset's table files, whose
    ``split`` column says which rows are the split (:func:`read_split` filters them)."""
    if dataset_kind(cfg) != "export":
        return table_uris(cfg, "train" if split == "train" and cfg.evaluate.train_dataset else "dataset")
    files = io.glob(io.join(cfg.run.run_dir, "export", "parquet"), f"{split}/*.parquet")
    if not files:
        raise FileNotFoundError(
            f"no {split} split under {cfg.run.run_dir}/export/parquet: run the export stage "
            "first (small archives may give no val split; use evaluate.split=test)"
        )
    return files


# ---------------------------------------------------------------- the dataset a sweep scores
# (evaluate.dataset)
def dataset_kind(cfg: WorkflowConfig, which: str = "dataset") -> str:
    """``export`` (this run's export), ``json`` (a LLaMA-Factory / ShareGPT JSON or JSONL file) or ``table``
    (a pairs table from ``sarlang import``: a Parquet file, or a folder of them)."""
    value = (
        cfg.evaluate.dataset if which == "dataset" else (cfg.evaluate.train_dataset or cfg.evaluate.dataset)
    )
    if value == "export":
        return "export"
    return "json" if value.lower().endswith((".json", ".jsonl")) else "table"


def dataset_label(cfg: WorkflowConfig) -> str:
    return (
        f"this run's export ({io.join(cfg.run.run_dir, 'export', 'parquet')})"
        if dataset_kind(cfg) == "export"
        else cfg.evaluate.dataset
    )


def vqa_mode(cfg: WorkflowConfig) -> str:
    """The leaderboard's VQA rule: ``evaluate.vqa_mode``, where ``auto`` is ``strict`` on our export and
    ``sarlang1m`` (the published rule, so numbers compare with the paper's) on any other dataset."""
    mode = cfg.evaluate.vqa_mode
    if mode == "auto":
        return "strict" if dataset_kind(cfg) == "export" else "sarlang1m"
    return mode


def _converted_uri(cfg: WorkflowConfig, which: str) -> str:
    return io.join(cfg.run.run_dir, "evaluate", "dataset", f"{which}.parquet")


def table_uris(cfg: WorkflowConfig, which: str = "dataset") -> list[str]:
    """The Parquet files of ``evaluate.dataset`` (``which="train"``: ``evaluate.train_dataset``)."""
    value = (
        cfg.evaluate.dataset if which == "dataset" else (cfg.evaluate.train_dataset or cfg.evaluate.dataset)
    )
    if dataset_kind(cfg, which) == "json":
        uri = _converted_uri(cfg, which)
        if not io.exists(uri):
            raise FileNotFoundError(
                f"{value} has not been read yet ({uri} is missing): run_evaluate converts it first"
            )
        return [uri]
    if value.endswith(".parquet"):
        if not io.exists(value):
            raise FileNotFoundError(
                f"evaluate.{'dataset' if which == 'dataset' else 'train_dataset'}={value} does not exist: "
                "write it with `sarlang import RELEASE_DIR OUT.parquet`"
            )
        return [value]
    files = [
        f
        for f in (io.glob(value, "**/*.parquet") if io.exists(value) else [])
        if not f.endswith(".errors.parquet")
    ]
    if not files:
        raise FileNotFoundError(
            f"evaluate.dataset={value} holds no Parquet table: give a pairs table written by "
            "`sarlang import`, a LLaMA-Factory JSON file, or `export`"
        )
    return files


def prepare_datasets(cfg: WorkflowConfig) -> list[str]:
    """Read ``evaluate.dataset`` / ``evaluate.train_dataset`` given as LLaMA-Factory JSON into pairs tables
    under ``evaluate/dataset/`` (every row in the split it is used as: the dataset in ``evaluate.split``, the
    train dataset in ``train``), with the import's error table beside them. Returns notes on rejected records.
    """
    from sarlang_ray import release

    notes = []
    for which in ("dataset", "train"):
        if which == "train" and not cfg.evaluate.train_dataset:
            continue
        if dataset_kind(cfg, which) != "json":
            continue
        path = cfg.evaluate.dataset if which == "dataset" else cfg.evaluate.train_dataset
        assert path is not None  # train_dataset is set (checked above) and dataset is never None
        result = release.import_release(path, default_split=cfg.evaluate.split)
        split = cfg.evaluate.split if which == "dataset" else "train"
        table = result.table.set_column(
            result.table.schema.get_field_index("split"),
            "split",
            pa.array([split] * result.table.num_rows, pa.string()),
        )
        uri = _converted_uri(cfg, which)
        release.write_import(release.ImportResult(result.root, table, result.errors, result.files), uri)
        t = result.totals
        if t["rejected"]:
            notes.append(
                f"{path}: {t['rejected']} of {t['records']} records rejected "
                f"({uri.replace('.parquet', '.errors.parquet')})"
            )
    return notes


def read_split(cfg: WorkflowConfig, split: str, columns: list[str] | None = None) -> pa.Table:
    """The rows of ``split`` of the evaluated dataset (``columns`` only).

    Raises:
        FileNotFoundError: no such split (the message says where it was looked for)."""
    parts = list(iter_split(cfg, split, columns))
    # as io.read_parquet
    return pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]


def iter_split(cfg: WorkflowConfig, split: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The rows of ``split`` file by file (``columns`` only), so a whole split never sits in memory at once;
    at least one table (maybe empty) for a split that exists.

    Raises:
        FileNotFoundError: no such split (the message says where it was looked for)."""
    import pyarrow.compute as pc

    if dataset_kind(cfg) == "export":
        for uri in split_files(cfg, split):
            yield io.read_parquet(uri, columns=columns)
        return
    which = "train" if split == "train" and cfg.evaluate.train_dataset else "dataset"
    files = table_uris(cfg, which)
    found = 0
    for uri in files:
        table = io.read_parquet(
            uri, columns=None if columns is None else list(dict.fromkeys([*columns, "split"]))
        )
        table = table.filter(pc.equal(table["split"], split))
        if table.num_rows:
            found += table.num_rows
            yield table.select(columns) if columns is not None else table
    if not found:
        where = cfg.evaluate.train_dataset if which == "train" else cfg.evaluate.dataset
        raise FileNotFoundError(
            f"no {split} split in {where} (its splits: "
            f"{sorted(set(io.read_parquet(files, columns=['split'])['split'].to_pylist()))})"
        )


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
    """Ray Data actor: loads one model, answers a batch of pairs with the trial's prompts and image variant.

    Its constructor takes only small arguments (no images): the rows bring their image (the SAR tile, or
    for the ``optical`` variant its optical twin, joined in by the read tasks; see :func:`pairs_dataset`)."""

    def __init__(self, model: str, image: str, prompt: dict, settings: dict):
        from sarlang_ray.models import Generator

        self.generator = Generator(
            model, settings["dtype"], settings["num_gpus"] > 0, settings["batch_size"], settings["max_pixels"]
        )
        self.image, self.prompt, self.s = image, prompt, settings

    def __call__(self, batch: dict) -> dict:
        from sarlang_ray.models import load_image

        jobs = defaultdict(list)  # generation budget -> row indices
        prompts, images = [], []
        for i, (kind, question, img) in enumerate(zip(batch["kind"], batch["question"], batch["image"])):
            text, budget = pair_prompt(kind, question, self.prompt, self.s)
            prompts.append(text)
            jobs[budget].append(i)
            images.append(load_image(img["bytes"], self.s["max_pixels"], self.image))
        predictions = [""] * len(prompts)
        for budget, idx in jobs.items():
            for i, text in zip(
                idx, self.generator.generate([images[i] for i in idx], [prompts[i] for i in idx], budget)
            ):
                predictions[i] = text
        return {"pair_id": batch["pair_id"], "prediction": predictions}


def pair_prompt(kind: str, question: str, prompt: dict, settings: dict) -> tuple[str, int]:
    """(text asked, max new tokens) for one pair: the trial's caption prompts (detailed captions get 3x the
    caption length) or its VQA prompt around the pair's question. Both engines ask exactly this."""
    if kind == "caption_concise":
        return prompt["caption"], settings["max_new_tokens_caption"]
    if kind == "caption_detailed":
        return prompt["detailed"], 3 * settings["max_new_tokens_caption"]
    return prompt["vqa"].format(question=str(question).rstrip("?. ")), settings["max_new_tokens_answer"]


def vllm_predict(cfg: WorkflowConfig, model: str, image: str, prompt: dict, ds) -> dict[str, str]:
    """``predict`` with ``evaluate.engine=vllm``: the pairs dataset ``ds`` -> requests (same prompts, image
    variant and ``run.max_pixels`` as the hf engine) -> Ray Data LLM's vLLM engine replicas
    (``evaluate.vllm``) -> pair_id -> prediction. A pair that fails in the engine fails the trial, naming it
    and the engine's message (the leaderboard lists the failed trial); an empty answer is a wrong one."""
    from sarlang_ray import vllm_engine
    from sarlang_ray.models import load_image

    ev, max_pixels = cfg.evaluate, cfg.run.max_pixels
    settings = {
        "max_new_tokens_caption": ev.max_new_tokens_caption,
        "max_new_tokens_answer": ev.max_new_tokens_answer,
    }
    processor = vllm_engine.build_processor(
        ev.vllm,
        model,
        ev.dtype,
        max_pixels,
        postprocess=lambda row: {"pair_id": row["pair_id"], **vllm_engine.parse_output(row)},
    )

    def to_request(row: dict) -> dict:
        text, budget = pair_prompt(row["kind"], row["question"], prompt, settings)
        chat = vllm_engine.render_prompt(vllm_engine.prompt_processor(model, max_pixels), text)
        return vllm_engine.request(
            chat, load_image(row["image"]["bytes"], max_pixels, image), budget, pair_id=row["pair_id"]
        )

    out = processor(ds.map(to_request, num_cpus=0.1)).take_all()
    failed = [r for r in out if r["error"]]
    if failed:
        raise RuntimeError(
            f"vLLM failed on {len(failed)} of {len(out)} pairs (e.g. {failed[0]['pair_id']}: "
            f"{failed[0]['error']})"
        )
    return {r["pair_id"]: r["text"] for r in out}


def prompt_dict(prompt) -> dict:
    """An ``evaluate.prompts`` entry as the plain dict a trial and ``predict`` take."""
    return {"name": prompt.name, "caption": prompt.caption, "detailed": prompt.detailed, "vqa": prompt.vqa}


def _optical_sources(cfg: WorkflowConfig, files: list[str], wanted: set[str]) -> list[list[str]]:
    """For each split file: the tiles-table shards that hold the optical twins of its wanted pairs' tiles.
    Reads tile ids only; raises when a tile is not in the tiles table."""
    shard_of = {}
    for uri in tiles_table_shards(cfg.run.run_dir):
        shard_of.update(dict.fromkeys(io.read_parquet(uri, columns=["tile_id"])["tile_id"].to_pylist(), uri))
    sources = []
    for uri in files:
        rows = io.read_parquet(uri, columns=["pair_id", "tile_id"]).to_pylist()
        tiles = {r["tile_id"] for r in rows if r["pair_id"] in wanted}
        missing = sorted(tiles - shard_of.keys())
        if missing:
            raise FileNotFoundError(
                f"evaluate.images lists 'optical' but {len(missing)} tile(s) of {uri} are not in the tiles "
                f"table under {io.join(cfg.run.run_dir, 'align', 'shards')} (e.g. {missing[0]}): the "
                "optical twins are read from there; copy the align stage's output into the run folder"
            )
        sources.append(sorted({shard_of[t] for t in tiles}))
    return sources


def pairs_dataset(cfg: WorkflowConfig, image: str, wanted: set[str]):
    """A Ray Dataset of the split's wanted pairs (pair_id, tile_id, kind, question, image), one light read
    task per split file (0.1 CPU: a trial holds almost no CPU and its actor pool the rest).

    ``image="optical"``: each read task also reads the optical twins of its file's tiles from the tiles
    table and puts them in the rows' ``image``; a tile without one fails the trial (an input upper bound
    on part of the split would be no upper bound)."""
    import ray

    if dataset_kind(cfg) != "export":
        return _table_pairs_dataset(cfg, wanted)
    files = split_files(cfg, cfg.evaluate.split)
    sources = _optical_sources(cfg, files, wanted) if image == "optical" else [[] for _ in files]
    columns = ["pair_id", "tile_id", "kind", "question"] + ([] if image == "optical" else ["image"])

    def read(item: dict) -> list[dict]:
        rows = [
            r for r in io.read_parquet(item["uri"], columns=columns).to_pylist() if r["pair_id"] in wanted
        ]
        if item["tiles"]:
            need = {r["tile_id"] for r in rows}
            optical: dict[str, bytes | None] = {}
            for uri in item["tiles"]:
                t = io.read_parquet(uri, columns=["tile_id", "optical_png"])
                optical.update(
                    (k, v)
                    for k, v in zip(t["tile_id"].to_pylist(), t["optical_png"].to_pylist())
                    if k in need
                )
            for r in rows:
                if not optical.get(r["tile_id"]):
                    raise ValueError(
                        f"tile {r['tile_id']} has no optical twin (optical_png is empty in the tiles table): "
                        "the optical image variant needs one for every tile; drop 'optical' from "
                        "evaluate.images"
                    )
                r["image"] = {"bytes": optical[r["tile_id"]], "path": None}
        return rows

    return ray.data.from_items([{"uri": u, "tiles": t} for u, t in zip(files, sources)]).flat_map(
        read, num_cpus=0.1
    )


def _table_pairs_dataset(cfg: WorkflowConfig, wanted: set[str], chunk: int = 64):
    """The wanted pairs of an imported table: the driver reads their ids, questions and image uris (no
    pixels), read tasks of ``chunk`` pairs each (0.1 CPU) read the images: from ``image_uri``, or embedded
    bytes from the table. An image that cannot be read fails the trial, naming it."""
    import ray

    rows = [
        r
        for r in read_split(
            cfg, cfg.evaluate.split, ["pair_id", "tile_id", "kind", "question", "image_uri"]
        ).to_pylist()
        if r["pair_id"] in wanted
    ]
    files = table_uris(cfg)

    def read(item: dict) -> list[dict]:
        out, embedded = [], [r["pair_id"] for r in item["rows"] if not r["image_uri"]]
        stored = {}
        if embedded:
            import pyarrow.compute as pc

            t = io.read_parquet(item["files"], columns=["pair_id", "image"])
            t = t.filter(pc.is_in(t["pair_id"], pa.array(embedded, pa.string())))
            stored = dict(zip(t["pair_id"].to_pylist(), t["image"].to_pylist()))
        for r in item["rows"]:
            if r["image_uri"]:
                try:
                    data = io.read_bytes(r["image_uri"])
                except (OSError, FileNotFoundError) as exc:
                    raise FileNotFoundError(
                        f"pair {r['pair_id']}: its image {r['image_uri']} cannot be read ({exc}); re-run "
                        "`sarlang import` (it checks every image) or restore the file"
                    ) from exc
                img = {"bytes": data, "path": r["image_uri"].rsplit("/", 1)[-1]}
            else:
                img = stored.get(r["pair_id"]) or {}
                if not img.get("bytes"):
                    raise ValueError(
                        f"pair {r['pair_id']} has neither an image_uri nor embedded image bytes in "
                        f"{item['files']}"
                    )
            out.append(
                {
                    "pair_id": r["pair_id"],
                    "tile_id": r["tile_id"],
                    "kind": r["kind"],
                    "question": r["question"],
                    "image": img,
                }
            )
        return out

    items = [{"files": files, "rows": rows[i : i + chunk]} for i in range(0, len(rows), chunk)]
    return ray.data.from_items(items).flat_map(read, num_cpus=0.1)


def predict(cfg: WorkflowConfig, model: str, image: str, prompt: dict, pairs: list[dict]) -> dict[str, str]:
    """pair_id -> prediction for ``pairs``, by a Ray Data actor pool over the split's Parquet files.

    The actors' constructor arguments stay small (model name, variant, prompt, settings): images travel
    in the rows. (Ray Data puts every actor pool's constructor arguments, inside its serialised UDF, in
    the object store whatever their size, so Ray's "constructor arguments in the object store and
    max_restarts > 0" log line appears for any actor pool; see docs/evaluate.md. Large arguments would
    only make that object, and each actor's copy of it, large.)"""
    import ray

    ev = cfg.evaluate
    wanted = {p["pair_id"] for p in pairs}
    if ev.engine == "vllm":
        ray.data.DataContext.get_current().enable_progress_bars = cfg.ray.progress
        return vllm_predict(cfg, model, image, prompt, pairs_dataset(cfg, image, wanted))
    settings = {
        "dtype": ev.dtype,
        "num_gpus": ev.num_gpus,
        "batch_size": ev.batch_size,
        "max_pixels": cfg.run.max_pixels,
        "max_new_tokens_caption": ev.max_new_tokens_caption,
        "max_new_tokens_answer": ev.max_new_tokens_answer,
    }
    ray.data.DataContext.get_current().enable_progress_bars = cfg.ray.progress
    ds = pairs_dataset(cfg, image, wanted)
    # the one resource vocabulary: concurrency N (a pool of N actors) or [min, max] (autoscaling between them)
    c = resource_keys(ev)["concurrency"] or 1
    low, high = c if isinstance(c, tuple) else (c, c)
    num_cpus = io.pool_cpus(high, ev.num_cpus, ray.cluster_resources().get("CPU", 1.0))
    if num_cpus != ev.num_cpus:
        log.warning(
            "evaluate: %d actors x %.2g CPUs would leave no CPU for the reads feeding them; each actor asks "
            "for %.3g CPUs instead (lower evaluate.num_cpus or evaluate.concurrency, or add nodes, to "
            "silence this)",
            high,
            ev.num_cpus,
            num_cpus,
        )
    pool = (
        ray.data.ActorPoolStrategy(size=low)
        if low == high
        else ray.data.ActorPoolStrategy(min_size=low, max_size=high)
    )
    out = ds.map_batches(
        Predictor,
        fn_constructor_args=(model, image, prompt, settings),
        batch_size=ev.batch_size * 4,
        compute=pool,
        num_cpus=num_cpus,
        num_gpus=ev.num_gpus,
    )
    return {r["pair_id"]: r["prediction"] for r in out.take_all()}


JUDGE_PROMPT = (
    "You grade answers to questions about a remote sensing image.\nQuestion: {question}\n"
    "Reference answer: {truth}\nPredicted answer: {prediction}\nDoes the predicted answer have the same "
    "meaning as the reference (semantic meaning, not exact wording; synonyms count)? Reply yes or no."
)


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
            reply = self.client._chat(
                [
                    {
                        "role": "user",
                        "content": JUDGE_PROMPT.format(question=question, truth=truth, prediction=prediction),
                    }
                ]
            )
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
            batch = self.tokenizer(new, padding=True, truncation=True, max_length=64, return_tensors="pt").to(
                self.device
            )
            with self.torch.no_grad():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = self.torch.nn.functional.normalize(
                (hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1
            )
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
    # served: run_evaluate pointed annotate.openai at the judge it serves
    if ev.judge in (
        "openai",
        "served",
    ):
        return OpenAIJudge(cfg)
    if ev.judge == "embedding":
        assert ev.judge_model is not None  # the config check requires it for judge=embedding
        return EmbeddingJudge(ev.judge_model, ev.judge_threshold)
    return None


def score(
    pairs: list[dict],
    predictions: dict[str, str],
    refs: dict[tuple, list[str]],
    judge=None,
    context: dict | None = None,
) -> dict:
    """Caption metrics (concise/detailed x tok/raw) and VQA accuracy (strict and sarlang1m, and ``judge``
    when a judge is given) of predictions; box answers by IoU; the SARChat-Bench section per task.

    ``refs``: (tile_id, kind) -> every reference caption of that tile and kind in the split.
    ``context`` (:func:`scoring_context`): ``sizes`` (pair_id -> (width, height) of the box-answer pairs'
    images), ``tasks`` (pair_id -> SARChat task), ``box_frame``/``truth_box_frame``."""
    context = context or {}
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
    vqa = [
        {**p, "prediction": predictions.get(p["pair_id"], "")}
        for p in pairs
        if p["kind"] not in CAPTION_KINDS
    ]
    failures = box_decisions(vqa, context)
    if failures is not None:
        out["box_pairs"], out["box_failures"] = failures.pop("_pairs"), failures
        out["box_parse_failures"] = sum(failures.get(k, 0) for k in ("no_box", "degenerate", "outside"))
    if context.get("tasks"):
        out.update(sarchat_scores(pairs, vqa, predictions, refs, context["tasks"]))
    if vqa:
        modes = {"strict": None, "sarlang1m": None, **({"judge": judge} if judge is not None else {})}
        calls, judge_failures = (judge.calls, judge.failures) if judge is not None else (0, 0)
        for mode, by in modes.items():
            acc = metrics.vqa_accuracy(vqa, mode=mode, judge=by)
            out[f"vqa_{mode}"] = acc["accuracy"]
            out[f"vqa_{mode}_per_application"] = {a: v["accuracy"] for a, v in acc["per_application"].items()}
            out[f"vqa_{mode}_per_question_type"] = {
                q: v["accuracy"] for q, v in acc["per_question_type"].items()
            }
        if judge is not None:  # one judge may score several rows: count this row's calls only
            out["judge_calls"], out["judge_failures"] = judge.calls - calls, judge.failures - judge_failures
        out["n_vqa"] = len(vqa)
    return out


def box_decisions(vqa: list[dict], context: dict) -> dict | None:
    """Score every VQA row whose reference answer is a box by IoU (:mod:`sarlang_ray.boxes`), in place: the
    row's ``decided`` is True/False (read by :func:`metrics.vqa_accuracy` in strict and judge mode) and
    ``why`` the reason it is wrong. Returns the reasons counted (``_pairs``: how many box rows), or None (no
    box row).

    Raises:
        ValueError: a box row whose image size is not in ``context['sizes']``."""
    from sarlang_ray import boxes

    box_rows = [r for r in vqa if boxes.is_box_answer(r["answer"])]
    if not box_rows:
        return None
    sizes, counts = context.get("sizes") or {}, {"_pairs": len(box_rows)}
    for r in box_rows:
        if r["pair_id"] not in sizes:
            raise ValueError(
                f"pair {r['pair_id']}: its answer is a box but its image size is unknown (scoring_context "
                "reads the sizes of every box pair's image)"
            )
        w, h = sizes[r["pair_id"]]
        ok, why, _ = boxes.box_correct(
            r["prediction"],
            r["answer"],
            w,
            h,
            frame=context.get("box_frame", "auto"),
            truth_frame=context.get("truth_box_frame", "auto"),
        )
        r["decided"], r["why"] = ok, why
        if why:
            counts[why] = counts.get(why, 0) + 1
    return counts


def sarchat_scores(
    pairs: list[dict], vqa: list[dict], predictions: dict[str, str], refs: dict, tasks: dict
) -> dict:
    """SARChat-Bench-2M's six columns, as its authors score them: classification, identification and counting
    by accuracy (the strict rule: normalised answers, the first integer for a count), grounding and referring
    by IoU >= 0.5 when the answer is a box (``decided``, :func:`box_decisions`; else the strict rule),
    description by the caption metrics (CIDEr, PTB-tokenised, in ``sarchat`` as a fraction; every metric in
    ``sarchat_description``). ``sarchat_n``: pairs per task."""
    from sarlang_ray import release

    acc: dict[str, list[int]] = {}
    for r in vqa:
        task = tasks.get(r["pair_id"])
        if task is None or task == "description":
            continue
        ok = (
            r["decided"]
            if r.get("decided") is not None
            else metrics.vqa_correct(r["prediction"], r["answer"], "strict")
        )
        n, c = acc.setdefault(task, [0, 0])
        acc[task] = [n + 1, c + bool(ok)]
    out: dict[str, Any] = {
        "sarchat": {t: c / n for t, (n, c) in acc.items()},
        "sarchat_n": {t: n for t, (n, _) in acc.items()},
    }
    described = [p for p in pairs if tasks.get(p["pair_id"]) == "description"]
    if described:
        preds = {(p["tile_id"], p["kind"]): predictions.get(p["pair_id"], "") for p in described}
        keys = sorted(preds)
        scores = metrics.caption_scores(
            {str(i): refs.get(k) or [""] for i, k in enumerate(keys)},
            {str(i): preds[k] for i, k in enumerate(keys)},
            tokenize=True,
        )
        out["sarchat"]["description"] = scores["cider"]
        out["sarchat_description"] = scores
        out["sarchat_n"]["description"] = len(keys)
    out["sarchat"] = {t: out["sarchat"][t] for t in release.SARCHAT_TASKS if t in out["sarchat"]}
    return out


def pair_tasks(cfg: WorkflowConfig) -> dict[str, str]:
    """pair_id -> SARChat-Bench task of the evaluated split's pairs (empty: our export, or no SARChat
    rows)."""
    if dataset_kind(cfg) == "export":
        return {}
    try:
        t = read_split(cfg, cfg.evaluate.split, ["pair_id", "task"])
    except (KeyError, pa.ArrowInvalid, ValueError):  # a table written before the task column
        return {}
    return {p: k for p, k in zip(t["pair_id"].to_pylist(), t["task"].to_pylist()) if k}


def image_sizes(cfg: WorkflowConfig, wanted: set[str]) -> dict[str, tuple[int, int]]:
    """pair_id -> (width, height) of the images of ``wanted`` pairs, read by Ray Data tasks (image headers
    only are decoded; nothing but the sizes comes back)."""
    if not wanted:
        return {}

    def size(row: dict) -> dict:
        import io as _io

        from PIL import Image

        with Image.open(_io.BytesIO(row["image"]["bytes"])) as im:
            return {"pair_id": row["pair_id"], "width": im.width, "height": im.height}

    rows = pairs_dataset(cfg, "sar", wanted).map(size, num_cpus=0.1).take_all()
    return {r["pair_id"]: (r["width"], r["height"]) for r in rows}


def scoring_context(cfg: WorkflowConfig, pairs: list[dict]) -> dict:
    """What :func:`score` needs beyond the answers: the SARChat tasks, the image sizes of the box-answer
    pairs, the box frames."""
    from sarlang_ray import boxes

    wanted = {
        p["pair_id"] for p in pairs if p["kind"] not in CAPTION_KINDS and boxes.is_box_answer(p["answer"])
    }
    return {
        "tasks": pair_tasks(cfg),
        "sizes": image_sizes(cfg, wanted),
        "box_frame": cfg.evaluate.box_frame,
        "truth_box_frame": cfg.evaluate.truth_box_frame,
    }


def caption_refs(table: pa.Table) -> dict[tuple, list[str]]:
    refs: dict[tuple, list[str]] = defaultdict(list)
    for r in table.select(["tile_id", "kind", "answer"]).to_pylist():
        if r["kind"] in CAPTION_KINDS:
            refs[(r["tile_id"], r["kind"])].append(r["answer"])
    return refs


def slug(*parts: str) -> str:
    return "__".join(
        re.sub(r"[^A-Za-z0-9._-]+", "_", p.rstrip("/").rsplit("/", 1)[-1] if "/" in p else p)[:60]
        for p in parts
    )


def prediction_name(model: str, image: str, prompt: str) -> str:
    """The predictions file of a trial (under ``evaluate/predictions/``): the model's last path component
    for a reader, with a short hash of the whole model entry beside it, so ``.../checkpoint_000001/merged``
    and ``.../checkpoint_000002/merged`` (two trials of one sweep, maybe at once) write two files."""
    digest = hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"{slug(model)}-{digest}__{slug(image, prompt)}.parquet"


def _trial(config: dict, cfg: WorkflowConfig) -> None:
    """One Ray Tune trial: inference for one (model, image variant, prompt), scored, predictions saved."""
    from ray import tune

    table = read_split(cfg, cfg.evaluate.split, META)
    pairs = select_pairs(table, cfg.evaluate.limit_pairs)
    model = resolve_model(config["model"], cfg)
    t0 = time.time()
    predictions = predict(cfg, model, config["image"], config["prompt"], pairs)
    seconds = time.time() - t0
    result = score(pairs, predictions, caption_refs(table), make_judge(cfg), scoring_context(cfg, pairs))
    name = prediction_name(config["model"], config["image"], config["prompt"]["name"])
    rows = [{**p, "prediction": predictions.get(p["pair_id"], "")} for p in pairs]
    io.write_parquet_atomic(
        io.join(cfg.run.run_dir, "evaluate", "predictions", name), pa.Table.from_pylist(rows)
    )
    tune.report(
        {
            **result,
            "model": config["model"],
            "model_path": model,
            "image": config["image"],
            "prompt": config["prompt"]["name"],
            "seconds": seconds,
            "samples_per_s": len(pairs) / max(seconds, 1e-9),
        }
    )


ORACLE = "template oracle (upper bound)"
MAJORITY = "majority answer (lower bound)"


def baseline_rows(cfg: WorkflowConfig, table: pa.Table) -> tuple[list[dict], list[str]]:
    """The reference rows (majority answer, template oracle) that ``evaluate.baselines`` asks for and that
    can be computed on this run, and a note for each one left out saying why."""
    pairs, refs, rows, notes = select_pairs(table, cfg.evaluate.limit_pairs), caption_refs(table), [], []
    judge = make_judge(cfg) if cfg.evaluate.baselines else None  # judged like the models' rows (vqa_judge)
    context = scoring_context(cfg, pairs) if cfg.evaluate.baselines else {}
    if "majority" in cfg.evaluate.baselines:
        row, why = majority_row(cfg, pairs, refs, judge, context)
        rows += [row] if row else []
        notes += [f"{MAJORITY} left out: {why}"] if why else []
    if "oracle" in cfg.evaluate.baselines:
        row, why = oracle_row(cfg, pairs, refs, judge)
        rows += [row] if row else []
        notes += [f"{ORACLE} left out: {why}"] if why else []
    return rows, notes


def majority_row(
    cfg: WorkflowConfig, pairs: list[dict], refs: dict, judge=None, context: dict | None = None
) -> tuple[dict | None, str | None]:
    """Lower bound: per question type the train split's most frequent answer; captions: its most frequent
    caption of that kind. (row, None), or (None, why) when there is no train split."""
    vqa, captions = metrics.AnswerCounts(), metrics.AnswerCounts()  # streamed file by file: counts only
    try:
        for part in iter_split(cfg, "train", ["kind", "question_type", "answer"]):
            kinds, types, answers = (part[c].to_pylist() for c in ("kind", "question_type", "answer"))
            vqa.add((t, a) for k, t, a in zip(kinds, types, answers) if k not in CAPTION_KINDS)
            captions.add((k, a) for k, a in zip(kinds, answers) if k in CAPTION_KINDS)
    except FileNotFoundError as exc:
        if dataset_kind(cfg) == "export":
            where = io.join(cfg.run.run_dir, "export", "parquet")
            return None, f"no train split under {where} to take the answers from"
        return None, (
            f"no train split to take the answers from ({exc}); give one with evaluate.train_dataset "
            "(a LLaMA-Factory JSON file or a pairs table)"
        )
    majority = vqa.majority()
    # caption kind -> its most frequent caption
    common = dict(captions.majority()) if captions.per_type else {}
    preds = {
        p["pair_id"]: common.get(p["kind"], "")
        if p["kind"] in CAPTION_KINDS
        else majority[p["question_type"]]
        for p in pairs
    }
    return {**score(pairs, preds, refs, judge, context), "model": MAJORITY, "image": "-", "prompt": "-"}, None


def oracle_row(
    cfg: WorkflowConfig, pairs: list[dict], refs: dict, judge=None
) -> tuple[dict | None, str | None]:
    """Upper bound: the template annotator run again on the pairs' tiles (from the tiles table). VQA answers
    are recomputed from each tile's objects (same seed and settings as the annotate stage, so the same
    questions; matched on tile and question); captions are re-written with another seed.

    (row, None), or (None, why) when the answers cannot be recomputed: no tiles table, pairs whose tile is
    not in it, tiles without a single labelled object (nothing to recompute from), or questions the
    template annotator does not ask (another annotate backend or seed). A row scoring copied references
    would show 100 % and check nothing."""
    from sarlang_ray.annotate.template import TemplateAnnotator

    run_dir, split = cfg.run.run_dir, cfg.evaluate.split
    if dataset_kind(cfg) != "export":
        return None, (
            f"evaluate.dataset={cfg.evaluate.dataset} is not this run's export: the template oracle "
            "recomputes "
            "answers from the labelled objects of this run's tiles, and an imported dataset has none"
        )
    if not tiles_table_shards(run_dir):
        return None, (
            f"no tiles table under {io.join(run_dir, 'align', 'shards')} to recompute the answers from "
            "(copy the align stage's output into the run folder)"
        )
    wanted = sorted({p["tile_id"] for p in pairs})
    # the template annotator reads no image
    columns = [c for c in ANNOTATE_TILE_COLUMNS if not c.endswith("_png")]
    import pyarrow.compute as pc

    tiles, wanted_ids = [], pa.array(wanted, pa.string())
    try:  # shard by shard, keeping only the split's tiles
        for uri in tiles_table_shards(run_dir):
            shard = io.read_parquet(uri, columns=columns)
            tiles += shard.filter(pc.is_in(shard["tile_id"], wanted_ids)).to_pylist()
    # - e.g. written without objects (ArrowInvalid): a note, not a crash
    except Exception as exc:  # noqa: BLE001
        return (
            None,
            (
                f"the tiles table under {io.join(run_dir, 'align', 'shards')} cannot be read: "
                f"{type(exc).__name__}: {exc}"
            ),
        )
    missing = sorted(set(wanted) - {t["tile_id"] for t in tiles})
    if missing:
        return None, (
            f"{len(missing)} of the {len(wanted)} tiles of the {split} pairs are not in the tiles table "
            f"(e.g. {missing[0]}): their answers cannot be recomputed"
        )
    if not any(t["objects"] for t in tiles):
        return None, (
            f"none of the {len(tiles)} tiles of the {split} pairs has a labelled object: there is nothing to "
            "recompute the answers from"
        )
    a = cfg.annotate
    same = TemplateAnnotator(
        seed=cfg.run.seed, identification_pairs=a.identification_pairs, max_per_family=a.max_per_family
    )
    rewrite = TemplateAnnotator(
        seed=cfg.run.seed + 1, identification_pairs=a.identification_pairs, max_per_family=a.max_per_family
    )
    answers: dict[tuple[str, str], str] = {}
    captions: dict[tuple[str, str], str] = {}
    for tile in tiles:
        for pair in same.annotate(tile):
            if pair["kind"] not in CAPTION_KINDS:
                answers.setdefault((tile["tile_id"], pair["question"]), pair["answer"])
        for pair in rewrite.annotate(tile):
            if pair["kind"] in CAPTION_KINDS:
                captions.setdefault((tile["tile_id"], pair["kind"]), pair["answer"])
    vqa = [p for p in pairs if p["kind"] not in CAPTION_KINDS]
    unmatched = [p for p in vqa if (p["tile_id"], p["question"]) not in answers]
    if unmatched:
        return None, (
            f"{len(unmatched)} of the {len(vqa)} VQA questions are not ones the template annotator asks of "
            f"their tile (annotate.backend={a.backend}, run.seed={cfg.run.seed}), e.g. "
            f"{unmatched[0]['question']!r}: it can only recompute its own questions' answers"
        )
    preds = {
        p["pair_id"]: captions.get((p["tile_id"], p["kind"]), "")
        if p["kind"] in CAPTION_KINDS
        else answers[(p["tile_id"], p["question"])]
        for p in pairs
    }
    return {**score(pairs, preds, refs, judge), "model": ORACLE, "image": "-", "prompt": "-"}, None


# ---------------------------------------------------------------- failed trials: the root exception
# Ray's exceptions around the one that failed a trial (RayTaskError(X) is Ray's class for a remote X, and
# Ray Data raises UserCodeException from the UDF's exception, ActorDiedError for an actor whose
# constructor raised, with a SystemException as marker cause). A wrapper is the root only if nothing
# else is found.
WRAPPERS = frozenset(
    {
        "RayTaskError",
        "RayError",
        "UserCodeException",
        "SystemException",
        "ActorDiedError",
        "RayActorError",
        "TuneError",
        "TrainingFailedError",
    }
)
_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"
_EXCEPTION_LINE = re.compile(r"([A-Za-z_][\w.]*(?:\([\w.]+\))?)(?:: (.*))?")


def _short(name: str) -> str:
    """``pyarrow.lib.ArrowInvalid`` -> ``ArrowInvalid``; ``ray.exceptions.RayTaskError(ValueError)`` ->
    ``RayTaskError``."""
    return name.split("(", 1)[0].rsplit(".", 1)[-1]


def _is_wrapper(name: str) -> bool:
    return _short(name) in WRAPPERS


def _segment_exception(segment: str) -> tuple[str, str] | None:
    """The innermost exception line of one traceback (no chain markers in it): a non-indented
    ``Name: message`` line right after a frame line (indented) or after Ray's ``ray::task() (pid=...)``
    header. The last non-wrapper one wins (Ray's wrappers print the remote traceback inside their message)."""
    found, prev = [], ""
    for line in segment.splitlines():
        if line.strip() and not line[0].isspace() and prev.startswith((" ", "\t", "ray::")):
            m = _EXCEPTION_LINE.fullmatch(line.rstrip())
            if m:
                found.append((m.group(1), (m.group(2) or "").strip()))
        if line.strip():
            prev = line
    real = [f for f in found if not _is_wrapper(f[0])]
    chosen = real or found
    return chosen[-1] if chosen else None


def root_from_text(text: str) -> tuple[str, str] | None:
    """(class name, message) of the root exception in a formatted traceback, Python's or Ray's, or None.

    Python prints a chain cause first; this walks back from the last exception through the explicit causes
    (``raise ... from``) to the first one that is not a Ray wrapper. An implicit chain ("During handling of
    the above exception") stops the walk: there the later exception is the one that says what went wrong
    (``except JSONDecodeError: raise OSError("... is not a valid JSON file")``). Tune's error file may
    hold several failures (retries): the last one is read."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    text = re.split(r"^Failure # \d+ .*$", text, flags=re.MULTILINE)[-1]
    parts = re.split(f"({re.escape(_CAUSE)}|{re.escape(_CONTEXT)})", text)
    segments, markers = parts[0::2], parts[1::2]
    # segment -> exception
    found = {k: f for k, f in enumerate(_segment_exception(seg) for seg in segments) if f}
    if not found:
        return None
    i = best = max(found)
    while i > 0 and markers[i - 1] == _CAUSE and (i - 1) in found:
        i -= 1
        if not _is_wrapper(found[i][0]) or _is_wrapper(found[best][0]):
            best = i
    name, message = found[best]
    return _short(name), message


def root_error(error, text: str = "") -> tuple[str, str]:
    """(class name, message) of the exception that actually failed a trial, under Ray's wrappers.

    ``error``: what Tune gives (``Result.error``: a RayTaskError, a TuneError, or the text of the trial's
    error file when the exception could not be unpickled); ``text``: the trial's error file, if any. The
    exception objects are followed through ``.cause`` (Ray's wrappers) and ``__cause__``; tracebacks in
    their text are read for the causes that pickling dropped (a Ray Data task's UserCodeException keeps
    its cause only in its traceback text)."""
    chain, seen, exc = [], set(), error
    while isinstance(exc, BaseException) and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
    real = [e for e in chain if not _is_wrapper(type(e).__name__)]
    for candidate in (str(error) if error is not None else "", text):
        parsed = root_from_text(candidate) if candidate else None
        if parsed and not _is_wrapper(parsed[0]):
            name, message = parsed
            same = [e for e in real if type(e).__name__ == name and str(e).strip()]
            if same and not message:
                message = str(same[-1]).strip().splitlines()[0]
            return name, message[:500]
    if real:
        return type(real[-1]).__name__, (str(real[-1]).strip().splitlines() or [""])[0][:500]
    # only Ray's own exception (e.g. an actor killed from outside): its first line says what happened
    if chain:
        return _short(type(chain[-1]).__name__), (str(chain[-1]).strip().splitlines() or [""])[0][:500]
    if isinstance(error, str) and error.strip():
        return "Error", error.strip().splitlines()[-1][:500]
    return "UnknownError", "the trial failed without an error message; see Tune's log"


def failed_trial(result) -> dict:
    """A failed Tune trial as a leaderboard entry: its grid point and the root exception (class, message)."""
    point = result.config or {}
    error_file, text = None, ""
    if result.path:
        try:  # Tune's text of the failure: the only place a cause survives when the exception itself did not
            import pyarrow.fs as pafs

            fs, path = result.filesystem, f"{result.path.rstrip('/')}/error.txt"
            if fs.get_file_info(path).type == pafs.FileType.File:
                with fs.open_input_stream(path) as f:
                    text = f.readall().decode(errors="replace")
                error_file = path
        except Exception as exc:  # noqa: BLE001 -- the board must be written; the error object is still read
            log.debug("evaluate: cannot read %s/error.txt: %s", result.path, exc)
    if result.error is None and not text:
        error_class, error = "MissingResult", "the trial ended without reporting its metrics"
    else:
        error_class, error = root_error(result.error, text)
    return {
        "model": point.get("model"),
        "image": point.get("image"),
        "prompt": (point.get("prompt") or {}).get("name"),
        "error_class": error_class,
        "error": error,
        "error_file": error_file,
    }


def run_evaluate(cfg: WorkflowConfig) -> dict:
    """The Ray Tune sweep, the baselines, the leaderboard files and plots; returns the leaderboard.

    A failed trial does not raise: it is listed in ``board["failed"]`` (grid point, root exception class and
    message) and in leaderboard.md, and logged as an error; the other trials' rows are kept. The caller
    decides the exit status (the evaluate stage fails when ``board["failed"]`` is not empty). A baseline
    that cannot be computed is left out, with the reason in ``board["notes"]``. ``evaluate.judge=served``: the
    judge's server runs for the sweep and the baselines, and is stopped after them (:func:`judge_service`)."""
    cfg = _absolute_datasets(cfg)
    ev = cfg.evaluate
    if ev.engine not in ENGINES:
        raise ValueError(f"evaluate.engine={ev.engine!r} is not one of {ENGINES}")
    if ev.engine == "vllm":  # before any trial starts: every trial would fail the same way
        from sarlang_ray.vllm_engine import require_vllm

        require_vllm("evaluate.engine=vllm")
    with judge_service(cfg) as (cfg, judge_info):
        board = _sweep(cfg, judge_info)
    return board


def judge_name(cfg: WorkflowConfig) -> str | None:
    """The judge's model name as the leaderboard shows it (None: no judge)."""
    ev = cfg.evaluate
    if ev.judge == "openai":
        return cfg.annotate.openai.model
    if ev.judge in ("embedding", "served"):
        from sarlang_ray.judge import served_name

        assert ev.judge_model is not None  # the config check requires it for these judges
        return served_name(ev.judge_model)
    return None


@contextlib.contextmanager
def judge_service(cfg: WorkflowConfig):
    """``evaluate.judge=served``: serve ``evaluate.judge_model`` (:func:`sarlang_ray.judge.served_judge`) for
    the block and yield a copy of ``cfg`` whose ``annotate.openai`` points at it, with the judge's description
    (name, url; ``requests`` filled in after the block). Any other judge: ``cfg`` as it is."""
    ev = cfg.evaluate
    if ev.judge != "served":
        yield cfg, ({"kind": ev.judge, "name": judge_name(cfg)} if ev.judge != "off" else None)
        return
    import copy

    from sarlang_ray import judge

    info: dict[str, Any] = {"kind": ev.judge, "name": judge_name(cfg)}
    assert ev.judge_model is not None  # the config check requires it for judge=served
    with judge.served_judge(
        ev.judge_model, dtype=ev.dtype, num_cpus=ev.judge_num_cpus, num_gpus=ev.judge_num_gpus
    ) as served:
        out = copy.deepcopy(cfg)
        o = out.annotate.openai
        o.base_url, o.model, o.api_key_env = (
            served["base_url"],
            served["model"],
            "SARLANG_SERVED_JUDGE_KEY_UNUSED",
        )
        o.temperature, o.max_tokens = 0.0, 8
        info.update(name=served["model"], url=served["base_url"], model_path=ev.judge_model)
        info["_stats_url"] = served["stats_url"]
        yield out, info


def _judge_requests(info: dict | None) -> None:
    """The served judge's own count of the requests it answered (before it is stopped)."""
    url = info.pop("_stats_url", None) if info is not None else None
    if info is not None and url:
        import requests

        try:
            info["requests"] = requests.get(url, timeout=30).json()["requests"]
        except (requests.RequestException, ValueError, KeyError) as exc:
            info["requests"] = None
            log.warning("evaluate: cannot read the judge server's request count at %s: %s", url, exc)


def _sweep(cfg: WorkflowConfig, judge_info: dict | None) -> dict:
    from ray import tune

    ev = cfg.evaluate
    notes = prepare_datasets(cfg)
    table = read_split(cfg, ev.split, META)
    storage_fs, storage = io.arrow_filesystem(ev.storage_path or io.join(cfg.run.run_dir, "evaluate", "tune"))
    space = {
        "model": tune.grid_search(list(ev.models)),
        "image": tune.grid_search(list(ev.images)),
        "prompt": tune.grid_search([prompt_dict(p) for p in ev.prompts]),
    }
    # a trial only drives its Ray Data actor pool, which holds the CPUs/GPUs: the trial itself asks for little
    # Trials run one after another in the same few processes (reuse_actors): the imports and METEOR's Java
    # process (5 s to load its paraphrase table) are paid once per process, not once per grid point.
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, cfg=cfg), {"cpu": 0.01}),
        param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=ev.max_concurrent_trials, reuse_actors=True),
        run_config=tune.RunConfig(
            name="sweep", storage_path=storage, storage_filesystem=storage_fs, verbose=0
        ),
    )
    with reaper.sigint_kept():
        grid = tuner.fit()
    rows, failed = [], []
    for trial in range(len(grid)):  # a ResultGrid is a sequence (__len__, __getitem__), not declared iterable
        result = grid[trial]
        trial_metrics = result.metrics or {}
        if result.error is not None or "n_pairs" not in trial_metrics:
            failed.append(failed_trial(result))
            f = failed[-1]
            log.error(
                "evaluate: trial %s / %s / %s failed: %s: %s",
                f["model"],
                f["image"],
                f["prompt"],
                f["error_class"],
                f["error"],
            )
            continue
        rows.append(
            {
                k: v
                for k, v in trial_metrics.items()
                if not k.startswith(
                    (
                        "time",
                        "timestamp",
                        "training_iteration",
                        "date",
                        "pid",
                        "hostname",
                        "node_ip",
                        "done",
                        "trial_id",
                        "experiment",
                        "iterations",
                        "config",
                    )
                )
            }
        )
    baselines, baseline_notes = baseline_rows(cfg, table)
    notes += baseline_notes
    _judge_requests(judge_info)
    for note in notes:
        log.warning("evaluate: %s", note)
    return write_leaderboard(cfg, rows + baselines, failed, notes, judge_info)


def _absolute_datasets(cfg: WorkflowConfig) -> WorkflowConfig:
    """A copy of ``cfg`` whose local dataset paths are absolute: Tune runs each trial in its own folder."""
    import copy
    import os

    out = copy.deepcopy(cfg)
    for key in ("dataset", "train_dataset"):
        value = getattr(out.evaluate, key)
        if value and value != "export" and not io.is_remote(value) and not os.path.isabs(value):
            setattr(out.evaluate, key, os.path.abspath(value))
    return out


def caption_sets(cfg: WorkflowConfig) -> dict[str, str]:
    """How the leaderboard names the two caption test sets: ``concise``/``detailed`` on our export; on the
    SARLANG-1M release ``concise (Caption_test1.csv)`` and ``complex (Caption_test.csv)``, as the paper."""
    names = {"concise": "concise", "detailed": "detailed"}
    if dataset_kind(cfg) == "export":
        return names
    try:
        sources = set(read_split(cfg, cfg.evaluate.split, ["kind", "source"])["source"].to_pylist())
    except (FileNotFoundError, KeyError, pa.ArrowInvalid):
        return names
    if "complex" in sources:
        names["detailed"] = "complex (Caption_test.csv)"
    if "concise" in sources and "complex" in sources:
        names["concise"] = "concise (Caption_test1.csv)"
    return names


def _rank_key(cfg: WorkflowConfig):
    mode = vqa_mode(cfg)
    return lambda r: -(r.get(f"vqa_{mode}") or 0.0)


def write_leaderboard(
    cfg: WorkflowConfig,
    rows: list[dict],
    failed: list[dict],
    notes: Sequence[str] = (),
    judge: dict | None = None,
) -> dict:
    """evaluate/leaderboard.{json,csv,md} and plots/{vqa_per_application,captions}.png."""
    import pandas as pd

    out = io.join(cfg.run.run_dir, "evaluate")
    rows = sorted(rows, key=_rank_key(cfg))
    mode = vqa_mode(cfg)
    board = {
        "split": cfg.evaluate.split,
        "vqa_mode": mode,
        "dataset": dataset_label(cfg),
        "caption_sets": caption_sets(cfg),
        "rows": rows,
        "failed": failed,
        "notes": list(notes),
        "paper": paper_results(),
        "judge": judge,
        "plots": [io.join(out, "plots", "vqa_per_application.png"), io.join(out, "plots", "captions.png")],
    }
    io.write_json_atomic(io.join(out, "leaderboard.json"), board)
    flat = pd.json_normalize(rows, sep=".")
    io.write_bytes_atomic(io.join(out, "leaderboard.csv"), flat.to_csv(index=False).encode())
    io.write_bytes_atomic(io.join(out, "leaderboard.md"), format_leaderboard(board).encode())
    _plots(rows, mode, out)
    return board


def paper_results() -> dict:
    with open(os.path.join(os.path.dirname(__file__), "paper_results.json")) as f:
        return json.load(f)


def _fmt(value, pct: bool = False) -> str:
    if value is None or value != value:  # noqa: PLR0124 - NaN is the one value unequal to itself
        return "-"
    return f"{100 * value:.1f}" if pct else f"{value:.3f}"


def format_leaderboard(board: dict) -> str:
    """The leaderboard as Markdown: VQA accuracy overall and per application (the paper's seven; image
    description is scored by its captions' CIDEr), the caption metrics per test set, failed trials, notes
    (baselines left out), then the paper's published numbers apart."""
    mode = board["vqa_mode"]
    # beside a judged ranking: the same rule without the judge
    other = "strict" if mode == "sarlang1m" else "sarlang1m"
    judge = board.get("judge") or {}
    judged = mode != "judge" and any(r.get("vqa_judge") is not None for r in board["rows"])
    sets = board.get("caption_sets") or {"concise": "concise", "detailed": "detailed"}
    present = {a for r in board["rows"] for a in r.get(f"vqa_{mode}_per_application", {})}
    apps = [a for a in APPLICATIONS[1:]] + sorted(present - set(APPLICATIONS[1:]))
    desc = f"image description (CIDEr {sets['detailed'].split(' ')[0]} / {sets['concise'].split(' ')[0]})"
    label = lambda m: f"VQA % (judged by {judge.get('name')})" if m == "judge" else f"VQA % ({m})"
    head = [
        "#",
        "model",
        "image",
        "prompt",
        label(mode),
        label(other),
        *([label("judge")] if judged else []),
        desc,
        *apps,
    ]
    where = f" of {board['dataset']}" if board.get("dataset") else ""
    lines = [
        f"## Leaderboard ({board['split']} split{where}; VQA rule `{mode}`; captions with PTB tokenisation)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for i, r in enumerate(board["rows"], 1):
        per_app = r.get(f"vqa_{mode}_per_application", {})
        cider = f"{_fmt(r.get('detailed_cider_tok'))} / {_fmt(r.get('concise_cider_tok'))}"
        cells = [
            str(i),
            str(r["model"]),
            str(r["image"]),
            str(r["prompt"]),
            _fmt(r.get(f"vqa_{mode}"), True),
            _fmt(r.get(f"vqa_{other}"), True),
            *([_fmt(r.get("vqa_judge"), True)] if judged else []),
            cider,
            *[_fmt(per_app.get(a), True) for a in apps],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    caption_rows = [
        (r, kind)
        for r in board["rows"]
        for kind in ("detailed", "concise")
        if r.get(f"{kind}_cider_tok") is not None
    ]
    if caption_rows:
        lines += [
            "",
            (
                "### Captions (one row per model and test set; PTB-tokenised, raw CIDEr as SARLANG-1M's "
                "script in the last column)"
            ),
            "",
            (
                "| model | test set | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | METEOR | ROUGE-L | CIDEr "
                "| CIDEr (raw) |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r, kind in caption_rows:
            cells = [
                str(r["model"]),
                sets[kind],
                *[_fmt(r.get(f"{kind}_{m}_tok")) for m in CAPTION_METRICS],
                _fmt(r.get(f"{kind}_cider_raw")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if judge:
        lines += [
            "",
            f"Judge: `{judge.get('name')}` (evaluate.judge={judge.get('kind')}"
            + (
                f", served at {judge['url']} for this sweep, {judge.get('requests')} requests answered"
                if judge.get("url")
                else ""
            )
            + "); per row, `judge_calls` in leaderboard.json counts the answers the rules left undecided "
            "that went to it.",
        ]
    lines += sarchat_section(board["rows"])
    if board["failed"]:
        lines += ["", "### Failed trials", ""] + [
            f"- {f['model']} / {f['image']} / {f['prompt']}: {f.get('error_class', 'Error')}: {f['error']}"
            for f in board["failed"]
        ]
    if board.get("notes"):
        lines += ["", "### Notes", ""] + [f"- {n}" for n in board["notes"]]
    paper = board["paper"]
    lines += [
        "",
        "### Published SARLANG-1M numbers (for comparison; not computed here)",
        "",
        "The paper (arXiv 2504.03254) scores VQA with a GPT-4o-mini judge after the substring rule,",
        "on its own test set: compare with the `sarlang1m` column (the same rule without the judge,",
        "a lower bound) on the release's test split. Sources and caveats: `sarlang_ray/paper_results.json`.",
        "",
        "| model | setting | VQA % overall | source |",
        "|---|---|---|---|",
    ]
    for r in paper.get("vqa", []):
        lines.append(
            f"| {r['model']} | {r.get('setting', '')} | {r.get('overall', '-')} | "
            f"{r.get('source_ref', '').split(' (')[0]} |"
        )
    if paper.get("captions"):
        lines += [
            "",
            "Published captioning CIDEr, x100 (ours above is x1: multiply by 100 to compare):",
            "",
            "| model | setting | test set | CIDEr x100 | source |",
            "|---|---|---|---|---|",
        ]
        for r in paper["captions"]:
            lines.append(
                f"| {r['model']} | {r.get('setting', '')} | {r.get('test_set', '')} | {r.get('cider', '-')} "
                "| "
                f"{r.get('source_ref', '').split(' (')[0]} |"
            )
    return "\n".join(lines) + "\n"


def sarchat_section(rows: list[dict]) -> list[str]:
    """The leaderboard's SARChat-Bench-2M section (Markdown lines; none when no row has SARChat scores): one
    column per task as its authors score it, the box answers' parse failures per model."""
    from sarlang_ray import release

    scored = [r for r in rows if r.get("sarchat")]
    if not scored:
        return []
    head = [
        "model",
        "image",
        "prompt",
        *[f"{t} (CIDEr)" if t == "description" else f"{t} %" for t in release.SARCHAT_TASKS],
        "box parse failures",
    ]
    lines = [
        "",
        (
            "### SARChat-Bench-2M (classification, identification: accuracy; counting: exact; grounding, "
            "referring: "
            "box IoU >= 0.5; description: CIDEr, PTB-tokenised)"
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in scored:
        sc, n = r["sarchat"], r.get("sarchat_n", {})
        cells = [str(r["model"]), str(r["image"]), str(r["prompt"])]
        cells += [
            (_fmt(sc.get(t)) if t == "description" else _fmt(sc.get(t), True))
            + (f" (n={n[t]})" if t in n else "")
            for t in release.SARCHAT_TASKS
        ]
        fails = r.get("box_failures") or {}
        cells.append(
            f"{r.get('box_parse_failures', 0)} of {r.get('box_pairs', 0)}"
            + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(fails.items())) + ")" if fails else "")
        )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _plots(rows: list[dict], mode: str, out: str) -> None:
    import numpy as np

    plt = plots.pyplot()

    def save(fig, name):
        plots.save_png(fig, io.join(out, "plots", name))

    labels = [
        f"{r['model'].rstrip('/').rsplit('/', 1)[-1][:28]} / {r['image']} / {r['prompt']}" for r in rows
    ]
    apps = sorted({a for r in rows for a in r.get(f"vqa_{mode}_per_application", {})})
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(apps) + 2), 3.8))
    width = 0.8 / max(1, len(rows))
    for i, (r, label) in enumerate(zip(rows, labels)):
        per = r.get(f"vqa_{mode}_per_application", {})
        ax.bar(np.arange(len(apps)) + i * width, [100 * per.get(a, 0) for a in apps], width, label=label)
    ax.set_xticks(np.arange(len(apps)) + 0.4 - width / 2, apps, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"VQA accuracy % ({mode})")
    if rows:
        plots.legend_outside(ax, fontsize=7)
    save(fig, "vqa_per_application.png")
    names = ["bleu_1", "bleu_4", "meteor", "rouge_l", "cider"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, kind in zip(axes, ("concise", "detailed")):
        for i, (r, label) in enumerate(zip(rows, labels)):
            ax.bar(
                np.arange(len(names)) + i * width,
                [r.get(f"{kind}_{n}_tok") or 0 for n in names],
                width,
                label=label,
            )
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
        ax.set_title(f"{kind} captions")
    if rows:
        plots.legend_outside(axes[1], fontsize=7)
    save(fig, "captions.png")
