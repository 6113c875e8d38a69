"""Evaluation: the Ray Tune sweep's leaderboard, its reference rows, failed trials, and the scoring glue."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sarlang_ray import evaluate, metrics, pipeline


def test_score_glue_matches_the_metrics_module():
    """score() keys captions per tile and kind, uses every reference, and computes VQA in both modes."""
    pairs = [
        {
            "pair_id": "a",
            "tile_id": "t1",
            "kind": "caption_concise",
            "application": "image description",
            "question_type": "c",
            "question": "",
            "answer": "two ships in a harbour",
        },
        {
            "pair_id": "b",
            "tile_id": "t2",
            "kind": "caption_concise",
            "application": "image description",
            "question_type": "c",
            "question": "",
            "answer": "a bridge over water",
        },
        {
            "pair_id": "c",
            "tile_id": "t1",
            "kind": "vqa",
            "application": "instance counting",
            "question_type": "counting/ship",
            "question": "How many ships?",
            "answer": "2",
        },
        {
            "pair_id": "d",
            "tile_id": "t2",
            "kind": "vqa",
            "application": "object identification",
            "question_type": "id/bridge",
            "question": "Is there a bridge?",
            "answer": "yes",
        },
    ]
    refs = {
        ("t1", "caption_concise"): ["two ships in a harbour", "ships moored at a quay"],
        ("t2", "caption_concise"): ["a bridge over water"],
    }
    preds = {"a": "two ships at a quay", "b": "a bridge over a river", "c": "12", "d": "Yes."}
    out = evaluate.score(pairs, preds, refs)
    direct = metrics.caption_scores(
        {"t1": refs[("t1", "caption_concise")], "t2": refs[("t2", "caption_concise")]},
        {"t1": preds["a"], "t2": preds["b"]},
        tokenize=True,
    )
    assert all(abs(out[f"concise_{k}_tok"] - v) < 1e-12 for k, v in direct.items())
    # "12" for 2: wrong in strict mode, right by the published substring rule; "Yes." right in both
    assert out["vqa_strict"] == 0.5 and out["vqa_sarlang1m"] == 1.0
    assert out["vqa_strict_per_application"] == {"instance counting": 0.0, "object identification": 1.0}
    assert out["vqa_sarlang1m_per_application"] == {"instance counting": 1.0, "object identification": 1.0}


def test_select_pairs_one_caption_prompt_per_tile_and_kind():
    import pyarrow as pa

    rows = [
        {
            "pair_id": f"p{i}",
            "tile_id": "t",
            "kind": k,
            "application": "x",
            "question_type": "q",
            "question": "",
            "answer": str(i),
        }
        for i, k in enumerate(["caption_concise", "caption_concise", "caption_detailed", "vqa", "vqa"])
    ]
    picked = evaluate.select_pairs(pa.Table.from_pylist(rows), None)
    assert [p["pair_id"] for p in picked] == ["p0", "p2", "p3", "p4"]
    assert len(evaluate.select_pairs(pa.Table.from_pylist(rows), 2)) == 2


@pytest.mark.slow
def test_leaderboard_files_baselines_and_summary(trained_run):
    cfg, summary = trained_run
    out = Path(cfg.run.run_dir) / "evaluate"
    board = json.loads((out / "leaderboard.json").read_text())
    models = [r["model"] for r in board["rows"]]
    assert set(models) == {
        "base",
        "finetuned",
        "majority answer (lower bound)",
        "template oracle (upper bound)",
    }
    assert models[0] == "template oracle (upper bound)"  # ranked by VQA accuracy
    oracle = board["rows"][0]
    assert oracle["vqa_strict"] == 1.0 and oracle["vqa_sarlang1m"] == 1.0
    assert 0 < oracle["concise_bleu_4_tok"] < 1  # a re-phrased caption, not a copy of the reference
    for r in board["rows"]:  # every metric of both caption sets, tokenised and raw
        for kind in ("concise", "detailed"):
            for name in evaluate.CAPTION_METRICS:
                assert 0 <= r[f"{kind}_{name}_tok"] and 0 <= r[f"{kind}_{name}_raw"], (r["model"], kind, name)
    header = (out / "leaderboard.csv").read_text().splitlines()[0]
    assert "vqa_strict" in header and "concise_cider_tok" in header
    assert (out / "leaderboard.md").read_text().count("\n| ") >= 4 + 2
    for png in board["plots"]:
        assert Path(png).read_bytes()[:4] == b"\x89PNG"
    test_pairs = evaluate.select_pairs(pq.read_table(evaluate.split_files(cfg, "test")), None)
    for model in ("base", "finetuned"):
        pred = pq.read_table(
            out / "predictions" / evaluate.prediction_name(model, "sar", "paper")
        ).to_pylist()
        assert sorted(p["pair_id"] for p in pred) == sorted(p["pair_id"] for p in test_pairs)
    text = pipeline.format_summary(summary)
    assert "## Leaderboard" in text and "plots: " in text and "majority answer" in text


def test_pool_cpus_leaves_a_read_share_only_when_the_pool_would_fill_the_cluster():
    from sarlang_ray import io

    assert io.pool_cpus(1, 1.0, 2.0) == 1.0  # fits beside its reads: as asked
    assert io.pool_cpus(2, 1.0, 2.0) == 0.875  # 2 x 1 CPU on 2 CPUs: 0.25 CPU stays free for reads
    assert io.pool_cpus(4, 1.0, 16.0) == 1.0
    assert io.pool_cpus(16, 1.0, 16.0) == round(15.75 / 16, 3)
    assert 2 * io.pool_cpus(2, 4.0, 2.0) + io.READ_SHARE <= 2.0


@pytest.mark.timeout(300)
def test_an_actor_pool_as_large_as_the_node_still_gets_its_reads(demo_run, tiny_vlm):
    """evaluate.concurrency=2 x num_cpus=1 on the 2-CPU test Ray: without the read share the actors held
    every CPU and the 0.1-CPU Parquet reads feeding them never ran (the dataset waited forever)."""
    from sarlang_ray import io
    from sarlang_ray.config import load_config

    cfg, _ = demo_run
    ev = load_config(
        None,
        [
            f"run.run_dir={cfg.run.run_dir}",
            "evaluate.concurrency=2",
            "evaluate.num_cpus=1",
            "evaluate.max_new_tokens_caption=4",
            "evaluate.max_new_tokens_answer=2",
            "ray.progress=false",
        ],
    )
    pairs = evaluate.select_pairs(
        io.read_parquet(evaluate.split_files(ev, "test"), columns=evaluate.META), 24
    )
    prompt = evaluate.prompt_dict(ev.evaluate.prompts[0])
    predictions = evaluate.predict(ev, tiny_vlm, "sar", prompt, pairs)
    assert sorted(predictions) == sorted(p["pair_id"] for p in pairs)


def _drop_column(folder: Path, column: str) -> None:
    """Rewrite every Parquet file under ``folder`` without ``column`` (a table written by another version)."""
    for f in folder.rglob("*.parquet"):
        table = pq.read_table(f)
        pq.write_table(table.drop_columns([column]), f)


@pytest.mark.slow
def test_a_failing_trial_is_listed_with_its_root_exception_and_the_sweep_goes_on(trained_run, tmp_path):
    """Two trials of four fail for their own reason: a model folder whose config.json is not JSON (the
    actor's constructor raises), and the optical variant on a tiles table written without optical_png (a
    Ray Data read task raises ArrowInvalid, which Ray wraps in UserCodeException whose message is only a
    retry hint). run_evaluate does not raise: the good trial and the baseline land, and each failure is
    listed with the root exception's class and message, in leaderboard.json and leaderboard.md. The sweep
    ranks by a local embedding judge (evaluate.judge=embedding), built inside the trial's process."""
    import shutil

    from sarlang_ray.config import load_config

    cfg, _ = trained_run
    run_dir = tmp_path / "run"
    for part in ("export", "align", "train"):
        shutil.copytree(Path(cfg.run.run_dir) / part, run_dir / part)
    _drop_column(run_dir / "align" / "shards", "optical_png")
    metrics_json = json.loads((run_dir / "train" / "metrics.json").read_text())
    good = metrics_json["merged_model"]
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    ev = load_config(
        None,
        [
            f"run.run_dir={run_dir}",
            f"train.model={cfg.train.model}",
            "ray.progress=false",
            f"evaluate.models=[{good},{broken}]",
            "evaluate.images=[sar,optical]",
            "evaluate.limit_pairs=16",
            "evaluate.baselines=[majority]",
            "evaluate.judge=embedding",
            "evaluate.vqa_mode=judge",
            f"evaluate.judge_model={_tiny_encoder(tmp_path / 'encoder', [('ship', 'vessel')], ['road'])}",
        ],
    )
    sigint = signal.getsignal(signal.SIGINT)
    board = evaluate.run_evaluate(ev)
    # Ray Tune's own handler is not left behind: Ctrl-C still works
    assert signal.getsignal(signal.SIGINT) is sigint
    assert {(r["model"], r["image"]) for r in board["rows"]} == {
        (good, "sar"),
        ("majority answer (lower bound)", "-"),
    }
    assert all(r["n_pairs"] == 16 for r in board["rows"])
    # judge only adds
    assert all(0 <= r["vqa_judge"] <= 1 and r["vqa_judge"] >= r["vqa_sarlang1m"] for r in board["rows"])
    failed = {(f["model"], f["image"]): f for f in board["failed"]}
    assert set(failed) == {(good, "optical"), (str(broken), "sar"), (str(broken), "optical")}
    arrow = failed[(good, "optical")]
    assert arrow["error_class"] == "ArrowInvalid" and arrow["error"].startswith(
        "No match for FieldRef.Name(optical_png)"
    )
    config = failed[(str(broken), "sar")]
    assert config["error_class"] == "OSError" and "is not a valid JSON file" in config["error"]
    # whichever fails first
    assert failed[(str(broken), "optical")]["error_class"] in (
        "ArrowInvalid",
        "OSError",
    )
    for f in board["failed"]:  # the exception, never Ray's wrapper or its retry hint
        assert f["prompt"] == "paper" and "retr" not in f["error"] and "UDF failed" not in f["error"], f
    full = json.loads((run_dir / "evaluate" / "leaderboard.json").read_text())
    assert full["failed"] == board["failed"] and full["notes"] == []
    md = (run_dir / "evaluate" / "leaderboard.md").read_text()
    assert "VQA rule `judge`" in md and "### Failed trials" in md
    assert f"- {good} / optical / paper: ArrowInvalid: No match for FieldRef.Name(optical_png)" in md
    assert f"- {broken} / sar / paper: OSError: It looks like the config file at" in md


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_models_with_the_same_last_path_component_write_two_prediction_files(
    demo_run, tiny_vlm, tmp_path
):
    """Two checkpoints both named .../merged (a sweep over checkpoints): each trial keeps its own predictions
    file, named by the readable last component and a hash of the whole path."""
    import shutil

    from sarlang_ray.config import load_config

    cfg, _ = demo_run
    run_dir = tmp_path / "run"
    shutil.copytree(Path(cfg.run.run_dir) / "export", run_dir / "export")
    models = [tmp_path / f"checkpoint_00000{i}" / "merged" for i in (1, 2)]
    for m in models:
        shutil.copytree(tiny_vlm, m)
    ev = load_config(
        None,
        [
            f"run.run_dir={run_dir}",
            "ray.progress=false",
            f"evaluate.models=[{models[0]},{models[1]}]",
            "evaluate.limit_pairs=6",
            "evaluate.baselines=[]",
            "evaluate.max_new_tokens_caption=2",
            "evaluate.max_new_tokens_answer=2",
        ],
    )
    board = evaluate.run_evaluate(ev)
    assert not board["failed"] and {r["model"] for r in board["rows"]} == {str(m) for m in models}
    files = sorted(p.name for p in (run_dir / "evaluate" / "predictions").glob("*.parquet"))
    expected = sorted(evaluate.prediction_name(str(m), "sar", "paper") for m in models)
    assert files == expected and len(set(files)) == 2 and all(f.startswith("merged-") for f in files)
    for f in files:
        assert pq.read_table(run_dir / "evaluate" / "predictions" / f).num_rows == 6
    # one trial after the other in one process (Tune's reuse_actors): the imports and METEOR's Java process
    # are paid once; Tune's own result files say which process ran each trial
    results = sorted((run_dir / "evaluate" / "tune" / "sweep").glob("*/result.json"))
    pids = [json.loads(r.read_text().splitlines()[-1])["pid"] for r in results]
    assert len(pids) == 2 and len(set(pids)) == 1, pids


