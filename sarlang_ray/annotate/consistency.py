"""Consistency check: do the pairs of one tile agree with each other and ask only what the pixels can show?

Each pair is read into **statements**, from its text alone, so the check runs on any annotations: template,
model-written (hf, openai / vLLM), or imported from a release. A caption gives one set of statements per
sentence ("It contains three ships." -> ships = 3); a VQA pair gives statements from its question and answer
("Are any buildings visible?" "no" -> buildings = 0). Then six rules look for **findings**:

* ``presence``: a class said present by one statement and absent by another (identification yes/no,
  counts, captions, region, classification and positioning answers).
* ``count``: two different counts of one class, or a total or comparison ("more ships than cars?") that
  disagrees with the counts the other pairs state.
* ``position``: a class said to be at a place of the 3x3 grid by one statement and not there by another.
* ``landcover``: land-cover statements that disagree: dominant class, stated fractions, water yes/no.
* ``implied_absence``: absence asserted of a class that the stated land cover implies ("mostly built-up
  (78%)" and "no" to "Are any buildings visible?"): land cover is what the image shows, the absence claim
  only says nobody labelled the buildings.
* ``unresolvable``: a class named at a GSD where it cannot be resolved (a car at 10 m), or a region box
  smaller than its class' minimum size (:mod:`sarlang_ray.annotate.visibility`).

Each finding **blames** the statements to drop. For ``presence``, ``count`` and ``position`` the values stated
for one fact vote: the statements that disagree with the best-supported value are blamed, all of them on a
tie (the pairs cannot tell which is right). ``implied_absence`` and ``unresolvable`` blame the offending
statement only; ``landcover`` blames the statements in the most conflicts (both sides of a one-to-one
conflict). QC then drops blamed caption sentences (``repair``) or rejects the pairs (``reject``), see
:func:`sarlang_ray.annotate.qc.qc_tile`.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sarlang_ray import io, tables
from sarlang_ray.annotate.visibility import Visibility
from sarlang_ray.annotate.vocab import NUMBER_WORDS, POSITIONS, mentioned_classes
from sarlang_ray.config import AnnotateSection
from sarlang_ray.rows import TileScale

RULES = ("presence", "count", "position", "landcover", "implied_absence", "unresolvable")
CAPTION_KINDS = ("caption_concise", "caption_detailed")
EXAMPLES_PER_RULE = 3

# land-cover words in free text -> land-cover class (align.landcover_classes names)
LANDCOVER_SYNONYMS = {
    "open water": "water",
    "water": "water",
    "sea": "water",
    "river": "water",
    "lake": "water",
    "built-up": "built-up",
    "built up": "built-up",
    "urban": "built-up",
    "vegetation": "vegetation",
    "vegetated land": "vegetation",
    "vegetated": "vegetation",
    "forest": "vegetation",
    "bare soil": "bare soil",
    "bare land": "bare soil",
    "bare ground": "bare soil",
    "paved surfaces": "road",
    "paved surface": "road",
    "paved": "road",
    "road": "road",
}
_LC = "|".join(sorted(map(re.escape, LANDCOVER_SYNONYMS), key=len, reverse=True))
_LC_FRACTION = re.compile(rf"\b({_LC})\s*\(\s*(\d+(?:\.\d+)?)\s*%\s*\)", re.IGNORECASE)
_LC_DOMINANT = re.compile(
    rf"\b(?:mostly|most of (?:it|the image|the tile|the scene) is)\s+(?:an?\s+)?(?:dense\s+)?({_LC})\b",
    re.IGNORECASE,
)
_LC_WORD = re.compile(rf"\b({_LC})\b", re.IGNORECASE)
_LC_QUESTION = re.compile(r"land ?cover|surface|terrain|covers the (largest|most)|dominat", re.IGNORECASE)

_POSITION_SYNONYMS = (
    (r"\bupper\b", "top"),
    (r"\blower\b", "bottom"),
    (r"\b(?:centre|middle)\b", "center"),
    (r"-", " "),
)
_POSITION = re.compile(r"\b(" + "|".join(sorted(map(re.escape, POSITIONS), key=len, reverse=True)) + r")\b")
_NUMBER = r"(\d+|" + "|".join(NUMBER_WORDS) + r"|a single|an|a)"
_COUNT_BEFORE = re.compile(_NUMBER + r"((?:\s+[a-z-]+){0,2})\s+$", re.IGNORECASE)
_NOT_ADJECTIVES = {
    "and",
    "or",
    "of",
    "the",
    "than",
    "with",
    "in",
    "on",
    "at",
    "to",
    "from",
    "by",
    "for",
    "as",
    "more",
    "fewer",
    "less",
    "are",
    "is",
    "be",
    "there",
    "these",
    "those",
    "many",
    "several",
    "some",
    "m",
}
_NEGATOR = re.compile(r"\b(no|not|without|none|zero|neither|nor|absent|never)\b|n't\b", re.IGNORECASE)
_NEGATED_AFTER = re.compile(
    r"\b(?:not|n't)\b.*\b(?:visible|present|seen|there|found)\b|\babsent\b", re.IGNORECASE
)
_ABSENT_ALL = re.compile(
    r"\b(?:no|without|zero)\s+(?:labell?ed\s+|visible\s+|other\s+|distinct\s+)?(?:objects?|targets?)\b"
    r"|\bno labell?ed object\b|\bnothing\b",
    re.IGNORECASE,
)
_CLAUSE = re.compile(r"[,;:]|\bbut\b|\bwhile\b|\bwhereas\b", re.IGNORECASE)
_BOX = re.compile(
    r"\[\s*(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*\]"
)
_COUNT_QUESTION = re.compile(r"\bhow many\b|^\s*count\b|\bnumber of\b|\bcount of\b", re.IGNORECASE)
_COMPARE = (
    ("eq", re.compile(r"\bas many\b|\bsame number\b|\bequal\b", re.IGNORECASE)),
    ("lt", re.compile(r"\bfewer\b|\bless\b|\bsmaller\b", re.IGNORECASE)),
    ("gt", re.compile(r"\bmore\b|\bexceed|\bnumerous\b|\blarger\b|\bgreater\b", re.IGNORECASE)),
)
_WH = re.compile(
    r"^\s*(what|which|where|describe|how would|along|locate|identify|name|in which|give)\b", re.IGNORECASE
)
_WHERE = re.compile(
    r"\bwhere\b|\bwhich (part|region|area)\b|\blocate\b|\bposition\b|\bin which\b", re.IGNORECASE
)


@dataclass(frozen=True)
class Statement:
    """One claim a pair makes. ``fact`` names what it is about, ``value`` what it says:

    ``("count", cls)``: ``("eq", n)`` or ``("ge", 1)``; ``("at", cls, cell)``: True/False; ``("total", a,
    b)``: n; ``("compare", a, b, op)``: True/False; ``("lc_fraction", lc)``: fraction; ``("lc_dominant",)``:
    lc; ``("water",)``: True/False; ``("absent_all",)``: True; ``("mention", cls)``: True; ``("box", cls)``:
    box size in 0-1000 units (its diagonal)."""

    pair: int  # index of the pair in the tile's list
    sentence: int | None  # caption sentence index; None: the whole (VQA) pair
    fact: tuple
    value: Any  # its type depends on ``fact`` (the list above): a tuple, bool, number or class name
    text: str


@dataclass
class Finding:
    rule: str
    message: str
    blamed: list[Statement]
    involved: list[Statement] = field(default_factory=list)

    def example(self, tile_id: str, pairs: list[dict]) -> dict:
        """JSON-ready: the statements involved, as written, and which are blamed."""
        seen, out = set(), []
        for s in self.involved or self.blamed:
            key = (s.pair, s.sentence)
            if key in seen:
                continue
            seen.add(key)
            p = pairs[s.pair]
            said = s.text if p["kind"] in CAPTION_KINDS else f"{p['question']} -> {p['answer']}"
            out.append(
                {
                    "pair_id": p.get("pair_id", s.pair),
                    "kind": p["kind"],
                    "text": said[:240],
                    "blamed": any((b.pair, b.sentence) == key for b in self.blamed),
                }
            )
        return {"rule": self.rule, "tile_id": tile_id, "message": self.message, "statements": out}


# ---------------------------------------------------------------- reading statements
def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _number(word: str) -> int | None:
    w = word.lower().strip()
    if w.isdigit():
        return int(w)
    return NUMBER_WORDS.index(w) if w in NUMBER_WORDS else None


def _positions(text: str) -> list[str]:
    t = text.lower()
    for pattern, word in _POSITION_SYNONYMS:
        t = re.sub(pattern, word, t)
    return [m.group(1) for m in _POSITION.finditer(t)]


def _yes_no(answer: str) -> bool | None:
    a = answer.strip().lower()
    if re.match(r"^yes\b", a):
        return True
    if re.match(r"^no\b", a):
        return False
    return None


def _answer_number(answer: str) -> int | None:
    a = answer.strip().lower()
    if re.match(r"^(no|none)\b", a):
        return 0
    if len(a.split()) > 8:
        return None
    m = re.search(r"\b(\d+|" + "|".join(NUMBER_WORDS) + r")\b", a)
    return _number(m.group(1)) if m else None


def _ordered_classes(text: str) -> list[str]:
    """Classes mentioned in ``text``, in order of first mention."""
    return [c for c, _ in sorted(mentioned_classes(text).items(), key=lambda kv: kv[1][0][0])]


def _caption_statements(i: int, text: str) -> list[Statement]:
    out = []
    for k, sent in enumerate(sentences(text)):

        def add(fact, value, k=k, sent=sent):
            out.append(Statement(i, k, fact, value, sent))

        for m in _LC_FRACTION.finditer(sent):
            add(("lc_fraction", LANDCOVER_SYNONYMS[m.group(1).lower()]), float(m.group(2)) / 100)
        dominant = _LC_DOMINANT.search(sent)
        if dominant:
            add(("lc_dominant",), LANDCOVER_SYNONYMS[dominant.group(1).lower()])
        if _ABSENT_ALL.search(sent):
            add(("absent_all",), True)
        mentions = mentioned_classes(sent)
        for cls, spans in mentions.items():
            add(("mention", cls), True)
            for start, end in spans:
                value = _caption_count(sent, start, end)
                if value is not None:
                    add(("count", cls), value)
        if len(mentions) == 1:
            ((cls, spans),) = mentions.items()
            after = sent[spans[0][1] :]
            if _caption_count(sent, *spans[0]) != ("eq", 0):
                for cell in dict.fromkeys(_positions(after)):
                    add(("at", cls, cell), True)
    return out


def _caption_count(sent: str, start: int, end: int) -> tuple | None:
    """What one class mention in a caption sentence says of its count: ("eq", n), ("ge", 1) or None
    (unsure)."""
    bounds = [0] + [m.end() for m in _CLAUSE.finditer(sent) if m.end() <= start]
    clause_start = bounds[-1]
    nxt = [m.start() for m in _CLAUSE.finditer(sent) if m.start() >= end]
    before, after = sent[clause_start:start], sent[end : nxt[0] if nxt else len(sent)]
    if _NEGATOR.search(before):
        return ("eq", 0)
    if _NEGATOR.search(after):
        return ("eq", 0) if _NEGATED_AFTER.search(after) else None
    m = _COUNT_BEFORE.search(before)
    if m and not (set(m.group(2).lower().split()) & _NOT_ADJECTIVES):
        word = m.group(1).lower()
        if word in ("a", "an"):
            return ("ge", 1) if not m.group(2).strip() else None  # "a large group of ships": not a count
        n = 1 if word == "a single" else _number(word)
        if n is not None:
            return ("eq", n)
    return ("ge", 1)


def _vqa_statements(i: int, question: str, answer: str) -> list[Statement]:
    out = []
    text = f"{question} -> {answer}"
    add = lambda fact, value: out.append(Statement(i, None, fact, value, text))
    classes = _ordered_classes(question)
    yn = _yes_no(answer)
    if _LC_QUESTION.search(question) and not classes:  # dominant land cover: the answer is a land-cover word
        m = _LC_WORD.search(answer)
        if m:
            add(("lc_dominant",), LANDCOVER_SYNONYMS[m.group(1).lower()])
        return out
    if re.search(r"\bwater\b", question, re.IGNORECASE) and not classes and yn is not None:
        add(("water",), yn)
        return out
    answer_classes = _ordered_classes(answer)
    for cls in dict.fromkeys(classes + answer_classes):
        add(("mention", cls), True)
    box = _BOX.search(question)
    if box:  # region referring: the box holds an object of the answer's class
        x0, y0, x1, y1 = (float(v) for v in box.groups())
        for cls in answer_classes[:1]:
            add(("count", cls), ("ge", 1))
            add(("box", cls), math.hypot(x1 - x0, y1 - y0))
        return out
    cells = _positions(question)
    if yn is not None:
        if len(classes) >= 2:
            for op, pattern in _COMPARE:
                if pattern.search(question):
                    add(("compare", classes[0], classes[1], op), yn)
                    break
        elif len(classes) == 1 and cells:
            add(("at", classes[0], cells[0]), yn)
            if yn:
                add(("count", classes[0]), ("ge", 1))
        elif len(classes) == 1:
            add(("count", classes[0]), ("ge", 1) if yn else ("eq", 0))
        return out
    if _COUNT_QUESTION.search(question) and not cells:
        n = _answer_number(answer)
        if n is not None and len(classes) == 2:
            add(("total", *sorted(classes)), n)
        elif n is not None and len(classes) == 1:
            add(("count", classes[0]), ("eq", n))
        return out
    if not _WH.search(question) or re.match(
        r"^\s*(no|none|nothing|there (is|are) no)\b", answer, re.IGNORECASE
    ):
        return out
    if len(classes) >= 2 and len(answer_classes) == 1:  # classification: the option chosen is present
        add(("count", answer_classes[0]), ("ge", 1))
    elif len(classes) == 1:  # "where is the ship?", "what is the shape of the ship?": presupposes a ship
        add(("count", classes[0]), ("ge", 1))
        if _WHERE.search(question):
            for cell in dict.fromkeys(_positions(answer)):
                add(("at", classes[0], cell), True)
    return out


def statements(pairs: list[dict]) -> list[Statement]:
    """Every statement of one tile's pairs (keys ``kind``, ``question``, ``answer``)."""
    out = []
    for i, p in enumerate(pairs):
        if p["kind"] in CAPTION_KINDS:
            out += _caption_statements(i, p["answer"])
        else:
            out += _vqa_statements(i, p["question"], p["answer"])
    return out


