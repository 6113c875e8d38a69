"""train: fine-tune a Hugging Face VLM on the exported dataset with Ray Train (TorchTrainer, Train V2).

The wiring, top to bottom:

- **ingest** (:func:`ingest`): Ray Data reads ``export/parquet/{train,val}``; the training rows get a new
  seeded global shuffle every epoch (``random_shuffle`` with ``RandomSeedConfig(train.seed,
  reseed_after_execution=True)``); then Ray Data tasks (``map_batches(preprocess_batch)``, at most
  ``train.preprocess_concurrency`` at once, each worker process keeping its :class:`Preprocess` and so its
  processor from one task and one epoch to the next) decode the PNG, render the model's own chat template
  (``models.chat_texts``), run the processor and build the labels. The training dataset runs with its own
  execution options (``DataConfig``: no ``preserve_order``), the held-out one in file order, unshuffled.
- **workers** (:func:`train_loop_per_worker`): each streams its shard with prefetch, pads and concatenates the
  tensors (:func:`collate`, generic over whatever the processor returned) and moves them to its device.
  Gradient accumulation skips the gradient all-reduce on all but the last micro-step (DDP ``no_sync``, FSDP2
  ``set_requires_gradient_sync``) and steps the left-over micro-batches at the end of an epoch.
- **strategies**: ``ddp`` (``prepare_model``) or ``fsdp`` (FSDP2 ``fully_shard`` per decoder layer, then the
  root; full fine-tuning).
- **checkpoints**: every epoch, with ``save_pretrained`` (tied weights safe): the LoRA adapter or the full
  model, the optimizer and scheduler, the history. Resuming checks that the checkpoint's weights are exactly
  the model's and fails with a clear message otherwise. The last checkpoint also holds ``merged/`` (model and
  processor, in the training dtype), loadable with plain ``AutoModelForImageTextToText.from_pretrained``.
  A restarted worker group resumes from the latest checkpoint (``FailureConfig(max_failures)``).

LoRA through peft with the paper's defaults (r=8 on all linear layers, lr 1e-4, 3 epochs, warm-up ratio 0.1,
per-device batch 1) or full fine-tuning; the loss is on the answer tokens only, the answer's span found from
the chat template.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any

from sarlang_ray import io, plots, reaper
from sarlang_ray.config import WorkflowConfig
from sarlang_ray.models import chat_texts, load_image, load_processor

# torch and Ray Train are imported where they run (the driver never loads torch for this module)
if TYPE_CHECKING:
    import torch
    from ray.train import DataConfig

log = logging.getLogger("sarlang")

IGNORE = -100  # label of tokens without loss (prompt, image, padding)
STRATEGIES = ("ddp", "fsdp")


def autocast_dtype(precision: str, device):
    """The autocast dtype for ``train.precision`` on ``device`` (None: plain fp32)."""
    import torch

    if precision == "auto":
        cuda = getattr(device, "type", str(device)) == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def weights_dtype(method: str, amp):
    """The dtype the model's weights are loaded (and the merged model saved) in.

    LoRA trains small fp32 adapters (peft keeps them fp32) over frozen base weights, which are loaded in the
    autocast dtype: bf16 halves the memory of a 7B base (14 GB instead of 28). Full fine-tuning keeps fp32
    master weights (AdamW updates in bf16 lose small steps) and computes in the autocast dtype."""
    import torch

    return amp if method == "lora" and amp is not None else torch.float32


# --- preprocessing (Ray Data, ahead of the workers)
# -----------------------------------------------------------


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_pair(processor, image, question: str, answer: str, max_length: int) -> dict:
    """One pair as the processor's tensors for training (numpy, batch dimension 1) plus ``labels``.

    One processor call on the full conversation (``models.chat_texts``); the labels are ``-100`` on the
    prompt's tokens (image tokens included) and the token ids on the answer and its end-of-turn marker. The
    answer's length comes from the tokenizer alone (the prompt and the full text without image expansion:
    the tokens after their common prefix), checked against the processor's tokens; where they disagree the
    prompt goes through the processor too. Sequences longer than ``max_length`` lose the end of the answer.

    Raises:
        ValueError: the prompt alone (with its image tokens) is longer than ``max_length``.
    """
    prompt, full = chat_texts(processor, question, answer)
    enc = dict(processor(images=[image], text=[full], return_tensors="np"))
    ids = enc["input_ids"][0].tolist()
    tok = processor.tokenizer
    plain_full, plain_prompt = tok(full)["input_ids"], tok(prompt)["input_ids"]
    n_answer = len(plain_full) - _common_prefix(plain_prompt, plain_full)
    if n_answer > 0 and ids[len(ids) - n_answer :] == plain_full[len(plain_full) - n_answer :]:
        n_prompt = len(ids) - n_answer
    else:  # the processor tokenises differently (special tokens, ...): the prompt through it as well
        prompt_ids = processor(images=[image], text=[prompt], return_tensors="np")["input_ids"][0].tolist()
        n_prompt = _common_prefix(prompt_ids, ids)
    if n_prompt >= max_length:
        raise ValueError(
            f"the prompt of {question!r} is {n_prompt} tokens with its image, not less than "
            f"train.max_length={max_length}: raise train.max_length or lower run.max_pixels"
        )
    shape = enc["input_ids"].shape
    labels = enc["input_ids"].copy()
    labels[0, :n_prompt] = IGNORE
    enc["labels"] = labels
    if shape[1] > max_length:  # cut the answer's end, in every per-token tensor alike
        enc = {k: v[:, :max_length] if v.shape == shape else v for k, v in enc.items()}
    return enc


class Preprocess:
    """PNG -> image (``run.max_pixels``) -> chat template -> processor -> labels, for a batch of pairs; the
    processor is loaded when it is made (:func:`preprocess_batch` keeps one per worker process).

    Every output column holds one array per pair, as the processor returned it for that pair alone (batch
    dimension 1 for per-token and most image tensors; Qwen's patch rows as they are); :func:`collate` batches
    them on the worker."""

    def __init__(self, model: str, max_pixels: int | None, max_length: int):
        self.processor = load_processor(io.local_copy(model), max_pixels)
        self.max_pixels, self.max_length = max_pixels, max_length

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        encoded = [
            encode_pair(self.processor, load_image(img["bytes"], self.max_pixels), q, a, self.max_length)
            for img, q, a in zip(batch["image"], batch["question"], batch["answer"])
        ]
        out = {"pair_id": np.asarray(batch["pair_id"])}
        for key in encoded[0]:
            column = np.empty(len(encoded), dtype=object)  # one array per pair, shapes may differ
            column[:] = [e[key] for e in encoded]
            out[key] = column
        return out


_PREPROCESSORS: dict[tuple, Preprocess] = {}


def preprocess_batch(batch: dict, model: str, max_pixels: int | None, max_length: int) -> dict:
    """:class:`Preprocess` as a Ray Data task function: the processor is loaded once per worker *process* and
    kept there (Ray reuses its worker processes across tasks), so a new epoch, which is a new execution of the
    dataset, starts no actor and loads no processor again."""
    key = (model, max_pixels, max_length)
    with reaper.cancel_ends_worker():  # Ray Data cancels these tasks when an epoch's execution is torn down
        if key not in _PREPROCESSORS:
            _PREPROCESSORS[key] = Preprocess(model, max_pixels, max_length)
        return _PREPROCESSORS[key](batch)


def collate(batch: dict, pad_token_id: int, device=None, float_dtype=None) -> dict:
    """Batch the per-pair arrays of :class:`Preprocess` into model inputs (torch tensors on ``device``).

    Generic over processors: a tensor shaped like the pair's ``input_ids`` is per-token (``input_ids``,
    ``attention_mask``, ``labels``, ``token_type_ids``, ...) and is padded on the right along the sequence
    (``pad_token_id``, ``-100`` for labels, 0 otherwise); any other (``pixel_values``, ``image_grid_thw``,
    ``pixel_attention_mask``, ``image_sizes``...) is concatenated along its first dimension, its other
    dimensions zero-padded to the largest (what the processors themselves do when they batch: Qwen's patch
    rows concatenate, Idefics3's image tiles pad). Floating tensors are cast to ``float_dtype`` if given."""
    import numpy as np
    import torch

    ids = [np.asarray(a) for a in batch["input_ids"]]
    out = {}
    for key, column in batch.items():
        if key == "pair_id":
            continue
        arrays = [np.asarray(a) for a in column]
        if all(a.shape == i.shape for a, i in zip(arrays, ids)):
            pad = {"input_ids": pad_token_id, "labels": IGNORE}.get(key, 0)
            width = max(a.shape[-1] for a in arrays)
            arrays = [
                np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])], constant_values=pad)
                for a in arrays
            ]
        else:
            largest = np.max([a.shape for a in arrays], axis=0)
            arrays = [
                np.pad(a, [(0, 0)] + [(0, int(m - s)) for m, s in zip(largest[1:], a.shape[1:])])
                for a in arrays
            ]
        tensor = torch.from_numpy(np.concatenate(arrays))
        if float_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(float_dtype)
        out[key] = tensor if device is None else tensor.to(device)
    return out


