"""Generation throughput: the same model, images and prompts through the hf path (``models.Generator``:
``transformers`` ``generate`` in fixed batches) and through vLLM on Ray Data LLM (``vllm_engine``), in one run
on one machine.

    # in the vLLM environment (docs/vllm.md): both engines, CPU; writes benchmarks/results/generate_cpu.json
    benchmarks/work/vllm-venv/bin/python benchmarks/bench_generate.py
    # on a GPU node with the vllm extra: a ~2 B LLaVA-1.5-style VLM built from its config (random weights)
    python benchmarks/bench_generate.py --gpu            # -> benchmarks/results/generate_gpu.json

Prompts: the annotate stage's requests for the demo's tiles (captions and the template's questions, the
optical twin as the image), rendered by the model's chat template exactly as both engines render them.
Every prompt generates exactly ``--tokens`` tokens (hf: ``min_new_tokens`` = ``max_new_tokens``; vLLM:
``min_tokens`` = ``max_tokens`` with ``ignore_eos``), so both engines do the same work whatever the random
weights would say. Greedy decoding on both.

Each engine makes one pass over the prompts from a cold start, as a stage sees it. Reported per engine:
``startup_s`` (hf: model load; vLLM: not separable, the engine starts when the dataset runs, so it is
inside ``first_result_s``), ``first_result_s`` (from the pass's start to the first generated text),
``prompts_per_s`` / ``output_tokens_per_s`` end to end (start-up included) and steady (from the first
results on: start-up and the first batch excluded), and the vLLM/hf ratios of both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sarlang_ray import io
from sarlang_ray.config import VLLMSection, load_config


def demo_tiles(work: Path) -> tuple[Path, list[str]]:
    """The demo run's align stage (reused from runs/demo when it is there) and its shard names."""
    run = REPO / "runs" / "demo"
    if not (run / "align" / "_SUCCESS.json").exists():
        from sarlang_ray import pipeline

        run = work / "run"
        cfg = load_config(
            str(REPO / "workflows" / "demo.yaml"),
            [
                f"run.run_dir={run}",
                f"synth.out_dir={work / 'archive'}",
                "ray.progress=false",
                "run.stages=[synth,catalog,tile,align]",
            ],
        )
        pipeline.run(cfg)
    root = run / "align" / "shards"
    return run, sorted(str(p.relative_to(root)) for p in root.glob("*/*.parquet"))


def requests(
    run: Path, shards: list[str], model: str, n: int, tokens: int, max_pixels: int | None
) -> list[dict]:
    """``n`` engine requests from the demo tiles (the annotate stage's prompts and images), each asking for
    exactly ``tokens`` tokens; ``text`` is the user text the prompt was rendered from (Generator renders
    it)."""
    from sarlang_ray.annotate.vllm_backend import VLLMAnnotator
    from sarlang_ray.models import load_image
    from sarlang_ray.tables import ANNOTATE_TILE_COLUMNS
    from sarlang_ray.vllm_engine import prompt_processor, render_prompt, request

    cfg = load_config(str(REPO / "workflows" / "demo.yaml"), [f"annotate.hf.model={model}"])
    annotator, processor = VLLMAnnotator(cfg.annotate, 0, max_pixels), prompt_processor(model, max_pixels)
    out: list[dict] = []
    for name in shards:
        for tile in io.read_parquet(
            str(run / "align" / "shards" / name), columns=ANNOTATE_TILE_COLUMNS
        ).to_pylist():
            image = load_image(annotator.image_png(tile), max_pixels)
            for _, text, _ in annotator.jobs(tile):
                out.append(
                    request(
                        render_prompt(processor, text),
                        image,
                        tokens,
                        fixed_length=True,
                        id=len(out),
                        text=text,
                    )
                )
                if len(out) == n:
                    return out
    raise SystemExit(f"the demo tiles give only {len(out)} prompts; ask for fewer (--prompts)")


def rates(n: int, tokens: int, start: float, arrivals: list[tuple[float, int]]) -> dict:
    """Throughput of one pass: ``arrivals`` = (time, results so far) each time results came back.
    End to end counts from ``start``; steady counts from the first arrival on (start-up and the first
    batch excluded), over the results that came after it."""
    (t_first, n_first), (t_end, _) = arrivals[0], arrivals[-1]
    steady_s = max(t_end - t_first, 1e-9)
    return {
        "prompts": n,
        "output_tokens": n * tokens,
        "seconds": round(t_end - start, 2),
        "first_result_s": round(t_first - start, 2),
        "prompts_per_s_end_to_end": round(n / (t_end - start), 2),
        "output_tokens_per_s_end_to_end": round(n * tokens / (t_end - start), 1),
        "prompts_per_s_steady": round((n - n_first) / steady_s, 2),
        "output_tokens_per_s_steady": round((n - n_first) * tokens / steady_s, 1),
    }


def run_hf(model: str, rows: list[dict], tokens: int, batch: int, dtype: str, gpu: bool) -> dict:
    """``models.Generator`` over ``rows``, batch by batch: start-up (model load), then the rates."""
    from sarlang_ray.models import Generator

    t0 = time.perf_counter()
    gen = Generator(model, dtype, gpu, batch)
    gen.model.generation_config.min_new_tokens = tokens  # fixed length: generate() reads it from here
    loaded = time.perf_counter()
    arrivals, texts = [], []
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        texts += gen.generate(
            [r["multimodal_data"]["image"] for r in chunk], [r["text"] for r in chunk], tokens
        )
        arrivals.append((time.perf_counter(), len(texts)))
    ids = gen.processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
    return {
        "startup_s": round(loaded - t0, 2),
        **rates(len(rows), tokens, loaded, arrivals),
        "batch_size": batch,
        "retokenised_output_tokens": sum(map(len, ids)),
    }