# ---------------------------------------------------------------- rules
def _compatible(value: tuple, hyp) -> bool:
    if value[0] == "eq":
        return hyp == value[1]
    return hyp == "ge1" or (isinstance(hyp, int) and hyp >= 1)


def _vote(group: list[Statement], compatible, hypotheses) -> tuple[list, list[Statement]]:
    """Best-supported hypotheses (several on a tie) and the statements that disagree with any of them."""
    support = {h: sum(compatible(s.value, h) for s in group) for h in hypotheses}
    best = max(support.values())
    winners = [h for h, n in support.items() if n == best]
    return winners, [s for s in group if not all(compatible(s.value, h) for h in winners)]


def _counts(stmts: list[Statement], findings: list[Finding]) -> dict[str, int]:
    """Presence and count findings per class; returns the classes whose count the pairs agree on."""
    by_class: dict[str, list[Statement]] = defaultdict(list)
    for s in stmts:
        if s.fact[0] == "count":
            by_class[s.fact[1]].append(s)
    known = {}
    for cls, group in by_class.items():
        exact = {s.value[1] for s in group if s.value[0] == "eq"}
        hypotheses = exact | (
            {"ge1"} if not any(n >= 1 for n in exact) and any(s.value[0] == "ge" for s in group) else set()
        )
        winners, blamed = _vote(group, _compatible, hypotheses)
        if len(winners) == 1 and isinstance(winners[0], int):
            known[cls] = winners[0]
        if blamed:
            said = sorted({s.value[1] if s.value[0] == "eq" else ">=1" for s in group}, key=str)
            zero = any(s.value == ("eq", 0) for s in group)
            rule = "presence" if zero and any(s.value != ("eq", 0) for s in group) else "count"
            findings.append(Finding(rule, f"{cls}: the pairs say {', '.join(map(str, said))}", blamed, group))
    return known


