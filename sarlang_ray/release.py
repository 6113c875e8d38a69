"""Import image-text releases into one pairs table: SARLANG-1M as published, our own export layout, and any
LLaMA-Factory / ms-swift / ShareGPT JSON instruction set (SARChat-Bench-2M's, for one).

:func:`import_release` walks a release folder (local or ``s3://``) and reads every text file it recognises:

* **SARLANG-1M as published** (HF ``YiminJimmy/SARLANG-1M``, README of ``Jimmyxichen/SARLANG-1M``): images in
  ``SARimages_preprocessed/SARimages/`` or ``SARimages/`` (PNG), ``SARimages_original/`` (TIF); text
  (``Text.zip``, unpacked) in ``Text/caption/Caption-training.csv`` (concise and complex captions mixed),
  ``Caption_test.csv`` (complex), ``Caption_test1.csv`` (concise), their JSON twins, and
  ``Text/VQA/{train,test}/SARVQA{1,2}_{train,test}.json``. SARVQA1's images come from SARDet-100K
  (``0009787.jpg``) and are distributed separately: pass their folder as ``sardet``. Files may sit one folder
  deeper or shallower: they are found by name, anywhere in the release.
* **our export layout** (``export/sarlang1m/``): ``captions/{concise,detailed}_<split>.csv`` (images under
  ``SAR_images/``) and ``vqa/vqa_<split>.json`` (with our ``application`` and ``question_type`` keys).
* **any other JSON or JSONL list of records**, split from the file name (``_train``/``_val``/``_test``).

Records: LLaMA-Factory / ms-swift form (``messages`` with ``role`` user/assistant and an ``<image>`` tag, plus
``images``), ShareGPT form (``conversations`` with ``from`` human/gpt and ``value``), or plain
``question``/``answer``/``image``; each user turn with its assistant turn is one pair. CSVs: the image and
text columns are found from the header (``image``, ``Image Name``, ``filename`` ...; ``caption``, ``text``
...; ``question``, ``answer``) or, in a headerless file, from the values (file names vs text); the choice is
reported. A JSON and a CSV twin of the same name: the JSON is read, the CSV reported as skipped.

Every row keeps its ``source`` (``SARVQA1``/``SARVQA2``, ``complex``/``concise``/``training``, ...),
``split``, ``file`` (``path#record``) and its image: ``image_uri`` checked to exist (or the bytes in
``image``, with ``embed_images``). A record whose image is missing, whose path leaves the release, or that is
malformed becomes a row of the errors table naming the file, the record and what to do; per file ``records =
imported + rejected``.

Applications: a record's own ``application`` key (ours) is kept; every other question gets one of the paper's
seven applications from rules over its text (:func:`classify_question`); what no rule matches is ``unknown``,
counted and shown with examples in the report.
"""

from __future__ import annotations

import csv
import io as _io
import json
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from sarlang_ray import io, prompts
from sarlang_ray.annotate.vocab import APPLICATIONS
from sarlang_ray.errors import ItemError, error_row, errors_table
from sarlang_ray.tables import ANNOTATION_SCHEMA

SPLITS = ("train", "val", "test")
UNKNOWN = "unknown"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
TEXT_EXTS = (".json", ".jsonl", ".csv")
# where releases keep their SAR images, searched in this order by file name
IMAGE_DIRS = (
    "SAR_images",
    "SARimages_preprocessed/SARimages",
    "SARimages_preprocessed",
    "SARimages",
    "SARimages_original",
    "images",
)
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
PAIRS_SCHEMA = (
    ANNOTATION_SCHEMA.append(pa.field("split", pa.string()))
    .append(pa.field("image_uri", pa.string()))
    .append(pa.field("source", pa.string()))
    .append(pa.field("file", pa.string()))
    .append(pa.field("image", IMAGE_TYPE))
    .append(pa.field("task", pa.string()))
)
# SARChat-Bench-2M's six tasks (its README's table), the ``task`` of its rows; None for every other release
SARCHAT_TASKS = ("classification", "description", "counting", "grounding", "identification", "referring")
# a record's task tag ("[refer] Locate 1 aircraft.") or its file's task name
# (SARChat_classify_refer_single_test.json)
_SARCHAT_NAMES = {
    "cls": "classification",
    "classify": "classification",
    "classification": "classification",
    "describe": "description",
    "description": "description",
    "caption": "description",
    "count": "counting",
    "counting": "counting",
    "grounding": "grounding",
    "identify": "identification",
    "identification": "identification",
    "refer": "referring",
    "referring": "referring",
}


# ---------------------------------------------------------------------------------------------------------
# safety: a release names images inside itself only


def release_image(root: str, image: object, where: str) -> str:
    """The uri of an image a release names, which must be a plain relative path inside the release.

    Raises:
        ItemError: ``unsafe_path`` for absolute paths, ``..`` parts, URLs, backslashes or control
            characters (a hostile or broken release must not point readers outside itself).
    """
    _check_relative(root, image, where)
    return io.join(root, str(image))


def _check_relative(root: str, image: object, where: str) -> None:
    path = str(image)
    parts = path.split("/")
    if (
        not isinstance(image, str)
        or not path
        or path.startswith(("/", "~"))
        or "://" in path
        or "\\" in path
        or re.match(r"^[A-Za-z]:", path)
        or any(p in ("", ".", "..") for p in parts)
        or any(ord(c) < 32 or ord(c) == 127 for c in path)
    ):
        ours = isinstance(image, str) and image.startswith("../sarlang1m/")  # export.LLAMA_IMAGES
        export_dir = root.rstrip("/").rpartition("/")[0] or ".."
        hint = (
            " This is sarlang-ray's own LLaMA-Factory export: import its sibling folder instead, "
            f"`sarlang import {export_dir}/sarlang1m OUT.parquet` (the same pairs, images inside it)."
            if ours
            else ""
        )
        raise ItemError(
            "unsafe_path",
            f"{where}: image path {image!r} is not a plain relative path inside the release "
            f"{root} (absolute, '..', a URL or control characters). Fix or remove the entry; images must "
            f"sit under the release folder.{hint}",
        )


# ---------------------------------------------------------------------------------------------------------
# the seven applications, from the question text

