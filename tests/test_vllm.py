"""The vLLM path (annotate.backend=vllm, evaluate.engine=vllm) around the engine, in the main environment.

The main environment has no vLLM (it pins its own torch and transformers; docs/vllm.md), so these tests
check everything the engine does not do, on the real demo tiles and the tiny VLM: the requests (the same
prompt text and image as the hf path), the parsing of Ray Data LLM's output rows into pairs that go
through the same QC and writer as the hf backend's, the errors table for failed and empty outputs, and
the message a run gets without vLLM. No test pretends to generate: output rows carry text the hf path
generated with the same model, or text written by the template annotator, and they say so.

The end-to-end test runs the real engine (vLLM's CPU build) in its own environment,
``benchmarks/work/vllm-venv`` (docs/vllm.md says how to build it); it skips when that is absent (CI).
"""

from __future__ import annotations

import io as _io
import json
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from sarlang_ray import io, prompts
from sarlang_ray.annotate.stage import AnnotateShard, validate_pairs
from sarlang_ray.annotate.template import TemplateAnnotator
from sarlang_ray.annotate.vllm_backend import VLLMAnnotator, _finish_shard, _keep, shard_requests
from sarlang_ray.config import ConfigError, load_config
from sarlang_ray.tables import ANNOTATE_TILE_COLUMNS, ANNOTATION_SCHEMA

REPO = Path(__file__).resolve().parents[1]
VLLM_VENV = REPO / "benchmarks" / "work" / "vllm-venv"


def _copy_align(cfg, dest: Path) -> Path:
    shutil.copytree(Path(cfg.run.run_dir) / "align", dest / "align")
    return dest


def _config(run_dir: Path, model: str, *overrides: str):
    return load_config(
        str(REPO / "workflows" / "demo.yaml"),
        [
            f"run.run_dir={run_dir}",
            "annotate.backend=vllm",
            f"annotate.hf.model={model}",
            "annotate.hf.dtype=float32",
            "ray.progress=false",
            *overrides,
        ],
    )


def _shards(run_dir: Path) -> list[str]:
    root = run_dir / "align" / "shards"
    return sorted(str(p.relative_to(root)) for p in root.glob("*/*.parquet"))


def _tiles(run_dir: Path, name: str) -> list[dict]:
    return io.read_parquet(
        str(run_dir / "align" / "shards" / name), columns=ANNOTATE_TILE_COLUMNS
    ).to_pylist()


def _engine_rows(requests: list[dict], texts: list[str], errors: list[str] | None = None) -> list[dict]:
    """Rows shaped as Ray Data LLM's vLLM stage returns them (the request's carried columns, then
    generated_text, num_generated_tokens, __inference_error__), around ``texts`` from elsewhere."""
    errors = errors or [""] * len(requests)
    return [
        {
            **{k: v for k, v in r.items() if k not in ("multimodal_data", "sampling_params")},
            "generated_text": t,
            "num_generated_tokens": len(t.split()),
            "__inference_error__": e,
        }
        for r, t, e in zip(requests, texts, errors)
    ]


def test_config_validates_the_engine_knobs_without_vllm_installed(tmp_path):
    cfg = _config(
        tmp_path,
        "m",
        "evaluate.engine=vllm",
        "annotate.vllm.tensor_parallel_size=2",
        "annotate.vllm.engine_kwargs.enforce_eager=true",
        "evaluate.vllm.device=cpu",
    )
    assert cfg.annotate.backend == "vllm" and cfg.evaluate.engine == "vllm"
    assert cfg.annotate.vllm.tensor_parallel_size == 2 and cfg.annotate.vllm.engine_kwargs == {
        "enforce_eager": True
    }
    for bad, words in (
        ("annotate.vllm.gpu_memory_utilization=1.5", "gpu_memory_utilization"),
        ("evaluate.vllm.device=tpu", "device must be gpu or cpu"),
        ("annotate.vllm.concurrency=0", "concurrency must be >= 1"),
    ):
        with pytest.raises(ConfigError, match=words):
            _config(tmp_path, "m", bad)


