"""The test split for other harnesses: an lmms-eval task loaded by lmms-eval's own TaskManager, a VLMEvalKit
TSV read the way VLMEvalKit reads it, both with the samples ``sarlang evaluate`` scores, both scored with our
metrics."""

from __future__ import annotations

import base64
import importlib.util
import io as _io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO
from PIL import Image

from sarlang_ray import cli, evaluate, harness
from sarlang_ray.annotate.vocab import APPLICATIONS
from sarlang_ray.config import load_config

NAME = "sarlang_demo_test"


@pytest.fixture(scope="module")
def bench(demo_run, tmp_path_factory):
    """`sarlang export-bench` on the demo's test split: (config, manifest, the selection evaluate scores)."""
    cfg0, _ = demo_run
    out = tmp_path_factory.mktemp("bench")
    overrides = [f"run.run_dir={cfg0.run.run_dir}", f"bench.out_dir={out}", f"bench.name={NAME}"]
    assert cli.main(["export-bench", *overrides, "--json"]) == 0
    cfg = load_config(None, overrides)
    manifest = json.loads((out / "manifest.json").read_text())
    pairs = evaluate.select_pairs(evaluate.read_split(cfg, "test", evaluate.META), None)
    return cfg, manifest, pairs


def _export_images(cfg, pairs) -> dict[str, np.ndarray]:
    table = evaluate.read_split(cfg, "test", ["pair_id", "image"]).to_pylist()
    wanted = {p["pair_id"] for p in pairs}
    return {
        r["pair_id"]: np.asarray(Image.open(_io.BytesIO(r["image"]["bytes"])).convert("RGB"))
        for r in table
        if r["pair_id"] in wanted
    }


def _predictions(samples) -> dict[str, str]:
    """Right on every other VQA pair, empty on the rest, the first reference for captions: scores strictly
    between 0 and 1 that any mix-up of pairs, answers or references would change."""
    return {
        s["pair_id"]: (
            s["references"][0] if s["kind"] in evaluate.CAPTION_KINDS else s["answer"] if i % 2 else ""
        )
        for i, s in enumerate(samples)
    }