_BOX = re.compile(
    r"\[\s*-?\d+(?:\.\d+)?\s*(?:,\s*-?\d+(?:\.\d+)?\s*){3}\]|\(\s*-?\d+(?:\.\d+)?\s*(?:,\s*-?\d+(?:\.\d+)?\s*){3}\)"
    r"|(?:<\d+>\s*){4}|\{\s*<\d+>|<(?:box|bbox|ref|quad)>|\bx1\b.*\by1\b"
)
_POSITION_WORD = (
    r"(?:top|bottom|upper|lower|left|right|cent(?:er|re|ral)|middle|corner|north|south|east|west)"
)
_POSITION = re.compile(
    r"\bwhere\b|\blocat(?:e|ed|ion)\b|\bposition(?:ed|s)?\b|\bwhich "
    r"(?:part|region|area|side|half|quadrant|corner|portion|section)\b"
    rf"|\b{_POSITION_WORD}[- ]?(?:{_POSITION_WORD}[- "
    r"]?)?(?:part|area|side|half|quadrant|corner|portion|section|region|of the (?:image|scene|picture))\b"
    rf"|\bin the {_POSITION_WORD}\b|\bat the {_POSITION_WORD}\b|\bon the (?:left|right)\b"
)
_REASONING = re.compile(
    r"\bmore\b.*\bthan\b|\bfewer\b.*\bthan\b|\bless\b.*\bthan\b|\bas "
    r"many\b.*\bas\b|\bexceed|\b(?:larger|greater|smaller|bigger|"
    r"higher|lower)\b.*\bthan\b|\bcompared?\b|\bwhy\b|\bpurpose\b|\bused for\b|\bfunction "
    r"of\b|\blikely\b|\bwhat might\b"
    r"|\bcould\b.*\b(?:be|indicate)\b|\breason\b|\binfer\b|\bsame number\b|\bequal number\b|\bin "
    r"total\b|\btogether\b"
    r"|\bcombined\b|\baltogether\b|\beither\b|\bsum of\b|\btotal\b.*\band\b"
)
_COUNT = re.compile(
    r"\bhow many\b|\bcount\b|\bnumber of\b|\bquantity of\b|\bhow "
    r"much\b.*\b(?:are|is)\b.*\b(?:there|present)\b"
)
_LAND = (
    r"(?:water|vegetation|forest|farm ?land|crop ?land|grass ?land|wetland|bare (?:soil|land)|soil|rangeland|"
    r"agricultural land|built[- ]up (?:area|land))"
)
_OTHERS = (
    ("shape", re.compile(r"\bshape[sd]?\b|\boutline\b|\bgeometr|\bcontour\b|\bform of\b")),
    (
        "direction",
        re.compile(
            r"\borient(?:ation|ed)\b|\bdirection\b|\baligned\b|\balignment\b|\bheading\b|\bpointing\b|\bfacing\b|\bangle\b"
            r"|\bflow(?:s|ing)?\b|\bfrom (?:north|south|east|west)\b"
        ),
    ),
    (
        "pattern",
        re.compile(
            r"\barrange(?:d|ment)\b|\bpattern\b|\blayout\b|\bdistribut(?:ed|ion)\b|\bspacing\b"
            r"|\bdensity\b|\bclustered\b|\bscattered\b"
        ),
    ),
    (
        "landcover",
        re.compile(
            r"\bland[- ]?(?:cover|use)\b|\bterrain\b|\bsurface\b|\blandscape\b"
            r"|\bcovers?\b.*\b(?:most|largest|majority)\b"
            rf"|^(?:is|are) there (?:any )?(?:open )?{_LAND}\b|\bcontains? (?:any )?(?:open )?{_LAND}\b"
            rf"|\b(?:see|observe) (?:any )?(?:open )?{_LAND}\b|\b{_LAND} "
            r"(?:body|bodies|area|areas|region|visible|present)\b"
            rf"|\b(?:agricultural|urban|residential|industrial|rural) (?:area|land|region|zone)\b"
            rf"|\b(?:covered|dominated|occupied) (?:mostly |mainly |largely )?(?:by|with) (?:open )?{_LAND}"
        ),
    ),
    (
        "attribute",
        re.compile(
            r"\bsize\b|\blength\b|\bwidth\b|\bheight\b|\bhow "
            r"(?:big|large|long|wide|tall)\b|\bmaterial\b|\bcondition\b"
            r"|\bstate of\b|\bstatus\b"
        ),
    ),
)
_DESCRIBE = re.compile(
    r"^(?:please )?(?:describe|caption|summari[sz]e|give (?:a |an )?(?:brief |short |concise |detailed "
    r")?(?:caption|description|summary)"
    r"|provide (?:a |an )?(?:brief |short |concise |detailed )?(?:caption|description|summary)|write (?:a "
    r"|an )?(?:caption|description)"
    r"|generate (?:a |an )?(?:caption|description)|what (?:does|do) (?:this|the) (?:sar "
    r")?(?:image|picture|scene) (?:show|depict|contain)\b"
    r"|what is (?:shown|depicted|happening) in (?:this|the) (?:sar )?(?:image|picture|scene)|tell me about "
    r"(?:this|the) (?:image|scene))"
)
_CLASSIFY = re.compile(
    r"\bwhat (?:type|kind|sort|category|class|categories|classes|types|kinds) of\b|\bwhich "
    r"(?:category|class|type|kind|categories|classes|types)\b"
    r"|\b(?:predominant|dominant|main|primary|major|principal|most common|most frequent|most "
    r"prominent)\b.*\b(?:category|class|object|objects|target|targets|type|feature|thing)\b"
    r"|\bclassif|\bwhich of (?:these|the following|the classes|the categories)\b|\bamong\b|\bselect "
    r"the\b|\bchoose\b"
    r"|\bwhat (?:object|objects|target|targets|category|class) (?:is|are|can|does|do)\b|\bwhat is "
    r"(?:the|this) (?:object|target)\b"
    r"|\bwhat (?:is|are) (?:present|visible|shown|seen)\b|\bwhat can (?:be seen|you see)\b|\bidentify the "
    r"(?:category|class|type|object)"
    r"|\b(?:object|target) (?:class|category|type)\b|\bwhat "
    r"(?:objects?|targets?|categor(?:y|ies)|class(?:es)?|things?)\b"
)
_IDENTIFY = re.compile(
    r"^(?:is|are) there\b|^(?:is|are) (?:a|an|any|some|the)\b|^does (?:the|this) (?:sar "
    r")?(?:image|scene|picture|area|region|photo)\b"
    r"|^do (?:you|we) (?:see|observe|notice)\b|^can (?:you|we|one) "
    r"(?:see|find|spot|observe|detect|identify)\b|^can (?:a|an|any|the)\b.*\bbe\b"
    r"|^(?:is|are) (?:there )?any\b|\b(?:present|visible|exist|exists|appear|appears) "
    r"(?:in|on)\b|\bcontain(?:s)? (?:a|an|any)\b"
    r"|\bis there\b|\bare there\b|\bdetect(?:ed)?\b|\bpresence of\b"
)
_TAGS = {
    "identify": ("object identification", "identification"),
    "count": ("instance counting", "counting"),
    "cls": ("object classification", "classification"),
    "classify": ("object classification", "classification"),
    "describe": ("image description", "description"),
    "caption": ("image description", "description"),
    "refer": ("object positioning", "positioning"),
    "grounding": ("region referring", "region"),
    "detection": ("object positioning", "positioning"),
}
_CLASS_HINT = re.compile(
    r"^\s*the (?:classes|categories|options|positions) are\s*:?\s*([^.?]*)[.?]?\s*", re.IGNORECASE
)
_TAG = re.compile(r"^\s*\[([a-z_ ]+)\]\s*", re.IGNORECASE)
_NOUN_STOP = (
    r"(?=\s+(?:are|is|can|could|do|does|in|on|at|inside|within|of|that|which|visible|present|here|there|seen|shown|"
    r"located|appear|appears|exist|exists|found|this|the|near|around|along|from|to|you)\b|\s*[?.,:;]|$)"
)
_NOUN_AFTER = (
    (
        "counting",
        re.compile(
            r"\bhow many (?:distinct |different |individual |separate )?([a-z][a-z\- ]*?)" + _NOUN_STOP
        ),
    ),
    ("counting", re.compile(r"\b(?:number|count|quantity) of (?:the )?([a-z][a-z\- ]*?)" + _NOUN_STOP)),
    ("counting", re.compile(r"^count (?:the |all )?([a-z][a-z\- ]*?)" + _NOUN_STOP)),
    (
        "identification",
        re.compile(r"\b(?:is|are) there (?:a |an |any |some )?([a-z][a-z\- ]*?)" + _NOUN_STOP),
    ),
    (
        "identification",
        re.compile(
            r"\b(?:contain|show|include|have|see|observe|find|spot|detect)s? (?:a |an |any |some "
            r")?([a-z][a-z\- ]*?)" + _NOUN_STOP
        ),
    ),
    ("identification", re.compile(r"^(?:is|are|can) (?:a |an |any |the )([a-z][a-z\- ]*?)" + _NOUN_STOP)),
    ("positioning", re.compile(r"\bwhere (?:is|are) (?:the |a |an )?([a-z][a-z\- ]*?)" + _NOUN_STOP)),
    (
        "positioning",
        re.compile(r"\b(?:locate|position of|location of) (?:the |a |an )?([a-z][a-z\- ]*?)" + _NOUN_STOP),
    ),
    ("positioning", re.compile(r"\b(?:contains?|is) the ([a-z][a-z\- ]*?)" + _NOUN_STOP)),
    (
        None,
        re.compile(
            r"\b(?:shape|orientation|direction|size|length|outline|arrangement) of (?:the |a |an "
            r")?([a-z][a-z\- ]*?)" + _NOUN_STOP
        ),
    ),
)
_GENERIC_NOUNS = {
    "image",
    "scene",
    "picture",
    "object",
    "objects",
    "thing",
    "things",
    "target",
    "targets",
    "area",
    "region",
    "it",
    "them",
    "one",
    "any",
    "sar image",
    "photo",
    "instance",
    "instances",
    "item",
    "items",
}