def _arithmetic(stmts: list[Statement], known: dict[str, int], findings: list[Finding]) -> None:
    """Totals and comparisons against the counts the other pairs agree on (they are the odd one out)."""
    ops = {"eq": lambda a, b: a == b, "lt": lambda a, b: a < b, "gt": lambda a, b: a > b}
    for s in stmts:
        if s.fact[0] == "total" and s.fact[1] in known and s.fact[2] in known:
            a, b = s.fact[1:]
            if known[a] + known[b] != s.value:
                findings.append(
                    Finding(
                        "count",
                        f"total of {a} and {b} is {s.value}, counts say {known[a]} + {known[b]}",
                        [s],
                        [s],
                    )
                )
        elif s.fact[0] == "compare" and s.fact[1] in known and s.fact[2] in known:
            _, a, b, op = s.fact
            if ops[op](known[a], known[b]) != s.value:
                findings.append(
                    Finding(
                        "count",
                        f"{a} {op} {b} answered {'yes' if s.value else 'no'}, counts say "
                        f"{known[a]} vs {known[b]}",
                        [s],
                        [s],
                    )
                )


def _places(stmts: list[Statement], known: dict[str, int], findings: list[Finding]) -> None:
    """Yes and no for one class at one cell; and, for a class the pairs agree has one instance, two
    statements that put it in different cells ("the harbour is in the top" vs "Where is the harbour?"
    "bottom")."""
    by_cell: dict[tuple, list[Statement]] = defaultdict(list)
    for s in stmts:
        if s.fact[0] == "at":
            by_cell[s.fact[1:]].append(s)
    for (cls, cell), group in by_cell.items():
        _, blamed = _vote(group, lambda v, h: v == h, {s.value for s in group})
        if blamed:
            findings.append(Finding("position", f"{cls} in the {cell}: said yes and no", blamed, group))
    for cls in sorted(c for c, n in known.items() if n == 1):
        claims: dict[tuple, set] = defaultdict(set)  # (pair, sentence) -> cells it puts the one instance in
        for s in stmts:
            if s.fact[0] == "at" and s.fact[1] == cls and s.value:
                claims[(s.pair, s.sentence)].add(s.fact[2])
        if len(claims) < 2:
            continue
        group = [s for s in stmts if s.fact[0] == "at" and s.fact[1] == cls and s.value]
        cells = set().union(*claims.values())
        _, blamed_claims = _vote(
            [Statement(k[0], k[1], ("at", cls), v, "") for k, v in claims.items()], lambda v, h: h in v, cells
        )
        blamed_keys = {(b.pair, b.sentence) for b in blamed_claims}
        if blamed_keys:
            blamed = [s for s in group if (s.pair, s.sentence) in blamed_keys]
            findings.append(
                Finding("position", f"the one {cls} placed in {', '.join(sorted(cells))}", blamed, group)
            )


