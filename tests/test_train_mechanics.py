"""Training mechanics (issue 14, item 3): preprocessing and collation generic over VLM families, the seeded
per-epoch shuffle of the training ingest, gradient accumulation with the epoch's left-over stepped, tied
embeddings saved and reloaded, resume that refuses a mismatched checkpoint, FSDP2 on two CPU workers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sarlang_ray import families, pipeline
from sarlang_ray.config import load_config
from sarlang_ray.models import load_processor
from sarlang_ray.tiny_models import init_tiny_vlm
from sarlang_ray.train import IGNORE, check_adapter, collate, encode_pair, load_checkpoint_model

FAMILIES = sorted(families.FAMILIES)  # every family of the adapter table
QA = [
    ("How many ships are there?", "3"),
    ("Describe this image.", "A port with two ships and a road."),
    ("Is there a road?", "no"),
]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """One tiny model folder per family (written on first use)."""
    root = tmp_path_factory.mktemp("family-models")
    made: dict[str, str] = {}

    def get(family: str, **kwargs) -> str:
        key = family + "".join(f"-{k}{v}" for k, v in sorted(kwargs.items()))
        if key not in made:
            made[key] = init_tiny_vlm(str(root / key), family=family, **kwargs)
        return made[key]

    return get


def _images():
    from PIL import Image

    return [Image.new("RGB", (64, 48), (40 * i, 90, 200 - 50 * i)) for i in range(len(QA))]


@pytest.mark.parametrize("family", FAMILIES)
def test_collated_batch_equals_the_processors_own_batch_and_labels_cover_only_the_answer(family, tiny_models):
    """Per-pair preprocessing + collate gives exactly what the processor returns for the whole batch (right
    padding), whatever tensors the family uses; the labels are the answer and its end-of-turn marker."""
    from sarlang_ray.models import chat_texts

    processor = load_processor(tiny_models(family))
    images = _images()
    encoded = [encode_pair(processor, im, q, a, 4096) for im, (q, a) in zip(images, QA)]
    batch = {"pair_id": np.array([str(i) for i in range(len(QA))])}
    for key in encoded[0]:
        column = np.empty(len(encoded), dtype=object)
        column[:] = [e[key] for e in encoded]
        batch[key] = column
    got = collate(batch, processor.tokenizer.pad_token_id)

    fulls = [chat_texts(processor, q, a)[1] for q, a in QA]
    processor.tokenizer.padding_side = "right"
    nested = family in ("idefics3", "smolvlm", "gemma3")  # these processors take one image list per text
    ref = processor(
        images=[[im] for im in images] if nested else images, text=fulls, return_tensors="pt", padding=True
    )
    assert set(got) == set(ref) | {"labels"}, (sorted(got), sorted(ref))
    for key in ref:
        assert got[key].shape == ref[key].shape, (key, got[key].shape, ref[key].shape)
        assert (got[key].double() == ref[key].double()).all(), key
    for i, (q, a) in enumerate(QA):
        answer_ids = got["input_ids"][i][got["labels"][i] != IGNORE]
        text = processor.tokenizer.decode(answer_ids)
        # the answer, then its end marker
        assert text.strip().startswith(a) and len(text.strip()) > len(a), text
        assert (got["labels"][i][ref["attention_mask"][i] == 0] == IGNORE).all()  # padding has no loss


def _tied(model) -> bool:
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_checkpoint_load_reties_tied_weights_and_refuses_another_models_weights(tiny_models, tmp_path):
    """The resume path: a save_pretrained checkpoint of a tied model (its output head saved once, under the
    checkpoint key names transformers writes) loads into the training model's architecture with the head
    re-tied; a checkpoint of another architecture, or a LoRA adapter of another rank, fails loudly."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    tied = AutoModelForImageTextToText.from_pretrained(tiny_models("qwen2_vl"))
    assert _tied(tied)
    with torch.no_grad():
        tied.get_input_embeddings().weight.add_(0.5)  # a change the reload must carry to the output head
    tied.save_pretrained(tmp_path / "ckpt")
    saved = set(load_file(tmp_path / "ckpt" / "model.safetensors"))
    assert not any(k.endswith("lm_head.weight") for k in saved)  # written once: the tie is restored on load
    resumed = load_checkpoint_model(tiny_models("qwen2_vl"), str(tmp_path / "ckpt"), torch.float32)
    assert _tied(resumed)
    assert torch.equal(resumed.get_output_embeddings().weight, tied.get_input_embeddings().weight)
    for (k, a), b in zip(tied.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k

    with pytest.raises(
        RuntimeError, match=r"cannot resume from checkpoint .*missing [1-9]\d* .*new train.name"
    ):
        load_checkpoint_model(tiny_models("qwen2_vl", layers=3), str(tmp_path / "ckpt"), torch.float32)
    with pytest.raises(RuntimeError, match=r"cannot resume from checkpoint .*shape differs [1-9]"):
        load_checkpoint_model(tiny_models("qwen2_vl", hidden=96), str(tmp_path / "ckpt"), torch.float32)

    lora8 = get_peft_model(
        AutoModelForImageTextToText.from_pretrained(tiny_models("llava")),
        LoraConfig(r=8, target_modules="all-linear"),
    )
    lora8.save_pretrained(tmp_path / "adapter")
    lora4 = get_peft_model(
        AutoModelForImageTextToText.from_pretrained(tiny_models("llava")),
        LoraConfig(r=4, target_modules="all-linear"),
    )
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    check_adapter(lora8, adapter, "adapter")  # its own adapter passes
    with pytest.raises(RuntimeError, match="shape differs [1-9]"):
        check_adapter(lora4, adapter, "adapter")


def test_lora_base_in_bf16_and_the_merged_model_saved_in_the_training_dtype(tiny_models, tmp_path):
    """LoRA loads the frozen base in the autocast dtype (bf16 where the GPU supports it; full fine-tuning
    keeps fp32 master weights); the merged model is written in the training dtype and reloads in it."""
    import torch
    from transformers import AutoModelForImageTextToText

    from sarlang_ray.train import _save_model, autocast_dtype, weights_dtype

    assert autocast_dtype("auto", torch.device("cpu")) is None  # no bf16 autocast on a CPU for auto
    assert (
        weights_dtype("lora", torch.bfloat16) == torch.bfloat16
        and weights_dtype("full", torch.bfloat16) == torch.float32
    )
    assert weights_dtype("lora", None) == torch.float32
    model = AutoModelForImageTextToText.from_pretrained(tiny_models("llava"))
    _save_model(model, str(tmp_path / "bf16"), dtype=torch.bfloat16)
    assert model.dtype == torch.float32  # the training model itself is left as it was
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "bf16")
    assert reloaded.dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    for (k, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16), b), k