def _singular(noun: str) -> str:
    words = noun.split()
    last = words[-1]
    if last.endswith("ies") and len(last) > 4:
        last = last[:-3] + "y"
    elif last.endswith(("ches", "shes", "sses", "xes")):
        last = last[:-2]
    elif last.endswith("s") and not last.endswith(("ss", "us", "is")) and len(last) > 3:
        last = last[:-1]
    return " ".join(words[:-1] + [last])


def _noun(text: str, family: str) -> str | None:
    for fam, pattern in _NOUN_AFTER:
        if fam not in (None, family):
            continue
        m = pattern.search(text)
        if m:
            noun = " ".join(w for w in m.group(1).split() if w not in ("a", "an", "the", "any", "some"))[
                :40
            ].strip(" -")
            if noun and noun not in _GENERIC_NOUNS and len(noun.split()) <= 2:
                return _singular(noun)
    return None


def classify_question(question: str) -> tuple[str, str]:
    """``(application, question_type)`` of a VQA question, by rules over its text.

    The application is one of the paper's seven (:data:`APPLICATIONS`) or ``unknown``; the question type is
    ``<family>`` or ``<family>/<object>`` (``counting/ship``, ``identification/storage tank``, ``region``,
    ``landcover``), the key of the majority-answer baseline. In order: a box in the question (``[x1, y1, x2,
    y2]``, ``<x><y><x><y>``) is **region referring**; "describe/caption this image" is **image description**;
    comparisons, totals and "why/what purpose" are **others** (reasoning); "how many / count / number of" is
    **instance counting**; "where / locate / in which part / in the top left" is **object positioning**;
    shape, orientation, arrangement, land cover and water, size are **others**; "what type / which category /
    predominant object / which of these" is **object classification**; "is there / are there / does the
    image contain / can you see" is **object identification**. A leading task tag (``[refer]``, ``[count]``,
    SARChat-Bench's form) decides when no rule does; a leading "The classes are: top, center, ..." (SARVQA1's
    prompt) marks positioning. Anything else is ``unknown``."""
    text = re.sub(r"<image>|<img>|</img>", " ", str(question or "")).strip()
    tag = None
    m = _TAG.match(text)
    if m:
        tag = m.group(1).strip().lower().replace(" ", "_")
        text = text[m.end() :]
    hint = ""
    m = _CLASS_HINT.match(text)
    if m:
        hint = m.group(1).lower()
        text = text[m.end() :]
    q = re.sub(r"\s+", " ", text.lower()).strip()
    positions_offered = bool(hint) and all(
        re.fullmatch(_POSITION_WORD + r"(?: " + _POSITION_WORD + ")?", w.strip())
        for w in hint.split(",")
        if w.strip()
    )

    def out(app: str, family: str) -> tuple[str, str]:
        noun = (
            _noun(q, family)
            if family
            in ("counting", "identification", "positioning", "shape", "direction", "pattern", "attribute")
            else None
        )
        return app, f"{family}/{noun}" if noun else family

    if not q:
        return (_TAGS[tag][0], _TAGS[tag][1]) if tag in _TAGS else (UNKNOWN, UNKNOWN)
    if _BOX.search(q):
        return out("region referring", "region")
    others = next((fam for fam, p in _OTHERS[:3] if p.search(q)), None)  # shape, direction, pattern
    if _DESCRIBE.search(q) and not others:
        return out("image description", "description")
    if _REASONING.search(q):
        return out("others", "reasoning")
    if _COUNT.search(q):
        return out("instance counting", "counting")
    if positions_offered or _POSITION.search(q):
        return out("object positioning", "positioning")
    if others:
        return out("others", others)
    for fam, pattern in _OTHERS[3:]:  # land cover, attributes
        if pattern.search(q):
            return out("others", fam)
    if _CLASSIFY.search(q):
        return out("object classification", "classification")
    if _IDENTIFY.search(q):
        return out("object identification", "identification")
    if tag in _TAGS:
        return out(*_TAGS[tag])
    return UNKNOWN, UNKNOWN