def _landcover(stmts: list[Statement], findings: list[Finding]) -> None:
    fractions = [s for s in stmts if s.fact[0] == "lc_fraction"]
    dominant = [s for s in stmts if s.fact[0] == "lc_dominant"]
    water = [s for s in stmts if s.fact[0] == "water"]
    conflicts: list[tuple[Statement, Statement, str]] = []
    for a in dominant:
        conflicts += [
            (a, b, f"dominant land cover {a.value} vs {b.value}")
            for b in dominant
            if b.value != a.value and (a.pair, a.sentence) < (b.pair, b.sentence)
        ]
        own = [f.value for f in fractions if f.fact[1] == a.value]
        for f in fractions:
            if f.fact[1] != a.value and f.value > (max(own) + 0.015 if own else 0.5):
                conflicts.append((a, f, f"dominant land cover {a.value} vs {f.fact[1]} at {f.value:.0%}"))
    for a in fractions:
        conflicts += [
            (a, b, f"{a.fact[1]} at {a.value:.0%} vs {b.value:.0%}")
            for b in fractions
            if b.fact == a.fact
            and abs(a.value - b.value) > 0.02
            and (a.pair, a.sentence) < (b.pair, b.sentence)
        ]
    for w in water:
        if w.value:  # water in the image, but the stated land cover leaves no room for it
            per_sentence: dict[tuple, float] = defaultdict(float)
            for f in fractions:
                if f.fact[1] != "water":
                    per_sentence[(f.pair, f.sentence)] += f.value
            conflicts += [
                (
                    w,
                    next(f for f in fractions if (f.pair, f.sentence) == key),
                    "water yes, land cover 100 % other",
                )
                for key, total in per_sentence.items()
                if total >= 0.995
            ]
        else:
            conflicts += [
                (w, f, f"no water, but water at {f.value:.0%}")
                for f in fractions
                if f.fact[1] == "water" and f.value >= 0.1
            ]
            conflicts += [(w, d, "no water, but water dominates") for d in dominant if d.value == "water"]
    # one conflict per two statements (a caption sentence or a VQA pair is one voice, whatever it states)
    key = lambda st: (st.pair, st.sentence)
    unique: dict[frozenset, tuple] = {}
    for a, b, why in conflicts:
        if key(a) != key(b):
            unique.setdefault(frozenset((key(a), key(b))), (a, b, why))
    conflicts = list(unique.values())
    # blame the statements in the most conflicts, repeatedly (one wrong answer against two captions that
    # agree: the answer); statements tied in what is left are all blamed
    left, blamed = list(conflicts), set()
    while left:
        degree = Counter(k for a, b, _ in left for k in (key(a), key(b)))
        top = max(degree.values())
        worst = {k for k, n in degree.items() if n == top}
        if top == 1:
            worst = set(degree)
        blamed |= worst
        left = [c for c in left if key(c[0]) not in worst and key(c[1]) not in worst]
    for a, b, why in conflicts:
        findings.append(Finding("landcover", why, [x for x in (a, b) if key(x) in blamed], [a, b]))