def test_root_error_digs_through_rays_wrappers():
    """The root exception of a failed trial from what Tune hands over: an exception object (RayTaskError
    around the trial's exception), or only the text of a traceback where pickling dropped the cause
    (Ray Data's UserCodeException), or an implicit chain (the later exception is the informative one)."""
    import ray.exceptions

    wrapped = ray.exceptions.RayTaskError(
        "train", "Traceback ...\nValueError: bad value", ValueError("bad value")
    )
    assert evaluate.root_error(wrapped.as_instanceof_cause()) == ("ValueError", "bad value")
    data_task = (
        "\x1b[36mray::FlatMap(read)()\x1b[39m (pid=6956, ip=192.0.2.2)\n"
        '  File "/x/evaluate.py", line 7, in read\n    rows = io.read_parquet(uri, columns=columns)\n'
        "pyarrow.lib.ArrowInvalid: No match for FieldRef.Name(image) in pair_id: string\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "ray::FlatMap(read)() (pid=6956, ip=192.0.2.2)\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
        "Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s).\n"
        "To change retry attempts, configure `ray.data.DataContext.get_current()` if you believe this to be "
        "transient.\n"
    )
    cause = ray.exceptions.UserCodeException("UDF failed to process a data block.")
    outer = ray.exceptions.RayTaskError("train", data_task, cause).as_instanceof_cause()
    assert evaluate.root_error(outer) == (
        "ArrowInvalid",
        "No match for FieldRef.Name(image) in pair_id: string",
    )
    tune_file = (
        "Failure # 1 (occurred at 2026-01-01_00-00-00)\nray::ImplicitFunc.train() (pid=1)\n"
        '  File "x.py", line 3, in f\n    json.loads(text)\njson.decoder.JSONDecodeError: Expecting value\n\n'
        "During handling of the above exception, another exception occurred:\n\n"
        '  File "x.py", line 5, in f\n    raise OSError("config.json is not a valid JSON file")\n'
        "OSError: config.json is not a valid JSON file\n"
    )
    # Result.error as text
    assert evaluate.root_error(tune_file) == (
        "OSError",
        "config.json is not a valid JSON file",
    )
    # the error file
    assert evaluate.root_error(None, tune_file) == (
        "OSError",
        "config.json is not a valid JSON file",
    )


