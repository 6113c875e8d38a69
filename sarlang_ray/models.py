"""Vision-language models: the family-agnostic loading, chat formatting and generation that annotation,
training and evaluation share. What differs between families at run time is in ``sarlang_ray.families`` and
nowhere else; the tiny models that tests build offline are in ``sarlang_ray.tiny_models``.
"""

from __future__ import annotations

import functools
import json
import os

from sarlang_ray import families

# --- processors whose video processor needs torchvision
# ------------------------------------------------------
# transformers 5 gives Qwen-VL, InternVL and SmolVLM processors a mandatory video processor, and every video
# processor it ships is built on torchvision, which this project does not install (it replaces the pinned
# torch). Images never touch it. Without torchvision, the processor is built with ``ImagesOnlyVideoProcessor``
# in its place: it keeps the real video processor's saved settings (so ``save_pretrained`` writes them back
# unchanged and a machine with torchvision loads the real one) and refuses videos.


def _video_mixin():
    import transformers
    from transformers.video_processing_utils import VideoProcessorMixin

    # transformers exports this base class only when torchvision is installed, yet checks every processor's
    # video processor against it by name: make the name resolvable (the class itself needs no torchvision)
    if "VideoProcessorMixin" not in transformers.__dict__:
        transformers.VideoProcessorMixin = VideoProcessorMixin
    return VideoProcessorMixin


@functools.lru_cache(maxsize=1)
def _images_only_class():
    mixin = _video_mixin()

    class ImagesOnlyVideoProcessor(mixin):
        """Holds a video processor's settings where torchvision (which every video processor needs) is
        absent."""

        def __init__(self, settings: dict):
            super().__init__()
            self._settings = dict(settings)
            for key in ("merge_size", "patch_size", "temporal_patch_size", "num_frames", "fps"):
                setattr(self, key, self._settings.get(key, getattr(self, key, None)))

        def to_dict(self) -> dict:
            return dict(self._settings)

        def __call__(self, videos, **kwargs):
            raise RuntimeError(
                f"video input needs torchvision for {self._settings.get('video_processor_type')}; "
                "this pipeline feeds images only"
            )

        preprocess = __call__

    # picklable (Ray ships processors to workers) as sarlang_ray.models.ImagesOnlyVideoProcessor (module
    # __getattr__)
    ImagesOnlyVideoProcessor.__module__, ImagesOnlyVideoProcessor.__qualname__ = (
        __name__,
        "ImagesOnlyVideoProcessor",
    )
    return ImagesOnlyVideoProcessor


def __getattr__(name: str):
    if name == "ImagesOnlyVideoProcessor":  # built on first use: its base class comes from transformers
        return _images_only_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def images_only_video_processor(settings: dict):
    """A stand-in video processor that carries ``settings`` (the real one's saved dict) and refuses videos."""
    return _images_only_class()(settings)


def _torchvision_missing() -> bool:
    from transformers.utils import is_torchvision_available

    return not is_torchvision_available()


def _build_processor(cls, image_processor, tokenizer, video_settings: dict, **kwargs):
    """``cls(image_processor, tokenizer, video_processor, **kwargs)`` with the real video processor built from
    ``video_settings`` where torchvision is installed, else the images-only stand-in carrying them."""
    if _torchvision_missing():
        video = images_only_video_processor(video_settings)
    else:
        import transformers

        settings = {k: v for k, v in video_settings.items() if k != "video_processor_type"}
        video = getattr(transformers, video_settings["video_processor_type"])(**settings)
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video, **kwargs)


def _load_images_only(model: str, **kwargs):
    """The processor of ``model`` (a folder) built without torchvision: tokenizer, image processor (the PIL
    backend) and chat template load as usual, the video processor is the images-only stand-in."""
    import inspect

    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    def read(name: str) -> dict:
        path = os.path.join(model, name)
        if not os.path.isfile(path):
            return {}
        with open(path) as f:
            return json.load(f)

    saved = read("processor_config.json")
    cls_name = saved.get("processor_class") or read("preprocessor_config.json").get("processor_class")
    if not cls_name:
        raise ValueError(
            f"{model}: neither processor_config.json nor preprocessor_config.json names a processor_class; "
            "save the model's processor with it (processor.save_pretrained)."
        )
    cls = getattr(transformers, cls_name)
    video = saved.get("video_processor") or read("video_preprocessor_config.json")
    params = inspect.signature(cls.__init__).parameters
    extra = {
        k: v
        for k, v in saved.items()
        if k in params and k not in ("image_processor", "tokenizer", "video_processor")
    }
    template = os.path.join(model, "chat_template.jinja")
    chat_template = None
    if os.path.isfile(template):
        with open(template) as f:
            chat_template = f.read()
    tokenizer = AutoTokenizer.from_pretrained(model)
    image_processor = AutoImageProcessor.from_pretrained(model, **kwargs)
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=images_only_video_processor(video),
        chat_template=chat_template or getattr(tokenizer, "chat_template", None),
        **extra,
    )


