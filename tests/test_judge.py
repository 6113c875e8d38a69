"""`evaluate.judge=served`: the evaluation serves an open model (here the tiny offline VLM's text side) behind
a real OpenAI-compatible server on Ray Serve for the sweep, judges through it, and stops it after; the
leaderboard shows the rule-only and the judged accuracy side by side with the judge's name; only the answers
the rules left undecided reach the judge, counted by the trial and by the server itself."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import requests

from sarlang_ray import boxes

# SARLANG-1M's script matches these exactly, never asking its judge
CLOSED = {
    "yes",
    "no",
    *map(str, range(100)),
}


@pytest.mark.slow
def test_a_served_judge_scores_only_what_the_rules_leave_undecided(ray_session, tiny_vlm, tmp_path, capsys):
    from test_release import _llamafactory, _png

    from sarlang_ray import cli

    for i in range(3):
        _png(tmp_path / "images" / f"t{i}.png", i)
    qa = [
        ("How many ships are in the image?", "2"),
        ("Is there a bridge?", "no"),
        ("What is the main object?", "storage tank"),
        ("What covers most of the scene?", "farmland"),
        ("Where is the ship?", "top left"),
        ("Locate the ship.", "[2, 3, 20, 22]"),
        ("What is the object in region [1, 2, 3, 4]?", "harbour"),
        ("Describe the shape of the pier.", "long and straight"),
    ]
    (tmp_path / "test.json").write_text(
        json.dumps([_llamafactory(q, a, f"images/t{i % 3}.png") for i, (q, a) in enumerate(qa)])
    )
    run = tmp_path / "run"
    rc = cli.main(
        [
            "evaluate",
            f"run.run_dir={run}",
            "run.stages=[evaluate]",
            f"evaluate.dataset={tmp_path / 'test.json'}",
            f"evaluate.models=[{tiny_vlm}]",
            "evaluate.baselines=[]",
            "evaluate.judge=served",
            f"evaluate.judge_model={tiny_vlm}",
            "evaluate.judge_num_cpus=0.5",
            "evaluate.vqa_mode=sarlang1m",
            "evaluate.max_new_tokens_answer=4",
            "ray.progress=false",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    board = json.loads((run / "evaluate" / "leaderboard.json").read_text())
    row = board["rows"][0]
    preds = pq.read_table(next((run / "evaluate" / "predictions").glob("*.parquet"))).to_pylist()
    undecided = [
        p
        for p in preds
        if p["kind"] == "vqa"
        and not boxes.is_box_answer(p["answer"])
        and p["answer"].lower() not in p["prediction"].lower()
        and p["answer"].lower() not in CLOSED
    ]
    assert len(undecided) >= 3  # open answers the tiny model does not repeat: the judge is really asked
    assert row["judge_calls"] == len(undecided) and row["judge_failures"] == 0
    judge = board["judge"]
    assert judge["kind"] == "served" and judge["name"] == "tiny-vlm" and judge["requests"] == len(undecided)
    header = next(line for line in out.splitlines() if line.startswith("| # | model"))
    assert "VQA % (sarlang1m)" in header and "VQA % (judged by tiny-vlm)" in header
    assert row["vqa_judge"] is not None and row["vqa_sarlang1m"] is not None
    assert row["vqa_judge"] >= row["vqa_sarlang1m"]  # the judge only adds to what the rule already accepted
    with pytest.raises(requests.ConnectionError):  # the server was stopped with the sweep
        requests.get(f"{judge['url']}/models", timeout=5)


def test_a_served_judge_needs_a_model_and_is_named_as_served():
    from sarlang_ray.config import ConfigError, load_config
    from sarlang_ray.judge import served_name

    with pytest.raises(ConfigError, match="evaluate.judge=served needs evaluate.judge_model"):
        load_config(None, ["evaluate.judge=served"])
    with pytest.raises(ConfigError, match="judge_num_cpus"):
        load_config(None, ["evaluate.judge=served", "evaluate.judge_model=m", "evaluate.judge_num_cpus=-1"])
    assert (
        load_config(
            None,
            [
                "evaluate.judge=served",
                "evaluate.judge_model=Qwen/Qwen2.5-7B-Instruct",
                "evaluate.vqa_mode=judge",
            ],
        ).evaluate.judge
        == "served"
    )
    assert served_name("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert served_name("/models/runs/tiny-vlm/") == "tiny-vlm" and served_name("s3://b/m/merged") == "merged"