def _implied(stmts: list[Statement], vis: Visibility, findings: list[Finding]) -> None:
    """Absence claims of a class that the stated land cover implies (built-up -> buildings)."""
    evidence: dict[str, Statement] = {}
    for s in stmts:
        if s.fact[0] == "lc_fraction" and s.value >= vis.implied_min_fraction:
            evidence.setdefault(s.fact[1], s)
        elif s.fact[0] == "lc_dominant":
            evidence.setdefault(s.value, s)
    for cls, lc in sorted(vis.implied_by.items()):
        if lc not in evidence:
            continue
        said: dict[tuple[int, int | None], Statement] = {}  # one finding per caption sentence or VQA pair
        for s in stmts:
            if (s.fact == ("count", cls) and s.value == ("eq", 0)) or s.fact == ("absent_all",):
                said.setdefault((s.pair, s.sentence), s)
        for s in said.values():
            findings.append(
                Finding(
                    "implied_absence",
                    f"no {cls} asserted where the land cover is {lc}",
                    [s],
                    [evidence[lc], s],
                )
            )


def _unresolvable(
    stmts: list[Statement], vis: Visibility, gsd_m: float | None, width: int | None, findings: list[Finding]
) -> None:
    if gsd_m is None:
        return
    done = set()
    for s in stmts:
        cls = s.fact[1] if s.fact[0] in ("mention", "box") else None
        if cls is None or cls not in vis.min_size_px:
            continue
        if (
            s.fact[0] == "mention"
            and not vis.resolvable(cls, gsd_m)
            and (s.pair, s.sentence, cls) not in done
        ):
            done.add((s.pair, s.sentence, cls))
            findings.append(
                Finding(
                    "unresolvable",
                    f"{cls} named at {gsd_m:g} m: a {vis.class_size_m[cls]:g} m {cls} "
                    f"spans {vis.class_size_m[cls] / gsd_m:.1f} px < {vis.min_size_px[cls]:g}",
                    [s],
                    [s],
                )
            )
        elif s.fact[0] == "box" and width and (s.pair, s.sentence, cls) not in done:
            # the box's diagonal bounds the object's extent; 0-1000 coordinates are rounded to whole units
            diag_px = (s.value + 1.5) * width / 1000
            if diag_px < vis.min_size_px[cls]:
                done.add((s.pair, s.sentence, cls))
                findings.append(
                    Finding(
                        "unresolvable",
                        f"region box of a {cls} spans <= {diag_px:.1f} px < {vis.min_size_px[cls]:g}",
                        [s],
                        [s],
                    )
                )


