"""Tiny vision-language models built offline, for machines without a GPU or a model hub.

``sarlang model init-tiny DIR`` writes a LLaVA-style VLM (CLIP vision tower + Llama decoder, random
weights) with a byte-level BPE tokenizer trained here on the project's own question/answer vocabulary,
a ``CLIPImageProcessorPil`` and a chat template, all with ``save_pretrained``. It loads with plain
``AutoModelForImageTextToText.from_pretrained(DIR)`` / ``AutoProcessor.from_pretrained(DIR)``, exactly
like a hub model, so tests exercise the same code path that runs LLaVA-1.5 or Qwen2-VL on a GPU cluster.
"""

from __future__ import annotations

import os

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
    lines += [str(i) for i in range(200)] + ["yes", "no", "user:", "assistant:", "Describe this image in detail."]
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