def test_the_lmms_eval_task_follows_the_documented_schema(bench):
    """What lmms-eval's docs (and its bundled tasks, e.g. chartqa.yaml) require of a task: a YAML with task,
    dataset_path + dataset_kwargs.data_files, test_split, output_type, the !function hooks and a metric_list
    whose aggregations exist; read here with a !function constructor that imports utils.py as lmms-eval does.
    """
    _cfg, manifest, pairs = bench
    task_dir = Path(manifest["files"]["lmms_eval"]["task_dir"])

    def function(loader, node):
        module_name, fn = loader.construct_scalar(node).rsplit(".", 1)
        spec = importlib.util.spec_from_file_location(module_name, task_dir / f"{module_name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return getattr(module, fn)

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", function)
    config = yaml.load((task_dir / f"{NAME}.yaml").read_text(), Loader=Loader)
    assert config["task"] == NAME and config["dataset_path"] == "parquet" and config["test_split"] == "test"
    assert config["output_type"] == "generate_until" and config["doc_to_target"] == "answer"
    assert all(callable(config[k]) for k in ("doc_to_visual", "doc_to_text", "process_results"))
    assert {m["metric"] for m in config["metric_list"]} >= {"vqa_strict", "vqa_sarlang1m", "concise_cider"}
    assert all(callable(m["aggregation"]) for m in config["metric_list"])
    rows = pd.read_parquet(task_dir / config["dataset_kwargs"]["data_files"]["test"])
    assert len(rows) == manifest["samples"] == len(pairs)
    assert list(rows["pair_id"]) == [p["pair_id"] for p in pairs]  # the same selection, in the same order


def test_the_lmms_eval_task_loads_with_lmms_evals_own_loader(bench, tmp_path, monkeypatch):
    lmms_tasks = pytest.importorskip(
        "lmms_eval.tasks",
        reason="lmms-eval is an optional dev dependency (pip install "
        "--no-deps lmms-eval, see docs/evaluate.md)",
    )
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg, manifest, pairs = bench
    manager = lmms_tasks.TaskManager(
        "WARNING",
        include_path=str(Path(manifest["files"]["lmms_eval"]["task_dir"]).parent),
        include_defaults=False,
    )
    task = lmms_tasks.get_task_dict([NAME], manager)[NAME]
    docs = list(task.test_docs())
    assert len(docs) == manifest["samples"] == len(pairs)

    images = _export_images(cfg, pairs)
    prompt = evaluate.prompt_dict(cfg.evaluate.prompts[0])
    for doc in docs[:40]:
        [visual] = task.doc_to_visual(doc)
        assert np.array_equal(np.asarray(visual), images[doc["pair_id"]])
        assert task.doc_to_text(doc) == harness.prompt_text(prompt, doc["kind"], doc["question"])
        assert task.doc_to_target(doc) == doc["answer"]
    predictions = _predictions(docs)
    results = [task.process_results(doc, [predictions[doc["pair_id"]]]) for doc in docs]
    scored = {m: fn([r[m] for r in results]) for m, fn in task.aggregation().items()}
    refs = evaluate.caption_refs(evaluate.read_split(cfg, "test", evaluate.META))
    ours = evaluate.score(pairs, predictions, refs)
    assert 0 < scored["vqa_strict"] < 1
    assert scored["vqa_strict"] == ours["vqa_strict"] and scored["vqa_sarlang1m"] == ours["vqa_sarlang1m"]
    assert (
        scored["concise_cider"] == ours["concise_cider_tok"]
        and scored["detailed_bleu_4"] == ours["detailed_bleu_4_tok"]
    )
    per_app = {m: v for m, v in scored.items() if m.startswith("vqa_strict_")}
    assert per_app and all(
        v == ours["vqa_strict_per_application"][m[len("vqa_strict_") :].replace("_", " ")]
        for m, v in per_app.items()
    )


def _vlmevalkit_load(tsv: Path) -> pd.DataFrame:
    """A TSV read as VLMEvalKit reads a custom dataset (vlmeval/smp/file.py load(): pd.read_csv(f, sep='\\t');
    vlmeval/dataset/__init__.py build_dataset(): a `question` column and no A/B columns is a CustomVQADataset;
    vlmeval/dataset/image_base.py ImageBaseDataset.__init__: index as str, an image value of 64 characters or
    fewer is the index of the row holding the image), at commit e8e78f05 of open-compass/VLMEvalKit, which
    does not install from PyPI."""
    data = pd.read_csv(tsv, sep="\t")
    # -> CustomVQADataset
    assert "question" in [c.lower() for c in data.columns] and not ("A" in data and "B" in data)
    data = data[~pd.isna(data["image"])]
    data["index"] = [str(x) for x in data["index"]]
    data["image"] = [str(x) for x in data["image"]]
    image_map = dict(zip(data["index"], data["image"]))
    for k, v in list(image_map.items()):
        if 0 < len(v) <= 64:
            assert v in image_map and len(image_map[v]) > 64
            image_map[k] = image_map[v]
    data["image"] = [image_map[k] for k in data["index"]]
    return data


def test_the_vlmevalkit_tsv_loads_as_vlmevalkit_reads_it_and_scores_with_our_metrics(bench, tmp_path, capsys):
    cfg, manifest, pairs = bench
    tsv = Path(manifest["files"]["vlmevalkit"]["tsv"])
    assert tsv.name == f"{NAME}.tsv"  # VLMEvalKit finds it as $LMUData/<dataset name>.tsv
    data = _vlmevalkit_load(tsv)
    assert len(data) == manifest["samples"] == len(pairs)
    assert list(data["pair_id"]) == [p["pair_id"] for p in pairs]
    assert set(data["category"]) <= set(APPLICATIONS) and data["index"].is_unique
    images = _export_images(cfg, pairs)
    for _, row in data.iterrows():  # vlmeval/smp/vlm.py decode_base64_to_image
        decoded = Image.open(_io.BytesIO(base64.b64decode(row["image"]))).convert("RGB")
        assert np.array_equal(np.asarray(decoded), images[row["pair_id"]])
    # each image once
    assert tsv.stat().st_size < sum(
        len(base64.b64encode(Image.fromarray(a).tobytes())) for a in images.values()
    )

    # VLMEvalKit's prediction file (PRED_FORMAT=tsv): every column but image, plus prediction
    predictions = _predictions(
        [{**p, "references": json.loads(r)} for p, r in zip(pairs, data["references"])]
    )
    preds = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False).drop(columns=["image"])
    preds["prediction"] = [predictions[p] for p in preds["pair_id"]]
    pred_file = tmp_path / f"tiny_{NAME}.tsv"
    preds.to_csv(pred_file, sep="\t", index=False)
    assert cli.main(["score-bench", str(pred_file)]) == 0
    scored = json.loads(capsys.readouterr().out)
    ours = evaluate.score(
        pairs, predictions, evaluate.caption_refs(evaluate.read_split(cfg, "test", evaluate.META))
    )
    assert 0 < scored["vqa_strict"] < 1
    for key in (
        "vqa_strict",
        "vqa_sarlang1m",
        "vqa_strict_per_application",
        "concise_cider_tok",
        "detailed_meteor_tok",
        "n_pairs",
    ):
        assert scored[key] == ours[key], key


