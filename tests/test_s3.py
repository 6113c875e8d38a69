"""Archive in and run folder out on s3:// (a real SeaweedFS server on 127.0.0.1)."""

from __future__ import annotations

import signal
from pathlib import Path

import fsspec
import pytest

from sarlang_ray import evaluate, io, pipeline
from sarlang_ray.config import SynthSection, load_config
from sarlang_ray.synth import write_archive


@pytest.mark.slow
def test_catalog_tile_align_from_and_to_s3(ray_session, s3, tmp_path):
    local = tmp_path / "archive"
    write_archive(SynthSection(out_dir=str(local), scene_size_px=256), seed=5)
    fs = fsspec.filesystem("s3")
    fs.put(str(local), "sarlang/archive", recursive=True)
    assert len(fs.glob("sarlang/archive/sar/*.tif")) == 4

    cfg = load_config(
        None,
        [
            "run.run_dir=s3://sarlang/runs/one",
            "catalog.archive=s3://sarlang/archive",
            "run.stages=[catalog,tile,align]",
            "ray.progress=false",
            "tile.tile_size=128",
        ],
    )
    summary = pipeline.run(cfg)
    scenes = pipeline.read_scenes(cfg.run.run_dir)
    assert len(scenes) == 4 and all(s["sar_uri"].startswith("s3://sarlang/archive/sar/") for s in scenes)
    assert all(s["optical_uri"] and s["optical_uri"].startswith("s3://") for s in scenes)
    tiles = pipeline.read_tiles(cfg.run.run_dir, columns=["tile_id", "objects", "optical_png"])
    assert tiles.num_rows == summary["stages"]["align"]["written"] > 0
    assert sum(len(o) for o in tiles["objects"].to_pylist()) > 0
    assert all(p is not None for p in tiles["optical_png"].to_pylist())
    assert io.exists("s3://sarlang/runs/one/config.yaml") and io.exists(
        "s3://sarlang/runs/one/align/_SUCCESS.json"
    )

    # the same archive read locally gives the same tiles (ids and objects)
    cfg_local = load_config(
        None,
        [
            f"run.run_dir={tmp_path / 'run'}",
            f"catalog.archive={local}",
            "run.stages=[catalog,tile,align]",
            "ray.progress=false",
            "tile.tile_size=128",
        ],
    )
    pipeline.run(cfg_local)
    local_tiles = pipeline.read_tiles(cfg_local.run.run_dir, columns=["tile_id", "objects"])
    assert sorted(local_tiles["tile_id"].to_pylist()) == sorted(tiles["tile_id"].to_pylist())