# --- checkpoints --------------------------------------------------------------------------------------------


def load_checkpoint_model(model_dir: str, folder: str, dtype):
    """The model of ``model_dir`` (its config: the architecture being trained) with the weights of the
    ``save_pretrained`` checkpoint ``folder``, checked key by key.

    Loading goes through ``from_pretrained`` (which maps a checkpoint's saved key names onto the model's and
    re-ties tied weights, saved once) with the training model's own config, so a checkpoint written by another
    model cannot bring its own architecture along.

    Raises:
        RuntimeError: the checkpoint's keys or shapes are not exactly the model's (it was written by another
            model or another ``train.method``), with the differences and what to do.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        # transformers types the return as the model alone; output_loading_info=True makes it (model, info)
        loaded: Any = AutoModelForImageTextToText.from_pretrained(
            folder,
            config=AutoConfig.from_pretrained(model_dir),
            dtype=dtype,
            use_safetensors=True,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
        model, info = loaded
    except (OSError, ValueError, RuntimeError) as exc:
        raise RuntimeError(f"cannot resume from checkpoint {folder}: {exc}. {_WHAT_TO_DO}") from exc
    shapes = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])]
    missing, unexpected = list(info.get("missing_keys", [])), list(info.get("unexpected_keys", []))
    if missing or unexpected or shapes:
        raise RuntimeError(_mismatch(folder, sorted(missing), sorted(unexpected), sorted(shapes)))
    return model


def check_adapter(model, adapter: dict, folder: str) -> None:
    """Raise a clear ``RuntimeError`` unless ``adapter`` holds exactly ``model``'s LoRA weights (keys,
    shapes)."""
    from peft import get_peft_model_state_dict

    own = get_peft_model_state_dict(model)
    missing, unexpected = sorted(set(own) - set(adapter)), sorted(set(adapter) - set(own))
    shapes = sorted(k for k in set(own) & set(adapter) if tuple(own[k].shape) != tuple(adapter[k].shape))
    if missing or unexpected or shapes:
        raise RuntimeError(_mismatch(folder, missing, unexpected, shapes))


def _mismatch(folder: str, missing: list, unexpected: list, shapes: list) -> str:
    def few(keys: list) -> str:
        return f"{len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"

    return (
        f"cannot resume from checkpoint {folder}: its weights do not match the model being trained "
        f"(missing {few(missing)}, unexpected {few(unexpected)}, shape differs {few(shapes)}). {_WHAT_TO_DO}"
    )


_WHAT_TO_DO = (
    "It was written by another train.model, train.method or LoRA setting: resume with the settings that "
    "wrote it, or start afresh with a new train.name (or an empty train.storage_path)"
)


def _decoder_layers(model) -> list:
    """The modules FSDP shards one by one: those whose class is in the model's ``_no_split_modules`` (the
    transformer blocks of its language model and vision tower, the unit transformers keeps whole)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no _no_split_modules: train.strategy=fsdp cannot find "
            "its layers to shard; use train.strategy=ddp"
        )
    return layers


