"""The `hf` annotator: any Hugging Face VLM (hub name or local folder) with batched generation.

Family-agnostic: ``models.Generator`` renders prompts with the model's own chat template and feeds the
processor's whole output to ``generate``; every family of ``sarlang_ray.families`` (LLaVA, Qwen2/2.5/3-VL,
InternVL, Idefics3, SmolVLM, Gemma 3) is tested through this class (``tests/test_families.py``).

RGB-to-SAR text transfer as in SARLANG-1M: the model sees the tile's *optical twin* (``annotate.hf.
caption_image``), writes the concise and the detailed caption, and answers the grounded questions that
the template annotator asks of the tile; captions and answers are attached to the SAR tile. Runs on a
GPU when the actor has one (``annotate.num_gpus``), else on the CPU. Weights load from safetensors only.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from sarlang_ray import prompts
from sarlang_ray.annotate.template import TemplateAnnotator
from sarlang_ray.annotate.visibility import Visibility
from sarlang_ray.config import AnnotateSection
from sarlang_ray.models import Generator, load_image
from sarlang_ray.rows import AnnotateTileRow


class HFAnnotator:
    name = "hf"

    def __init__(self, cfg: AnnotateSection, seed: int = 0, max_pixels: int | None = None):
        self.cfg = cfg.hf
        self.max_pixels = max_pixels  # run.max_pixels, shared with training and evaluation
        self.generator = Generator(
            self.cfg.model, self.cfg.dtype, cfg.num_gpus > 0, self.cfg.batch_size, max_pixels
        )
        self.questions = TemplateAnnotator(
            seed=seed,
            identification_pairs=cfg.identification_pairs,
            max_per_family=cfg.max_per_family,
            visibility=Visibility.from_config(cfg),
        )

    def _image(self, tile: AnnotateTileRow) -> Image.Image:
        png = tile.get("optical_png") if self.cfg.caption_image == "optical" else None
        return load_image(png or tile["sar_png"], self.max_pixels)

    def generate(self, images: list[Image.Image], prompts: list[str], max_new_tokens: int) -> list[str]:
        return self.generator.generate(images, prompts, max_new_tokens)

    def annotate_many(self, tiles: Sequence[AnnotateTileRow]) -> list[list[dict] | Exception]:
        jobs = []  # (tile index, pair template, prompt, max tokens)
        for k, tile in enumerate(tiles):
            for pair in self.questions.annotate(tile):
                jobs.append(
                    (
                        k,
                        pair,
                        *prompts.annotation_prompt(
                            pair, self.cfg.max_new_tokens_caption, self.cfg.max_new_tokens_answer
                        ),
                    )
                )
        answered: list[list[dict]] = [[] for _ in tiles]
        images = {k: self._image(t) for k, t in enumerate(tiles)}
        for budget in sorted({j[3] for j in jobs}):  # one generation length per batch
            group = [j for j in jobs if j[3] == budget]
            answers = self.generate([images[j[0]] for j in group], [j[2] for j in group], budget)
            for (k, pair, _, _), answer in zip(group, answers):
                answered[k].append({**pair, "answer": answer})
        results: list[list[dict] | Exception] = []
        for pairs in answered:
            if not any(p["answer"] for p in pairs):
                results.append(ValueError("the model generated only empty text for this tile"))
            else:  # empty answers are malformed: drop them, keep the rest
                results.append([p for p in pairs if p["answer"]])
        return results
