"""Every VLM family through the family-agnostic code: a tiny model per family built offline, loaded with the
Auto classes, generating in batches, annotating real tiles, its answer span found from its own chat template,
and a LoRA fine-tune that lowers the loss, merges, saves and reloads to the same logits."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from sarlang_ray import families, models, tiny_models

FAMILIES = sorted(tiny_models.TINY_BUILDERS)
REPO = Path(__file__).resolve().parents[1]

# What closes the assistant's turn in each family's published chat template (from the hub repos' templates,
# written out here rather than read from the code under test); LLaVA-1.5's template closes it with nothing,
# and the model was trained to end its answer with the end-of-sequence token </s>.
END_OF_TURN = {
    "llava": "</s>",
    "qwen2_vl": "<|im_end|>",
    "qwen2_5_vl": "<|im_end|>",
    "qwen3_vl": "<|im_end|>",
    "internvl": "<|im_end|>",
    "idefics3": "<end_of_utterance>",
    "smolvlm": "<end_of_utterance>",
    "gemma3": "<end_of_turn>",
}
# the model class each family's hub checkpoints load as
MODEL_CLASS = {
    "llava": "LlavaForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> folder of its tiny model, built once per module on first use."""
    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = tiny_models.init_tiny_vlm(
                str(tmp_path_factory.mktemp("tiny") / family), family=family
            )
        return built[family]

    return get


def _images():
    """Two images of different sizes and aspect ratios (Qwen grids and Idefics3 splits differ between
    them)."""
    gradient = Image.linear_gradient("L").resize((48, 40)).convert("RGB")
    return [gradient, Image.new("RGB", (64, 24), (90, 140, 200))]


def _embeddings_shared(model) -> bool:
    return model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()


