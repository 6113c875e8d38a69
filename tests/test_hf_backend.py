"""The hf backend with a tiny VLM built offline: same code path as a hub model on a GPU cluster."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sarlang_ray import pipeline
from sarlang_ray.annotate.vocab import APPLICATIONS
from sarlang_ray.config import load_config


def test_init_tiny_writes_a_loadable_safetensors_model(tmp_path):
    out = tmp_path / "vlm"
    proc = subprocess.run(
        [sys.executable, "-m", "sarlang_ray", "model", "init-tiny", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "How many ships are there?"}],
        }
    ]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = processor(images=[Image.new("RGB", (40, 40))], text=[text], return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert ids.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.slow
def test_hf_backend_annotates_every_tile_on_the_actor_pool(demo_run, tiny_vlm, tmp_path):
    cfg, _ = demo_run
    run_dir = tmp_path / "hf"
    shutil.copytree(cfg.run.run_dir, run_dir, ignore=shutil.ignore_patterns("annotate", "export", "archive"))
    hf = load_config(
        None,
        [
            f"run.run_dir={run_dir}",
            "annotate.backend=hf",
            f"annotate.hf.model={tiny_vlm}",
            "annotate.hf.dtype=float32",
            "annotate.hf.batch_size=16",
            "ray.progress=false",
        ],
    )
    counts = pipeline.run(hf, ["annotate"])["stages"]["annotate"]
    assert counts["planned"] == counts["written"] + counts["rejected"]
    assert counts["written"] > 0.9 * counts["planned"]
    pairs = pipeline.read_annotations(str(run_dir)).to_pylist()
    assert {p["backend"] for p in pairs} == {"hf"}
    assert set(Counter(p["application"] for p in pairs)) == set(APPLICATIONS)
    assert all(p["answer"] for p in pairs)
    # an untrained tiny model writes noise: QC rejects some of it, says why, and the report adds up
    captions = [p for p in pairs if p["kind"] != "vqa"]
    assert any(not p["qc_passed"] for p in captions)
    assert all(p["qc_reasons"] for p in pairs if not p["qc_passed"])
    report = json.loads((Path(run_dir) / "annotate" / "qc_report.json").read_text())
    assert report["rule_hits"] == dict(Counter(r for p in pairs for r in p["qc_reasons"]))
    assert report["pairs"]["planned"] == len(pairs) == report["pairs"]["passed"] + report["pairs"]["rejected"]
