"""The prompts of the SARLANG-1M paper, in one place: the questions stored with caption pairs, what the
`hf` annotator asks a VLM, and the defaults of ``evaluate.prompts``."""

from __future__ import annotations

CAPTION_CONCISE = "Describe the content of this image in one sentence."  # the paper's concise-caption prompt
CAPTION_DETAILED = "Describe this image in detail."
VQA = "Question: {question}. Answer the question concisely."  # the paper's VQA prompt
ANSWER_SUFFIX = " Answer the question concisely."  # after a question, when the model answers a stored pair

CAPTIONS = {"concise": CAPTION_CONCISE, "detailed": CAPTION_DETAILED}
