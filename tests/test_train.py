"""Ray Train fine-tuning of a tiny offline VLM on the exported demo dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sarlang_ray import pipeline
from sarlang_ray.config import load_config


@pytest.mark.slow
def test_lora_training_lowers_held_out_loss_and_checkpoints_reload(demo_run, tiny_vlm, tmp_path):
    import shutil

    cfg, _ = demo_run
    run_dir = tmp_path / "train"
    shutil.copytree(Path(cfg.run.run_dir) / "export", run_dir / "export")
    tr = load_config(None, [f"run.run_dir={run_dir}", f"train.model={tiny_vlm}", "train.batch_size=8", "train.lr=0.003",
                            "train.epochs=2", "train.limit_pairs=240", "ray.progress=false"])
    counts = pipeline.run(tr, ["train"])["stages"]["train"]
    assert counts["val_loss_after"] < counts["val_loss_before"] - 0.05, counts
    metrics = json.loads((run_dir / "train" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [-1, 0, 1]
    assert (run_dir / "train" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"

    ckpt = Path(counts["checkpoint"])
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists()
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(ckpt / "merged")  # plain transformers, no sarlang code
    processor = AutoProcessor.from_pretrained(ckpt / "merged")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many ships are there?"}]}]
    inputs = processor(images=[Image.new("RGB", (64, 64))], text=[processor.apply_chat_template(msgs, add_generation_prompt=True)],
                       return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