def sarchat_task(question: str, source: str, rec: dict | None = None) -> str | None:
    """The SARChat-Bench-2M task (one of :data:`SARCHAT_TASKS`) of one of its questions, from the data: the
    question's task tag (``[count] How many ...``), else its file's task name (``SARChat:classify_count`` from
    ``SARChat_classify_count_test.json``: the last known word before ``_single``/``_multi``), else the
    record's own ``task`` key; None when none of them names a task (the mixed ``total_task`` training file
    without tags)."""
    m = _TAG.match(re.sub(r"<image>|<img>|</img>", " ", str(question or "")).strip())
    if m and m.group(1).strip().lower() in _SARCHAT_NAMES:
        return _SARCHAT_NAMES[m.group(1).strip().lower()]
    words = [w for w in source.split(":", 1)[-1].lower().split("_") if w not in ("single", "multi")]
    for w in reversed(words):
        if w in _SARCHAT_NAMES:
            return _SARCHAT_NAMES[w]
    own = str((rec or {}).get("task") or "").strip().lower()
    return _SARCHAT_NAMES.get(own) or (own if own in SARCHAT_TASKS else None)


def _application(rec: dict) -> str | None:
    """A record's own application key, when it names one of the seven (ours, or a release that has one)."""
    value = rec.get("application") if isinstance(rec, dict) else None
    if isinstance(value, str) and value.strip().lower().replace("_", " ") in APPLICATIONS:
        return value.strip().lower().replace("_", " ")
    return None


# ---------------------------------------------------------------------------------------------------------
# records: LLaMA-Factory / ms-swift messages, ShareGPT conversations, plain question/answer

_USER = {"user", "human"}
_ASSISTANT = {"assistant", "gpt", "bot", "model", "chatgpt"}


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style parts
        return " ".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type", "text") == "text"
        )
    raise TypeError("content is not text")


def record_turns(rec) -> tuple[str, list[tuple[str, str]]]:
    """``(form, [(question, answer), ...])`` of one record: every user turn with the assistant turn after it.

    Raises:
        ValueError: not a record of a known form, or no user/assistant pair in it.
    """
    if not isinstance(rec, dict):  # ValueError as documented: every malformed record is reported alike
        raise ValueError("not a JSON object")  # noqa: TRY004
    if "messages" in rec or "conversations" in rec:
        form, turns, role_key, text_key = (
            ("llamafactory", rec["messages"], "role", "content")
            if "messages" in rec
            else ("sharegpt", rec["conversations"], "from", "value")
        )
        if not isinstance(turns, list):
            raise ValueError("messages/conversations is not a list")
        pairs, question = [], None
        for turn in turns:
            role = str(turn.get(role_key, "")).lower() if isinstance(turn, dict) else ""
            if role in _USER:
                question = _text(turn.get(text_key))
            elif role in _ASSISTANT and question is not None:
                pairs.append((question, _text(turn.get(text_key))))
                question = None
        if not pairs:
            raise ValueError("no user turn followed by an assistant turn")
        return form, pairs
    for q, a in (("question", "answer"), ("query", "response"), ("instruction", "output")):
        if isinstance(rec.get(q), str) and isinstance(rec.get(a), (str, int, float)):
            return "qa", [(rec[q], str(rec[a]))]
    raise ValueError("no messages, conversations or question/answer keys")


def record_image(rec: dict):
    """The record's (first) image path, or None."""
    for key in ("images", "image", "image_path", "img"):
        value = rec.get(key)
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, dict):
            value = value.get("path") or value.get("image")
        if isinstance(value, str) and value:
            return value
    return None