def test_evaluate_does_not_import_the_orchestrator():
    import subprocess
    import sys

    code = (
        "import sarlang_ray.evaluate, sys; "
        "assert 'sarlang_ray.pipeline' not in sys.modules, 'imports pipeline'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_baselines_that_cannot_be_computed_are_left_out_with_a_note(demo_run, tmp_path):
    """The template oracle recomputes answers from the tiles' objects: without a tiles table, with tiles of
    the split that carry no object, or with pairs whose tile is missing from it, it is left out (never a
    100 % row) and a note says why, in leaderboard.json and leaderboard.md; so is the majority answer
    without a train split. With the tiles table as written, it recomputes every answer (100 %)."""
    import shutil

    import pyarrow as pa
    import pyarrow.compute as pc

    from sarlang_ray import io
    from sarlang_ray.config import load_config

    cfg0, _ = demo_run
    run_dir = tmp_path / "run"
    shutil.copytree(Path(cfg0.run.run_dir) / "export", run_dir / "export")
    cfg = load_config(None, [f"run.run_dir={run_dir}", "evaluate.limit_pairs=60", "ray.progress=false"])
    table = io.read_parquet(evaluate.split_files(cfg, "test"), columns=evaluate.META)

    def baselines():
        rows, notes = evaluate.baseline_rows(cfg, table)
        return {r["model"]: r for r in rows}, notes

    rows, notes = baselines()  # no tiles table
    assert list(rows) == [evaluate.MAJORITY] and len(notes) == 1
    assert notes[0].startswith(f"{evaluate.ORACLE} left out: no tiles table under")

    shutil.copytree(Path(cfg0.run.run_dir) / "align", run_dir / "align")
    rows, notes = baselines()  # the tiles table as the align stage wrote it: every answer recomputed
    assert set(rows) == {evaluate.MAJORITY, evaluate.ORACLE} and notes == []
    assert rows[evaluate.ORACLE]["vqa_strict"] == 1.0 and 0 < rows[evaluate.ORACLE]["concise_bleu_4_tok"] < 1

    test_tiles = {p["tile_id"] for p in evaluate.select_pairs(table, 60)}
    shards = sorted((run_dir / "align" / "shards").rglob("*.parquet"))
    for f in shards:  # tiles of the split without a single object
        t = pq.read_table(f)
        empty = pa.array(
            [
                [] if tid in test_tiles else objs
                for tid, objs in zip(t["tile_id"].to_pylist(), t["objects"].to_pylist())
            ],
            t.schema.field("objects").type,
        )
        pq.write_table(t.set_column(t.schema.get_field_index("objects"), "objects", empty), f)
    rows, notes = baselines()
    assert list(rows) == [evaluate.MAJORITY] and "has a labelled object" in notes[0]

    for f in shards:  # pairs whose tile is not in the tiles table
        t = pq.read_table(f)
        pq.write_table(t.filter(pc.invert(pc.is_in(t["tile_id"], pa.array(sorted(test_tiles)[:1])))), f)
    rows, notes = baselines()
    assert (
        list(rows) == [evaluate.MAJORITY]
        and f"1 of the {len(test_tiles)} tiles of the test pairs are not in the tiles table" in notes[0]
    )

    shutil.rmtree(run_dir / "export" / "parquet" / "train")
    rows, notes = baselines()
    assert (
        rows == {}
        and len(notes) == 2
        and notes[0].startswith(f"{evaluate.MAJORITY} left out: no train split")
    )
    board = evaluate.write_leaderboard(cfg, list(rows.values()), [], notes)
    assert (
        json.loads((run_dir / "evaluate" / "leaderboard.json").read_text())["notes"]
        == notes
        == board["notes"]
    )
    md = (run_dir / "evaluate" / "leaderboard.md").read_text()
    assert "### Notes" in md and all(f"- {n}" in md for n in notes)
    assert "| template oracle" not in md and "| majority answer" not in md


def test_the_optical_variant_reads_the_optical_twins_in_the_read_tasks(demo_run):
    """evaluate.images=[optical]: the rows reaching the actors carry each tile's optical twin from the tiles
    table (joined by the read tasks; the actors' constructor arguments hold no image)."""
    from sarlang_ray import io, tables
    from sarlang_ray.config import load_config

    cfg0, _ = demo_run
    cfg = load_config(None, [f"run.run_dir={cfg0.run.run_dir}", "ray.progress=false"])
    pairs = evaluate.select_pairs(
        io.read_parquet(evaluate.split_files(cfg, "test"), columns=evaluate.META), 30
    )
    rows = evaluate.pairs_dataset(cfg, "optical", {p["pair_id"] for p in pairs}).take_all()
    optical = dict(zip(*tables.read_tiles(cfg.run.run_dir, ["tile_id", "optical_png"]).to_pydict().values()))
    assert sorted(r["pair_id"] for r in rows) == sorted(p["pair_id"] for p in pairs)
    assert all(r["image"]["bytes"] == optical[r["tile_id"]] for r in rows)
    sar = {
        r["pair_id"]: r["image"]["bytes"]
        for r in evaluate.pairs_dataset(cfg, "sar", {p["pair_id"] for p in pairs}).take_all()
    }
    assert all(sar[r["pair_id"]] != r["image"]["bytes"] for r in rows)


def test_openai_judge_decides_what_the_substring_rule_cannot(monkeypatch):
    """evaluate.judge=openai: a real HTTP endpoint on 127.0.0.1 judges the non-substring, non-closed answers;
    a call that keeps failing counts as wrong and is counted."""
    import re
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from sarlang_ray.config import load_config

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][0]["content"]
            truth = re.search(r"Reference answer: (.*)", prompt).group(1)
            pred = re.search(r"Predicted answer: (.*)", prompt).group(1)
            seen.append((truth, pred))
            if truth == "storage tank":  # this endpoint keeps failing for one question
                self.send_response(500)
                self.end_headers()
                return
            same = {("ship", "vessel"), ("harbour", "port")}
            data = json.dumps(
                {"choices": [{"message": {"content": "Yes." if (truth, pred) in same else "No"}}]}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        cfg = load_config(
            None,
            [
                f"annotate.openai.base_url=http://127.0.0.1:{httpd.server_address[1]}/v1",
                "annotate.openai.max_retries=1",
                "annotate.openai.backoff_s=0.01",
                "evaluate.judge=openai",
                "evaluate.vqa_mode=judge",
            ],
        )
        judge = evaluate.OpenAIJudge(cfg)
        pairs = [
            {
                "pair_id": str(i),
                "tile_id": "t",
                "kind": "vqa",
                "application": "object classification",
                "question_type": "cls",
                "question": f"What is object {i}?",
                "answer": a,
            }
            for i, a in enumerate(["ship", "harbour", "bridge", "storage tank", "2", "yes"])
        ]
        preds = {"0": "vessel", "1": "port", "2": "road", "3": "oil tank", "4": "3", "5": "yes, there is"}
        out = evaluate.score(pairs, preds, {}, judge)
    finally:
        httpd.shutdown()
    # vessel/port: judged right; road: judged wrong; storage tank: endpoint failed -> wrong, counted;
    # "3" for 2 is a closed answer (never sent to the judge); "yes, there is" contains "yes" (substring)
    assert out["vqa_judge"] == pytest.approx(3 / 6)
    assert out["judge_calls"] == 4 and out["judge_failures"] == 1
    assert sorted(t for t, _ in seen) == ["bridge", "harbour", "ship", "storage tank", "storage tank"]
    assert out["vqa_sarlang1m"] == pytest.approx(1 / 6) and out["vqa_strict"] == pytest.approx(4 / 6)


def _tiny_encoder(folder: Path, synonyms: list[tuple[str, str]], words: list[str]) -> str:
    """A 1-layer BERT written offline (config + vocab.txt, random weights, safetensors) in which each
    synonym pair shares one word-embedding row: a stand-in for a trained sentence encoder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[w for pair in synonyms for w in pair], *words]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        add_pooling_layer=False,
    )
    with torch.no_grad():
        for a, b in synonyms:
            model.embeddings.word_embeddings.weight[vocab.index(b)] = model.embeddings.word_embeddings.weight[
                vocab.index(a)
            ]
    model.save_pretrained(folder)
    return str(folder)


def test_embedding_judge_decides_by_cosine_similarity_of_a_local_encoder(tmp_path):
    """evaluate.judge=embedding: a local encoder (folder, safetensors) judges the answers the substring and
    closed-answer rules leave open; equal meaning (here: a shared embedding) is right, other words and
    empty answers are wrong; closed answers (yes/no, counts) never reach it."""
    from sarlang_ray.config import load_config

    encoder = _tiny_encoder(
        tmp_path / "encoder", [("soccer", "football"), ("harbour", "port")], ["bridge", "road", "ship"]
    )
    cfg = load_config(
        None,
        [
            "evaluate.judge=embedding",
            f"evaluate.judge_model={encoder}",
            "evaluate.judge_threshold=0.99",
            "evaluate.vqa_mode=judge",
        ],
    )
    judge = evaluate.make_judge(cfg)
    assert isinstance(judge, evaluate.EmbeddingJudge)
    assert judge.similarity("soccer", "football") == pytest.approx(1.0, abs=1e-6)
    assert judge.similarity("bridge", "road") < 0.99
    pairs = [
        {
            "pair_id": str(i),
            "tile_id": "t",
            "kind": "vqa",
            "application": "others",
            "question_type": "q",
            "question": f"What is {i}?",
            "answer": a,
        }
        for i, a in enumerate(["soccer", "harbour", "bridge", "ship", "2", "no"])
    ]
    preds = {"0": "football", "1": "port", "2": "road", "3": "", "4": "3", "5": "yes"}
    out = evaluate.score(pairs, preds, {}, judge)
    assert out["vqa_judge"] == pytest.approx(2 / 6)  # soccer/football and harbour/port
    assert out["vqa_sarlang1m"] == 0.0 and out["judge_calls"] == 4  # "2" and "no" are closed: no judge call
    again = evaluate.score(pairs[:1], preds, {}, judge)  # the same judge on another row counts that row only
    assert again["vqa_judge"] == 1.0 and again["judge_calls"] == 1


def test_a_failed_trial_makes_the_command_exit_non_zero_with_its_root_exception(
    trained_run, tmp_path, capsys
):
    """`sarlang evaluate` writes the leaderboard, then exits 1 and names the root exception on stderr; the
    stage is not marked done, so a rerun tries again."""
    import shutil

    from sarlang_ray import cli

    cfg, _ = trained_run
    run_dir = tmp_path / "run"
    for part in ("export", "train"):
        shutil.copytree(Path(cfg.run.run_dir) / part, run_dir / part)
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    rc = cli.main(
        [
            "evaluate",
            f"run.run_dir={run_dir}",
            f"train.model={cfg.train.model}",
            "ray.progress=false",
            "run.stages=[evaluate]",
            f"evaluate.models=[{broken}]",
            "evaluate.limit_pairs=8",
            "evaluate.baselines=[]",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert (
        "1 trial(s) failed" in err
        and "OSError" in err
        and "is not a valid JSON file" in err
        and "retr" not in err
    )
    assert (run_dir / "evaluate" / "leaderboard.md").exists() and not (
        run_dir / "evaluate" / "_SUCCESS.json"
    ).exists()


@pytest.mark.slow
def test_one_command_evaluates_a_model_on_the_imported_sarlang1m_release(
    ray_session, tiny_vlm, tmp_path, capsys
):
    """`sarlang import` of a SARLANG-1M release as published, then `sarlang evaluate
    workflows/sarlang1m.yaml`:
    the leaderboard has the paper's seven application columns, the complex and concise caption sets apart, the
    majority baseline from the release's train split (no template oracle: no objects), the `sarlang1m` rule
    and the published numbers."""
    from conftest import REPO
    from test_release import build_release

    from sarlang_ray import cli
    from sarlang_ray.annotate.vocab import APPLICATIONS

    built = build_release(tmp_path)
    pairs = tmp_path / "pairs.parquet"
    assert cli.main(["import", str(built["root"]), str(pairs), "--sardet", str(built["sardet"])]) == 0
    capsys.readouterr()
    rc = cli.main(
        [
            "evaluate",
            str(REPO / "workflows" / "sarlang1m.yaml"),
            f"run.run_dir={tmp_path / 'run'}",
            f"evaluate.dataset={pairs}",
            f"train.model={tiny_vlm}",
            "ray.progress=false",
            "evaluate.max_new_tokens_caption=4",
            "evaluate.max_new_tokens_answer=2",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    board = json.loads((tmp_path / "run" / "evaluate" / "leaderboard.json").read_text())
    assert board["vqa_mode"] == "sarlang1m" and board["caption_sets"] == {
        "concise": "concise (Caption_test1.csv)",
        "detailed": "complex (Caption_test.csv)",
    }
    assert [r["model"] for r in board["rows"]] == [evaluate.MAJORITY, "base"]  # ranked by the sarlang1m rule
    base = board["rows"][1]
    assert base["n_pairs"] == built["vqa_test"] + 5 and base["n_vqa"] == built["vqa_test"]
    assert set(base["vqa_sarlang1m_per_application"]) >= set(APPLICATIONS[1:])
    majority = board["rows"][0]
    assert 0 < majority["vqa_strict"] < 1  # per question type from the train split, whose answers differ
    header = next(line for line in out.splitlines() if line.startswith("| # | model"))
    assert (
        all(f" {app} " in header for app in APPLICATIONS[1:])
        and "image description (CIDEr complex / concise)" in header
    )
    for label in (
        "| base | complex (Caption_test.csv) |",
        "| base | concise (Caption_test1.csv) |",
        "| majority answer (lower bound) | complex (Caption_test.csv) |",
        "| 1 | majority answer (lower bound) |",
        "### Published SARLANG-1M numbers",
        "| LLaVA-1.5-7B | zero-shot | 33.55 |",
        "| Qwen2.5-VL-7B | lora | complex | 55.64 |",
    ):
        assert label in out, label
    assert "template oracle" not in out


def test_a_llamafactory_json_file_is_a_dataset_too(tmp_path):
    """evaluate.dataset=<LLaMA-Factory JSON>: read into a pairs table (every record in evaluate.split), the
    majority baseline from evaluate.train_dataset, the oracle left out with a note, auto picks sarlang1m."""
    from test_release import _llamafactory, _png

    from sarlang_ray.config import load_config

    for i in range(3):
        _png(tmp_path / "images" / f"t{i}.png", i)
    test = [
        _llamafactory(q, a, f"images/t{i % 3}.png")
        for i, (q, a) in enumerate(
            [
                ("How many ships are in the image?", "2"),
                ("Is there a bridge?", "no"),
                ("Where is the ship?", "top"),
                ("What is the object in the area [1, 2, 3, 4]?", "car"),
            ]
        )
    ]
    train = [
        _llamafactory("How many ships are in the image?", "3", "images/t0.png"),
        _llamafactory("Is there a bridge?", "no", "images/t1.png"),
        _llamafactory("Is there a car?", "yes", "images/gone.png"),
    ]
    (tmp_path / "test.json").write_text(json.dumps(test))
    (tmp_path / "train.json").write_text(json.dumps(train))
    cfg = load_config(
        None,
        [
            f"run.run_dir={tmp_path / 'run'}",
            f"evaluate.dataset={tmp_path / 'test.json'}",
            f"evaluate.train_dataset={tmp_path / 'train.json'}",
        ],
    )
    notes = evaluate.prepare_datasets(cfg)
    assert notes == [
        (
            f"{tmp_path / 'train.json'}: 1 of 3 records rejected "
            f"({tmp_path / 'run'}/evaluate/dataset/train.errors.parquet)"
        )
    ]
    table = evaluate.read_split(cfg, "test", evaluate.META)
    assert table.num_rows == 4 and evaluate.vqa_mode(cfg) == "sarlang1m"
    assert sorted(table["application"].to_pylist()) == [
        "instance counting",
        "object identification",
        "object positioning",
        "region referring",
    ]
    rows, notes = evaluate.baseline_rows(cfg, table)
    assert [r["model"] for r in rows] == [evaluate.MAJORITY] and "is not this run's export" in notes[0]
    assert rows[0]["vqa_strict_per_application"]["object identification"] == 1.0  # "no", the train answer
    assert rows[0]["vqa_strict_per_application"]["instance counting"] == 0.0  # "3" from train, "2" in test


def test_baselines_stream_the_split_and_give_what_the_whole_table_gives(demo_run):
    """The majority answer counts the train split file by file; its predictions equal the most frequent answer
    per question type (and caption per kind) counted here over the whole train table at once, ties to the
    alphabetically first; the template oracle reads the tiles table shard by shard and still recomputes
    every VQA answer."""
    from collections import Counter

    import pyarrow as pa

    from sarlang_ray import io
    from sarlang_ray.config import load_config

    cfg0, _ = demo_run
    cfg = load_config(None, [f"run.run_dir={cfg0.run.run_dir}", "ray.progress=false"])
    files = evaluate.split_files(cfg, "train")
    parts = list(evaluate.iter_split(cfg, "train", ["kind", "question_type", "answer"]))
    assert len(parts) == len(files) > 1  # one table per export shard of the split
    whole = pa.concat_tables(parts)
    assert whole.equals(io.read_parquet(files, columns=["kind", "question_type", "answer"]))

    counts: dict[str, Counter] = {}
    for r in whole.to_pylist():
        key = r["kind"] if r["kind"] in evaluate.CAPTION_KINDS else r["question_type"]
        counts.setdefault(key, Counter())[r["answer"]] += 1

    def most_frequent(c: Counter) -> str:
        return min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0]

    expected_answer = {k: most_frequent(c) for k, c in counts.items()}
    overall = most_frequent(sum((c for k, c in counts.items() if k not in evaluate.CAPTION_KINDS), Counter()))

    test = io.read_parquet(evaluate.split_files(cfg, "test"), columns=evaluate.META)
    pairs, refs = evaluate.select_pairs(test, None), evaluate.caption_refs(test)
    # unseen type: overall
    expected_preds = {
        p["pair_id"]: expected_answer.get(p["kind"], "")
        if p["kind"] in evaluate.CAPTION_KINDS
        else expected_answer.get(p["question_type"], overall)
        for p in pairs
    }
    row, why = evaluate.majority_row(cfg, pairs, refs)
    assert why is None
    expected = {
        **evaluate.score(pairs, expected_preds, refs),
        "model": evaluate.MAJORITY,
        "image": "-",
        "prompt": "-",
    }
    assert row == expected

    oracle, why = evaluate.oracle_row(cfg, pairs, refs)
    assert why is None and oracle["vqa_strict"] == 1.0