def test_export_bench_writes_an_imported_release_too(tmp_path, capsys):
    """`sarlang export-bench workflows/sarlang1m.yaml` on an imported SARLANG-1M-style release: the same
    samples evaluate scores (VQA of the test split, one prompt per image and caption set), images read from
    the release."""
    from test_release import build_release

    built = build_release(tmp_path)
    pairs_uri = tmp_path / "pairs.parquet"
    assert cli.main(["import", str(built["root"]), str(pairs_uri), "--sardet", str(built["sardet"])]) == 0
    overrides = [
        f"run.run_dir={tmp_path / 'run'}",
        f"evaluate.dataset={pairs_uri}",
        f"bench.out_dir={tmp_path / 'bench'}",
    ]
    capsys.readouterr()
    assert cli.main(["export-bench", str(REPO / "workflows" / "sarlang1m.yaml"), *overrides]) == 0
    assert "sarlang1m_test" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "bench" / "manifest.json").read_text())
    # test VQA pairs, one prompt per image of Caption_test (2) and Caption_test1 (3)
    expected = built["vqa_test"] + 2 + 3
    assert manifest["samples"] == expected and manifest["kinds"] == {
        "caption_concise": 3,
        "caption_detailed": 2,
        "vqa": built["vqa_test"],
    }
    assert len(_vlmevalkit_load(tmp_path / "bench" / "vlmevalkit" / "sarlang1m_test.tsv")) == expected
    rows = pd.read_parquet(tmp_path / "bench" / "lmms_eval" / "sarlang1m_test" / "sarlang1m_test.parquet")
    assert len(rows) == expected and set(rows["source"]) == {"SARVQA1", "SARVQA2", "complex", "concise"}
    assert all(
        (tmp_path / "bench" / "lmms_eval" / "sarlang1m_test" / p).is_file() for p in rows["image_path"]
    )


def test_export_bench_holds_one_split_file_of_images_at_a_time(demo_run, tmp_path):
    """Nothing big through the driver: export-bench streams the split file by file (images staged on local
    disk, the TSV written in chunks), so its peak of Python allocations stays a fraction of the split's image
    bytes. It held them whole before: every pair's image (a row holds its tile's image), then the whole
    TSV."""
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg0, _ = demo_run
    src = Path(cfg0.run.run_dir) / "export" / "parquet" / "test"
    dst = tmp_path / "run" / "export" / "parquet" / "test"
    dst.mkdir(parents=True)
    rng = np.random.default_rng(0)
    table = pq.read_table(sorted(src.glob("*.parquet")))
    big: dict[str, bytes] = {}  # an incompressible 256 KB image per tile in place of the demo's
    for tid in table["tile_id"].to_pylist():
        if tid not in big:
            buf = _io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (512, 512), dtype=np.uint8)).save(buf, format="PNG")
            big[tid] = buf.getvalue()
    tids = table["tile_id"].to_pylist()
    images = pa.array(
        [{"bytes": big[t], "path": img["path"]} for t, img in zip(tids, table["image"].to_pylist())],
        table.schema.field("image").type,
    )
    table = table.set_column(table.schema.get_field_index("image"), "image", images)
    for k in range(0, len(table), 4):  # files of 4 pairs, as an export of many small shards has
        pq.write_table(table.slice(k, 4), dst / f"part-{k:04d}.parquet")
    held_before = sum(len(big[t]) for t in tids)  # what the old export-bench held: every row's image
    assert len(table) >= 100

    harness.export_bench(
        load_config(None, [f"run.run_dir={tmp_path / 'run'}", f"bench.out_dir={tmp_path / 'warm'}"])
    )
    cfg = load_config(None, [f"run.run_dir={tmp_path / 'run'}", f"bench.out_dir={tmp_path / 'bench'}"])
    tracemalloc.start()  # after a first run: the modules it imports on first use are not what is measured
    try:
        manifest = harness.export_bench(cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert manifest["images"] == len(big) and manifest["samples"] > 0
    data = _vlmevalkit_load(Path(manifest["files"]["vlmevalkit"]["tsv"]))
    for _, row in data.iterrows():
        assert base64.b64decode(row["image"]) == big[row["tile_id"]]
    lmms = Path(manifest["files"]["lmms_eval"]["task_dir"])
    assert {
        (lmms / p).read_bytes() for p in pd.read_parquet(lmms / f"{manifest['name']}.parquet")["image_path"]
    } == set(big.values())
    assert peak < 0.25 * held_before, (peak, held_before)
