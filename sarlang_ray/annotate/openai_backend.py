"""The `openai` annotator: any OpenAI-compatible chat endpoint (vLLM, TGI, llama.cpp server, a hosted API).

RGB-to-SAR text transfer as in SARLANG-1M: the *optical twin* of each tile is captioned (concise and
detailed), and the captions are attached to the SAR tile; QA pairs are asked for as JSON, grounded in
the tile's object list given in the prompt: only the objects that can be seen at the tile's GSD
(:mod:`sarlang_ray.annotate.visibility`), so the model is not invited to ask about cars at 10 m. Every pair
then goes through the same QC as template pairs, the contradiction rule included.

The API key is read from the environment variable named by ``annotate.openai.api_key_env`` (never from
the config, never logged). Requests have a timeout and are retried with exponential backoff on
timeouts, connection errors, 429 and 5xx. ``annotate.openai.max_concurrency`` requests run at once per
worker actor, so the cluster-wide limit is that times ``annotate.concurrency``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import requests

from sarlang_ray import prompts
from sarlang_ray.annotate.visibility import Visibility
from sarlang_ray.annotate.vocab import APPLICATIONS, CLASS_WORDS, position_of
from sarlang_ray.config import AnnotateSection
from sarlang_ray.rows import AnnotateTileRow

CONCISE_PROMPT = "Describe the content of this remote sensing image in one sentence. Do not mention colours."
DETAILED_PROMPT = (
    "Describe this remote sensing image in detail: land cover, objects with their counts and "
    "positions, and their arrangement. Do not mention colours."
)
QA_PROMPT = """You write question-answer pairs about a remote sensing image for a SAR benchmark.
Objects in the image (class, position): {objects}. Land cover fractions: {landcover}.
Write {n} pairs, grounded only in these facts, as a JSON list of objects with keys
"application" (one of: {applications}), "question" and "answer" (short). Reply with the JSON only."""


class BackendError(RuntimeError):
    """The endpoint failed for this tile after all retries (the message says why)."""


class OpenAIAnnotator:
    name = "openai"

    def __init__(self, cfg: AnnotateSection):
        self.cfg = cfg.openai
        self.visibility = Visibility.from_config(cfg)
        key = os.environ.get(self.cfg.api_key_env, "")
        self.session = requests.Session()
        self.session.headers["Content-Type"] = "application/json"
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    # -- one request, with retries -------------------------------------------------
    def _chat(self, messages: list[dict]) -> str:
        url = self.cfg.base_url.rstrip("/") + "/chat/completions"
        body = {
            "model": self.cfg.model,
            "messages": messages,
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                time.sleep(min(self.cfg.backoff_s * 2 ** (attempt - 1), 30))
            try:
                r = self.session.post(url, data=json.dumps(body), timeout=self.cfg.timeout_s)
            except requests.Timeout:
                last = f"timeout after {self.cfg.timeout_s} s"
                continue
            except requests.ConnectionError as exc:
                last = f"connection error: {exc.__class__.__name__}"
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = f"HTTP {r.status_code}"
                continue
            if r.status_code != 200:
                raise BackendError(f"HTTP {r.status_code} from {url}: {r.text[:200]}")
            try:
                return r.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise BackendError(f"malformed response from {url}: {r.text[:200]}") from None
        raise BackendError(f"{url} failed after {self.cfg.max_retries + 1} attempts: {last}")

    @staticmethod
    def _image_message(png: bytes, prompt: str) -> list[dict]:
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        return [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": prompt},
                ],
            }
        ]

    # -- one tile ------------------------------------------------------------------------
    def annotate(self, tile: AnnotateTileRow) -> list[dict]:
        image = tile.get("optical_png") if self.cfg.caption_image == "optical" else tile["sar_png"]
        if image is None:
            image = tile["sar_png"]  # no optical twin: caption the SAR tile itself
        concise = self._chat(self._image_message(image, CONCISE_PROMPT)).strip()
        detailed = self._chat(self._image_message(image, DETAILED_PROMPT)).strip()
        size = tile["width"]
        seen = self.visibility.view(tile, tuple(CLASS_WORDS)).seen
        objects = (
            ", ".join(f"{o['class']} ({position_of(o['bbox_xyxy'], size)})" for o in seen[:60]) or "none"
        )
        landcover = ", ".join(f"{k} {v:.0%}" for k, v in (tile.get("landcover") or [])) or "unknown"
        prompt = QA_PROMPT.format(
            objects=objects,
            landcover=landcover,
            n=self.cfg.qa_per_tile,
            applications=", ".join(a for a in APPLICATIONS if a != "image description"),
        )
        qa = self._parse_qa(self._chat([{"role": "user", "content": prompt}]))
        pairs = [
            {
                "kind": "caption_concise",
                "application": "image description",
                "question_type": "caption/concise",
                "question": prompts.CAPTION_CONCISE,
                "answer": concise,
            },
            {
                "kind": "caption_detailed",
                "application": "image description",
                "question_type": "caption/detailed",
                "question": prompts.CAPTION_DETAILED,
                "answer": detailed,
            },
        ]
        counts: Counter[str] = Counter()
        for item in qa:
            counts[item["application"]] += 1
            pairs.append(
                {
                    "kind": "vqa",
                    "application": item["application"],
                    "question_type": f"llm/{item['application'].replace(' ', '_')}",
                    "question": item["question"],
                    "answer": item["answer"],
                }
            )
        return pairs

    @staticmethod
    def _parse_qa(text: str) -> list[dict]:
        m = re.search(r"\[.*\]", text, re.DOTALL)  # models like to wrap JSON in prose or code fences
        if not m:
            raise BackendError(f"QA reply is not a JSON list: {text[:120]!r}")
        try:
            items = json.loads(m.group(0))
        except json.JSONDecodeError as exc:
            raise BackendError(f"QA reply is not valid JSON ({exc.msg}): {text[:120]!r}") from None
        good = [
            i
            for i in items
            if isinstance(i, dict)
            and i.get("application") in APPLICATIONS
            and str(i.get("question", "")).strip()
            and str(i.get("answer", "")).strip()
        ]
        if not good:
            raise BackendError("QA reply has no usable pair (application, question, answer)")
        return [
            {
                "application": i["application"],
                "question": str(i["question"]).strip(),
                "answer": str(i["answer"]).strip(),
            }
            for i in good
        ]

    def annotate_many(self, tiles: Sequence[AnnotateTileRow]) -> list[list[dict] | Exception]:
        """Tiles in parallel (``max_concurrency`` requests in flight); an exception per failed tile."""

        def one(tile):
            try:
                return self.annotate(tile)
            except Exception as exc:  # noqa: BLE001 - returned, not raised: the other tiles go on
                return exc

        with ThreadPoolExecutor(max_workers=max(1, self.cfg.max_concurrency)) as pool:
            return list(pool.map(one, tiles))
