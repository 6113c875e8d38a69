"""The prompts of the SARLANG-1M paper, in one place: the questions stored with caption pairs, what the
`hf` annotator asks a VLM, and the defaults of ``evaluate.prompts``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CAPTION_CONCISE = "Describe the content of this image in one sentence."  # the paper's concise-caption prompt
CAPTION_DETAILED = "Describe this image in detail."
VQA = "Question: {question}. Answer the question concisely."  # the paper's VQA prompt
ANSWER_SUFFIX = " Answer the question concisely."  # after a question, when the model answers a stored pair

CAPTIONS = {"concise": CAPTION_CONCISE, "detailed": CAPTION_DETAILED}


def annotation_prompt(
    pair: Mapping[str, Any], max_new_tokens_caption: int, max_new_tokens_answer: int
) -> tuple[str, int]:
    """What a VLM annotator (``hf``, ``vllm``) asks for a template pair, and its generation budget: the
    caption prompts (a detailed caption gets three times the caption budget), else the pair's question."""
    if pair["kind"] == "caption_concise":
        return CAPTION_CONCISE, max_new_tokens_caption
    if pair["kind"] == "caption_detailed":
        return CAPTION_DETAILED, 3 * max_new_tokens_caption
    return pair["question"] + ANSWER_SUFFIX, max_new_tokens_answer
