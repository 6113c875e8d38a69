"""Tiny vision-language models built offline, for tests, benchmarks and `sarlang model init-tiny`.

``sarlang model init-tiny DIR --family F`` writes a tiny VLM of family ``F`` (``llava``, ``qwen2_vl``,
``qwen2_5_vl``, ``qwen3_vl``, ``internvl``, ``idefics3``, ``smolvlm``, ``gemma3``): the family's own model
class with random weights at toy sizes, its own processor class (the PIL image processors: this project runs
without torchvision), its image-token mechanics, a chat template in the family's published format, and a
byte-level BPE tokenizer trained here on the project's question/answer vocabulary plus the family's special
tokens, all written with ``save_pretrained`` (safetensors). It loads with plain
``AutoModelForImageTextToText.from_pretrained(DIR)`` / ``AutoProcessor.from_pretrained(DIR)`` like the hub
model, so tests exercise the code path that runs LLaVA-1.5, Qwen2-VL or Gemma 3 on a GPU cluster.

It sits above ``annotate`` (the tokenizer is trained on the template phrasings) and beside it, never below:
``models`` (loading and generation, which the annotate backends use) does not import it.
"""

from __future__ import annotations

import os

from sarlang_ray import families, prompts
from sarlang_ray.models import _build_processor


def _corpus() -> list[str]:
    """Text the tokenizer is trained on: every template phrasing, class, position and number."""
    from sarlang_ray.annotate import template
    from sarlang_ray.annotate.vocab import CLASS_WORDS, NUMBER_WORDS, POSITIONS

    lines = []
    for name in dir(template):
        value = getattr(template, name)
        if isinstance(value, tuple) and value and all(isinstance(v, str) for v in value):
            lines += list(value)
    lines += (
        [f"{c} {p}" for c, (p, syns) in CLASS_WORDS.items() for _ in range(3)]
        + list(POSITIONS)
        + list(NUMBER_WORDS)
    )
    lines += [str(i) for i in range(200)] + [
        "yes",
        "no",
        "user:",
        "assistant:",
        "User:",
        "Assistant:",
        "USER:",
        "ASSISTANT:",
        "system",
        "user",
        "assistant",
        "model",
        prompts.CAPTION_DETAILED,
    ]
    return lines * 4


def _tokenizer(
    specials: list[str], roles: dict[str, str], extra: dict[str, str] | None = None, add_bos: bool = False
):
    """A byte-level BPE tokenizer trained on ``_corpus()`` with ``specials`` as special tokens.

    ``roles`` maps ``bos_token``/``eos_token``/``pad_token``/``unk_token`` to tokens of ``specials``;
    ``extra`` names the family's multimodal tokens (``image_token``, ``boi_token``...) the processors read as
    tokenizer attributes. ``add_bos`` prepends the BOS token to every encoding, as Llama tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=roles.get("unk_token")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        _corpus(),
        trainers.BpeTrainer(
            vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    if add_bos:
        bos = roles["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, padding_side="left", extra_special_tokens=extra or {}, **roles
    )


# Chat templates in each family's published format (the hub repos' chat_template.json / the transformers
# conversion scripts), trimmed of tool-calling branches a captioning pipeline never renders.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% "
    "endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' "
    "'}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN2_VL_TEMPLATE = (  # Qwen2-VL and Qwen2.5-VL
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] "
    "}}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value "
    "}}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif "
    "%}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN3_VL_TEMPLATE = """{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count) %}
    {%- if content is string %}
        {{- content }}
    {%- else %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                <|vision_start|><|image_pad|><|vision_end|>
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                <|vision_start|><|video_pad|><|vision_end|>
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + render_content(messages[0].content, false) + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, True) %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + content }}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is "
    "string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == "
    "'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == "
    "'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
_IDEFICS_TURNS = (
    "{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == "
    "'image' %}"
    "{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor "
    "%}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_TEMPLATE = "<|begin_of_text|>" + _IDEFICS_TURNS
SMOLVLM_TEMPLATE = "<|im_start|>" + _IDEFICS_TURNS
CHAT_TEMPLATE = LLAVA_TEMPLATE  # the default (llava) tiny model's template, under the name benchmarks import
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


def _text(hidden: int, layers: int, tokenizer, **extra) -> dict:
    """The text-decoder settings every tiny family shares (4 heads of ``hidden // 4``).

    Weights start 10x wider than transformers' default (``initializer_range=0.2``): at 0.02 two tiny layers
    barely move the residual stream, and a model with tied embeddings then only repeats its last input token
    (a newline or a colon, which strip to nothing); wider weights make an untrained model write varied text.
    The tiny LLaVA (untied, the demo's model, fine-tuned from random weights) keeps the default 0.02, from
    which it learns the demo's answers within its 3 epochs."""
    return dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{"initializer_range": 0.2, **extra},
    )


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _tiny_llava(hidden: int, layers: int, size: int):
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
        {"image_token": "<image>"},
        add_bos=True,
    )
    patch = 8  # (size / 8)^2 patches + CLS: 16 image tokens at 32 px (the "default" strategy drops CLS)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        ),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_TEMPLATE,
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=2,
            image_size=size,
            patch_size=patch,
        ),
        # untied: the default
        text_config=LlamaConfig(**_text(hidden, layers, tokenizer, initializer_range=0.02)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    return LlavaForConditionalGeneration(config), processor


_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
_QWEN_EXTRA = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
}