def test_processor_config_carries_the_knobs_into_ray_data_llm(tiny_vlm):
    from sarlang_ray.config import VLLMSection
    from sarlang_ray.vllm_engine import processor_config

    section = VLLMSection(
        concurrency=3,
        batch_size=32,
        max_model_len=2048,
        gpu_memory_utilization=0.8,
        tensor_parallel_size=2,
        max_num_seqs=128,
        engine_kwargs={"max_model_len": 1024, "seed": 7},
    )
    c = processor_config(section, tiny_vlm, "bfloat16", max_pixels=50_000)
    assert (c.model_source, c.concurrency, c.batch_size) == (tiny_vlm, 3, 32)
    e = c.engine_kwargs
    assert (e["tensor_parallel_size"], e["gpu_memory_utilization"], e["max_num_seqs"], e["dtype"]) == (
        2,
        0.8,
        128,
        "bfloat16",
    )
    assert e["max_model_len"] == 1024 and e["seed"] == 7  # engine_kwargs win over the named knobs
    assert e["limit_mm_per_prompt"] == {"image": 1}
    # CLIP's image processor takes no max_pixels; the image is downsized instead
    assert "mm_processor_kwargs" not in e
    assert (
        not (c.chat_template_stage or c.tokenize_stage or c.detokenize_stage) and c.should_continue_on_error
    )
    assert c.placement_group_config is None  # GPUs: Ray Data LLM gives each replica tensor x pipeline GPUs
    cpu = processor_config(
        VLLMSection(device="cpu", cpus_per_replica=2, tensor_parallel_size=2), tiny_vlm, "auto", None
    )
    assert cpu.placement_group_config["bundles"] == [{"CPU": 2.0, "GPU": 0.0}] * 2
    assert "gpu_memory_utilization" not in cpu.engine_kwargs


