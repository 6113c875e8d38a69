"""Hand a test split to the harnesses people already use, scored with our metrics.

:func:`export_bench` (``sarlang export-bench``) writes the pairs that ``sarlang evaluate`` scores (the split
``evaluate.split`` of ``evaluate.dataset``: our export, an imported release, a LLaMA-Factory JSON; the same
selection: every VQA pair, one caption prompt per image and caption set) in two forms:

* an **lmms-eval task** (``lmms_eval/<name>/``): ``<name>.yaml`` (``dataset_path: parquet`` with
  ``data_files`` beside it, ``doc_to_visual`` / ``doc_to_text`` / ``doc_to_target``, ``process_results`` and
  one ``metric_list`` entry per metric with its aggregation), ``utils.py`` (those hooks; the aggregations call
  :func:`sarlang_ray.evaluate.score`, so a model scores the same in lmms-eval as in ``sarlang evaluate``),
  ``<name>.parquet`` (one row per sample) and ``images/`` (each image once). Run: ``lmms-eval --model ...
  --tasks <name> --include_path <out>/lmms_eval``.
* a **VLMEvalKit TSV** (``vlmevalkit/<name>.tsv``): ``index``, ``image`` (base64; a row whose image already
  appeared holds that row's index instead, VLMEvalKit's own space saving), ``question`` (the prompt the model
  sees), ``answer``, ``category`` (the application), ``l2-category`` (question type), ``split``, and our
  ``pair_id``, ``tile_id``, ``kind``, ``raw_question``, ``references`` (JSON), ``source``. VLMEvalKit treats
  an unknown TSV in ``$LMUData`` with a ``question`` column and no ``A``/``B`` columns as a custom VQA
  dataset: ``LMUData=<out>/vlmevalkit python run.py --data <name> --model ... --mode infer``; its prediction
  file keeps every column but ``image``, and :func:`score_predictions` (``sarlang score-bench FILE``) scores
  it.

The prompts are ``evaluate.prompts``' first entry (the paper's by default), as ``sarlang evaluate`` asks them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from sarlang_ray import evaluate, io
from sarlang_ray.config import WorkflowConfig

TSV_COLUMNS = [
    "index",
    "image",
    "question",
    "answer",
    "category",
    "l2-category",
    "split",
    "pair_id",
    "tile_id",
    "kind",
    "raw_question",
    "references",
    "source",
    "image_name",
    "task",
    "box_size",
]


def bench_name(cfg: WorkflowConfig) -> str:
    name = cfg.bench.name or f"sarlang_{cfg.name}_{cfg.evaluate.split}"
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def prompt_text(prompt: dict, kind: str, question: str) -> str:
    """What the model is asked for a pair (as :class:`sarlang_ray.evaluate.Predictor` asks it)."""
    if kind == "caption_concise":
        return prompt["caption"]
    if kind == "caption_detailed":
        return prompt["detailed"]
    return prompt["vqa"].format(question=str(question).rstrip("?. "))


def _image_stream(cfg: WorkflowConfig, pairs: list[dict]) -> Iterator[tuple[str, str, bytes]]:
    """(pair_id, image file name, bytes) for the pairs, one file of the split at a time (export: the split's
    image column; tables: ``image_uri`` or the embedded bytes): the split's images never sit in memory
    together."""
    import pyarrow.compute as pc

    wanted = pa.array([p["pair_id"] for p in pairs], pa.string())
    export = evaluate.dataset_kind(cfg) == "export"
    columns = ["pair_id", "tile_id", "image"] if export else ["pair_id", "image_uri", "image"]
    for table in evaluate.iter_split(cfg, cfg.evaluate.split, columns):
        table = table.filter(pc.is_in(table["pair_id"], wanted))
        image = table["image"].combine_chunks()
        # bytes made row by row: pairs repeat them
        paths, blobs = (
            image.field("path").to_pylist(),
            image.field("bytes"),
        )
        for i, (pid, key) in enumerate(zip(table["pair_id"].to_pylist(), table[columns[1]].to_pylist())):
            if export:
                yield pid, paths[i] or f"{key}.png", blobs[i].as_py()
            elif key:  # image_uri
                yield pid, key.rsplit("/", 1)[-1], io.read_bytes(key)
            elif image[i].is_valid and blobs[i].is_valid:
                yield pid, paths[i] or f"{pid}.png", blobs[i].as_py()
            else:
                raise FileNotFoundError(f"pair {pid} has neither an image_uri nor embedded image bytes")


def bench_samples(cfg: WorkflowConfig) -> list[dict]:
    """The samples a harness gets: one per pair ``sarlang evaluate`` scores, in its order (images apart)."""
    cfg = evaluate._absolute_datasets(cfg)
    evaluate.prepare_datasets(cfg)
    table = evaluate.read_split(cfg, cfg.evaluate.split, evaluate.META)
    limit = cfg.bench.limit_pairs or cfg.evaluate.limit_pairs
    pairs = evaluate.select_pairs(table, limit)
    refs = evaluate.caption_refs(table)
    sources = {}
    if evaluate.dataset_kind(cfg) != "export":
        t = evaluate.read_split(cfg, cfg.evaluate.split, ["pair_id", "source"])
        sources = dict(zip(t["pair_id"].to_pylist(), t["source"].to_pylist()))
    tasks = evaluate.pair_tasks(cfg)
    sizes = _box_sizes(cfg, pairs)
    prompt = evaluate.prompt_dict(cfg.evaluate.prompts[0])
    samples = []
    for i, p in enumerate(pairs):
        caption = p["kind"] in evaluate.CAPTION_KINDS
        samples.append(
            {
                "index": i,
                **{k: p[k] for k in evaluate.META},
                "prompt": prompt_text(prompt, p["kind"], p["question"]),
                "references": refs[(p["tile_id"], p["kind"])] if caption else [p["answer"]],
                "source": sources.get(p["pair_id"], "export"),
                "task": tasks.get(p["pair_id"], ""),
                "box_size": json.dumps(sizes[p["pair_id"]]) if p["pair_id"] in sizes else "",
            }
        )
    return samples


def _box_sizes(cfg: WorkflowConfig, pairs: list[dict]) -> dict[str, list[int]]:
    """pair_id -> [width, height] of the images of the box-answer pairs (scored by IoU, which needs the
    size)."""
    import io as _io

    from PIL import Image

    from sarlang_ray import boxes

    wanted = [
        p for p in pairs if p["kind"] not in evaluate.CAPTION_KINDS and boxes.is_box_answer(p["answer"])
    ]
    sizes = {}
    for pid, _, data in _image_stream(cfg, wanted) if wanted else ():
        with Image.open(_io.BytesIO(data)) as im:
            sizes[pid] = [im.width, im.height]
    return sizes


def scoring_context(rows: list[dict]) -> dict:
    """:func:`sarlang_ray.evaluate.score`'s context from exported samples (their ``task`` and
    ``box_size``)."""
    sizes = {r["pair_id"]: tuple(json.loads(r["box_size"])) for r in rows if r.get("box_size")}
    return {"tasks": {r["pair_id"]: r["task"] for r in rows if r.get("task")}, "sizes": sizes}


def _metric_keys(samples: list[dict], mode: str) -> list[tuple[str, str]]:
    """(lmms-eval metric name, key into :func:`sarlang_ray.evaluate.score`'s result) for what the samples
    hold."""
    keys = []
    if any(s["kind"] not in evaluate.CAPTION_KINDS for s in samples):
        keys += [("vqa_strict", "vqa_strict"), ("vqa_sarlang1m", "vqa_sarlang1m")]
        apps = sorted({s["application"] for s in samples if s["kind"] not in evaluate.CAPTION_KINDS})
        keys += [
            (
                f"vqa_{mode}_{re.sub(r'[^a-z0-9]+', '_', a.lower()).strip('_')}",
                f"vqa_{mode}_per_application|{a}",
            )
            for a in apps
        ]
    for kind, short in evaluate.CAPTION_KINDS.items():
        if any(s["kind"] == kind for s in samples):
            keys += [(f"{short}_{m}", f"{short}_{m}_tok") for m in evaluate.CAPTION_METRICS]
    from sarlang_ray.release import (
        SARCHAT_TASKS,  # SARChat-Bench: one metric per task, scored as `sarlang evaluate`
    )

    tasks = {s.get("task") for s in samples}
    keys += [(f"sarchat_{t}", f"sarchat|{t}") for t in SARCHAT_TASKS if t in tasks]
    return keys


UTILS_TEMPLATE = '''"""lmms-eval hooks of the task {name!r}, written by `sarlang export-bench` (sarlang-ray).

The aggregations score with sarlang-ray's own code (sarlang_ray.harness.aggregate ->
sarlang_ray.evaluate.score: captions by pycocoevalcap with PTB tokenisation, VQA by the strict and sarlang1m
rules), so a model scores the same here as in `sarlang evaluate`. Install sarlang-ray in the lmms-eval
environment.
"""

import os

from PIL import Image

TASK_DIR = os.path.dirname(os.path.abspath(__file__))
FIELDS = (
    "pair_id", "tile_id", "kind", "application", "question_type", "question", "answer", "task", "box_size"
)
# lmms-eval metric -> key of sarlang_ray.evaluate.score's result ("a|b": per-application entry b of a)
METRICS = {metrics!r}


def doc_to_visual(doc):
    with Image.open(os.path.join(TASK_DIR, doc["image_path"])) as image:
        return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {{}}
    return f"{{kwargs.get('pre_prompt', '')}}{{doc['prompt']}}{{kwargs.get('post_prompt', '')}}"


def process_results(doc, results):
    item = {{k: doc.get(k, "") for k in FIELDS}}
    item["references"] = list(doc["references"])
    item["prediction"] = results[0] if results else ""
    return {{name: item for name in METRICS}}


def _metric(items, name):
    from sarlang_ray.harness import aggregate  # scored once per set of predictions, whichever hook asks first

    return aggregate(items, METRICS[name])

'''


def _yaml(name: str, metrics: list[tuple[str, str]], cfg: WorkflowConfig, n: int) -> str:
    ev = cfg.evaluate
    metric_list = "\n".join(
        f"  - metric: {m}\n    aggregation: !function utils.agg_{m}\n    higher_is_better: true"
        for m, _ in metrics
    )
    return f"""# lmms-eval task written by `sarlang export-bench` (sarlang-ray): {n} samples,