def _order_loop(config: dict) -> None:
    """A Ray Train loop that only records the pair ids each epoch delivers from each dataset (no model)."""
    import ray.train

    seen = {}
    for epoch in range(config["epochs"]):
        for name in config["names"]:
            shard = ray.train.get_dataset_shard(name)
            seen[f"{name}{epoch}"] = [
                str(p) for b in shard.iter_batches(batch_size=4, batch_format="numpy") for p in b["pair_id"]
            ]
    Path(config["out"]).write_text(json.dumps(seen))  # one machine: the test reads it back


@pytest.mark.slow
def test_training_order_is_shuffled_anew_each_epoch_and_reproducible_for_a_seed(demo_run, tiny_vlm, tmp_path):
    """The training ingest (what run_train hands Ray Train: datasets and DataConfig) delivers the same pairs
    every epoch in a new order, the same orders again for a second ingest with the same train.seed and others
    for another seed; validation keeps the file order. (Three ingests side by side in one trainer.)"""
    import pyarrow.parquet as pq
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sarlang_ray import io
    from sarlang_ray.train import ingest

    run_dir = tmp_path / "run"
    _copy_export(demo_run, run_dir)
    n, epochs = 24, 3
    datasets, options = {}, {}
    for name, seed in (("first", 0), ("again", 0), ("other", 1)):
        ds, config, _ = ingest(
            _config(
                run_dir, tiny_vlm, f"train.seed={seed}", f"train.limit_pairs={n}", "train.cpus_per_worker=0.5"
            )
        )
        datasets[name], options[name] = ds["train"], config._get_user_execution_options("train")
        assert options[name].preserve_order is False  # the training ingest's own options
    datasets["val"] = ds["val"]
    out = tmp_path / "seen.json"
    TorchTrainer(
        _order_loop,
        train_loop_config={"epochs": epochs, "out": str(out), "names": list(datasets)},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(tmp_path / "storage")),
        datasets=datasets,
        dataset_config=DataConfig(execution_options=options),
    ).fit()
    seen = json.loads(out.read_text())

    files = sorted(str(p) for p in (run_dir / "export" / "parquet" / "train").glob("*.parquet"))
    expected = pq.read_table(files, columns=["pair_id"])["pair_id"].to_pylist()[:n]  # the first n, file order
    orders = [seen[f"first{e}"] for e in range(epochs)]
    for e in range(epochs):
        assert sorted(orders[e]) == sorted(expected)  # every pair once per epoch
    assert orders[0] != expected and len({tuple(o) for o in orders}) == epochs  # shuffled, anew each epoch
    assert [seen[f"again{e}"] for e in range(epochs)] == orders  # the same seed: the same orders
    assert all(seen[f"other{e}"] != orders[e] for e in range(epochs))  # another seed: other orders
    parquet = str(run_dir / "export" / "parquet")
    val_files = io.glob(parquet, "val/*.parquet") or io.glob(parquet, "test/*.parquet")
    val_expected = pq.read_table(sorted(val_files), columns=["pair_id"])["pair_id"].to_pylist()[: n // 4]
    assert all(seen[f"val{e}"] == val_expected for e in range(epochs))  # held-out: file order, unshuffled


def _copy_export(demo_run, run_dir: Path) -> None:
    cfg, _ = demo_run
    shutil.copytree(Path(cfg.run.run_dir) / "export", run_dir / "export")


def _config(run_dir: Path, model: str, *overrides: str):
    return load_config(
        None, [f"run.run_dir={run_dir}", f"train.model={model}", "ray.progress=false", *overrides]
    )


def _logits(model_dir_or_model, processor):
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from sarlang_ray.models import chat_texts

    model = model_dir_or_model
    if isinstance(model, (str, Path)):
        model = AutoModelForImageTextToText.from_pretrained(model)
    prompt, _ = chat_texts(processor, "How many ships are there?")
    inputs = processor(images=[Image.new("RGB", (64, 64), (30, 60, 90))], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**inputs).logits


@pytest.mark.slow
def test_full_finetune_with_tied_embeddings_steps_the_leftover_and_reloads(demo_run, tiny_models, tmp_path):
    """Full fine-tuning of a model with tied embeddings (tiny Qwen2-VL, as Qwen2-VL-2B): 5 pairs, batch 1,
    grad_accum 2 -> 3 optimizer steps an epoch (the 5th micro-batch stepped, not carried over), the linear
    schedule ends at lr 0 exactly on the last step; the saved model reloads with from_pretrained and gives
    the same logits as the checkpoint loaded the way a resume loads it; loading that checkpoint for another
    model fails with a clear message instead of loading nothing."""
    import torch
    from transformers import AutoModelForImageTextToText

    model_dir = tiny_models("qwen2_vl")
    base = AutoModelForImageTextToText.from_pretrained(model_dir)
    assert _tied(base) and base.config.tie_word_embeddings
    run_dir = tmp_path / "run"
    _copy_export(demo_run, run_dir)
    cfg = _config(
        run_dir,
        model_dir,
        "train.method=full",
        "train.limit_pairs=5",
        "train.batch_size=1",
        "train.grad_accum=2",
        "train.epochs=2",
        "train.lr=0.003",
        "train.max_failures=0",
    )
    summary = pipeline.run(cfg, ["train"])["stages"]["train"]
    history = json.loads((run_dir / "train" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 3, 6]
    assert history[1]["lr"] > 0 and history[2]["lr"] == 0.0
    assert history[1]["order_sha256"] != history[2]["order_sha256"]

    ckpt = Path(summary["checkpoint"])
    processor = load_processor(str(ckpt / "merged"))
    reloaded = AutoModelForImageTextToText.from_pretrained(ckpt / "merged")
    assert _tied(reloaded)
    strict = load_checkpoint_model(model_dir, str(ckpt), torch.float32)  # the resume path
    trained, loaded = _logits(reloaded, processor), _logits(strict, processor)
    assert torch.allclose(trained, loaded, atol=1e-5)
    assert not torch.allclose(trained, _logits(base, processor), atol=1e-3)  # training changed the model

    # what a restarted worker does with this checkpoint when the model no longer matches it: a clear error
    with pytest.raises(RuntimeError, match=r"cannot resume from checkpoint .*missing [1-9]"):
        load_checkpoint_model(tiny_models("qwen2_vl", layers=3), str(ckpt), torch.float32)


@pytest.mark.slow
def test_fsdp_full_finetune_on_two_cpu_workers_saves_a_reloadable_model(demo_run, tiny_vlm, tmp_path):
    """train.strategy=fsdp: FSDP2 (fully_shard per decoder layer + root) on 2 Ray Train workers over gloo;
    the checkpoint is gathered into a plain save_pretrained folder that reloads with from_pretrained and
    loads strictly into a fresh model (the same logits), and the held-out loss goes down."""
    import torch

    run_dir = tmp_path / "run"
    _copy_export(demo_run, run_dir)
    cfg = _config(
        run_dir,
        tiny_vlm,
        "train.method=full",
        "train.strategy=fsdp",
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.limit_pairs=32",
        "train.batch_size=4",
        "train.epochs=1",
        "train.lr=0.003",
        "train.max_failures=0",
    )
    summary = pipeline.run(cfg, ["train"])["stages"]["train"]
    assert summary["val_loss_after"] < summary["val_loss_before"], summary
    history = json.loads((run_dir / "train" / "metrics.json").read_text())["history"]
    assert history[-1]["step"] == 4  # 32 pairs over 2 workers, batch 4
    ckpt = Path(summary["checkpoint"])
    processor = load_processor(str(ckpt / "merged"))
    strict = load_checkpoint_model(tiny_vlm, str(ckpt), torch.float32)
    merged = _logits(str(ckpt / "merged"), processor)
    assert torch.allclose(merged, _logits(strict, processor), atol=1e-5)
    assert not torch.allclose(merged, _logits(tiny_vlm, processor), atol=1e-3)


def _preprocess_in_a_worker(pid_file: str, batch: dict, model: str) -> list[str]:
    import os

    from sarlang_ray.train import preprocess_batch

    Path(pid_file).write_text(str(os.getpid()))
    return sorted(preprocess_batch(batch, model, None, 256))


@pytest.mark.serial  # cancels 0.5 and 1.2 s into a fresh worker: alone, so that load does not move them
def test_a_preprocessing_task_cancelled_in_its_first_imports_leaves_no_broken_worker(
    ray_session, tiny_vlm, tmp_path
):
    """Ray Data cancels preprocessing tasks when an execution is torn down (a lost node restarting the
    training workers). A cancel inside the first import of transformers -> torch used to leave the worker
    process with half-initialised modules, and Ray reused it: every later task there failed to import (CI:
    "module 'sympy' has no attribute 'printing'", each training retry). Now the cancelled task's process ends,
    and the next task runs in a clean one."""
    import io
    import time

    import psutil
    import ray
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (64, 48), 90).save(buf, format="PNG")
    batch = {
        "pair_id": np.array(["p0"]),
        "image": [{"bytes": buf.getvalue()}],
        "question": np.array(["Is there a road?"]),
        "answer": np.array(["no"]),
    }
    task = ray.remote(_preprocess_in_a_worker)
    for attempt, delay in enumerate((0.5, 1.2)):
        # workers of their own (a runtime_env of their own): nothing imported yet when the cancel comes
        opts = {"runtime_env": {"env_vars": {"SARLANG_TEST_FRESH_WORKERS": f"{attempt}"}}}
        pid_file = tmp_path / f"pid-{attempt}"
        ref = task.options(**opts).remote(str(pid_file), batch, tiny_vlm)
        while not pid_file.exists():
            time.sleep(0.01)
        time.sleep(delay)  # the first imports take seconds in a fresh process
        ray.cancel(ref)
        with pytest.raises(ray.exceptions.TaskCancelledError):
            ray.get(ref, timeout=60)
        cancelled = int(pid_file.read_text())
        deadline = time.time() + 10

        def gone(
            pid: int = cancelled,
        ) -> bool:  # exited, or a zombie; NoSuchProcess: it exited between the calls
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        while not gone() and time.time() < deadline:
            time.sleep(0.05)
        assert gone()
        keys = ray.get(task.options(**opts).remote(str(pid_file), batch, tiny_vlm), timeout=120)
        assert int(pid_file.read_text()) != cancelled
        assert {"input_ids", "labels", "pixel_values"} <= set(keys)


def test_a_held_out_loss_on_the_test_split_is_said_loudly(tmp_path):
    """An export without a val split: the held-out loss is measured on the test split (the leaderboard's
    pairs), and the train marker and the summary say so instead of calling it held-out as usual."""
    from sarlang_ray.train import held_out_split

    parquet = tmp_path / "export" / "parquet"
    for split in ("train", "test"):
        (parquet / split).mkdir(parents=True)
        (parquet / split / "0.parquet").write_bytes(b"")
    assert held_out_split(str(parquet)) == "test"
    (parquet / "val").mkdir()
    (parquet / "val" / "0.parquet").write_bytes(b"")
    assert held_out_split(str(parquet)) == "val"
    counts = {
        "n_train": 10,
        "val_loss_before": 2.0,
        "val_loss_after": 1.0,
        "checkpoint": "c",
        "held_out_split": "test",
        "warnings": ["train: the export has no val split, so the held-out loss is the test split's"],
    }
    text = pipeline.format_summary(
        {
            "workflow": "w",
            "run_dir": "r",
            "wall_seconds": 1.0,
            "stages": {"train": counts},
            "tiles_per_gsd": {},
            "objects_per_class": {},
            "rejects_by_reason": {},
        }
    )
    assert (
        "held-out loss (test split!) 2.000 -> 1.000" in text
        and "!! WARNING train: the export has no val split" in text
    )