def test_cli_writes_a_family_from_its_hub_name(tmp_path, capsys):
    from sarlang_ray import cli

    out = tmp_path / "qwen"
    assert cli.main(["model", "init-tiny", str(out), "--family", "Qwen/Qwen2-VL-2B-Instruct"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_vl"
    assert cli.main(["model", "init-tiny", str(tmp_path / "x"), "--family", "acme/NotAVLM"]) == 2
    err = capsys.readouterr().err
    assert "acme/NotAVLM" in err and "families.py" in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_loads_like_a_hub_model(tiny, family, tmp_path):
    from transformers import AutoModelForImageTextToText

    folder = Path(tiny(family))
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(model).__name__ == MODEL_CLASS[family]
    assert families.family_of(str(folder)) is families.FAMILIES[family] is families.family_of(model.config)
    # the tiny model ties its embeddings exactly when the reference hub model does (Qwen2-VL-2B does)
    assert _embeddings_shared(model) is families.FAMILIES[family].tied
    processor = models.load_processor(str(folder))
    assert type(processor).__name__ == families.FAMILIES[family].processor
    # the saved processor names the family's real classes, video processor included, so a machine with
    # torchvision loads it with plain AutoProcessor
    saved = json.loads((folder / "processor_config.json").read_text())
    assert saved["processor_class"] == families.FAMILIES[family].processor
    if "video_processor" in saved:
        assert saved["video_processor"]["video_processor_type"] == saved["processor_class"].replace(
            "Processor", "VideoProcessor"
        )
    # a loaded processor saves back the same settings (a merged checkpoint reloads) and survives pickling
    # (Ray)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text()) == saved
    assert (tmp_path / "chat_template.jinja").read_text() == (folder / "chat_template.jinja").read_text()
    clone = pickle.loads(pickle.dumps(processor))
    assert type(clone) is type(processor) and clone.chat_template == processor.chat_template


@pytest.mark.parametrize("family", FAMILIES)
def test_generator_batches_left_padded_and_decodes_only_new_tokens(tiny, family):
    generator = models.Generator(tiny(family), dtype="float32", batch_size=2)
    images, questions = (
        _images(),
        ["How many ships are there?", "Describe the land cover of this image in detail."],
    )
    batched = generator.generate(images, questions, 6)
    assert len(batched) == 2 and all(batched)
    # one prompt at a time (no padding at all) gives the same greedy text: padding and masking are right
    alone = [generator.generate([im], [q], 6)[0] for im, q in zip(images, questions)]
    assert batched == alone
    # only new tokens are decoded: none of the prompt's text comes back
    prompt = models.chat_texts(generator.processor, questions[1])[0]
    assert not any(out.startswith(questions[1]) or questions[1] in out or prompt in out for out in batched)


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_texts_answer_span_is_answer_and_end_of_turn(tiny, family):
    processor = models.load_processor(tiny(family))
    question, answer = "How many ships are there?", "three ships"
    prompt, full = models.chat_texts(processor, question, answer)
    assert full.startswith(prompt) and full.endswith(answer + END_OF_TURN[family])
    image = _images()[0]
    full_ids = processor(images=[[image]], text=[full], return_tensors="pt")["input_ids"][0].tolist()
    prompt_ids = processor(images=[[image]], text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
    assert full_ids[: len(prompt_ids)] == prompt_ids  # the prompt's tokens are a prefix of the conversation's
    span = full_ids[len(prompt_ids) :]
    assert span[-1] == processor.tokenizer.convert_tokens_to_ids(END_OF_TURN[family])
    assert processor.tokenizer.decode(span).strip() == answer + END_OF_TURN[family]


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_max_pixels_reaches_the_image_knob(tiny, family):
    folder = tiny(family)
    image = Image.new("RGB", (64, 64), "white")

    def image_tokens(max_pixels):
        processor = models.load_processor(folder, max_pixels)
        text = models.chat_texts(processor, "Where?")[0]
        ids = processor(images=[[image]], text=[text], return_tensors="pt")["input_ids"][0]
        return int((ids == processor.image_token_id).sum())

    if family == "qwen2_vl":  # 8-px patches merged 2x2: 64x64 is 4x4 merged tokens, 16x16 (256 px) is one
        assert (image_tokens(None), image_tokens(256)) == (16, 1)
    else:  # 32-px tiles of 4 tokens: 64 px is split in 2x2 tiles plus the global image, 32 px is one tile
        assert (image_tokens(None), image_tokens(32 * 32)) == (5 * 4, 4)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_annotator_annotates_real_tiles(tiny, family, demo_run):
    from sarlang_ray import pipeline
    from sarlang_ray.annotate.hf_backend import HFAnnotator
    from sarlang_ray.config import AnnotateSection

    cfg, _ = demo_run
    tiles = pipeline.read_tiles(cfg.run.run_dir).slice(0, 2).to_pylist()
    section = AnnotateSection(backend="hf")
    (
        section.hf.model,
        section.hf.dtype,
        section.hf.max_new_tokens_caption,
        section.hf.max_new_tokens_answer,
    ) = (tiny(family), "float32", 6, 3)
    annotator = HFAnnotator(section, seed=0, max_pixels=cfg.run.max_pixels)
    results = annotator.annotate_many(tiles)
    planned = [annotator.questions.annotate(t) for t in tiles]
    for pairs, plan in zip(results, planned):
        assert not isinstance(pairs, Exception), pairs
        assert pairs and all(p["answer"] for p in pairs)
        assert {(p["kind"], p["question"]) for p in pairs} <= {(p["kind"], p["question"]) for p in plan}


def _batch(processor, family: str):
    """Two chat-formatted samples with labels on the answer span only (found from the chat template)."""
    images = _images()
    qa = [("How many ships are there?", "three ships"), ("What covers most of the image?", "water")]
    texts = [models.chat_texts(processor, q, a) for q, a in qa]
    batch = processor(
        images=[[im] for im in images],
        text=[full for _, full in texts],
        return_tensors="pt",
        padding=True,
        padding_side="right",
    )
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for i, (image, (prompt, _)) in enumerate(zip(images, texts)):
        labels[
            i, : processor(images=[[image]], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
        ] = -100
    batch["labels"] = labels
    assert set(families.FAMILIES[family].forward_inputs) <= set(batch)
    return batch


@pytest.mark.slow  # the file's slowest part: about 2-10 s a family on 2 CPU cores
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_learns_merges_saves_and_reloads(tiny, family, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    folder = tiny(family)
    processor = models.load_processor(folder)
    batch = _batch(processor, family)
    answer_tokens = int((batch["labels"] != -100).sum())
    assert answer_tokens >= 4  # two answers of at least one token, each with its end-of-turn marker
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=families.family_of(folder).lora_targets)
    )
    assert model.get_nb_trainable_parameters()[0] > 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
    merged = model.merge_and_unload().eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = merged(**inputs).logits
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert _embeddings_shared(reloaded) is families.FAMILIES[family].tied
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=0)


def test_every_preset_names_a_family_with_a_tiny_builder():
    hub_models = {}
    for preset in sorted((REPO / "workflows").glob("*.yaml")):
        cfg = yaml.safe_load(preset.read_text()) or {}
        for section, key in (("train", "model"), ("annotate", "hf")):
            value = (cfg.get(section) or {}).get(key)
            value = value.get("model") if isinstance(value, dict) else value
            # a hub name
            if value and re.fullmatch(r"[\w.-]+/[\w.-]+", value) and not value.startswith("runs/"):
                hub_models[f"{preset.name}:{section}"] = value
    assert {"qwen2vl-2b.yaml:train", "qwen25vl-7b.yaml:train", "llava15-7b.yaml:train"} <= set(hub_models)
    for where, name in hub_models.items():
        assert families.tiny_for(name) in tiny_models.TINY_BUILDERS, where
    assert families.tiny_for("Qwen/Qwen2-VL-2B-Instruct") == "qwen2_vl"
    assert families.tiny_for("Qwen/Qwen2.5-VL-7B-Instruct") == "qwen2_5_vl"
    assert families.tiny_for("llava-hf/llava-1.5-7b-hf") == "llava"
    with pytest.raises(KeyError, match="families.py"):
        families.tiny_for("acme/NotAVLM")
