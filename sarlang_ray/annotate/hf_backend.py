"""The `hf` annotator: any Hugging Face VLM (hub name or local folder) with batched generation.

RGB-to-SAR text transfer as in SARLANG-1M: the model sees the tile's *optical twin* (``annotate.hf.
caption_image``), writes the concise and the detailed caption, and answers the grounded questions that
the template annotator asks of the tile; captions and answers are attached to the SAR tile. Runs on a
GPU when the actor has one (``annotate.num_gpus``), else on the CPU. Weights load from safetensors only.
"""

from __future__ import annotations

import io

from PIL import Image

from sarlang_ray.annotate.template import TemplateAnnotator
from sarlang_ray.config import AnnotateSection

CONCISE = "Describe the content of this image in one sentence."
DETAILED = "Describe this image in detail."


class HFAnnotator:
    name = "hf"

    def __init__(self, cfg: AnnotateSection, seed: int = 0):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.cfg = cfg.hf
        self.device = "cuda" if torch.cuda.is_available() and cfg.num_gpus > 0 else "cpu"
        dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.cfg.dtype]
        self.processor = AutoProcessor.from_pretrained(self.cfg.model)
        self.processor.tokenizer.padding_side = "left"  # batched generation with a decoder-only LM
        self.model = AutoModelForImageTextToText.from_pretrained(self.cfg.model, dtype=dtype, use_safetensors=True)
        self.model.to(self.device).eval()
        self.questions = TemplateAnnotator(seed=seed, identification_pairs=cfg.identification_pairs,
                                           max_per_family=cfg.max_per_family)
        self.torch = torch

    def _image(self, tile: dict) -> Image.Image:
        png = tile.get("optical_png") if self.cfg.caption_image == "optical" else None
        return Image.open(io.BytesIO(png or tile["sar_png"])).convert("RGB")

    def generate(self, images: list[Image.Image], prompts: list[str], max_new_tokens: int) -> list[str]:
        """Batched greedy generation; one answer per (image, prompt)."""
        out: list[str] = []
        for i in range(0, len(prompts), self.cfg.batch_size):
            texts = [self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True)
                for p in prompts[i:i + self.cfg.batch_size]]
            inputs = self.processor(images=images[i:i + self.cfg.batch_size], text=texts, return_tensors="pt", padding=True)
            inputs = inputs.to(self.device)
            with self.torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            out += [t.strip() for t in self.processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]
        return out

    def annotate_many(self, tiles: list[dict]) -> list[list[dict] | Exception]:
        jobs = []  # (tile index, pair template, prompt, max tokens)
        for k, tile in enumerate(tiles):
            for pair in self.questions.annotate(tile):
                if pair["kind"] == "caption_concise":
                    jobs.append((k, pair, CONCISE, self.cfg.max_new_tokens_caption))
                elif pair["kind"] == "caption_detailed":
                    jobs.append((k, pair, DETAILED, 3 * self.cfg.max_new_tokens_caption))
                else:
                    jobs.append((k, pair, pair["question"] + " Answer the question concisely.", self.cfg.max_new_tokens_answer))
        results: list[list[dict] | Exception] = [[] for _ in tiles]
        images = {k: self._image(t) for k, t in enumerate(tiles)}
        for budget in sorted({j[3] for j in jobs}):  # one generation length per batch
            group = [j for j in jobs if j[3] == budget]
            answers = self.generate([images[j[0]] for j in group], [j[2] for j in group], budget)
            for (k, pair, _, _), answer in zip(group, answers):
                results[k].append({**pair, "answer": answer})
        for k, pairs in enumerate(results):
            if not any(p["answer"] for p in pairs):
                results[k] = ValueError("the model generated only empty text for this tile")
            else:  # empty answers are malformed: drop them, keep the rest
                results[k] = [p for p in pairs if p["answer"]]
        return results
