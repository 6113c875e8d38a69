"""GPU throughput of LoRA fine-tuning a ~2B-parameter LLaVA-style VLM in bf16 (random weights, no download).

    python benchmarks/gpu_vlm_lora.py --out results.json          # on a GPU machine
    python benchmarks/gpu_vlm_lora.py --tiny                      # a seconds-long smoke run on the CPU

The model is built from a config (CLIP-L/14-336-sized vision tower, a 2048-wide 24-layer Llama decoder),
wrapped with peft LoRA (r=8 on all linear layers of the language model, the paper's setting), and
trained on random images and tokens: 576 image tokens + ``--text-tokens`` text tokens per sample.

Model FLOPs per step (for MFU) count the matrix products a LoRA step needs: forward 2·N·T over all
frozen and trainable weights N and tokens T, plus attention 4·layers·T·L·d; backward the same again for
activation gradients (frozen weights need no weight gradients) plus 4·N_lora·T for the adapters.
MFU = model FLOPs / step time / peak bf16 dense FLOP/s of the card (``--peak-tflops``, default: H100/H200
SXM spec 989).
"""

from __future__ import annotations

import argparse
import json
import time


def build(tiny: bool, device: str, dtype):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if tiny:
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        text = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=1000,
        )
    else:
        vision = CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        )
        text = LlamaConfig(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=16,
            vocab_size=32064,
            max_position_embeddings=4096,
        )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=text.vocab_size - 1,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype)
    return model, config


def main() -> int:
    import torch
    from peft import LoraConfig, get_peft_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    t0 = time.time()
    model, config = build(a.tiny, device, dtype)
    n_total = sum(p.numel() for p in model.parameters())
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    )
    model = get_peft_model(model, lora)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    build_s = time.time() - t0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    vc, tc = config.vision_config, config.text_config
    n_img = (vc.image_size // vc.patch_size) ** 2
    seq = n_img + a.text_tokens
    ids = torch.randint(0, tc.vocab_size - 2, (a.batch, seq), device=device)
    ids[:, 1 : 1 + n_img] = config.image_token_id
    pixels = torch.randn(a.batch, 3, vc.image_size, vc.image_size, device=device, dtype=dtype)
    labels = ids.clone()
    labels[:, : 1 + n_img] = -100  # loss on text tokens only, like answer-only training

    def step():
        out = model(input_ids=ids, pixel_values=pixels, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(a.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    sync()
    step_s = (time.perf_counter() - t0) / a.steps

    tokens = a.batch * seq
    d, layers = tc.hidden_size, tc.num_hidden_layers
    forward = 2 * n_total * tokens + 4 * layers * tokens * seq * d
    flops = 2 * forward + 4 * n_lora * tokens
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "params_total": n_total,
        "params_lora": n_lora,
        "batch": a.batch,
        "seq_len": seq,
        "image_tokens": n_img,
        "steps": a.steps,
        "step_seconds": round(step_s, 4),
        "tokens_per_s": round(tokens / step_s, 1),
        "samples_per_s": round(a.batch / step_s, 2),
        "model_tflops_per_step": round(flops / 1e12, 2),
        "achieved_tflops": round(flops / step_s / 1e12, 1),
        "mfu_vs_peak": round(flops / step_s / (a.peak_tflops * 1e12), 3),
        "peak_tflops": a.peak_tflops,
        "build_seconds": round(build_s, 1),
        "final_loss": round(float(loss.detach()), 4),
        "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None,
    }
    print(json.dumps(result, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