def contradictions(tile: TileScale, pairs: list[dict], visibility: Visibility | None = None) -> list[Finding]:
    """Findings for one tile's pairs (dicts with ``kind``, ``question``, ``answer``).

    ``tile`` needs ``gsd_m`` (None: the ``unresolvable`` rule is skipped) and may give ``width`` (pixels;
    region boxes are then checked against the minimum sizes). Nothing else of the tile is read: the check
    judges what the pairs say, not what the labels hold, so it is independent of the annotator."""
    vis = visibility or Visibility()
    stmts = statements(pairs)
    # a generic "no labelled objects are visible" says 0 of every class the other pairs talk about
    absent_all = [s for s in stmts if s.fact[0] == "absent_all"]
    for cls in sorted({s.fact[1] for s in stmts if s.fact[0] == "count"}):
        stmts += [Statement(s.pair, s.sentence, ("count", cls), ("eq", 0), s.text) for s in absent_all]
    findings: list[Finding] = []
    known = _counts(stmts, findings)
    _arithmetic(stmts, known, findings)
    _places(stmts, known, findings)
    _landcover(stmts, findings)
    _implied(stmts, vis, findings)
    _unresolvable(stmts, vis, tile.get("gsd_m"), tile.get("width"), findings)
    return findings


# ---------------------------------------------------------------- over a whole table or export
def check_pairs(
    pairs: list[dict], tiles: Mapping[str, TileScale] | None = None, visibility: Visibility | None = None
) -> dict:
    """Run :func:`contradictions` over pairs of many tiles (grouped by ``tile_id``) and report.

    ``pairs`` may carry ``gsd_m`` and ``backend``; ``tiles`` (tile id -> dict with ``gsd_m`` / ``width``)
    fills what they lack. Returns counts of findings and of pairs hit per rule and per backend, the tiles
    whose GSD is unknown (``unresolvable`` not judged there) and up to three examples per rule."""
    vis = visibility or Visibility()
    tiles = tiles or {}
    by_tile: dict[str, list[dict]] = defaultdict(list)
    for p in pairs:
        by_tile[p["tile_id"]].append(p)
    findings: Counter[str] = Counter()
    hit_pairs: Counter[str] = Counter()
    by_backend: dict[str, Counter] = defaultdict(Counter)
    examples: dict[str, list] = defaultdict(list)
    tiles_hit, unjudged = set(), 0
    for tid in sorted(by_tile):
        group = by_tile[tid]
        info = tiles.get(tid, {})
        gsd = group[0].get("gsd_m") if group[0].get("gsd_m") is not None else info.get("gsd_m")
        unjudged += gsd is None
        found = contradictions({"gsd_m": gsd, "width": info.get("width")}, group, vis)
        for f in found:
            findings[f.rule] += 1
            by_backend[group[f.blamed[0].pair].get("backend") or "unknown"][f.rule] += 1
            if len(examples[f.rule]) < EXAMPLES_PER_RULE:
                examples[f.rule].append(f.example(tid, group))
        for rule in RULES:
            hit_pairs[rule] += len({s.pair for f in found if f.rule == rule for s in f.blamed})
        if found:
            tiles_hit.add(tid)
    return {
        "tiles": len(by_tile),
        "pairs": len(pairs),
        "tiles_with_findings": len(tiles_hit),
        "findings": {r: findings[r] for r in RULES},
        "pairs_hit": {r: hit_pairs[r] for r in RULES},
        "by_backend": {b: {r: c[r] for r in RULES} for b, c in sorted(by_backend.items())},
        "tiles_without_gsd": unjudged,
        "examples": {r: examples[r] for r in RULES if examples[r]},
    }