# the {ev.split} split of {evaluate.dataset_label(cfg)}. Run:
#   lmms-eval --model <model> --model_args pretrained=<hub name> --tasks {name} \\
#     --include_path <this folder's parent>
# Scoring calls sarlang-ray's metrics (utils.py): install sarlang-ray in the lmms-eval environment.
task: {name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {name}.parquet
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max(3 * ev.max_new_tokens_caption, ev.max_new_tokens_answer)}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
{metric_list}
metadata:
  version: 1.0
  source: sarlang-ray export-bench
"""


def export_bench(cfg: WorkflowConfig) -> dict:
    """Write the evaluated split as an lmms-eval task and a VLMEvalKit TSV (``bench.formats``) under
    ``bench.out_dir``; returns the manifest (also ``manifest.json``): samples, files, per-application
    counts."""
    cfg = evaluate._absolute_datasets(cfg)
    samples = bench_samples(cfg)
    if not samples:
        raise ValueError(
            f"the {cfg.evaluate.split} split of {evaluate.dataset_label(cfg)} has no pairs to export"
        )
    name = bench_name(cfg)
    out = cfg.bench.out_dir or io.join(cfg.run.run_dir, "bench")
    with tempfile.TemporaryDirectory(prefix="sarlang-bench-") as staged:
        return _write_bench(cfg, samples, name, out, Path(staged))


def _write_bench(cfg: WorkflowConfig, samples: list[dict], name: str, out: str, staged: Path) -> dict:
    """export_bench's files. Each image once, under a name unique to its bytes, staged in a local folder as
    the split's files stream by (only their digests are kept), then copied to the lmms-eval task and read back
    for the TSV, row by row."""
    names: dict[str, str] = {}  # pair_id -> file name
    digests: dict[str, str] = {}  # file name -> sha1 of its bytes
    for pid, base, data in _image_stream(cfg, samples):
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip(".") or f"{pid}.png"  # a plain file name
        stem, _, ext = base.rpartition(".")
        digest = hashlib.sha1(data).hexdigest()
        candidate, k = base, 1
        while candidate in digests and digests[candidate] != digest:
            k += 1
            candidate = f"{stem}-{k}.{ext}"
        if candidate not in digests:
            digests[candidate] = digest
            (staged / candidate).write_bytes(data)
        names[pid] = candidate
    missing = [s["pair_id"] for s in samples if s["pair_id"] not in names]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} pairs of the {cfg.evaluate.split} split have no image, e.g. {missing[:3]}"
        )
    manifest: dict[str, Any] = {
        "name": name,
        "split": cfg.evaluate.split,
        "dataset": evaluate.dataset_label(cfg),
        "samples": len(samples),
        "images": len(digests),
        "applications": _counts(s["application"] for s in samples),
        "kinds": _counts(s["kind"] for s in samples),
        "files": {},
    }
    if "lmms_eval" in cfg.bench.formats:
        task_dir = io.join(out, "lmms_eval", name)
        mode = evaluate.vqa_mode(cfg)
        metrics = _metric_keys(samples, mode if mode in ("strict", "sarlang1m") else "sarlang1m")
        rows = [
            {
                **{
                    k: s[k]
                    for k in ("index", *evaluate.META, "prompt", "references", "source", "task", "box_size")
                },
                "image_path": f"images/{names[s['pair_id']]}",
            }
            for s in samples
        ]
        io.write_parquet_atomic(io.join(task_dir, f"{name}.parquet"), pa.Table.from_pylist(rows))
        for fname in digests:
            io.write_bytes_atomic(io.join(task_dir, "images", fname), (staged / fname).read_bytes())
        utils = UTILS_TEMPLATE.format(name=name, metrics=dict(metrics)) + "".join(
            f"\ndef agg_{m}(items):\n    return _metric(items, {m!r})\n" for m, _ in metrics
        )
        io.write_bytes_atomic(io.join(task_dir, "utils.py"), utils.encode())
        io.write_bytes_atomic(
            io.join(task_dir, f"{name}.yaml"), _yaml(name, metrics, cfg, len(samples)).encode()
        )
        manifest["files"]["lmms_eval"] = {
            "task_dir": task_dir,
            "yaml": io.join(task_dir, f"{name}.yaml"),
            "metrics": [m for m, _ in metrics],
            "run": f"lmms-eval --model <model> --tasks {name} --include_path {io.join(out, 'lmms_eval')}",
        }
    if "vlmevalkit" in cfg.bench.formats:
        tsv = io.join(out, "vlmevalkit", f"{name}.tsv")
        io.write_stream_atomic(
            tsv, (chunk.encode() for chunk in vlmevalkit_tsv(samples, staged, names, cfg.evaluate.split))
        )
        manifest["files"]["vlmevalkit"] = {
            "tsv": tsv,
            "run": f"LMUData={io.join(out, 'vlmevalkit')} python run.py --data {name} "
            "--model <model> --mode infer   # then: sarlang score-bench <prediction file>",
        }
    io.write_json_atomic(io.join(out, "manifest.json"), manifest)
    return manifest


def _counts(values) -> dict:
    out: dict = defaultdict(int)
    for v in values:
        out[v] += 1
    return dict(sorted(out.items()))


def vlmevalkit_tsv(
    samples: list[dict], images: Path, names: dict, split: str, chunk_bytes: int = 1 << 20
) -> Iterator[str]:
    """The VLMEvalKit TSV text in chunks of rows of about ``chunk_bytes`` of base64 each (the header first):
    one row per sample; an image's first row holds its base64 (read from the folder ``images``, by its name in
    ``names``), later rows of the same image hold that row's index (VLMEvalKit resolves image values of 64
    characters or fewer as an index)."""
    import pandas as pd

    first: dict[str, int] = {}
    rows, size, header = [], 0, True
    for i, s in enumerate(samples):
        name = names[s["pair_id"]]
        if name in first:
            image = str(first[name])
        else:
            first[name] = s["index"]
            image = base64.b64encode((images / name).read_bytes()).decode()
        size += len(image)
        rows.append(
            {
                "index": s["index"],
                "image": image,
                "question": s["prompt"],
                "answer": s["answer"],
                "category": s["application"],
                "l2-category": s["question_type"],
                "split": split,
                "pair_id": s["pair_id"],
                "tile_id": s["tile_id"],
                "kind": s["kind"],
                "raw_question": s["question"],
                "references": json.dumps(s["references"]),
                "source": s["source"],
                "image_name": name,
                "task": s.get("task", ""),
                "box_size": s.get("box_size", ""),
            }
        )
        if size >= chunk_bytes or i == len(samples) - 1:
            yield pd.DataFrame(rows, columns=TSV_COLUMNS).to_csv(sep="\t", index=False, header=header)
            rows, size, header = [], 0, False


# ---------------------------------------------------------------------------------------------------------
# scoring a harness's predictions with our metrics

_SCORES: dict[tuple, dict] = {}


def aggregate(items: list[dict], key: str) -> float:
    """One metric of :func:`sarlang_ray.evaluate.score` over lmms-eval's ``process_results`` items (the
    exported task's aggregations call this). ``key``: a key of the score, or ``group|entry``
    (``vqa_sarlang1m_per_application| others``). The score is computed once per set of predictions: lmms-eval
    loads utils.py anew for every ``!function``, so the cache lives here."""
    signature = tuple((i["pair_id"], i["prediction"]) for i in items)
    if signature not in _SCORES:
        pairs = [{k: i[k] for k in evaluate.META} for i in items]
        refs = {
            (i["tile_id"], i["kind"]): list(i["references"])
            for i in items
            if i["kind"] in evaluate.CAPTION_KINDS
        }
        _SCORES.clear()
        _SCORES[signature] = evaluate.score(
            pairs, {i["pair_id"]: i["prediction"] for i in items}, refs, None, scoring_context(items)
        )
    result = _SCORES[signature]
    if "|" in key:
        group, entry = key.split("|", 1)
        return float(result.get(group, {}).get(entry, 0.0))
    return float(result.get(key, 0.0))


def read_predictions(path: str) -> list[dict]:
    """Rows with ``pair_id``, ``tile_id``, ``kind``, ``application``, ``question_type``, ``question``,
    ``answer``, ``references`` and ``prediction`` from a harness's output: VLMEvalKit's prediction file
    (``.tsv``, ``.csv``, ``.xlsx``: the TSV's columns plus ``prediction``) or lmms-eval's ``--log_samples``
    file (``.jsonl``: our ``process_results`` items)."""
    import pandas as pd

    if path.endswith(".jsonl"):
        rows = []
        for line in io.read_bytes(path).decode().splitlines():
            if not line.strip():
                continue
            sample = json.loads(line)
            item = next(
                (v for v in sample.values() if isinstance(v, dict) and "pair_id" in v and "prediction" in v),
                None,
            )
            if item is None:
                raise ValueError(
                    f"{path}: a sample without a sarlang item (pair_id, prediction): was it written by the "
                    "task "
                    "`sarlang export-bench` made, with --log_samples?"
                )
            rows.append(item)
        return rows
    fs, p = io.filesystem(path)
    with fs.open(p, "rb") as f:
        if path.endswith(".xlsx"):
            df = pd.read_excel(f, dtype=str, keep_default_na=False)
        else:
            df = pd.read_csv(f, sep="\t" if path.endswith(".tsv") else ",", dtype=str, keep_default_na=False)
    missing = {"pair_id", "kind", "prediction", "answer"} - set(df.columns)
    if missing:
        raise ValueError(
            f"{path}: no column(s) {sorted(missing)}: give VLMEvalKit's prediction file for a TSV written by "
            "`sarlang export-bench` (it keeps the TSV's columns and adds prediction)"
        )
    rows = df.to_dict("records")
    for r in rows:
        r["application"], r["question_type"] = r.get("category", ""), r.get("l2-category", "")
        r["question"] = r.get("raw_question", r.get("question", ""))
        r["references"] = json.loads(r["references"]) if r.get("references") else [r["answer"]]
    return rows


def score_predictions(path: str) -> dict:
    """Our metrics (:func:`sarlang_ray.evaluate.score`) of a harness's prediction file."""
    rows = read_predictions(path)
    pairs = [{k: r.get(k, "") for k in evaluate.META} for r in rows]
    refs = {
        (r["tile_id"], r["kind"]): list(r["references"]) for r in rows if r["kind"] in evaluate.CAPTION_KINDS
    }
    return evaluate.score(
        pairs, {r["pair_id"]: r.get("prediction") or "" for r in rows}, refs, None, scoring_context(rows)
    )
