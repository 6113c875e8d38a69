"""train: fine-tune a Hugging Face VLM on the exported dataset with Ray Train (TorchTrainer, Train V2).

Reads ``export/parquet/{train,val}`` with Ray Data (each worker streams its shard through
``get_dataset_shard``), chat-formats every pair with the model's own processor and chat template, and
puts the loss on the answer tokens only. LoRA through peft with the paper's defaults (r=8 on all linear
layers, lr 1e-4, 3 epochs, warm-up ratio 0.1, per-device batch 1) or full fine-tuning. Each epoch ends
with the held-out loss and a checkpoint (LoRA adapter as safetensors, optimizer and history); the last
one also holds the merged model, loadable with plain ``AutoModelForImageTextToText.from_pretrained``.
A restarted worker group resumes from the latest checkpoint (``FailureConfig(max_failures)``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

from sarlang_ray import io, plots
from sarlang_ray.config import WorkflowConfig
from sarlang_ray.models import load_image, load_processor


def autocast_dtype(precision: str, device):
    """The autocast dtype for ``train.precision`` on ``device`` (None: plain fp32)."""
    import torch

    if precision == "auto":
        cuda = getattr(device, "type", str(device)) == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _collate(processor, rows: dict, max_length: int, device, max_pixels: int | None = None):
    """Chat-format a batch; labels are -100 everywhere but on the answer tokens (and the end token)."""
    images = [load_image(img["bytes"], max_pixels) for img in rows["image"]]
    prompts, fulls = [], []
    eos = processor.tokenizer.eos_token or ""
    for q, a in zip(rows["question"], rows["answer"]):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": str(q)}]}]
        prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
        prompts.append(prompt)
        fulls.append(prompt + str(a) + eos)
    processor.tokenizer.padding_side = "right"
    batch = processor(images=images, text=fulls, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for i, (img, prompt) in enumerate(zip(images, prompts)):
        n_prompt = processor(images=[img], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
        labels[i, :n_prompt] = -100
    batch["labels"] = labels
    return {k: v.to(device) for k, v in batch.items()}


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, get_linear_schedule_with_warmup

    t = config["train"]
    torch.manual_seed(t["seed"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    model_dir = io.local_copy(t["model"])  # a model folder on s3:// is fetched once per node
    processor = load_processor(model_dir, config["max_pixels"])
    amp = autocast_dtype(t["precision"], device)  # mixed precision where the device supports it
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    def forward(rows):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return model(**_collate(processor, rows, t["max_length"], device, config["max_pixels"]))

    model = AutoModelForImageTextToText.from_pretrained(model_dir, use_safetensors=True)
    if t["method"] == "lora":
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        model = get_peft_model(model, LoraConfig(r=t["lora_r"], lora_alpha=t["lora_alpha"], lora_dropout=t["lora_dropout"],
                                                 target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t["lr"])
    steps_per_epoch = max(1, math.ceil(config["n_train"] / (t["batch_size"] * world * t["grad_accum"])))
    total = steps_per_epoch * t["epochs"]
    scheduler = get_linear_schedule_with_warmup(optimizer, int(t["warmup_ratio"] * total), total)
    start_epoch, history, resumes = 0, [], []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resume: adapter/model weights, optimizer, scheduler and history
        with checkpoint.as_directory() as d:
            if t["method"] == "lora":
                set_peft_model_state_dict(model, load_file(os.path.join(d, "adapter", "adapter_model.safetensors")))
            else:
                model.load_state_dict(load_file(os.path.join(d, "model.safetensors")), strict=False)
            state = torch.load(os.path.join(d, "trainer_state.pt"), weights_only=True)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            meta = json.load(open(os.path.join(d, "state.json")))
            start_epoch, history = meta["epoch"] + 1, meta["history"]
            resumes = meta.get("resumes", []) + [start_epoch]  # visible proof of each resume
    model = ray.train.torch.prepare_model(model)
    inner = model.module if hasattr(model, "module") else model

    def mean_loss(shard) -> float:
        model.eval()
        total_loss, n = torch.zeros(2, device=device), 0
        with torch.no_grad():
            for rows in shard.iter_batches(batch_size=t["batch_size"], batch_format="numpy"):
                out = forward(rows)
                total_loss += torch.tensor([out.loss.item() * len(rows["question"]), len(rows["question"])], device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(total_loss)
        model.train()
        return float(total_loss[0] / max(total_loss[1], 1))

    val = ray.train.get_dataset_shard("val")
    if start_epoch == 0 and not history:
        t0 = time.time()
        history.append({"epoch": -1, "step": 0, "val_loss": mean_loss(val)})
        history[-1]["val_seconds"] = time.time() - t0
    step = history[-1]["step"]
    for epoch in range(start_epoch, t["epochs"]):
        model.train()
        t0, seen, running = time.time(), 0, []
        for i, rows in enumerate(ray.train.get_dataset_shard("train").iter_batches(batch_size=t["batch_size"], batch_format="numpy")):
            loss = forward(rows).loss
            scaler.scale(loss / t["grad_accum"]).backward()
            running.append(loss.item())
            seen += len(rows["question"])
            if (i + 1) % t["grad_accum"] == 0:
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
        seconds = time.time() - t0  # training only: the held-out pass below is timed apart
        val_loss = mean_loss(val)
        history.append({"epoch": epoch, "step": step, "train_loss": sum(running) / max(1, len(running)), "val_loss": val_loss,
                        "seconds": seconds, "val_seconds": time.time() - t0 - seconds,
                        "samples_per_s": seen * world / max(seconds, 1e-9)})
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                if t["method"] == "lora":
                    inner.save_pretrained(os.path.join(d, "adapter"))  # safetensors adapter
                else:
                    from safetensors.torch import save_file

                    save_file({k: v.contiguous() for k, v in inner.state_dict().items()}, os.path.join(d, "model.safetensors"))
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                           os.path.join(d, "trainer_state.pt"))
                json.dump({"epoch": epoch, "history": history, "resumes": resumes}, open(os.path.join(d, "state.json"), "w"))
                if epoch == t["epochs"] - 1:  # the final checkpoint also holds the merged model
                    merged = inner.merge_and_unload() if t["method"] == "lora" else inner
                    merged.save_pretrained(os.path.join(d, "merged"))
                    processor.save_pretrained(os.path.join(d, "merged"))
            ray.train.report(history[-1], checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


def run_train(cfg: WorkflowConfig) -> dict:
    """Fine-tune on export/parquet; writes train/metrics.json, train/loss_curve.png, checkpoints under train/."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    if t.init_tiny and not io.exists(io.join(t.model, "config.json")):
        from sarlang_ray.models import init_tiny_vlm

        init_tiny_vlm(t.model, seed=cfg.run.seed)
    if not io.is_remote(t.model) and os.path.isdir(t.model):
        t.model = os.path.abspath(t.model)  # workers may run in another directory (or on another node)
    parquet = io.join(cfg.run.run_dir, "export", "parquet")
    splits = {s: io.glob(parquet, f"{s}/*.parquet") for s in ("train", "val", "test")}
    if not splits["train"]:
        raise FileNotFoundError(f"no training data under {parquet}: run the export stage first")
    held_out = splits["val"] or splits["test"]  # small archives may have no validation scene
    columns = ["image", "question", "answer"]
    train_ds = io.parquet_dataset(splits["train"], columns)  # light reads: see io.parquet_dataset
    val_ds = io.parquet_dataset(held_out, columns)
    if t.limit_pairs:
        train_ds, val_ds = train_ds.limit(t.limit_pairs), val_ds.limit(max(1, t.limit_pairs // 4))
    n_train = io.parquet_rows(splits["train"])  # from the footers: counting the dataset would read it all
    if t.limit_pairs:
        n_train = min(n_train, t.limit_pairs)
    storage = t.storage_path or io.join(cfg.run.run_dir, "train")
    storage_fs, storage_path = io.arrow_filesystem(storage)  # s3:// through the pipeline's own fsspec config
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": {k: getattr(t, k) for k in t.__dataclass_fields__}, "n_train": n_train,
                           "max_pixels": cfg.run.max_pixels},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(name=t.name, storage_path=storage_path, storage_filesystem=storage_fs, checkpoint_config=CheckpointConfig(num_to_keep=t.num_to_keep),
                             failure_config=FailureConfig(max_failures=t.max_failures)),
        datasets={"train": train_ds, "val": val_ds},
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = json.load(open(os.path.join(d, "state.json")))
    history = state["history"]
    checkpoint = result.checkpoint.path if storage_fs is None else f"{storage.split('://')[0]}://{result.checkpoint.path}"
    out = {"history": history, "resumes": state.get("resumes", []), "checkpoint": checkpoint,
           "merged_model": io.join(checkpoint, "merged"), "n_train": n_train,
           "val_loss_before": history[0]["val_loss"], "val_loss_after": history[-1]["val_loss"]}
    io.write_json_atomic(io.join(cfg.run.run_dir, "train", "metrics.json"), out)
    _plot(history, io.join(cfg.run.run_dir, "train", "loss_curve.png"))
    return out


def _plot(history: list[dict], uri: str) -> None:
    fig, ax = plots.pyplot().subplots(figsize=(6, 3.2))
    ax.plot([h["epoch"] + 1 for h in history], [h["val_loss"] for h in history], "o-", label="held-out loss")
    tr = [h for h in history if "train_loss" in h]
    ax.plot([h["epoch"] + 1 for h in tr], [h["train_loss"] for h in tr], "s--", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    plots.save_png(fig, uri)