@pytest.mark.slow
def test_train_checkpoints_and_evaluation_on_s3(demo_run, tiny_vlm, s3, tmp_path):
    """Run folder on s3://: Ray Train writes its checkpoints there (through the pipeline's fsspec config),
    evaluation loads the fine-tuned model from there and writes the leaderboard there. LoRA: the held-out
    loss falls, the checkpoint holds the adapter and the merged model, which plain transformers loads and
    generates with."""
    import json
    from pathlib import Path

    cfg0, _ = demo_run
    fs = fsspec.filesystem("s3")
    fs.put(str(Path(cfg0.run.run_dir) / "export"), "sarlang/runs/trained/export", recursive=True)
    cfg = load_config(
        None,
        [
            "run.run_dir=s3://sarlang/runs/trained",
            f"train.model={tiny_vlm}",
            "train.method=lora",
            "train.epochs=2",
            "train.limit_pairs=240",
            "train.batch_size=8",
            "train.lr=0.003",
            "evaluate.models=[finetuned]",
            "evaluate.limit_pairs=24",
            "evaluate.baselines=[majority]",
            "run.stages=[train,evaluate]",
            "ray.progress=false",
        ],
    )
    sigint = signal.getsignal(signal.SIGINT)
    summary = pipeline.run(cfg)
    # Ray Train's and Ray Tune's own handlers are not left behind: Ctrl-C still works
    assert signal.getsignal(signal.SIGINT) is sigint
    counts = summary["stages"]["train"]
    assert counts["val_loss_after"] < counts["val_loss_before"] - 0.05, counts
    checkpoint = counts["checkpoint"]
    assert checkpoint.startswith("s3://sarlang/runs/trained/train/sarlang-train/checkpoint_")
    assert io.exists(f"{checkpoint}/merged/model.safetensors") and io.exists(
        f"{checkpoint}/adapter/adapter_model.safetensors"
    )
    metrics = json.loads(fs.cat("sarlang/runs/trained/train/metrics.json"))
    assert metrics["merged_model"] == f"{checkpoint}/merged"
    assert [h["epoch"] for h in metrics["history"]] == [-1, 0, 1]
    assert fs.cat("sarlang/runs/trained/train/loss_curve.png")[:4] == b"\x89PNG"
    fs.get(f"{checkpoint}/merged".removeprefix("s3://"), str(tmp_path / "merged"), recursive=True)
    _generates_with_plain_transformers(tmp_path / "merged")
    board = json.loads(fs.cat("sarlang/runs/trained/evaluate/leaderboard.json"))
    assert not board["failed"], board["failed"]
    assert [r["model"] for r in board["rows"] if r["model"] == "finetuned"] and all(
        r["n_pairs"] == 24 for r in board["rows"]
    )
    assert fs.exists(
        "sarlang/runs/trained/evaluate/predictions/" + evaluate.prediction_name("finetuned", "sar", "paper")
    )
    assert fs.glob("sarlang/runs/trained/evaluate/tune/sweep/*")  # Tune's own results, on S3 too
    assert not Path("s3:").exists() and not Path("sarlang").exists()  # no URI was mistaken for a local path


def _generates_with_plain_transformers(folder) -> None:
    """The merged model loads and answers an image question with transformers' Auto classes (no sarlang
    code)."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "How many ships are there?"}],
        }
    ]
    inputs = processor(
        images=[Image.new("RGB", (64, 64))],
        text=[processor.apply_chat_template(msgs, add_generation_prompt=True)],
        return_tensors="pt",
    )
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


FETCH = """
import sys, time
from sarlang_ray import io

real = io.filesystem


def counted(uri):  # each download appends a line to the count file, and takes a moment (a model is large)
    fs, path = real(uri)
    get = fs.get

    def slow_get(*args, **kwargs):
        with open(sys.argv[3], "a") as f:
            f.write("get\\n")
        time.sleep(1.0)
        return get(*args, **kwargs)

    fs.get = slow_get
    return fs, path


io.filesystem = counted
start = float(sys.argv[4])
time.sleep(max(0.0, start - time.time()))  # all four ask at the same moment
print(io.local_copy(sys.argv[1], sys.argv[2]))
"""


def test_local_copy_downloads_once_per_node_with_no_partial_left(s3, tmp_path):
    """Four processes of one node ask for the same s3:// model folder at once: one download, one folder with
    every file, no ``.partial`` copy left; a later call downloads nothing."""
    import os
    import subprocess
    import sys
    import time

    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    files = {"config.json": b'{"a": 1}', "weights.bin": os.urandom(3 << 20), "sub/tokenizer.json": b"{}"}
    for name, data in files.items():
        (src / name).write_bytes(data)
    fsspec.filesystem("s3").put(str(src), "sarlang/models/m", recursive=True)
    uri, cache, count = "s3://sarlang/models/m", tmp_path / "cache", tmp_path / "downloads.txt"
    start = time.time() + 3.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FETCH, uri, str(cache), str(count), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    folders = {o.strip().splitlines()[-1] for o, _ in outs}
    assert len(folders) == 1
    folder = folders.pop()
    assert count.read_text().count("get") == 1  # one download, not four
    for name, data in files.items():
        assert (Path(folder) / name).read_bytes() == data
    assert sorted(p.name for p in cache.iterdir() if p.name.endswith(".partial")) == []
    assert sorted(p.name for p in cache.iterdir()) == sorted([Path(folder).name, Path(folder).name + ".lock"])
    subprocess.run(
        [sys.executable, "-c", FETCH, uri, str(cache), str(count), "0"], check=True, capture_output=True
    )
    assert count.read_text().count("get") == 1  # already there: nothing fetched
