"""Size a global SAR archive on paper: nodes and hours per stage, from the throughputs measured here.

    .venv/bin/python benchmarks/size_archive.py --tb 100                 # Sentinel-1 GRD, default cluster
    .venv/bin/python benchmarks/size_archive.py --tb 5 --preset umbra-spotlight --cpu-nodes 8 --json out.json

Measured inputs (committed result files, produced by the benchmarks beside this script):

- ``results/scale.json`` (``bench_scale.py``): tile + align CPU-seconds per 256 px tile (the slope of the
  linear fit, times the CPUs that produced it) and template-annotate CPU-seconds per tile (marginal,
  between the two largest scales), QA pairs per tile.
- ``results/gpu_vlm_lora_h200_b16.json`` (``gpu_vlm_lora.py``): LoRA training tokens/s of a 2.05 B VLM on
  one H200, scaled to the target model by parameter count (training FLOPs per token ~ 6 x parameters).

Not measured here, and marked as such in the output: caption generation with a VLM on GPUs (``annotate.
backend=hf``) and evaluation inference. Both are decode-bound; the script uses the memory-bandwidth
roofline (one decode step reads every weight once: ``tokens/s <= batch x HBM bandwidth / weight bytes``)
times an efficiency you pass (default 0.5), and says so. Per-vCPU speed is assumed equal to the 2-CPU VM
that measured it; network per node is the instance's advertised bandwidth.

The model: an archive of ``tb`` terabytes of SAR files holds ``tb * 1e12 / bytes_per_pixel *
compression`` pixels at ``native_gsd``; each pyramid level ``g >= native_gsd`` makes ``pixels *
(native/g)^2 * valid_fraction / tile_size^2`` tiles. Every stage's work is then tiles (CPU stages),
generated tokens (GPU annotation, evaluation) or trained tokens (training), divided by what one node
does per hour.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# sensor presets: bytes per pixel as stored, stored/raw size ratio, native pixel size, pyramid levels
PRESETS = {
    "sentinel1-grd": {
        "bytes_per_pixel": 2,
        "compression": 1.0,
        "native_gsd_m": 10.0,
        "gsds_m": [10.0, 25.0],
        "note": "Sentinel-1 IW GRD, uint16 amplitude, uncompressed GeoTIFF, one polarisation per file",
    },
    "opera-rtc": {
        "bytes_per_pixel": 4,
        "compression": 0.5,
        "native_gsd_m": 30.0,
        "gsds_m": [30.0],
        "note": "OPERA RTC-S1, float32 backscatter, deflate COG (about 2:1)",
    },
    "umbra-spotlight": {
        "bytes_per_pixel": 4,
        "compression": 1.0,
        "native_gsd_m": 0.5,
        "gsds_m": [0.5, 1.0, 2.0, 5.0, 10.0],
        "note": "Umbra GEC spotlight, float32, the demo pyramid (0.5-10 m)",
    },
}


def measured(results: Path = RESULTS) -> dict:
    """Per-unit costs from the committed benchmark results (KeyError/FileNotFoundError if missing)."""
    scale = json.loads((results / "scale.json").read_text())
    cpus = scale["machine"]["cpus"]
    pts = sorted(scale["points"], key=lambda p: p["tiles"])
    a, b = pts[-2], pts[-1]
    annotate_cpu_s = cpus * (b["annotate"]["seconds"] - a["annotate"]["seconds"]) / (b["tiles"] - a["tiles"])
    gpu = json.loads((results / "gpu_vlm_lora_h200_b16.json").read_text())
    return {
        "tile_align_cpu_s_per_tile": cpus * scale["fit"]["seconds_per_tile"],
        "annotate_cpu_s_per_tile": annotate_cpu_s,
        "pairs_per_tile": b["annotate"]["pairs"] / b["annotate"]["tiles"],
        "train_tokens_per_s_per_h200": gpu["tokens_per_s"],
        "train_measured_params": gpu["params_total"],
        "achieved_tflops": gpu["achieved_tflops"],
        "source": {
            "scale": str(results / "scale.json"),
            "gpu": str(results / "gpu_vlm_lora_h200_b16.json"),
            "scale_date": scale["date"],
            "cpus": cpus,
        },
    }


def size(
    tb: float,
    preset: str = "sentinel1-grd",
    tile_size: int = 256,
    valid_fraction: float = 0.8,
    cpu_nodes: int = 32,
    vcpus_per_node: int = 16,
    node_gbps: float = 12.5,
    gpu_nodes: int = 8,
    gpus_per_node: int = 8,
    caption_model_params: float = 7e9,
    train_model_params: float = 7e9,
    hbm_tb_s: float = 4.8,
    decode_batch: int = 32,
    decode_efficiency: float = 0.5,
    caption_tokens_per_tile: int = 150,
    prompt_tokens_per_tile: int = 1300,
    train_tokens_per_pair: int = 640,
    epochs: int = 3,
    train_pairs_cap: int = 1_000_000,
    eval_pairs_cap: int = 200_000,
    answer_tokens: int = 12,
    pairs_per_tile: float | None = None,
    results: Path = RESULTS,
) -> dict:
    """Work, node-hours and wall hours per stage for ``tb`` terabytes of ``preset`` scenes."""
    p, m = PRESETS[preset], measured(results)
    pixels = tb * 1e12 / p["bytes_per_pixel"] * p["compression"]
    levels = [g for g in p["gsds_m"] if g >= p["native_gsd_m"]]
    tiles = sum(pixels * (p["native_gsd_m"] / g) ** 2 for g in levels) * valid_fraction / tile_size**2
    pairs = tiles * (pairs_per_tile or m["pairs_per_tile"])
    cpus = cpu_nodes * vcpus_per_node
    stages = []

    def add(stage, work, unit, node_hours, nodes, kind, basis, bottleneck):
        stages.append(
            {
                "stage": stage,
                "work": work,
                "unit": unit,
                "node_hours": node_hours,
                "nodes": nodes,
                "node_kind": kind,
                "wall_hours": node_hours / nodes,
                "basis": basis,
                "bottleneck": bottleneck,
            }
        )

    # tile + align: CPU-bound unless the node's share of the archive arrives slower than it is processed
    cpu_h = tiles * m["tile_align_cpu_s_per_tile"] / 3600
    node_mb_s_needed = tb * 1e6 / (cpu_h / cpus) / 3600 / cpu_nodes  # MB/s of SAR per node at full CPU speed
    node_mb_s_nic = node_gbps * 1e3 / 8
    io_bound = node_mb_s_needed > node_mb_s_nic
    add(
        "tile + align",
        tiles,
        "tiles",
        max(cpu_h / vcpus_per_node, tb * 1e6 / node_mb_s_nic / 3600),
        cpu_nodes,
        f"{vcpus_per_node}-vCPU",
        "measured (bench_scale.py)",
        f"{'I/O' if io_bound else 'CPU'}: each node needs {node_mb_s_needed:,.0f} MB/s of SAR at full CPU "
        "speed, "
        f"its NIC carries {node_mb_s_nic:,.0f} MB/s",
    )
    add(
        "annotate (templates + QC)",
        tiles,
        "tiles",
        tiles * m["annotate_cpu_s_per_tile"] / 3600 / vcpus_per_node,
        cpu_nodes,
        f"{vcpus_per_node}-vCPU",
        "measured (bench_scale.py)",
        "CPU",
    )
    # GPU generation: decode is bound by memory bandwidth (one step reads every bf16 weight once, for a
    # batch of sequences); the prompt (image tokens + text) is a forward pass at the achieved TFLOP/s of
    # the measured training step
    decode_tok_s = decode_batch * hbm_tb_s * 1e12 / (2 * caption_model_params) * decode_efficiency
    prefill_tok_s = m["achieved_tflops"] * 1e12 / (2 * caption_model_params)

    def gen_gpu_hours(n_items, new_tokens, prompt_tokens):
        return n_items * (new_tokens / decode_tok_s + prompt_tokens / prefill_tok_s) / 3600

    def gen_bottleneck(new_tokens, prompt_tokens):
        decode, prompt = new_tokens / decode_tok_s, prompt_tokens / prefill_tok_s
        share = max(decode, prompt) / (decode + prompt)
        return (
            f"GPU compute: the prompt ({prompt_tokens} tokens, image included), {share:.0%} of the time"
            if prompt > decode
            else f"GPU memory bandwidth: decoding, {share:.0%} of the time"
        )

    basis = (
        f"estimate, not measured: decode {decode_tok_s:,.0f} tokens/s per GPU (bandwidth roofline x "
        f"{decode_efficiency:g}), prompt {prefill_tok_s:,.0f} tokens/s (measured TFLOP/s)"
    )
    add(
        "captions with a VLM (annotate.backend=hf)",
        tiles * caption_tokens_per_tile,
        "generated tokens",
        gen_gpu_hours(tiles, caption_tokens_per_tile, prompt_tokens_per_tile) / gpus_per_node,
        gpu_nodes,
        f"{gpus_per_node}-GPU",
        basis,
        gen_bottleneck(caption_tokens_per_tile, prompt_tokens_per_tile),
    )
    train_pairs = min(pairs, train_pairs_cap) if train_pairs_cap else pairs
    train_tok_s = m["train_tokens_per_s_per_h200"] * m["train_measured_params"] / train_model_params
    train_tokens = train_pairs * train_tokens_per_pair * epochs
    add(
        "train (LoRA)",
        train_tokens,
        "trained tokens",
        train_tokens / train_tok_s / 3600 / gpus_per_node,
        gpu_nodes,
        f"{gpus_per_node}-GPU",
        f"measured on H200, scaled by parameters: {train_tok_s:,.0f} tokens/s per GPU",
        "GPU compute",
    )
    eval_pairs = min(pairs * 0.2, eval_pairs_cap) if eval_pairs_cap else pairs * 0.2
    add(
        "evaluate (one model x one prompt)",
        eval_pairs * answer_tokens,
        "generated tokens",
        gen_gpu_hours(eval_pairs, answer_tokens, train_tokens_per_pair) / gpus_per_node,
        gpu_nodes,
        f"{gpus_per_node}-GPU",
        "estimate, not measured (as captions)",
        gen_bottleneck(answer_tokens, train_tokens_per_pair),
    )
    return {
        "tb": tb,
        "preset": preset,
        "preset_note": p["note"],
        "levels_m": levels,
        "pixels": pixels,
        "tiles": tiles,
        "pairs": pairs,
        "train_pairs": train_pairs,
        "eval_pairs": eval_pairs,
        "stages": stages,
        "measured": m,
        "cluster": {
            "cpu_nodes": cpu_nodes,
            "vcpus_per_node": vcpus_per_node,
            "node_gbps": node_gbps,
            "gpu_nodes": gpu_nodes,
            "gpus_per_node": gpus_per_node,
        },
    }


def markdown(s: dict) -> str:
    def n(x):
        return f"{x:,.0f}" if x >= 100 else f"{x:,.2g}"

    lines = [
        (
            f"**{s['tb']:g} TB of {s['preset']}** ({s['preset_note']}; levels {s['levels_m']} m): "
            f"{n(s['pixels'] / 1e9)} Gpx, {n(s['tiles'])} tiles, {n(s['pairs'])} QA/caption pairs "
            f"(training on {n(s['train_pairs'])}, evaluating on {n(s['eval_pairs'])})."
        ),
        "",
        "| stage | work | node-hours | nodes | wall hours | bottleneck | basis |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in s["stages"]:
        lines.append(
            f"| {r['stage']} | {n(r['work'])} {r['unit']} | {n(r['node_hours'])} ({r['node_kind']}) | "
            f"{r['nodes']} | {n(r['wall_hours'])} | {r['bottleneck']} | {r['basis']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tb", type=float, action="append", help="archive size in TB (repeatable)")
    parser.add_argument("--preset", default="sentinel1-grd", choices=sorted(PRESETS))
    for key in (
        "cpu_nodes",
        "vcpus_per_node",
        "gpu_nodes",
        "gpus_per_node",
        "decode_batch",
        "tile_size",
        "train_pairs_cap",
        "eval_pairs_cap",
    ):
        parser.add_argument("--" + key.replace("_", "-"), type=int)
    for key in (
        "node_gbps",
        "caption_model_params",
        "train_model_params",
        "hbm_tb_s",
        "decode_efficiency",
        "valid_fraction",
        "pairs_per_tile",
    ):
        parser.add_argument("--" + key.replace("_", "-"), type=float)
    parser.add_argument("--json", help="also write the numbers here")
    args = vars(parser.parse_args(argv))
    out_json, tbs = args.pop("json"), args.pop("tb") or [1.0, 10.0, 100.0]
    kwargs = {k: v for k, v in args.items() if v is not None}
    sized = [size(tb, **kwargs) for tb in tbs]
    print("\n\n".join(markdown(s) for s in sized))
    if out_json:
        Path(out_json).write_text(json.dumps(sized, indent=2, default=float) + "\n")
    return 0 if all(math.isfinite(r["wall_hours"]) for s in sized for r in s["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
