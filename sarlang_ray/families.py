"""The one table of what differs between VLM families, keyed by ``config.model_type``.

Annotation, training, merging and evaluation are written once against ``AutoProcessor`` /
``AutoModelForImageTextToText``, the model's own chat template and whatever tensors its processor returns;
what still differs between families lives here and nowhere else:

- ``lora_targets``: what peft's ``LoraConfig(target_modules=...)`` gets. ``"all-linear"`` (every linear
  layer of the language model, the vision tower and the projector, never the output head) is right for every
  family below: the SARLANG-1M recipe puts LoRA on all linear layers, and no family here has a linear layer
  that must stay frozen.
- the image-size knob: how ``run.max_pixels`` reaches the processor. Qwen-VL processors choose their
  image-token count from ``max_pixels``/``min_pixels`` (dynamic resolution); Idefics3/SmolVLM resize the
  longest edge to ``size["longest_edge"]`` and split it into tiles of ``max_image_size``; LLaVA, InternVL and
  Gemma 3 resize every image (or tile) to a fixed square, so ``max_pixels`` only downsizes the PNG before the
  processor sees it (``models.load_image``).
- ``tied``: whether the reference hub model ties its input and output embeddings (``tie_word_embeddings``);
  the tiny model of the family does the same, so saving and reloading tied weights is tested.
- ``forward_inputs``: what the processor returns beside ``input_ids``/``attention_mask``/``pixel_values``
  that the model needs in its forward pass, training included (Gemma 3's ``token_type_ids`` switch on
  bidirectional attention over image tokens; Qwen's ``image_grid_thw`` carries each image's patch grid).
  Code passes the processor's whole output to the model (dropping none of it), so these are checked in the
  tests, not special-cased.

``family_of`` finds the row of a model folder, a config, a hub name or a model type; ``tiny_for`` names the
family whose tiny offline model (``sarlang model init-tiny --family``) stands in for a hub model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """What one VLM family needs that the family-agnostic code cannot find out by itself."""

    name: str  # config.model_type of the family's models
    hub_prefixes: tuple[str, ...]  # hub names starting with one of these (case-insensitive) are this family
    processor: str  # processor class (documentation; AutoProcessor picks it from the saved files)
    image_knob: str  # "max_pixels" (Qwen), "longest_edge" (Idefics3/SmolVLM) or "fixed" (nothing to set)
    tied: bool  # the reference hub model ties its input and output embeddings
    forward_inputs: tuple[str, ...] = ()  # processor outputs the model needs beside ids, mask and pixels
    lora_targets: str | tuple[str, ...] = "all-linear"
    notes: str = ""


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "llava",
            ("llava-hf/llava-1.5", "llava-hf/bakllava"),
            "LlavaProcessor",
            "fixed",
            tied=False,
            notes="CLIP ViT-L/14-336 + Vicuna; 576 image tokens per image; the template ends no turn, so the "
            "answer is followed by </s> (the end of sequence LLaVA-1.5 was trained with)",
        ),
        Family(
            "qwen2_vl",
            ("qwen/qwen2-vl",),
            "Qwen2VLProcessor",
            "max_pixels",
            tied=True,
            forward_inputs=("image_grid_thw",),
            notes="Qwen2-VL-2B ties its embeddings (7B and 72B do not); one image token per 2x2 merged 14-px "
            "patch",
        ),
        Family(
            "qwen2_5_vl",
            ("qwen/qwen2.5-vl",),
            "Qwen2_5_VLProcessor",
            "max_pixels",
            tied=False,
            forward_inputs=("image_grid_thw",),
            notes="Qwen2.5-VL-3B ties its embeddings, 7B and 72B do not",
        ),
        Family(
            "qwen3_vl",
            ("qwen/qwen3-vl",),
            "Qwen3VLProcessor",
            "max_pixels",
            tied=True,
            forward_inputs=("image_grid_thw",),
            notes="16-px patches, DeepStack visual features; 2B/4B tie their embeddings",
        ),
        Family(
            "internvl",
            ("opengvlab/internvl",),
            "InternVLProcessor",
            "fixed",
            tied=False,
            notes="the -hf checkpoints (e.g. OpenGVLab/InternVL3-2B-hf); 448-px tiles (crop_to_patches), "
            "256 <IMG_CONTEXT> tokens per tile",
        ),
        Family(
            "idefics3",
            ("huggingfacem4/idefics3",),
            "Idefics3Processor",
            "longest_edge",
            tied=False,
            forward_inputs=("pixel_attention_mask",),
            notes="image splitting into 364-px tiles plus a global image",
        ),
        Family(
            "smolvlm",
            ("huggingfacetb/smolvlm",),
            "SmolVLMProcessor",
            "longest_edge",
            tied=True,
            forward_inputs=("pixel_attention_mask",),
            notes="Idefics3's architecture on SmolLM2; 512-px tiles",
        ),
        Family(
            "gemma3",
            ("google/gemma-3",),
            "Gemma3Processor",
            "fixed",
            tied=True,
            forward_inputs=("token_type_ids",),
            notes="896-px SigLIP, 256 image tokens between <start_of_image> and <end_of_image>; "
            "token_type_ids "
            "mark image tokens (bidirectional attention over them; without them, silently causal)",
        ),
    )
}


def _model_type(model) -> str | None:
    """The model type of a config object, a model folder, a hub name or a model-type string (None if
    unknown)."""
    if hasattr(model, "model_type"):
        return model.model_type
    model = str(model)
    config = os.path.join(model, "config.json")
    if os.path.isfile(config):
        with open(config) as f:
            return json.load(f).get("model_type")
    if model in FAMILIES:
        return model
    lowered = model.lower()
    for family in FAMILIES.values():
        if any(lowered.startswith(p) for p in family.hub_prefixes):
            return family.name
    return None


def family_of(model) -> Family:
    """The family of ``model``: a model folder (its ``config.json``), a transformers config, a hub name
    (``Qwen/Qwen2-VL-2B-Instruct``) or a model type (``qwen2_vl``).

    Raises:
        KeyError: a model type this table does not list, or a name it cannot place.
    """
    model_type = _model_type(model)
    if model_type not in FAMILIES:
        raise KeyError(
            f"{model!r} (model type {model_type!r}) is not a VLM family this pipeline knows; known: "
            f"{sorted(FAMILIES)}. Add a row to sarlang_ray/families.py (and a tiny builder in "
            "sarlang_ray/models.py) to support it"
        )
    return FAMILIES[model_type]


def tiny_for(model) -> str:
    """The family name whose tiny offline model stands in for ``model`` (a hub name, folder or model type),
    e.g. ``tiny_for("Qwen/Qwen2-VL-2B-Instruct") == "qwen2_vl"``: ``sarlang model init-tiny DIR --family``
    with it writes a toy model wired exactly like the hub one."""
    return family_of(model).name


def processor_kwargs(model, max_pixels: int | None, image_processor=None) -> dict:
    """``AutoProcessor.from_pretrained`` keyword arguments that apply ``run.max_pixels`` to ``model``'s family
    (empty when the family has a fixed input size, is not in the table, or ``max_pixels`` is not set).

    ``image_processor`` (the processor's own, when already loaded) supplies the tile size for the
    ``longest_edge`` knob, so the longest edge stays a whole number of tiles.
    """
    if not max_pixels:
        return {}
    try:
        knob = family_of(model).image_knob
    except KeyError:  # a VLM outside the table: its processor keeps its own size (load_image still downsizes)
        return {}
    if knob == "max_pixels":  # Qwen: the image-token budget; min_pixels never above it
        size = getattr(image_processor, "size", None) or {}
        min_pixels = (
            getattr(image_processor, "min_pixels", None)
            or getattr(size, "shortest_edge", None)
            or (size.get("shortest_edge") if isinstance(size, dict) else None)
            or 0
        )
        return {"max_pixels": int(max_pixels), "min_pixels": int(min(min_pixels, max_pixels))}
    if knob == "longest_edge":  # Idefics3/SmolVLM: the longest edge, a whole number of tiles (at least one)
        tile = (getattr(image_processor, "max_image_size", None) or {}).get("longest_edge") or 1
        side = max(tile, tile * round(math.sqrt(max_pixels) / tile))
        return {"size": {"longest_edge": int(side)}}
    return {}