def _auto_processor(model: str, **kwargs):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model, **kwargs)
    except (ValueError, ImportError) as exc:
        if "torchvision" not in str(exc).lower() or not os.path.isdir(model):
            raise
        return _load_images_only(model, **kwargs)


def load_processor(model: str, max_pixels: int | None = None):
    """``AutoProcessor`` of a model (hub name or folder) with ``run.max_pixels`` applied through the family's
    image-size knob (``families.processor_kwargs``: Qwen's ``max_pixels``, Idefics3/SmolVLM's longest edge;
    nothing for fixed-size families). Works without torchvision (see ``images_only_video_processor``)."""
    processor = _auto_processor(model)
    kwargs = families.processor_kwargs(model, max_pixels, getattr(processor, "image_processor", None))
    if kwargs:
        processor = _auto_processor(model, **kwargs)
    return processor


def user_message(question: str) -> list[dict]:
    """One user turn: the image, then the text (the content-list format every VLM chat template reads)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": str(question)}]}]


def chat_texts(processor, question: str, answer: str | None = None) -> tuple[str, str | None]:
    """``(prompt, full)``: the prompt rendered by the model's own chat template up to the assistant's turn,
    and the whole conversation with ``answer`` as the assistant's turn, ending with the turn's end marker.

    Training puts the loss on the tokens of ``full`` after those of ``prompt``: the answer and the marker that
    ends it, which is what the model must learn to emit to stop. The marker is what the template writes after
    the answer, whitespace trimmed (``<|im_end|>`` for Qwen and InternVL, ``<end_of_turn>`` for Gemma 3,
    ``<end_of_utterance>`` for Idefics3/SmolVLM); a template that closes the turn with nothing (LLaVA-1.5's)
    gets the tokenizer's end-of-sequence token, as the model was trained. A template whose full rendering does
    not start with its prompt rendering (some insert reasoning markers) falls back to
    ``prompt + answer + eos``.
    """
    messages = user_message(question)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    if answer is None:
        return prompt, None
    answer = str(answer)
    eos = processor.tokenizer.eos_token or ""
    full = processor.apply_chat_template(
        messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    )
    at = full.find(answer, len(prompt)) if full.startswith(prompt) else -1
    if at < 0:
        return prompt, prompt + answer + eos
    end = at + len(answer)
    # what closes this turn (nothing in LLaVA-1.5's template)
    marker = full[end:].strip().split("\n")[0].strip()
    return prompt, full[:end] + (marker or eos)


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
        image = image.resize(
            (max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.Resampling.LANCZOS
        )
    return image


class Generator:
    """A VLM (hub name or folder, safetensors only) with batched greedy generation, on the GPU when asked
    for and present. Used by the ``hf`` annotator and by evaluation; family-agnostic: prompts come from the
    model's chat template, the processor's whole output goes to ``generate``, only new tokens are decoded."""

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        use_gpu: bool = False,
        batch_size: int = 8,
        max_pixels: int | None = None,
    ):
        import torch
        from transformers import AutoModelForImageTextToText

        from sarlang_ray.io import local_copy

        model = local_copy(model)  # a model folder on s3:// (a fine-tuned checkpoint) is fetched once
        self.torch = torch
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.batch_size = batch_size
        torch_dtype = {
            "auto": "auto",
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[dtype]
        self.processor = load_processor(model, max_pixels)
        self.processor.tokenizer.padding_side = "left"  # batched generation with a decoder-only LM
        self.model = AutoModelForImageTextToText.from_pretrained(
            model, dtype=torch_dtype, use_safetensors=True
        )
        # transformers types the wrapped .to() without self
        self.model.to(self.device).eval()  # type: ignore[arg-type]

    def generate(self, images: list, prompts: list[str], max_new_tokens: int) -> list[str]:
        """One greedy answer per (image, prompt), ``batch_size`` prompts per ``generate`` call."""
        out: list[str] = []
        for i in range(0, len(prompts), self.batch_size):
            texts = [chat_texts(self.processor, p)[0] for p in prompts[i : i + self.batch_size]]
            batch_images = [[image] for image in images[i : i + self.batch_size]]  # one image per prompt
            inputs = self.processor(
                images=batch_images, text=texts, return_tensors="pt", padding=True, padding_side="left"
            )
            inputs = inputs.to(self.device)
            with self.torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = ids[:, inputs["input_ids"].shape[1] :]
            out += [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]
        return out