def run_vllm(section: VLLMSection, model: str, rows: list[dict], tokens: int, dtype: str) -> dict:
    """One Ray Data LLM pass over ``rows`` from a cold engine. Start-up is not separable from the first
    result here (the engine starts when the dataset runs): ``first_result_s`` holds both."""
    import ray

    from sarlang_ray.vllm_engine import build_processor, parse_output

    t0 = time.perf_counter()
    processor = build_processor(
        section, model, dtype, None, postprocess=lambda r: {"id": r["id"], **parse_output(r)}
    )
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // section.batch_size))
    arrivals, out = [], []
    for row in processor(ds).iter_rows():
        out.append(row)
        arrivals.append((time.perf_counter(), len(out)))
    errors = [r["error"] for r in out if r["error"]]
    if errors or len(out) != len(rows):
        raise RuntimeError(
            f"vLLM returned {len(out)} of {len(rows)} rows, {len(errors)} failed: {errors[:1]}"
        )
    counted = sum(r["tokens"] for r in out)
    if counted != tokens * len(rows):
        raise RuntimeError(f"vLLM generated {counted} tokens, not {tokens} x {len(rows)}")
    first = arrivals[0][0]  # rows of the first block arrive together: count them as the first arrival
    arrivals = [(first, sum(1 for t, _ in arrivals if t - first < 0.05))] + [
        a for a in arrivals if a[0] - first >= 0.05
    ]
    return {**rates(len(rows), tokens, t0, arrivals), "engine": dict(section.__dict__)}


def gpu_model(out: str) -> str:
    """A ~2 B LLaVA-1.5-style VLM from its config, random weights: CLIP ViT-L/14 at 336 px (576 image tokens)
    + a 2048-wide, 28-layer Llama decoder; the tokenizer and chat template of the tiny VLM."""
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from sarlang_ray.tiny_models import CHAT_TEMPLATE, init_tiny_vlm

    init_tiny_vlm(out)  # tokenizer (and a tiny model, replaced below)
    tokenizer = AutoTokenizer.from_pretrained(out)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
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
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--gpu", action="store_true", help="a ~2 B VLM on the GPU (bf16) instead of the tiny one on the CPU"
    )
    ap.add_argument("--prompts", type=int, default=None, help="prompts in the full pass (CPU 96, GPU 2048)")
    ap.add_argument("--tokens", type=int, default=None, help="output tokens per prompt (CPU 16, GPU 64)")
    ap.add_argument("--hf-batch", type=int, default=None, help="Generator batch size (CPU 16, GPU 32)")
    ap.add_argument(
        "--out", default=None, help="result file (default benchmarks/results/generate_{cpu,gpu}.json)"
    )
    args = ap.parse_args()
    gpu = args.gpu
    n = args.prompts or (2048 if gpu else 96)
    tokens = args.tokens or (64 if gpu else 16)
    hf_batch = args.hf_batch or (32 if gpu else 16)
    dtype = "bfloat16" if gpu else "float32"

    import ray

    from sarlang_ray.tiny_models import init_tiny_vlm
    from sarlang_ray.vllm_engine import hub_layout, require_vllm

    version = require_vllm("bench_generate.py")
    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    run, shards = demo_tiles(work)
    # vLLM 0.29 reads the hub's LLaVA layout (hub_layout); its CPU attention needs heads of 32+ (hidden 256 /
    # 4)
    source = (
        gpu_model(str(work / "vlm-2b-src")) if gpu else init_tiny_vlm(str(work / "tiny-vlm-src"), hidden=256)
    )
    model = hub_layout(source, str(work / "model"))
    rows = requests(run, shards, model, n, tokens, None)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    section = VLLMSection(
        device="gpu" if gpu else "cpu",
        batch_size=64 if gpu else 16,
        max_model_len=4096 if gpu else 512,
        gpu_memory_utilization=0.85,
        cpus_per_replica=1.0,
        engine_kwargs={} if gpu else {"enforce_eager": True},
    )
    result: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "model": "LLaVA-1.5-style ~2B (random weights, bf16)"
        if gpu
        else "tiny LLaVA (init_tiny_vlm hidden=256, float32)",
        "vllm": version,
        "tokens_per_prompt": tokens,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    result["hf"] = run_hf(model, rows, tokens, hf_batch, dtype, gpu)
    print("hf", result["hf"], flush=True)
    result["vllm_ray_data_llm"] = run_vllm(section, model, rows, tokens, dtype)
    print("vllm", result["vllm_ray_data_llm"], flush=True)
    for kind in ("steady", "end_to_end"):
        result[f"vllm_over_hf_output_tokens_per_s_{kind}"] = round(
            result["vllm_ray_data_llm"][f"output_tokens_per_s_{kind}"]
            / result["hf"][f"output_tokens_per_s_{kind}"],
            2,
        )
    ray.shutdown()
    out = (
        Path(args.out)
        if args.out
        else REPO / "benchmarks" / "results" / f"generate_{'gpu' if gpu else 'cpu'}.json"
    )
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