def _clean_question(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<image>", " ", text)).strip()


# ---------------------------------------------------------------------------------------------------------
# CSV columns, from the header or the values

_IMAGE_HEADERS = {
    "image",
    "images",
    "imagename",
    "imgname",
    "img",
    "imgid",
    "imageid",
    "filename",
    "file",
    "path",
    "imagepath",
    "imagefile",
    "picture",
    "name",
    "image_name",
    "imagenames",
}
_TEXT_HEADERS = {
    "caption",
    "captions",
    "text",
    "description",
    "sentence",
    "sentences",
    "label",
    "gt",
    "groundtruth",
    "caption1",
    "desc",
    "annotation",
}
_QUESTION_HEADERS = {"question", "questions", "query", "prompt", "q"}
_ANSWER_HEADERS = {"answer", "answers", "response", "a", "gt", "groundtruth", "groundtruthanswer", "label"}


def _norm(header: str) -> str:
    return re.sub(r"[^a-z0-9]", "", header.strip().lower())


def _is_image_name(value: str) -> bool:
    return value.strip().lower().endswith(IMAGE_EXTS)


def csv_columns(rows: list[list[str]], uri: str) -> tuple[dict[str, int], bool, str]:
    """``({"image": i, "text": j} or {"image": i, "question": j, "answer": k}, has_header, how)`` of a CSV.

    A header is a first row none of whose cells is an image file name and one of whose cells names a known
    column; without one, the image column is the one whose values are image file names, a question column
    the one whose values end in "?", and the caption or answer column the longest remaining one.

    Raises:
        ItemError: ``unknown_columns`` when no image or no text column can be found.
    """
    first = rows[0] if rows else []
    names = [_norm(c) for c in first]
    header = (
        bool(first)
        and not any(_is_image_name(c) for c in first)
        and any(n in _IMAGE_HEADERS | _TEXT_HEADERS | _QUESTION_HEADERS | _ANSWER_HEADERS for n in names)
    )
    body = rows[1:] if header else rows
    width = max((len(r) for r in body[:200]), default=len(first))
    cols: dict[str, int] = {}
    if header:
        for role, known in (
            ("image", _IMAGE_HEADERS),
            ("question", _QUESTION_HEADERS),
            ("answer", _ANSWER_HEADERS - {"label"}),
            ("text", _TEXT_HEADERS),
        ):
            hit = next((i for i, n in enumerate(names) if n in known and i not in cols.values()), None)
            if hit is not None:
                cols[role] = hit
        if "question" in cols and "answer" not in cols and "text" in cols:
            cols["answer"] = cols.pop("text")
        if "question" not in cols:
            cols.pop("answer", None)
    sample = body[:200]

    def share(i, test):
        values = [r[i] for r in sample if i < len(r) and r[i].strip()]
        return sum(map(test, values)) / len(values) if values else 0.0

    if "image" not in cols:
        best = max(range(width), key=lambda i: share(i, _is_image_name), default=None)
        if best is not None and share(best, _is_image_name) >= 0.5:
            cols["image"] = best
    free = [i for i in range(width) if i not in cols.values()]
    if "text" not in cols and "answer" not in cols and free:
        qs = [i for i in free if share(i, lambda v: v.strip().endswith("?")) >= 0.5]
        if qs and len(free) >= 2:
            cols["question"] = qs[0]
            free = [i for i in free if i != qs[0]]
            cols["answer"] = max(free, key=lambda i: sum(len(r[i]) for r in sample if i < len(r)))
        else:
            cols["text"] = max(free, key=lambda i: sum(len(r[i]) for r in sample if i < len(r)))
    if "image" not in cols or not ({"text"} <= cols.keys() or {"question", "answer"} <= cols.keys()):
        raise ItemError(
            "unknown_columns",
            f"{uri}: cannot tell the image and text columns apart (header: "
            f"{first[:6] if header else 'none'}). Give the file a header such as image,caption or "
            "image,question,answer.",
        )
    label = lambda i: f"{first[i].strip()!r} (column {i})" if header else f"column {i}"
    how = ", ".join(f"{role} = {label(i)}" for role, i in cols.items()) + ("" if header else " (no header)")
    return cols, header, how


# ---------------------------------------------------------------------------------------------------------
# what a file in a release is


@dataclass
class FileSpec:
    rel: str  # path inside the release
    role: str  # vqa or caption
    source: str  # SARVQA1, complex, concise, training, vqa, ...
    split: str
    kind: str | None = None  # caption_concise / caption_detailed; None: from the prompt or the length
    image_prefix: str = ""  # CSV image names are relative to this folder of the release (ours: SAR_images/)


_SPLIT_TOKEN = re.compile(
    r"(?:^|[_\-. ])(train|training|trainval|val|valid|validation|dev|test\d*)(?=$|[_\-. ])", re.IGNORECASE
)


def _split_of(stem: str, default: str) -> str:
    m = _SPLIT_TOKEN.search(stem)
    if not m:
        return default
    token = m.group(1).lower()
    return "train" if token.startswith("train") else "test" if token.startswith("test") else "val"


def describe_file(rel: str, default_split: str = "test") -> FileSpec | None:
    """What a text file of a release holds (None: not a pairs file, e.g. ``dataset_info.json``)."""
    parts = rel.split("/")
    name = parts[-1]
    stem = name.rsplit(".", 1)[0]
    parent = parts[-2].lower() if len(parts) > 1 else ""
    low = stem.lower()
    if (
        not name.lower().endswith(TEXT_EXTS)
        or name.startswith(".")
        or "__MACOSX" in parts
        or low in ("dataset_info", "leakage", "summary", "manifest")
        or low.endswith(("report", "errors"))
    ):
        return None
    if m := re.fullmatch(r"(SARVQA\d+)_(train|test|val)\w*", stem, re.IGNORECASE):
        return FileSpec(rel, "vqa", m.group(1).upper(), _split_of(m.group(2), default_split))
    if re.fullmatch(r"caption[-_ ]?train(?:ing)?", low):
        return FileSpec(rel, "caption", "training", "train")
    if re.fullmatch(r"caption[-_ ]?test1", low):
        return FileSpec(rel, "caption", "concise", "test", "caption_concise")
    if re.fullmatch(r"caption[-_ ]?test", low):
        return FileSpec(rel, "caption", "complex", "test", "caption_detailed")
    if parent == "captions" and (m := re.fullmatch(r"(concise|detailed)_(train|val|test)", low)):
        return FileSpec(rel, "caption", m.group(1), m.group(2), f"caption_{m.group(1)}", "SAR_images/")
    if parent == "vqa" and (m := re.fullmatch(r"vqa_(train|val|test)", low)):
        return FileSpec(rel, "vqa", "vqa", m.group(1))
    split = _split_of(stem, default_split)
    source = _SPLIT_TOKEN.sub("", stem).strip("_- .") or stem
    role = "caption" if re.search(r"caption|describe|description", low) else "vqa"
    if m := re.fullmatch(r"sarchat_(.+?)_(train|test|val)(?:_.*)?", low):
        source = f"SARChat:{m.group(1)}"
    return FileSpec(rel, role, source, split)


def _caption_kind(prompt: str | None, caption: str) -> str:
    """concise or detailed, for a caption from a mixed file: from the prompt that asked for it, else its
    length."""
    p = (prompt or "").lower()
    if re.search(r"one sentence|brief|concise|short|single sentence", p):
        return "caption_concise"
    if re.search(r"detail|complex|comprehensive|thorough", p):
        return "caption_detailed"
    sentences = [s for s in re.split(r"[.!?]+\s", caption.strip()) if s.strip()]
    return "caption_concise" if len(caption.split()) <= 30 and len(sentences) <= 1 else "caption_detailed"


# ---------------------------------------------------------------------------------------------------------
# images: found by path inside the release, else by name in the image folders


class ImageIndex:
    """Where a release's images are. A record's path is looked up as given inside the release first; then its
    file name (else its stem, with any image extension) among every image of the release, the preprocessed
    PNG folders before the others and ``SARimages_original`` (TIFs) last; ``before`` folders (``--images``)
    are searched ahead of the release, ``after`` folders (``--sardet``) behind it, both recursively."""

    def __init__(self, root: str, files: list[str], before: Sequence[str] = (), after: Sequence[str] = ()):
        self.root, self.files = root, set(files)
        self.before, self.after = [d for d in before if d], [d for d in after if d]
        self.release_images = sorted((f for f in files if f.lower().endswith(IMAGE_EXTS)), key=self._rank)
        folders = sorted(
            {f.rsplit("/", 1)[0] if "/" in f else "." for f in self.release_images},
            key=lambda d: self._rank(d + "/x"),
        )
        self.folders = [*self.before, *(io.join(root, d) if d != "." else root for d in folders), *self.after]
        self._by_name: dict[str, str] = {}
        self._by_stem: dict[str, str] = {}
        self._loaded = False

    @staticmethod
    def _rank(rel: str) -> tuple[int, str]:
        folder = rel.rsplit("/", 1)[0] if "/" in rel else ""
        name = folder.rsplit("/", 1)[-1]
        if folder in IMAGE_DIRS[:3] or name == "SAR_images":
            return 0, rel
        if name == "SARimages_original":
            return 3, rel
        return (1 if name in IMAGE_DIRS else 2), rel

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True

        def listed(folder: str) -> list[str]:
            return [u for u in list_files(folder, absolute=True) if u.lower().endswith(IMAGE_EXTS)]

        ordered = [u for d in self.before for u in listed(d)]
        ordered += [io.join(self.root, f) for f in self.release_images]
        ordered += [u for d in self.after for u in listed(d)]
        for uri in ordered:
            base = uri.rsplit("/", 1)[-1]
            self._by_name.setdefault(base, uri)
            self._by_stem.setdefault(base.rsplit(".", 1)[0], uri)

    def where(self) -> str:
        shown = ", ".join(self.folders[:6]) + (
            f" and {len(self.folders) - 6} more folders" if len(self.folders) > 6 else ""
        )
        return shown or f"{self.root} (no image in it)"

    def find(self, path: str, prefix: str = "") -> str | None:
        """The uri of an image a record names, or None."""
        for candidate in dict.fromkeys((prefix + path, path)):
            if candidate in self.files:
                return io.join(self.root, candidate)
        self._load()
        base = path.rsplit("/", 1)[-1]
        return self._by_name.get(base) or self._by_stem.get(base.rsplit(".", 1)[0])


def list_files(root: str, absolute: bool = False) -> list[str]:
    """Every file under ``root`` (local or remote), relative to it (or absolute uris), sorted."""
    fs, path = io.filesystem(root)
    if not fs.isdir(path):
        return []
    found = fs.find(path)
    base = path.rstrip("/") + "/"
    rel = sorted(f.removeprefix(base) for f in found)
    return [io.join(root, r) for r in rel] if absolute else rel


# ---------------------------------------------------------------------------------------------------------
# the import


@dataclass
class ImportResult:
    """What :func:`import_release` read: the pairs, the errors, and per-file counts that reconcile."""

    root: str
    table: pa.Table
    errors: pa.Table
    files: list[dict] = field(default_factory=list)

    @property
    def totals(self) -> dict:
        keys = ("records", "imported", "rejected", "pairs")
        return {k: sum(f.get(k, 0) for f in self.files) for k in keys}

    def applications(self) -> dict:
        vqa = [
            a
            for a, k in zip(self.table["application"].to_pylist(), self.table["kind"].to_pylist())
            if k == "vqa"
        ]
        counts = Counter(vqa)
        unknown = [
            q
            for q, a, k in zip(
                self.table["question"].to_pylist(),
                self.table["application"].to_pylist(),
                self.table["kind"].to_pylist(),
            )
            if k == "vqa" and a == UNKNOWN
        ]
        return {
            "vqa_pairs": len(vqa),
            "per_application": {a: counts.get(a, 0) for a in (*APPLICATIONS, UNKNOWN) if counts.get(a)},
            "unknown": len(unknown),
            "unknown_rate": len(unknown) / len(vqa) if vqa else 0.0,
            "unknown_examples": list(dict.fromkeys(unknown))[:10],
        }

    def report(self) -> dict:
        errors = Counter(self.errors["error_class"].to_pylist())
        return {
            "root": self.root,
            "totals": self.totals,
            "files": self.files,
            "applications": self.applications(),
            "errors_by_class": dict(errors.most_common()),
            "splits": dict(Counter(self.table["split"].to_pylist())),
            "sources": dict(Counter(self.table["source"].to_pylist())),
        }


def import_release(
    root: str,
    *,
    splits: tuple[str, ...] | None = None,
    sardet: str | None = None,
    images: str | None = None,
    check_images: bool = True,
    embed_images: bool = False,
    strict: bool = False,
    default_split: str = "test",
    files: list[str] | None = None,
) -> ImportResult:
    """Read a release folder (or one JSON/JSONL/CSV file) into a pairs table, an errors table and a report.

    Args:
        root: the unpacked release folder, local or ``s3://``; or one file (then only that file is read).
        splits: only files of these splits (None: all).
        sardet: folder holding SARDet-100K's images (SARVQA1's), searched recursively by file name.
        images: another image folder, searched first (e.g. ``SARimages_original`` for the TIFs).
        check_images: a record whose image cannot be found is an error row (False: its expected uri is kept).
        embed_images: put each image's bytes in the ``image`` column (small sets; large ones keep uris).
        strict: raise on the first unsafe path or malformed record instead of writing an error row.
        default_split: the split of a file whose name has none.
        files: read only these release-relative files.

    Raises:
        ItemError: ``not_a_release`` (no folder, a zip, no pairs file in it); with ``strict``, ``unsafe_path``
            and ``malformed_release``.
    """
    single = None
    fs, path = io.filesystem(root)
    if fs.isfile(path) and root.lower().endswith(TEXT_EXTS):
        root, single = root.rsplit("/", 1) if "/" in root else (".", root)
    listing = list_files(root) if fs.isdir(io.filesystem(root)[1]) else []
    if not listing:
        raise ItemError(
            "not_a_release",
            f"{root} is not a release folder: it is missing, empty, or a file (a zip?). "
            "Unpack the release archive first and pass the folder that holds it (SARLANG-1M: the folder with "
            "SARimages*/ and Text/, after `unzip Text.zip`).",
        )
    wanted = [single] if single else files
    specs, skipped = [], []
    for rel in wanted if wanted is not None else listing:
        spec = describe_file(rel, default_split)
        if spec is not None and (splits is None or spec.split in splits):
            specs.append(spec)
    by_stem: dict[tuple[str, str], list[FileSpec]] = defaultdict(list)
    for s in specs:
        by_stem[
            (
                s.rel.rsplit("/", 1)[0] if "/" in s.rel else "",
                s.rel.rsplit("/", 1)[-1].rsplit(".", 1)[0].lower(),
            )
        ].append(s)
    chosen = []
    for group in by_stem.values():
        group.sort(key=lambda s: [".json", ".jsonl", ".csv"].index("." + s.rel.rsplit(".", 1)[-1].lower()))
        chosen.append(group[0])
        skipped += [
            {
                "file": s.rel,
                "skipped": f"twin of {group[0].rel} (the JSON is read)",
                "records": 0,
                "imported": 0,
                "rejected": 0,
                "pairs": 0,
            }
            for s in group[1:]
        ]
    chosen.sort(key=lambda s: s.rel)
    if not chosen:
        zips = [f for f in listing if f.lower().endswith(".zip")]
        hint = (
            f" It holds {', '.join(zips[:3])}: unpack {'them' if len(zips) > 1 else 'it'} in place."
            if zips
            else ""
        )
        raise ItemError(
            "not_a_release",
            f"{root} is not a release folder: it has no caption or VQA file (captions/, vqa/, "
            f"Text/caption/*.csv, Text/VQA/**/SARVQA*.json, or a JSON list of records).{hint} Unpack the "
            "release "
            "archive first and pass the folder that holds it.",
        )
    index = ImageIndex(root, listing, before=[images] if images else [], after=[sardet] if sardet else [])
    reader = _Reader(root, index, check_images, embed_images, strict)
    for spec in chosen:
        reader.read(spec)
    table = pa.Table.from_pylist(reader.rows, schema=PAIRS_SCHEMA)
    return ImportResult(root, table, errors_table(reader.errors), reader.files + skipped)


class _Reader:
    def __init__(self, root: str, index: ImageIndex, check_images: bool, embed: bool, strict: bool):
        self.root, self.index, self.check, self.embed, self.strict = root, index, check_images, embed, strict
        self.rows: list[dict] = []
        self.errors: list[dict] = []
        self.files: list[dict] = []
        self.ids: Counter = Counter()

    def reject(self, item: str, exc: ItemError, stats: dict) -> None:
        """An errors-table row for a rejected record (strict: unsafe paths and malformed records raise)."""
        if self.strict and exc.error_class in ("unsafe_path", "malformed_release"):
            raise exc
        self.errors.append(error_row("import", item, exc.error_class, str(exc)))
        stats["rejected"] += 1

    def image(self, spec: FileSpec, path, where: str) -> str:
        """The uri of a record's image. Raises ItemError (unsafe_path, missing_image)."""
        if not isinstance(path, str) or not path:
            raise ItemError(
                "malformed_release", f"{where}: the record names no image (images, image). Fix or remove it."
            )
        _check_relative(self.root, spec.image_prefix + path, where)
        found = self.index.find(path, spec.image_prefix)
        if found is None:
            if not self.check:
                return io.join(self.root, spec.image_prefix + path)
            hint = (
                " SARDet-100K images (such as 0009787.jpg, SARVQA1's) are distributed separately: download "
                "SARDet-100K and pass its image folder with --sardet DIR."
                if spec.source == "SARVQA1" or re.fullmatch(r"\d+\.jpe?g", path.rsplit("/", 1)[-1])
                else ""
            )
            raise ItemError(
                "missing_image",
                f"{where}: image {path!r} is not in the release (searched {spec.image_prefix + path!r} "
                f"and by name in {self.index.where()}).{hint} Add the image, or pass the folder that holds "
                "it "
                "with --images DIR.",
            )
        return found

    def add(
        self,
        spec: FileSpec,
        kind: str,
        question: str,
        answer: str,
        image_uri: str,
        rec: dict | None,
        item: str,
        application: str | None = None,
        question_type: str | None = None,
        task: str | None = None,
    ) -> None:
        if kind == "vqa":
            if application is None:
                application, question_type = classify_question(question)
            question_type = question_type or classify_question(question)[1]
        else:
            application, question_type = "image description", f"caption/{kind.split('_', 1)[1]}"
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.rel.rsplit(".", 1)[0].rsplit("/", 1)[-1])
        self.ids[base] += 1
        row: dict[str, Any] = {
            "pair_id": f"{base}-{self.ids[base]:07d}",
            "tile_id": image_uri.rsplit("/", 1)[-1].rsplit(".", 1)[0],
            "scene_id": None,
            "gsd_m": None,
            "kind": kind,
            "application": application,
            "question_type": question_type,
            "question": question,
            "answer": answer,
            "backend": "import",
            "qc_passed": True,
            "qc_reasons": [],
            "split": spec.split,
            "image_uri": image_uri,
            "source": spec.source,
            "file": item,
            "image": None,
            "task": task,
        }
        if self.embed:
            row["image"] = {"bytes": io.read_bytes(image_uri), "path": image_uri.rsplit("/", 1)[-1]}
        self.rows.append(row)

    def read(self, spec: FileSpec) -> None:
        uri = io.join(self.root, spec.rel)
        stats: dict[str, Any] = {
            "file": spec.rel,
            "role": spec.role,
            "source": spec.source,
            "split": spec.split,
            "records": 0,
            "imported": 0,
            "rejected": 0,
            "pairs": 0,
        }
        self.files.append(stats)
        try:
            data = io.read_bytes(uri).decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            stats["records"] += 1
            self.reject(
                spec.rel,
                ItemError(
                    "unreadable_file",
                    f"{uri}: cannot be read as UTF-8 text ({exc}). Re-extract it from the release archive.",
                ),
                stats,
            )
            return
        if spec.rel.lower().endswith(".csv"):
            self._csv(spec, uri, data, stats)
        else:
            self._json(spec, uri, data, stats)

    def _json(self, spec: FileSpec, uri: str, data: str, stats: dict) -> None:
        if spec.rel.lower().endswith(".jsonl"):
            records = []
            for n, line in enumerate(data.splitlines()):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        records.append(ValueError(f"line {n + 1} is not JSON ({exc.msg})"))
            stats["form"] = "jsonl"
        else:
            try:
                records = json.loads(data)
            except json.JSONDecodeError as exc:
                stats["records"] += 1
                self.reject(
                    spec.rel,
                    ItemError(
                        "unreadable_file",
                        f"{uri}: not valid JSON ({exc.msg} at line {exc.lineno}). "
                        "Re-extract the file from the release archive.",
                    ),
                    stats,
                )
                return
            if not isinstance(records, list):
                stats["records"] += 1
                self.reject(
                    spec.rel,
                    ItemError(
                        "unreadable_file",
                        f"{uri}: a JSON {type(records).__name__}, not a list of records "
                        "(LLaMA-Factory, ShareGPT and ms-swift datasets are JSON lists). Convert it to "
                        "a list.",
                    ),
                    stats,
                )
                return
        forms: Counter[str] = Counter()
        for i, rec in enumerate(records):
            stats["records"] += 1
            where, item = f"{uri} record {i}", f"{spec.rel}#{i}"
            try:
                if isinstance(rec, Exception):  # a JSONL line that did not parse: malformed like any other
                    raise ValueError(str(rec))  # noqa: TRY004
                form, turns = record_turns(rec)
            except (ValueError, TypeError, AttributeError) as exc:
                self.reject(
                    item,
                    ItemError(
                        "malformed_release",
                        f"{where}: needs messages (a user and an assistant turn) and "
                        "images (LLaMA-Factory form), or conversations with from/value (ShareGPT form), or "
                        f"question/answer and image ({exc}). Fix or remove the record.",
                    ),
                    stats,
                )
                continue
            forms[form] += 1
            try:
                image_uri = self.image(spec, record_image(rec), where)
            except ItemError as exc:
                self.reject(item, exc, stats)
                continue
            tasks: list[str | None] = [None] * len(turns)
            if spec.source.startswith("SARChat:"):
                tasks = [sarchat_task(q, spec.source, rec) for q, _ in turns]
                if None in tasks:
                    self.reject(
                        item,
                        ItemError(
                            "unknown_task",
                            f"{where}: a SARChat-Bench record whose task cannot be told: "
                            "no task tag ([cls], [count], [identify], [refer], [grounding], [describe]) "
                            f"leads its question {turns[tasks.index(None)][0][:80]!r}, its file name "
                            f"({spec.rel}) names none and it has no 'task' key. Tag the question or "
                            "move the record to its task's file.",
                        ),
                        stats,
                    )
                    continue
            stats["imported"] += 1
            for t, (question, answer) in enumerate(turns):
                question, answer = _clean_question(question), str(answer).strip()
                if spec.role == "caption" or tasks[t] == "description":
                    kind = spec.kind or _caption_kind(question, answer)
                else:
                    kind = "vqa"
                self.add(
                    spec,
                    kind,
                    question if kind == "vqa" else (question or prompts.CAPTIONS[kind.split("_")[1]]),
                    answer,
                    image_uri,
                    rec,
                    item if len(turns) == 1 else f"{item}.{t}",
                    _application(rec),
                    rec.get("question_type") if _application(rec) else None,
                    task=tasks[t],
                )
                stats["pairs"] += 1
        stats["form"] = stats.get("form") or ("+".join(sorted(forms)) or "none")

    def _csv(self, spec: FileSpec, uri: str, data: str, stats: dict) -> None:
        rows = [r for r in csv.reader(_io.StringIO(data)) if any(c.strip() for c in r)]
        stats["form"] = "csv"
        try:
            cols, header, how = csv_columns(rows, uri)
        except ItemError as exc:
            for n, _ in enumerate(rows, start=1):
                stats["records"] += 1
                self.reject(f"{spec.rel}:{n}", ItemError(exc.error_class, f"{exc} (line {n})"), stats)
            return
        stats["columns"], stats["header"] = how, header
        for n, row in enumerate(rows[1:] if header else rows, start=2 if header else 1):
            stats["records"] += 1
            where, item = f"{uri} line {n}", f"{spec.rel}:{n}"
            cell = lambda role, row=row: (
                row[cols[role]].strip() if role in cols and cols[role] < len(row) else ""
            )
            text = cell("text") if "text" in cols else cell("answer")
            if not cell("image") or not text or ("question" in cols and not cell("question")):
                what = "caption" if "text" in cols else "question and answer"
                self.reject(
                    item,
                    ItemError(
                        "malformed_release",
                        f"{where}: needs an image and a {what} ({how}). Fix or remove the line.",
                    ),
                    stats,
                )
                continue
            try:
                image_uri = self.image(spec, cell("image"), where)
            except ItemError as exc:
                self.reject(item, exc, stats)
                continue
            question = cell("question") if "question" in cols else None
            if spec.role == "vqa" and question:
                kind = "vqa"
            else:  # a caption file, or a CSV of image,caption
                kind = spec.kind or _caption_kind(question, text)
                question = question or prompts.CAPTIONS[kind.split("_")[1]]
            self.add(spec, kind, question, text, image_uri, None, item)
            stats["imported"] += 1
            stats["pairs"] += 1


