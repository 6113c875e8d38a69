"""Automatic quality control: the four error types SARLANG-1M's experts corrected, plus duplicates.

Rules (each ``repair``, ``reject`` or ``off`` in config; captions and free-text answers are checked):

* ``colour``: colour words a SAR image cannot show (red, blue, ...). Repair drops the word.
* ``count``: a number before a class noun ("three ships") that disagrees with the tile's objects.
  Repair writes the true count; a class with no objects is left to the hallucination rule.
* ``hallucination``: a class mentioned (any synonym: harbour/harbor/port, ship/boat/vessel, ...) that the
  tile's labels do not contain. Repair drops the sentence.
* ``vague``: too few words or empty phrases ("some objects", "I cannot tell").
* ``duplicate``: the same question (or caption) twice for one tile, after normalisation, or nearly the
  same (token-set Jaccard >= 0.85): later copies are rejected.
* ``contradiction``: pairs of one tile that disagree (identification vs counts vs captions vs land cover vs
  positions), absence asserted where land cover implies the class, and classes too small to see at the
  tile's GSD (:mod:`sarlang_ray.annotate.consistency`, run over the pairs that passed the rules above).
  Repair drops the blamed sentences of captions and rejects blamed VQA pairs (a yes/no cannot be edited
  into the truth); reject rejects every pair holding a blamed statement.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from sarlang_ray.annotate import consistency
from sarlang_ray.annotate.visibility import Visibility
from sarlang_ray.annotate.vocab import NUMBER_WORDS, count_phrase, mentioned_classes
from sarlang_ray.config import QCSection
from sarlang_ray.rows import ObjectRow, TileScale

RULES = ("colour", "count", "hallucination", "vague", "duplicate", "contradiction")
COLOUR_WORDS = (
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "violet",
    "pink",
    "brown",
    "cyan",
    "magenta",
    "turquoise",
    "beige",
    "colorful",
    "colourful",
    "multicolored",
    "multicoloured",
)
_COLOUR = re.compile(r"\s*\b(" + "|".join(COLOUR_WORDS) + r")\b(?:-colou?red)?", re.IGNORECASE)
_NUMBER = r"(\d+|" + "|".join(NUMBER_WORDS) + r"|a single|a|an|one)"
VAGUE_PHRASES = (
    "some objects",
    "various objects",
    "something",
    "some things",
    "i cannot",
    "i can't",
    "it is unclear",
    "hard to tell",
    "not sure",
    "an image",
    "a picture",
    "unknown objects",
)
FREE_TEXT_KINDS = ("caption_concise", "caption_detailed")


def _number_value(word: str) -> int | None:
    w = word.lower()
    if w.isdigit():
        return int(w)
    if w in ("a", "an", "one", "a single"):
        return 1
    return NUMBER_WORDS.index(w) if w in NUMBER_WORDS else None


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def check_text(text: str, kind: str, counts: Counter, cfg: QCSection) -> tuple[str | None, list[str]]:
    """Apply the text rules. Returns (text after repairs, or None if rejected; rule hits)."""
    hits: list[str] = []
    rejected = False

    if cfg.colour != "off" and _COLOUR.search(text):
        hits.append("colour")
        if cfg.colour == "reject":
            rejected = True
        text = re.sub(r"\s{2,}", " ", _COLOUR.sub("", text)).strip()

    if cfg.hallucination != "off":
        absent = [c for c in mentioned_classes(text) if counts.get(c, 0) == 0]
        if absent:
            hits.append("hallucination")
            if cfg.hallucination == "reject":
                rejected = True
            else:
                keep = [s for s in _sentences(text) if not any(c in mentioned_classes(s) for c in absent)]
                text = " ".join(keep)

    if cfg.count != "off":
        for cls, spans in mentioned_classes(text).items():
            true = counts.get(cls, 0)
            for start, end in reversed(spans):
                m = re.search(_NUMBER + r"((?:\s+[a-z-]+){0,2})\s+$", text[:start], re.IGNORECASE)
                if not m or true == 0:
                    continue
                value = _number_value(m.group(1))
                if value is None or value == true:
                    continue
                # "a large group of ships": not a count
                if m.group(1).lower() in ("a", "an") and m.group(2).strip():
                    continue
                hits.append("count")
                if cfg.count == "reject":
                    rejected = True
                    break
                number, noun = count_phrase(cls, true).split(" ", 1)
                if m.group(1).isdigit():
                    number = str(true)
                elif m.group(1)[0].isupper():
                    number = number.capitalize()
                text = text[: m.start(1)] + number + m.group(2) + " " + noun + text[end:]
                break
    if cfg.vague != "off":
        words = re.findall(r"[A-Za-z0-9]+", text)
        min_words = {
            "caption_concise": cfg.min_words_concise,
            "caption_detailed": cfg.min_words_detailed,
        }.get(kind, 1)
        if len(words) < min_words or any(p in text.lower() for p in VAGUE_PHRASES):
            hits.append("vague")
            rejected = True
    hits = sorted(set(hits), key=RULES.index)
    return (None if rejected else text), hits


NEAR_DUPLICATE = 0.85  # token-set Jaccard similarity above which two texts of one tile are duplicates


def _jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / max(1, len(a | b))


def normalise_question(q: str) -> str:
    return re.sub(r"[^a-z0-9\[\], ]", "", q.lower()).strip()


def apply_qc(
    pairs: list[dict],
    objects: Sequence[ObjectRow],
    cfg: QCSection,
    tile: TileScale | None = None,
    visibility: Visibility | None = None,
) -> list[dict]:
    """QC one tile's pairs: fills ``qc_passed`` and ``qc_reasons``; repaired text replaces the original.
    The ``contradiction`` rule runs when ``tile`` (its ``gsd_m``, optionally ``width``) is given."""
    return qc_tile(pairs, objects, cfg, tile, visibility)[0]


def qc_tile(
    pairs: list[dict],
    objects: Sequence[ObjectRow],
    cfg: QCSection,
    tile: TileScale | None = None,
    visibility: Visibility | None = None,
) -> tuple[list[dict], list[consistency.Finding]]:
    """:func:`apply_qc`, and the contradiction findings among the pairs that passed the other rules (their
    statements' ``pair`` indices point into the returned list)."""
    counts = Counter(o["class"] for o in objects)
    seen: set[tuple[str, frozenset]] = set()
    out = []
    for p in pairs:
        p = dict(p)
        reasons: list[str] = []
        passed = True
        if p["kind"] in FREE_TEXT_KINDS:
            text, reasons = check_text(p["answer"], p["kind"], counts, cfg)
            if text is None:
                passed = False
            else:
                p["answer"] = text
        text = normalise_question(p["question"] if p["kind"] == "vqa" else p["answer"])
        tokens = frozenset(re.findall(r"[a-z0-9]+", text))
        if cfg.duplicate != "off" and any(
            kind == p["kind"] and _jaccard(tokens, t) >= NEAR_DUPLICATE for kind, t in seen
        ):
            reasons = reasons + ["duplicate"]
            passed = False
        seen.add((p["kind"], tokens))
        p["qc_passed"], p["qc_reasons"] = passed, reasons
        out.append(p)
    if tile is None or cfg.contradiction == "off":
        return out, []
    return out, _contradictions(out, tile, cfg, visibility)


def _contradictions(out: list[dict], tile: TileScale, cfg: QCSection, visibility: Visibility | None) -> list:
    """The contradiction rule over the passed pairs of ``out`` (edited in place)."""
    live = [i for i, p in enumerate(out) if p["qc_passed"]]
    findings = consistency.contradictions(tile, [out[i] for i in live], visibility)
    blamed: dict[int, set] = {}
    for f in findings:
        for s in f.blamed:
            blamed.setdefault(live[s.pair], set()).add(s.sentence)
    for i, sentence_ids in blamed.items():
        p = out[i]
        p["qc_reasons"] = p["qc_reasons"] + ["contradiction"]
        if p["kind"] in FREE_TEXT_KINDS and cfg.contradiction == "repair" and None not in sentence_ids:
            keep = [s for k, s in enumerate(consistency.sentences(p["answer"])) if k not in sentence_ids]
            words = len(re.findall(r"[A-Za-z0-9]+", " ".join(keep)))
            min_words = {
                "caption_concise": cfg.min_words_concise,
                "caption_detailed": cfg.min_words_detailed,
            }[p["kind"]]
            if keep and (cfg.vague == "off" or words >= min_words):
                p["answer"] = " ".join(keep)
                continue
            if keep:
                p["qc_reasons"].append("vague")
        p["qc_passed"] = False
    # the findings, re-indexed onto ``out``
    return [
        consistency.Finding(
            f.rule,
            f.message,
            [consistency.Statement(live[s.pair], s.sentence, s.fact, s.value, s.text) for s in f.blamed],
            [consistency.Statement(live[s.pair], s.sentence, s.fact, s.value, s.text) for s in f.involved],
        )
        for f in findings
    ]