def test_requests_carry_the_hf_paths_prompts_and_images(demo_run, tiny_vlm, tmp_path):
    cfg, _ = demo_run
    run_dir = _copy_align(cfg, tmp_path)
    vcfg = _config(run_dir, tiny_vlm, "run.max_pixels=4096")
    name = _shards(run_dir)[0]
    rows = shard_requests(vcfg)({"shard": name})
    tiles = _tiles(run_dir, name)
    assert {r["n_requests"] for r in rows} == {len(rows)} and {r["shard"] for r in rows} == {name}
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vlm)
    questions = TemplateAnnotator(
        seed=vcfg.run.seed,
        identification_pairs=vcfg.annotate.identification_pairs,
        max_per_family=vcfg.annotate.max_per_family,
    )
    by_tile = {}
    for r in rows:
        by_tile.setdefault(r["tile_id"], []).append(r)
    assert list(by_tile) == [t["tile_id"] for t in tiles]
    for tile in tiles:
        asked = by_tile[tile["tile_id"]]
        pairs = questions.annotate(tile)
        assert [r["job"] for r in asked] == list(range(len(pairs)))
        for r, pair in zip(asked, pairs):
            text = {
                "caption_concise": prompts.CAPTION_CONCISE,
                "caption_detailed": prompts.CAPTION_DETAILED,
            }.get(pair["kind"], pair["question"] + " Answer the question concisely.")
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            assert r["prompt"] == processor.apply_chat_template(msgs, add_generation_prompt=True)
            budget = {"caption_concise": 32, "caption_detailed": 96}.get(pair["kind"], 8)
            assert r["sampling_params"] == {"temperature": 0.0, "max_tokens": budget}
            assert json.loads(r["pair"]) == {k: v for k, v in pair.items() if k != "answer"}
        # the optical twin (RGB-to-SAR transfer), RGB, downsized to run.max_pixels with its aspect kept
        png = tile["optical_png"] or tile["sar_png"]
        source = Image.open(_io.BytesIO(png))
        image = asked[0]["multimodal_data"]["image"]
        assert image.mode == "RGB" and image.width * image.height <= 4096
        assert abs(image.width / image.height - source.width / source.height) < 0.05
        assert all(r["multimodal_data"]["image"] is image for r in asked)  # decoded once per tile
        # and the model's own processor accepts the request as the engine gets it: one image, its tokens
        # expanded
        inputs = processor(images=[image], text=[asked[0]["prompt"]], return_tensors="pt")
        image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
        # the tiny VLM sees 32 px in 8 px patches: 16 patch features (CLIP's class token is dropped)
        assert int((inputs["input_ids"] == image_token).sum()) == (32 // 8) ** 2


@pytest.mark.slow
def test_outputs_become_the_same_annotations_as_the_hf_backend(demo_run, tiny_vlm, tmp_path):
    """The hf backend's own texts, passed through the vllm backend's parsing, QC and writer, give the hf
    backend's annotation shard row for row (only the backend column differs)."""
    cfg, _ = demo_run
    hf_dir, v_dir = _copy_align(cfg, tmp_path / "hf"), _copy_align(cfg, tmp_path / "vllm")
    name = min((n for n in _shards(hf_dir) if _tiles(hf_dir, n)), key=lambda n: len(_tiles(hf_dir, n)))
    hcfg = load_config(
        str(REPO / "workflows" / "demo.yaml"),
        [
            f"run.run_dir={hf_dir}",
            "annotate.backend=hf",
            f"annotate.hf.model={tiny_vlm}",
            "annotate.hf.dtype=float32",
        ],
    )
    hf_shard = AnnotateShard(hcfg.annotate, str(hf_dir), hcfg.run.seed, None)
    tiles = _tiles(hf_dir, name)
    generated = hf_shard.backend.annotate_many(tiles)  # the hf path's raw texts, before QC
    hf_manifest = hf_shard({"shard": name})

    vcfg = _config(v_dir, tiny_vlm)
    requests = shard_requests(vcfg)({"shard": name})
    texts = []
    for r in requests:  # the hf text of the same (tile, question); "" where the hf backend got an empty one
        tile_pairs = generated[[t["tile_id"] for t in tiles].index(r["tile_id"])]
        pair = json.loads(r["pair"])
        match = [
            p["answer"] for p in tile_pairs if (p["kind"], p["question"]) == (pair["kind"], pair["question"])
        ]
        texts.append(match[0] if match else "")
    v_manifest = _finish_shard(
        AnnotateShard,
        vcfg.annotate,
        str(v_dir),
        vcfg.run.seed,
        None,
        name,
        [_keep(row) for row in _engine_rows(requests, texts)],
    )

    def table(run_dir):
        t = pq.read_table(run_dir / "annotate" / "shards" / name)
        assert t.schema.equals(ANNOTATION_SCHEMA, check_metadata=False)
        return t.to_pylist()

    hf_rows, v_rows = table(hf_dir), table(v_dir)
    assert {r["backend"] for r in v_rows} == {"vllm"} and {r["backend"] for r in hf_rows} == {"hf"}

    def key(r):
        return (r["tile_id"], r["kind"], r["question"], r["answer"], r["qc_passed"], tuple(r["qc_reasons"]))

    assert Counter(map(key, v_rows)) == Counter(map(key, hf_rows))
    for k in ("planned", "written", "rejected", "pairs", "pairs_passed", "qc_hits"):
        assert v_manifest[k] == hf_manifest[k], k


def test_engine_errors_and_empty_outputs_go_to_the_errors_table(demo_run, tmp_path):
    """Output rows of three kinds for one shard: an engine error on one prompt of tile A, empty text for
    every prompt of tile B, tile C missing from the output; the other tiles get the template's own
    answers as their text (written by the template annotator, not generated)."""
    cfg, _ = demo_run
    run_dir = _copy_align(cfg, tmp_path)
    name = max(_shards(run_dir), key=lambda n: len(_tiles(run_dir, n)))
    vcfg = _config(run_dir, str(REPO / "runs" / "no-model"))
    annotator = VLLMAnnotator(vcfg.annotate, vcfg.run.seed)
    tiles = _tiles(run_dir, name)
    assert len(tiles) >= 4
    a, b, c = (t["tile_id"] for t in tiles[:3])
    rows, texts, errors = [], [], []
    for tile in tiles:
        if tile["tile_id"] == c:
            continue
        for j, (pair, _, _) in enumerate(annotator.jobs(tile)):
            rows.append(
                {
                    "shard": name,
                    "n_requests": 0,
                    "tile_id": tile["tile_id"],
                    "job": j,
                    "prompt": "p",
                    "pair": json.dumps({k: v for k, v in pair.items() if k != "answer"}),
                }
            )
            texts.append("" if tile["tile_id"] == b or (tile["tile_id"] == a and j == 1) else pair["answer"])
            errors.append(
                "EngineGenerateError: prompt is too long" if tile["tile_id"] == a and j == 1 else ""
            )
    m = _finish_shard(
        AnnotateShard,
        vcfg.annotate,
        str(run_dir),
        vcfg.run.seed,
        None,
        name,
        [_keep(r) for r in _engine_rows(rows, texts, errors)],
    )
    err = {r["item"]: r for r in pq.read_table(run_dir / "annotate" / "errors" / name).to_pylist()}
    assert set(err) == {a, b, c}
    assert (
        "EngineGenerateError: prompt is too long" in err[a]["message"]
        and "1 of the tile's" in err[a]["message"]
    )
    assert "only empty text" in err[b]["message"]
    assert "returned 0 of the tile's" in err[c]["message"]
    assert all(e["error_class"] == "backend_error" and e["stage"] == "annotate" for e in err.values())
    assert (m["planned"], m["written"], m["rejected"]) == (len(tiles), len(tiles) - 3, 3)
    written = pq.read_table(run_dir / "annotate" / "shards" / name).to_pylist()
    assert {r["tile_id"] for r in written} == {t["tile_id"] for t in tiles[3:]}
    # template text through the vllm backend's parsing gives the template's pairs, and they pass its QC
    expected = [p for t in tiles[3:] for p in TemplateAnnotator(seed=vcfg.run.seed).annotate(t)]
    assert [(r["question"], r["answer"]) for r in written] == [(p["question"], p["answer"]) for p in expected]
    assert (
        validate_pairs(
            [
                {k: r[k] for k in ("kind", "application", "question_type", "question", "answer")}
                for r in written
            ]
        )
        is None
    )
    assert m["pairs"] == len(written) and m["pairs_passed"] == sum(r["qc_passed"] for r in written)


def test_a_run_without_vllm_says_what_to_install(demo_run, tmp_path):
    pytest.importorskip("ray.data.llm")
    if __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this environment: the missing-vllm message cannot show")
    from sarlang_ray import evaluate, pipeline
    from sarlang_ray.vllm_engine import VLLMUnavailable

    cfg, _ = demo_run
    run_dir = _copy_align(cfg, tmp_path)
    vcfg = _config(run_dir, str(REPO / "runs" / "no-model"), "run.stages=[annotate]")
    with pytest.raises(
        VLLMUnavailable, match=r"annotate.backend=vllm.*pip install 'sarlang-ray\[vllm\]'.*GPU nodes"
    ):
        pipeline.run(vcfg, ["annotate"])
    assert not (run_dir / "annotate" / "shards").exists()  # nothing was written before the check
    ecfg = load_config(
        str(REPO / "workflows" / "demo.yaml"), [f"run.run_dir={cfg.run.run_dir}", "evaluate.engine=vllm"]
    )
    with pytest.raises(VLLMUnavailable, match=r"evaluate.engine=vllm.*sarlang-ray\[vllm\]"):
        evaluate.run_evaluate(ecfg)


# run in the vLLM environment: annotate with backend=vllm, then evaluate the base model with engine=vllm
E2E = """
import json, sys
import ray
from sarlang_ray import pipeline
from sarlang_ray.config import load_config
from sarlang_ray.tiny_models import init_tiny_vlm
from sarlang_ray.vllm_engine import hub_layout
run_dir = sys.argv[1]
# vLLM's CPU attention needs a head size of 32 or more (hidden 256 / 4 heads); CLIP keys in the hub's layout
model = hub_layout(init_tiny_vlm(f"{run_dir}/tiny-vlm-src", hidden=256), f"{run_dir}/tiny-vlm")
engine = ["device=cpu", "cpus_per_replica=1", "max_model_len=512", "batch_size=32",
          "engine_kwargs.enforce_eager=true"]
common = [
    f"run.run_dir={run_dir}", "ray.progress=false", f"annotate.hf.model={model}", "annotate.hf.dtype=float32",
    "annotate.backend=vllm", *(f"annotate.vllm.{k}" for k in engine), *(f"evaluate.vllm.{k}" for k in engine),
]
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
annotate = pipeline.run(load_config("workflows/demo.yaml", common + ["run.stages=[annotate,export]"]),
                        ["annotate", "export"])["stages"]["annotate"]
board = pipeline.run(load_config("workflows/demo.yaml", common + [
    "run.stages=[evaluate]", f"evaluate.models=[{model}]", "evaluate.engine=vllm", "evaluate.dtype=float32",
    "evaluate.limit_pairs=40", "evaluate.baselines=[]"]), ["evaluate"])
result = {"model": model, "annotate": annotate, "evaluate": board["stages"].get("evaluate")}
print(json.dumps(result, default=str))
"""


def _vllm_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "RAY_ADDRESS"))}
    env.update(
        VLLM_TARGET_DEVICE="cpu",
        VLLM_CPU_KVCACHE_SPACE="1",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
        PYTHONPATH=str(REPO),
    )
    return env


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the CPU engine starts twice (annotate, evaluate): about 5 min each here
def test_vllm_backend_end_to_end_in_its_own_environment(demo_run, tmp_path):
    """annotate.backend=vllm and evaluate.engine=vllm with the real engine (vLLM's CPU build), in the
    separate environment docs/vllm.md builds; the annotations pass the schema and QC checks the hf
    backend's pass, and the evaluation writes a leaderboard row for the model."""
    python = VLLM_VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(
            f"no vLLM environment at {VLLM_VENV} (built by hand, see docs/vllm.md; CI does not build it)"
        )
    cfg, _ = demo_run
    run_dir = _copy_align(cfg, tmp_path / "run")
    proc = subprocess.run(
        [str(python), "-c", E2E, str(run_dir)],
        capture_output=True,
        text=True,
        env=_vllm_env(),
        cwd=REPO,
        timeout=1500,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    counts = report["annotate"]
    assert (
        counts["planned"] == counts["written"] + counts["rejected"]
        and counts["written"] > 0.9 * counts["planned"]
    )
    pairs = pq.read_table(run_dir / "annotate" / "shards").to_pylist()
    assert pairs and {p["backend"] for p in pairs} == {"vllm"}
    assert (
        validate_pairs(
            [{k: p[k] for k in ("kind", "application", "question_type", "question", "answer")} for p in pairs]
        )
        is None
    )
    assert pq.read_table(run_dir / "annotate" / "shards").schema.equals(
        ANNOTATION_SCHEMA, check_metadata=False
    )
    assert all(p["qc_reasons"] for p in pairs if not p["qc_passed"])
    qc = json.loads((run_dir / "annotate" / "qc_report.json").read_text())
    assert qc["backend"] == "vllm" and qc["pairs"]["planned"] == len(pairs)
    assert qc["rule_hits"] == dict(Counter(r for p in pairs for r in p["qc_reasons"]))
    board = json.loads((run_dir / "evaluate" / "leaderboard.json").read_text())
    assert not board["failed"], board["failed"]
    row = next(r for r in board["rows"] if r.get("model") == report["model"])
    assert row["n_pairs"] == 40