def import_sarlang1m(root: str, splits: tuple[str, ...] = SPLITS) -> pa.Table:
    """A SARLANG-style release folder (ours or the published SARLANG-1M) as a pairs table, raising on the
    first unsafe image path or malformed record (what :func:`import_release` with ``strict=True`` does).
    Images are not required to exist here: ``image_uri`` is where the release says they are.

    Raises:
        ItemError: ``not_a_release``, ``unsafe_path`` (see :func:`release_image`), ``malformed_release``.
    """
    return import_release(root, splits=splits, check_images=False, strict=True).table


def format_report(result: ImportResult) -> str:
    """The import summary a person reads: per file the records that became pairs and the rejected ones, the
    CSV columns chosen, pairs per application with the unknown rate and examples, errors by class."""
    r = result.report()
    t = r["totals"]
    lines = [
        (
            f"import {result.root}: records {t['records']} = imported {t['imported']} + rejected "
            f"{t['rejected']} "
            f"-> {t['pairs']} pairs"
        )
    ]
    for f in r["files"]:
        if f.get("skipped"):
            lines.append(f"  {f['file']}: skipped, {f['skipped']}")
            continue
        cols = f"; columns: {f['columns']}" if f.get("columns") else ""
        lines.append(
            f"  {f['file']} ({f.get('form')}, {f['source']}, {f['split']}): records {f['records']} = "
            "imported "
            f"{f['imported']} + rejected {f['rejected']}{cols}"
        )
    a = r["applications"]
    if a["vqa_pairs"]:
        lines.append(
            "VQA pairs per application: " + ", ".join(f"{k}: {v}" for k, v in a["per_application"].items())
        )
        lines.append(
            f"unknown application: {a['unknown']} of {a['vqa_pairs']} ({100 * a['unknown_rate']:.2f} %)"
            + ("; e.g. " + " | ".join(repr(q) for q in a["unknown_examples"][:5]) if a["unknown"] else "")
        )
    lines.append(
        "rejected by reason: " + (", ".join(f"{k}: {v}" for k, v in r["errors_by_class"].items()) or "none")
    )
    return "\n".join(lines)


def write_import(result: ImportResult, out: str) -> dict:
    """``out`` (the pairs, Parquet), ``<out stem>.errors.parquet`` and ``<out stem>.report.json``; the
    report."""
    stem = out.removesuffix(".parquet")
    io.write_parquet_atomic(out, result.table)
    io.write_parquet_atomic(f"{stem}.errors.parquet", result.errors)
    report = result.report()
    io.write_json_atomic(f"{stem}.report.json", report)
    return report