def merge_reports(reports: list[dict]) -> dict:
    """:func:`check_pairs` reports of disjoint sets of tiles (export shards), summed into one as if checked
    together: counts added, examples kept in the reports' order up to ``EXAMPLES_PER_RULE`` per rule."""
    out: dict[str, Any] = {
        "tiles": 0,
        "pairs": 0,
        "tiles_with_findings": 0,
        "tiles_without_gsd": 0,
        "findings": dict.fromkeys(RULES, 0),
        "pairs_hit": dict.fromkeys(RULES, 0),
        "by_backend": {},
        "examples": {},
    }
    for r in reports:
        for key in ("tiles", "pairs", "tiles_with_findings", "tiles_without_gsd"):
            out[key] += r[key]
        for key in ("findings", "pairs_hit"):
            for rule in RULES:
                out[key][rule] += r[key].get(rule, 0)
        for backend, counts in r["by_backend"].items():
            mine = out["by_backend"].setdefault(backend, dict.fromkeys(RULES, 0))
            for rule in RULES:
                mine[rule] += counts.get(rule, 0)
        for rule, examples in r["examples"].items():
            kept = out["examples"].setdefault(rule, [])
            kept.extend(examples[: EXAMPLES_PER_RULE - len(kept)])
    out["by_backend"] = dict(sorted(out["by_backend"].items()))
    out["examples"] = {r: out["examples"][r] for r in RULES if out["examples"].get(r)}
    return out