def _save_model(model, folder: str, state_dict: dict | None = None, dtype=None) -> None:
    """``save_pretrained`` (safetensors; tied weights written once), optionally with the weights cast to
    ``dtype`` and the config (and its sub-configs) saying so; ``model`` itself is left as it is."""
    import copy

    import torch

    if dtype is None or dtype == torch.float32:
        model.save_pretrained(folder, state_dict=state_dict)
        return
    state_dict = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in (state_dict if state_dict is not None else model.state_dict()).items()
    }
    model.save_pretrained(folder, state_dict=state_dict)
    config = copy.deepcopy(model.config)  # save_pretrained writes the dtype of the parameters in memory
    for c in [config] + [getattr(config, name, None) for name in getattr(config, "sub_configs", {})]:
        if c is not None:
            c.dtype = dtype
    config.save_pretrained(folder)


# --- the worker ---------------------------------------------------------------------------------------------


def steps_per_epoch(n_train: int, world: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch: every worker gets ``n_train // world`` pairs (an equal split), in
    ``ceil(rows / batch_size)`` micro-batches, stepped every ``grad_accum`` and once more for the
    left-over."""
    rows = n_train // world
    return math.ceil(math.ceil(rows / batch_size) / grad_accum)


@dataclasses.dataclass
class _Worker:
    """What one Ray Train worker holds while it trains; the named steps below read and update it."""

    t: dict  # the train section
    rank: int
    world: int
    device: torch.device
    processor: Any  # a transformers processor (loaded by build_model)
    amp: torch.dtype | None  # autocast dtype, or None
    dtype: torch.dtype  # weights dtype
    fsdp: bool
    # set by the steps below (Any: None until then, and the wrappers' types are not torch.nn.Module's own)
    model: Any = None  # what runs forward: DDP-wrapped, FSDP-sharded or plain
    inner: Any = None  # what saves: the unwrapped model (peft or transformers)
    params: list = dataclasses.field(default_factory=list)
    optimizer: Any = None  # torch.optim.AdamW (make_optimizer)
    scheduler: Any = None  # its LambdaLR warm-up schedule
    scaler: Any = None  # torch.amp.GradScaler
    step: int = 0

    @property
    def pad_id(self) -> int:
        tok = self.processor.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def _open_worker(config: dict) -> _Worker:
    import ray.train
    import torch

    t = config["train"]
    torch.manual_seed(t["seed"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    amp = autocast_dtype(t["precision"], device)  # mixed precision where the device supports it
    w = _Worker(
        t=t,
        rank=ctx.get_world_rank(),
        world=ctx.get_world_size(),
        device=device,
        processor=None,
        amp=amp,
        dtype=weights_dtype(t["method"], amp),
        fsdp=t["strategy"] == "fsdp",
    )
    w.scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    return w


def build_model(w: _Worker, model_dir: str, checkpoint_dir: str | None):
    """The model to train: the base (or, resuming full fine-tuning, the checkpoint's weights, checked key by
    key), with the LoRA adapter on all linear layers (the checkpoint's, checked, when resuming)."""
    from transformers import AutoModelForImageTextToText

    d, t = checkpoint_dir, w.t
    if d and t["method"] == "full":
        model = load_checkpoint_model(model_dir, d, w.dtype)
    else:
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=w.dtype, use_safetensors=True)
    if t["method"] == "lora":
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        model = get_peft_model(
            model,
            LoraConfig(
                r=t["lora_r"],
                lora_alpha=t["lora_alpha"],
                lora_dropout=t["lora_dropout"],
                target_modules="all-linear",
            ),
        )
        if d:
            adapter = load_file(os.path.join(d, "adapter", "adapter_model.safetensors"))
            check_adapter(model, adapter, os.path.join(d, "adapter"))
            set_peft_model_state_dict(model, adapter)
    return model


def resume_state(checkpoint_dir: str | None) -> tuple[int, list[dict], list[int], dict | None]:
    """(first epoch, history, resumes, optimizer + scheduler state) from a checkpoint, or a fresh start."""
    if not checkpoint_dir:
        return 0, [], [], None
    import torch

    trainer_state = torch.load(os.path.join(checkpoint_dir, "trainer_state.pt"), weights_only=True)
    with open(os.path.join(checkpoint_dir, "state.json")) as f:
        meta = json.load(f)
    start_epoch = meta["epoch"] + 1
    # resumes: proof
    return (
        start_epoch,
        meta["history"],
        meta.get("resumes", []) + [start_epoch],
        trainer_state,
    )


def distribute(w: _Worker, model) -> None:
    """DDP (``prepare_model``, a no-op on one worker) or FSDP2: ``fully_shard`` per decoder layer, then the
    root."""
    import ray.train

    if w.fsdp:
        from torch.distributed.fsdp import fully_shard

        model.to(w.device)
        for layer in _decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        w.model = w.inner = model
    else:
        w.model = ray.train.torch.prepare_model(model)  # DDP when there are several workers
        w.inner = w.model.module if hasattr(w.model, "module") else w.model
    w.params = [p for p in w.model.parameters() if p.requires_grad]


def make_optimizer(w: _Worker, n_train: int, trainer_state: dict | None) -> None:
    """AdamW over the trainable parameters and the linear warm-up schedule, restored from
    ``trainer_state``."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    t = w.t
    w.optimizer = torch.optim.AdamW(w.params, lr=t["lr"])
    total = steps_per_epoch(n_train, w.world, t["batch_size"], t["grad_accum"]) * t["epochs"]
    w.scheduler = get_linear_schedule_with_warmup(w.optimizer, int(t["warmup_ratio"] * total), total)
    if trainer_state is None:
        return
    if w.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            w.model, w.optimizer, trainer_state["optimizer"], options=StateDictOptions(full_state_dict=True)
        )
    else:
        w.optimizer.load_state_dict(trainer_state["optimizer"])
    w.scheduler.load_state_dict(trainer_state["scheduler"])


def _forward(w: _Worker, batch):
    import torch

    inputs = collate(batch, w.pad_id, w.device, w.amp if w.amp is not None else w.dtype)
    with torch.autocast(w.device.type, dtype=w.amp or torch.float32, enabled=w.amp is not None):
        return w.model(**inputs)


def _batches(w: _Worker, name: str):
    import ray.train

    return ray.train.get_dataset_shard(name).iter_batches(
        batch_size=w.t["batch_size"], batch_format="numpy", prefetch_batches=w.t["prefetch_batches"]
    )


def _sync_gradients(w: _Worker, on: bool):
    """No gradient all-reduce on accumulation micro-steps, only on the one before a step."""
    import contextlib

    if w.fsdp:
        w.model.set_requires_gradient_sync(on)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if on or not hasattr(w.model, "no_sync") else w.model.no_sync()


def held_out_loss(w: _Worker) -> float:
    """Mean loss over the held-out shard, summed on the device and all-reduced once (not one sync per
    batch)."""
    import torch

    w.model.eval()
    total_loss = torch.zeros(2, device=w.device)
    with torch.no_grad():
        for batch in _batches(w, "val"):
            n = len(batch["pair_id"])
            total_loss[0] += _forward(w, batch).loss.detach().float() * n
            total_loss[1] += n
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total_loss)
    w.model.train()
    return float(total_loss[0] / total_loss[1].clamp(min=1))


def _optimizer_step(w: _Worker, micro: int) -> None:
    accum = w.t["grad_accum"]
    if micro < accum:  # the epoch's left-over: each micro-batch's loss was divided by accum, not micro
        for p in w.params:
            if p.grad is not None:
                p.grad.mul_(accum / micro)
    w.scaler.step(w.optimizer)
    w.scaler.update()
    w.scheduler.step()
    w.optimizer.zero_grad(set_to_none=True)
    w.step += 1


def train_epoch(w: _Worker) -> dict:
    """One pass over this worker's training shard with gradient accumulation; the epoch's history fields."""
    import torch

    accum = w.t["grad_accum"]
    w.model.train()
    t0, seen, order = time.time(), 0, hashlib.sha256()
    # the micro-batches' summed loss stays on the device: read once per epoch (the history's logging step),
    # since a .item() per micro-batch waits for the GPU every step
    running, micro_batches = torch.zeros((), device=w.device), 0
    pending = 0  # micro-batches whose gradients wait for a step
    it = iter(_batches(w, "train"))
    batch = next(it, None)
    while batch is not None:
        following = next(it, None)  # one ahead: the epoch's last micro-batch must sync and step
        last = pending + 1 == accum or following is None
        with _sync_gradients(w, last):
            loss = _forward(w, batch).loss
            w.scaler.scale(loss / accum).backward()
        pending += 1
        running += loss.detach().float()
        micro_batches += 1
        seen += len(batch["pair_id"])
        order.update("\n".join(map(str, batch["pair_id"])).encode() + b"\n")
        if last:
            _optimizer_step(w, pending)
            pending = 0
        batch = following
    seconds = time.time() - t0
    # rank 0's sample order this epoch
    return {
        "step": w.step,
        "train_loss": running.item() / max(1, micro_batches),
        "seconds": seconds,
        "samples_per_s": seen * w.world / max(seconds, 1e-9),
        "lr": w.scheduler.get_last_lr()[0],
        "order_sha256": order.hexdigest(),
    }


def save_checkpoint(w: _Worker, epoch: int, history: list[dict], resumes: list[int], final: bool) -> None:
    """Report the epoch's metrics with a checkpoint: adapter or full weights, optimizer + scheduler, history;
    the final one also holds ``merged/`` (model + processor, in the training dtype). Under FSDP every rank
    gathers the full state (collectives), rank 0 writes."""
    import ray.train
    import torch

    if w.fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(w.model, options=full)
        trainer_state = {
            "optimizer": get_optimizer_state_dict(w.model, w.optimizer, options=full),
            "scheduler": w.scheduler.state_dict(),
        }
    else:
        model_state = None
        trainer_state = {"optimizer": w.optimizer.state_dict(), "scheduler": w.scheduler.state_dict()}
    lora = w.t["method"] == "lora"
    with tempfile.TemporaryDirectory() as d:
        if w.rank == 0:
            if lora:
                w.inner.save_pretrained(os.path.join(d, "adapter"))  # safetensors adapter
            else:
                _save_model(w.inner, d, model_state)  # model.safetensors + config.json, fp32
            torch.save(trainer_state, os.path.join(d, "trainer_state.pt"))
            with open(os.path.join(d, "state.json"), "w") as f:
                json.dump({"epoch": epoch, "history": history, "resumes": resumes}, f)
            if final:
                merged = os.path.join(d, "merged")
                if lora:
                    _save_model(w.inner.merge_and_unload(), merged)  # the base's dtype (bf16 on such GPUs)
                else:
                    _save_model(w.inner, merged, model_state, dtype=w.amp)
                w.processor.save_pretrained(merged)
        ray.train.report(
            history[-1], checkpoint=ray.train.Checkpoint.from_directory(d) if w.rank == 0 else None
        )


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: build the model (resuming from the latest checkpoint if there is one),
    distribute it, make the optimizer, then per epoch train, measure the held-out loss and save a
    checkpoint."""
    import contextlib

    import ray.train

    w = _open_worker(config)
    model_dir = io.local_copy(w.t["model"])  # a model folder on s3:// is fetched once per node
    w.processor = load_processor(model_dir, config["max_pixels"])  # saved beside the merged model
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as d:
        model = build_model(w, model_dir, d)
        start_epoch, history, resumes, trainer_state = resume_state(d)
    distribute(w, model)
    make_optimizer(w, config["n_train"], trainer_state)
    if start_epoch == 0 and not history:
        t0 = time.time()
        history.append({"epoch": -1, "step": 0, "val_loss": held_out_loss(w)})
        history[-1]["val_seconds"] = time.time() - t0
    w.step = history[-1]["step"]
    for epoch in range(start_epoch, w.t["epochs"]):
        entry = {"epoch": epoch, **train_epoch(w)}
        t0 = time.time()
        entry["val_loss"] = held_out_loss(w)
        entry["val_seconds"] = time.time() - t0
        history.append(entry)
        save_checkpoint(w, epoch, history, resumes, final=epoch == w.t["epochs"] - 1)


# --- the driver ---------------------------------------------------------------------------------------------


def _rows_dataset(files: list[str], columns: list[str], limit: int | None):
    """A Ray Dataset of the rows of ``files`` in file order, one read per file; ``limit``: the first rows of
    the first files (counted from the Parquet footers, so the same pairs every run and epoch)."""
    import ray

    items: list[dict[str, Any]] = [{"uri": f, "rows": None} for f in files]
    if limit is not None:
        items = []
        left = limit
        for f in files:
            if left <= 0:
                break
            n = io.parquet_rows([f])
            items.append({"uri": f, "rows": min(n, left)})
            left -= n

    def read(item: dict) -> list[dict]:
        table = io.read_parquet(item["uri"], columns=columns)
        return (table if item["rows"] is None else table.slice(0, item["rows"])).to_pylist()

    return ray.data.from_items(items).flat_map(read, num_cpus=0.1)


def held_out_split(parquet: str) -> str:
    """The split the held-out loss is measured on: ``val``, or ``test`` when the export has no validation
    pairs (a small archive may put no block in val). Then the held-out loss is the test split's, the split the
    leaderboard scores: the training log, metrics.json and the run summary say so."""
    return "val" if io.glob(parquet, "val/*.parquet") else "test"


def ingest(cfg: WorkflowConfig) -> tuple[dict, DataConfig, int]:
    """``(datasets, data_config, n_train)`` for the trainer: the preprocessed ``train`` (shuffled anew each
    epoch with ``train.seed``) and ``val`` datasets, and the ``DataConfig`` that runs the training ingest
    without ``preserve_order`` (the held-out one keeps the run's options)."""
    import ray
    from ray.data import RandomSeedConfig
    from ray.train import DataConfig

    t = cfg.train
    parquet = io.join(cfg.run.run_dir, "export", "parquet")
    splits = {s: io.glob(parquet, f"{s}/*.parquet") for s in ("train", "val", "test")}
    if not splits["train"]:
        raise FileNotFoundError(f"no training data under {parquet}: run the export stage first")
    held_out = splits[held_out_split(parquet)]
    n_train = io.parquet_rows(splits["train"])  # from the footers: counting the dataset would read it all
    if t.limit_pairs:
        n_train = min(n_train, t.limit_pairs)
    if n_train < t.num_workers:
        raise ValueError(
            f"{n_train} training pairs under {parquet} for train.num_workers={t.num_workers}: "
            "every worker needs at least one"
        )
    columns = ["pair_id", "image", "question", "answer"]
    train_ds = _rows_dataset(splits["train"], columns, t.limit_pairs)
    val_ds = _rows_dataset(held_out, columns, max(1, t.limit_pairs // 4) if t.limit_pairs else None)
    if t.shuffle:  # a new permutation every epoch (execution), the same sequence for the same seed
        train_ds = train_ds.random_shuffle(
            seed=RandomSeedConfig(seed=t.seed, reseed_after_execution=True), num_cpus=0.1
        )
    # CPUs left by the training workers, of which the preprocessing actors leave some to the reads
    free = ray.cluster_resources().get("CPU", 1.0) - t.num_workers * t.cpus_per_worker
    task_cpus = io.pool_cpus(t.preprocess_concurrency, t.preprocess_cpus, max(free, 0.0))
    # tasks, at most preprocess_concurrency at once (1: batches leave in input order), in worker processes
    # that keep their processor between epochs (preprocess_batch): no actor to start per epoch
    preprocess = {
        "fn_kwargs": {"model": t.model, "max_pixels": cfg.run.max_pixels, "max_length": t.max_length},
        "batch_size": t.preprocess_batch_size,
        "num_cpus": task_cpus,
        "concurrency": t.preprocess_concurrency,
    }
    datasets = {
        "train": train_ds.map_batches(preprocess_batch, **preprocess),
        "val": val_ds.map_batches(preprocess_batch, **preprocess),
    }
    options = DataConfig.default_ingest_options()
    options.preserve_order = False  # the run's deterministic-manifest setting is not for training ingest
    return datasets, DataConfig(execution_options={"train": options}), n_train


def run_train(cfg: WorkflowConfig) -> dict:
    """Fine-tune on export/parquet; writes train/metrics.json, train/loss_curve.png, checkpoints under
    train/."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    if t.strategy not in STRATEGIES:
        raise ValueError(f"train.strategy={t.strategy!r}: use one of {list(STRATEGIES)}")
    if t.strategy == "fsdp" and t.method != "full":
        raise ValueError(
            "train.strategy=fsdp shards the full model for full fine-tuning: set train.method=full, "
            "or keep train.strategy=ddp for LoRA (its frozen base needs no optimizer state)"
        )
    if t.init_tiny and not io.exists(io.join(t.model, "config.json")):
        from sarlang_ray.tiny_models import init_tiny_vlm

        init_tiny_vlm(t.model, seed=cfg.run.seed)
    if not io.is_remote(t.model) and os.path.isdir(t.model):
        t.model = os.path.abspath(t.model)  # workers may run in another directory (or on another node)
    held_out = held_out_split(io.join(cfg.run.run_dir, "export", "parquet"))
    if held_out != "val":
        log.warning(
            "WARNING train: the export has no val split: the held-out loss is measured on the TEST split, "
            "the "
            "pairs the leaderboard scores (a larger archive, or other export.val / export.block_m, gives a "
            "val split)"
        )
    datasets, data_config, n_train = ingest(cfg)
    storage = t.storage_path or io.join(cfg.run.run_dir, "train")
    storage_fs, storage_path = io.arrow_filesystem(storage)  # s3:// through the pipeline's own fsspec config
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": {k: getattr(t, k) for k in t.__dataclass_fields__},
            "n_train": n_train,
            "max_pixels": cfg.run.max_pixels,
        },
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=t.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=t.num_to_keep),
            failure_config=FailureConfig(max_failures=t.max_failures),
        ),
        datasets=datasets,
        dataset_config=data_config,
    )
    with reaper.sigint_kept():
        result = trainer.fit()
    if result.checkpoint is None:  # every epoch reports one; none means no epoch finished
        raise RuntimeError(
            f"train: the run {t.name} finished without a checkpoint. Read its log for the failure."
        )
    with result.checkpoint.as_directory() as d, open(os.path.join(d, "state.json")) as f:
        state = json.load(f)
    history = state["history"]
    checkpoint = (
        result.checkpoint.path
        if storage_fs is None
        else f"{storage.split('://')[0]}://{result.checkpoint.path}"
    )
    out = {
        "history": history,
        "resumes": state.get("resumes", []),
        "checkpoint": checkpoint,
        "merged_model": io.join(checkpoint, "merged"),
        "n_train": n_train,
        "held_out_split": held_out,
        "val_loss_before": history[0]["val_loss"],
        "val_loss_after": history[-1]["val_loss"],
    }
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