def _qwen_parts(patch: int, size: int, template: str, processor_class: str):
    """Tokenizer, image processor (smart resize to multiples of ``2 * patch``, 2x2 merge) and processor of a
    tiny Qwen-VL; images of (2 patch)^2 to (2 size)^2 pixels (1 to 16 merged tokens at patch 8, size 32)."""
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    tokenizer = _tokenizer(
        _QWEN_SPECIALS, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, _QWEN_EXTRA
    )
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch,
        temporal_patch_size=2,
        merge_size=2,
        min_pixels=(2 * patch) ** 2,
        max_pixels=(2 * size) ** 2,
    )
    video_config = {
        "video_processor_type": processor_class.replace("Processor", "VideoProcessor"),
        "patch_size": patch,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "size": {"shortest_edge": (2 * patch) ** 2, "longest_edge": (2 * size) ** 2},
    }
    processor = _build_processor(
        getattr(transformers, processor_class),
        image_processor,
        tokenizer,
        video_config,
        chat_template=template,
    )
    return tokenizer, processor


def _qwen_rope(hidden: int) -> dict:
    head = hidden // 4  # mrope sections (temporal, height, width) cover head_dim / 2 rotary pairs
    return {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [head // 4, head // 8, head // 8]}


def _tiny_qwen2_vl(hidden: int, layers: int, size: int):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer, processor = _qwen_parts(8, size, QWEN2_VL_TEMPLATE, "Qwen2VLProcessor")
    image, video, start, end = _ids(
        tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
    )
    # as Qwen2-VL-2B
    config = Qwen2VLConfig(
        text_config=_text(hidden, layers, tokenizer, rope_parameters=_qwen_rope(hidden)),
        vision_config={
            "depth": layers,
            "embed_dim": 32,
            "hidden_size": hidden,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
        tie_word_embeddings=True,
    )
    return Qwen2VLForConditionalGeneration(config), processor


def _tiny_qwen2_5_vl(hidden: int, layers: int, size: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer, processor = _qwen_parts(8, size, QWEN2_VL_TEMPLATE, "Qwen2_5_VLProcessor")
    image, video, start, end = _ids(
        tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
    )
    # as Qwen2.5-VL-7B
    config = Qwen2_5_VLConfig(
        text_config=_text(hidden, layers, tokenizer, rope_parameters=_qwen_rope(hidden)),
        vision_config={
            "depth": layers,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden,
            "window_size": 32,
            "fullatt_block_indexes": [layers - 1],
        },
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(config), processor


def _tiny_qwen3_vl(hidden: int, layers: int, size: int):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tokenizer, processor = _qwen_parts(8, size, QWEN3_VL_TEMPLATE, "Qwen3VLProcessor")
    image, video, start, end = _ids(
        tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
    )
    rope = {**_qwen_rope(hidden), "mrope_interleaved": True}
    # as Qwen3-VL-2B
    config = Qwen3VLConfig(
        text_config=_text(hidden, layers, tokenizer, rope_parameters=rope),
        vision_config={
            "depth": layers,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
        tie_word_embeddings=True,
    )
    return Qwen3VLForConditionalGeneration(config), processor


def _tiny_internvl(hidden: int, layers: int, size: int):
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
    )

    tokenizer = _tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    patch = 8  # a 32-px tile: 4x4 patches, pixel-shuffled by 0.5 to 2x2 = 4 tokens per tile
    tokens = (size // patch // 2) ** 2
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": size, "width": size}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    video_config = {"video_processor_type": "InternVLVideoProcessor", "size": {"height": size, "width": size}}
    processor = _build_processor(
        InternVLProcessor,
        image_processor,
        tokenizer,
        video_config,
        image_seq_length=tokens,
        chat_template=INTERNVL_TEMPLATE,
    )
    config = InternVLConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "image_size": [size, size],
            "patch_size": [patch, patch],
        },
        text_config=dict(model_type="qwen2", **_text(hidden, layers, tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=tokens,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    return InternVLForConditionalGeneration(config), processor


def _idefics_tokens() -> list[str]:
    return ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
        f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)
    ]


def _idefics_vision(layers: int, size: int, patch: int) -> dict:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "image_size": size,
        "patch_size": patch,
    }


def _tiny_idefics3(hidden: int, layers: int, size: int):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    tokenizer = _tokenizer(
        ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", *_idefics_tokens()],
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<end_of_utterance>",
            "pad_token": "<|finetune_right_pad_id|>",
        },
    )
    tile, patch = size, 8  # at 32 px, 4x4 patches per tile, pixel-shuffled by 2: 4 tokens per tile
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile}, do_image_splitting=True
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(tile // patch // 2) ** 2,
        chat_template=IDEFICS3_TEMPLATE,
    )
    # pad_token_id: a generic config attribute the config accepts as an extra keyword (its dataclass __init__,
    # all that mypy sees, does not list it)
    config = Idefics3Config(  # type: ignore[call-arg]
        vision_config=_idefics_vision(layers, tile, patch),
        text_config=dict(model_type="llama", **_text(hidden, layers, tokenizer)),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return Idefics3ForConditionalGeneration(config), processor


def _tiny_smolvlm(hidden: int, layers: int, size: int):
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessorPil,
        SmolVLMProcessor,
    )

    tokenizer = _tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_idefics_tokens()],
        {"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "pad_token": "<|im_end|>"},
        {
            "fake_image_token": "<fake_token_around_image>",
            "image_token": "<image>",
            "end_of_utterance_token": "<end_of_utterance>",
            "global_image_token": "<global-img>",
        },
    )
    tile, patch = size, 8
    image_processor = SmolVLMImageProcessorPil(
        size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile}, do_image_splitting=True
    )
    video_config = {
        "video_processor_type": "SmolVLMVideoProcessor",
        "size": {"longest_edge": 2 * tile},
        "max_image_size": {"longest_edge": tile},
    }
    processor = _build_processor(
        SmolVLMProcessor,
        image_processor,
        tokenizer,
        video_config,
        image_seq_len=(tile // patch // 2) ** 2,
        chat_template=SMOLVLM_TEMPLATE,
    )
    # as SmolVLM-256M/500M
    config = SmolVLMConfig(
        vision_config=_idefics_vision(layers, tile, patch),
        text_config=dict(model_type="llama", **_text(hidden, layers, tokenizer)),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[call-arg]  # as Idefics3Config's
        tie_word_embeddings=True,
    )
    return SmolVLMForConditionalGeneration(config), processor


def _tiny_gemma3(hidden: int, layers: int, size: int):
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
    )

    tokenizer = _tokenizer(
        [
            "<pad>",
            "<eos>",
            "<bos>",
            "<unk>",
            "<start_of_turn>",
            "<end_of_turn>",
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
        ],
        {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"},
        {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    )
    # at 32 px, 4x4 patches average-pooled to 2x2 = 4 soft tokens between <start_of_image> and <end_of_image>
    patch = 8
    tokens = (size // patch // 2) ** 2
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": size, "width": size}),
        tokenizer=tokenizer,
        image_seq_length=tokens,
        chat_template=GEMMA3_TEMPLATE,
    )
    boi, eoi, soft = _ids(tokenizer, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    text = _text(
        hidden,
        layers,
        tokenizer,
        query_pre_attn_scalar=hidden // 4,
        sliding_window=64,
        layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
    )
    # as every Gemma 3
    config = Gemma3Config(
        text_config=text,
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "image_size": size,
            "patch_size": patch,
        },
        mm_tokens_per_image=tokens,
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=soft,
        initializer_range=0.2,
        tie_word_embeddings=True,
    )
    model = Gemma3ForConditionalGeneration(config)
    # Gemma scales token embeddings by sqrt(hidden) and normalises each layer's output (post-norms at 1 + 0):
    # an untrained two-layer model then repeats its last input token; 4x wider post-norms let the layers speak
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
                weight.fill_(3.0)
    return model, processor


TINY_BUILDERS = {
    "llava": _tiny_llava,
    "qwen2_vl": _tiny_qwen2_vl,
    "qwen2_5_vl": _tiny_qwen2_5_vl,
    "qwen3_vl": _tiny_qwen3_vl,
    "internvl": _tiny_internvl,
    "idefics3": _tiny_idefics3,
    "smolvlm": _tiny_smolvlm,
    "gemma3": _tiny_gemma3,
}


def init_tiny_vlm(
    out_dir: str,
    seed: int = 0,
    family: str = "llava",
    hidden: int = 64,
    layers: int = 2,
    image_size: int = 32,
) -> str:
    """Write a tiny VLM of ``family`` (see ``TINY_BUILDERS``) + its processor to ``out_dir``; returns
    ``out_dir``.

    ``family`` may also be a hub name or model type that ``families.tiny_for`` places
    (``Qwen/Qwen2-VL-2B-Instruct`` gives a tiny ``qwen2_vl``). ``hidden`` is the text decoder's width (4
    heads), ``layers`` the depth of its decoder and vision tower, ``image_size`` (a multiple of 16) the vision
    input side (tile side for InternVL/Idefics3/SmolVLM; half the largest image side for Qwen). Weights are
    random (``seed``), in float32."""
    if image_size % 16:
        raise ValueError(f"image_size must be a multiple of 16 (8-px patches merged 2x2), got {image_size}")
    import torch

    family = families.tiny_for(family)
    if family not in TINY_BUILDERS:
        raise KeyError(f"no tiny builder for family {family!r}; families with one: {sorted(TINY_BUILDERS)}")
    torch.manual_seed(seed)
    model, processor = TINY_BUILDERS[family](hidden, layers, image_size)
    tokenizer = processor.tokenizer
    # generation stops at the template's end of turn (what the tokenizer calls eos), as on the hub models
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)  # safetensors
    processor.save_pretrained(out_dir)
    return out_dir