def check_export(run_dir: str, visibility: Visibility | None = None, export_dir: str | None = None) -> dict:
    """:func:`check_pairs` over an export (``export/parquet/<split>/*.parquet``), with each tile's width from
    the tiles table and each pair's backend from the annotations table where the run folder has them.

    Raises:
        FileNotFoundError: the export has no Parquet files (nothing was checked; a report of zeros would lie).
    """
    export_dir = export_dir or io.join(run_dir, "export")
    files = (
        io.glob(io.join(export_dir, "parquet"), "*/*.parquet")
        if io.exists(io.join(export_dir, "parquet"))
        else []
    )
    if not files:
        raise FileNotFoundError(
            f"no exported pairs under {io.join(export_dir, 'parquet')}: run the export stage first"
        )
    cols = ["pair_id", "tile_id", "gsd_m", "kind", "question", "answer"]
    pairs = io.read_parquet(files, columns=cols).to_pylist()
    tiles = {}
    if tables.tiles_table_shards(run_dir):
        tiles = {
            t["tile_id"]: t for t in tables.read_tiles(run_dir, ["tile_id", "gsd_m", "width"]).to_pylist()
        }
    if tables.annotation_shards(run_dir):
        ann = tables.read_annotations(run_dir, ["pair_id", "backend"])
        backend = dict(zip(ann["pair_id"].to_pylist(), ann["backend"].to_pylist()))
        for p in pairs:
            p["backend"] = backend.get(p["pair_id"])
    return check_pairs(pairs, tiles, visibility)


def card_section(run_dir: str, cfg: AnnotateSection, exported: dict) -> str:
    """The dataset card's "Contradictions" section (markdown): findings per rule and backend found by the
    annotate stage's QC (``annotate/qc_report.json``) and by this checker run again over the exported pairs,
    independently of the annotator (``exported``: the export shards' reports, :func:`merge_reports`; 0 unless
    ``annotate.qc.contradiction`` is off), and the GSD up to which each class is asked about."""
    vis = Visibility.from_config(cfg)
    report_uri = io.join(run_dir, "annotate", "qc_report.json")
    annotated = io.read_json(report_uri).get("contradictions") if io.exists(report_uri) else None
    at_annotation = annotated["by_backend"] if annotated else {}
    backends = sorted(set(exported["by_backend"]) | set(at_annotation)) or [cfg.backend]
    rows = []
    for rule in RULES:
        for backend in backends:
            at_qc = at_annotation[backend].get(rule, 0) if backend in at_annotation else "n/a"
            rows.append(
                f"| {rule} | {backend} | {at_qc} | {exported['by_backend'].get(backend, {}).get(rule, 0)} |"
            )
    limits = ", ".join(f"{c} <= {vis.max_gsd(c):.3g} m" for c in sorted(vis.class_size_m, key=vis.max_gsd))
    mode = cfg.qc.contradiction
    fate = {"repair": "repaired or rejected", "reject": "rejected", "off": "kept: the rule is off"}[mode]
    missing = (
        ""
        if annotated
        else "\nThe annotate stage left no contradiction counts (no qc_report.json, or an older one): n/a.\n"
    )
    return f"""## Contradictions
Pairs of one tile must agree with each other and ask only what the pixels can show
(`sarlang_ray/annotate/consistency.py`). Findings per rule and backend: found by the annotate stage's QC
(`annotate.qc.contradiction: {mode}`, the blamed pairs {fate}), and by the same checker run again over this
export ({exported["tiles_with_findings"]} of
{exported["tiles"]} exported tiles with a finding).
{missing}
| rule | backend | found by annotation QC | left in this export |
|---|---|---|---|
{chr(10).join(rows)}

Classes are asked about and named only up to the GSD at which a typical instance spans `annotate.min_size_px`
pixels: {limits}.
"""


def run_visibility(run_dir: str) -> Visibility:
    """The visibility settings a run was made with (its ``config.yaml``, local or s3://), else the
    defaults."""
    import tempfile

    from sarlang_ray.config import load_config

    uri = io.join(run_dir, "config.yaml")
    if not io.exists(uri):
        return Visibility()
    with tempfile.NamedTemporaryFile(suffix=".yaml") as f:
        f.write(io.read_bytes(uri))
        f.flush()
        return Visibility.from_config(load_config(f.name).annotate)


if __name__ == "__main__":  # python -m sarlang_ray.annotate.consistency RUN_DIR: check that run's export
    if len(sys.argv) != 2:
        sys.exit("usage: python -m sarlang_ray.annotate.consistency RUN_DIR")
    report = check_export(sys.argv[1], run_visibility(sys.argv[1]))
    print(json.dumps(report, indent=2))
