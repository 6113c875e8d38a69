"""Tiny vision-language models built offline, for machines without a GPU or a model hub.

``sarlang model init-tiny DIR`` writes a LLaVA-style VLM (CLIP vision tower + Llama decoder, random
weights) with a byte-level BPE tokenizer trained here on the project's own question/answer vocabulary,
a ``CLIPImageProcessorPil`` and a chat template, all with ``save_pretrained``. It loads with plain
``AutoModelForImageTextToText.from_pretrained(DIR)`` / ``AutoProcessor.from_pretrained(DIR)``, exactly
like a hub model, so tests exercise the same code path that runs LLaVA-1.5 or Qwen2-VL on a GPU cluster.
"""

from __future__ import annotations

import os

from sarlang_ray import prompts

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def _corpus() -> list[str]:
    """Text the tokenizer is trained on: every template phrasing, class, position and number."""
    from sarlang_ray.annotate import template
    from sarlang_ray.annotate.vocab import CLASS_WORDS, NUMBER_WORDS, POSITIONS

    lines = []
    for name in dir(template):
        value = getattr(template, name)
        if isinstance(value, tuple) and value and all(isinstance(v, str) for v in value):
            lines += list(value)
    lines += [f"{c} {p}" for c, (p, syns) in CLASS_WORDS.items() for _ in range(3)] + list(POSITIONS) + list(NUMBER_WORDS)
    lines += [str(i) for i in range(200)] + ["yes", "no", "user:", "assistant:", prompts.CAPTION_DETAILED]
    return lines * 4


def init_tiny_vlm(out_dir: str, seed: int = 0, image_size: int = 32, hidden: int = 64, layers: int = 2) -> str:
    """Write a tiny LLaVA-style VLM + processor to ``out_dir``; returns ``out_dir``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=1024, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                        padding_side="left")
    patch = 8
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                              image_size=image_size, patch_size=patch)
    text = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)  # safetensors
    processor.save_pretrained(out_dir)
    return out_dir


def load_processor(model: str, max_pixels: int | None = None):
    """``AutoProcessor`` of a model; ``max_pixels`` (``run.max_pixels``) goes to processors that take it
    (Qwen2-VL / Qwen2.5-VL decide their image-token count from it)."""
    import inspect

    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    image_processor = getattr(processor, "image_processor", None)
    if max_pixels and image_processor is not None and "max_pixels" in inspect.signature(type(image_processor).__init__).parameters:
        processor = AutoProcessor.from_pretrained(model, max_pixels=max_pixels)
    return processor


def user_message(question: str) -> list[dict]:
    """One user turn: the image, then the text (the content-list format every VLM chat template reads)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": str(question)}]}]


def chat_texts(processor, question: str, answer: str | None = None) -> tuple[str, str | None]:
    """``(prompt, full)``: the prompt rendered by the model's own chat template up to the assistant's turn,
    and the whole conversation with ``answer`` as the assistant's turn (its end-of-turn marker included).

    Training puts the loss on the tokens of ``full`` after those of ``prompt``; the answer's span therefore
    comes from the template itself rather than from an assumed format. A template whose full rendering does
    not start with its prompt rendering (some insert reasoning markers) falls back to ``prompt + answer + eos``.
    """
    messages = user_message(question)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    if answer is None:
        return prompt, None
    full = processor.apply_chat_template(
        messages + [{"role": "assistant", "content": [{"type": "text", "text": str(answer)}]}])
    if not full.startswith(prompt) or str(answer) not in full[len(prompt):]:
        full = prompt + str(answer) + (processor.tokenizer.eos_token or "")
    return prompt, full.rstrip()


def load_image(png: bytes, max_pixels: int | None = None, variant: str = "sar"):
    """A tile PNG as the RGB PIL image every model stage feeds its processor.

    ``max_pixels`` (``run.max_pixels``) downsizes (aspect kept, Lanczos) so width*height <= max_pixels;
    ``variant`` is an evaluation preprocessing choice: ``sar`` as tiled, ``sar_equalized`` with its
    histogram equalised (a contrast variant; ``optical`` tiles are the same as ``sar`` here: pass the
    optical PNG)."""
    import io as _io
    import math

    from PIL import Image, ImageOps

    image = Image.open(_io.BytesIO(png)).convert("RGB")
    if variant == "sar_equalized":
        image = ImageOps.equalize(image)
    if max_pixels and image.width * image.height > max_pixels:
        scale = math.sqrt(max_pixels / (image.width * image.height))
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.LANCZOS)
    return image


class Generator:
    """A VLM (hub name or folder, safetensors only) with batched greedy generation, on the GPU when asked
    for and present. Used by the ``hf`` annotator and by evaluation."""

    def __init__(self, model: str, dtype: str = "auto", use_gpu: bool = False, batch_size: int = 8,
                 max_pixels: int | None = None):
        import torch
        from transformers import AutoModelForImageTextToText

        from sarlang_ray.io import local_copy

        model = local_copy(model)  # a model folder on s3:// (a fine-tuned checkpoint) is fetched once
        self.torch = torch
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.batch_size = batch_size
        torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        self.processor = load_processor(model, max_pixels)
        self.processor.tokenizer.padding_side = "left"  # batched generation with a decoder-only LM
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype, use_safetensors=True)
        self.model.to(self.device).eval()

    def generate(self, images: list, prompts: list[str], max_new_tokens: int) -> list[str]:
        """One greedy answer per (image, prompt), ``batch_size`` prompts per ``generate`` call."""
        out: list[str] = []
        for i in range(0, len(prompts), self.batch_size):
            texts = [self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True)
                for p in prompts[i:i + self.batch_size]]
            inputs = self.processor(images=images[i:i + self.batch_size], text=texts, return_tensors="pt", padding=True)
            inputs = inputs.to(self.device)
            with self.torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = ids[:, inputs["input_ids"].shape[1]:]
            out += [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]
        return out
