"""The errors table that every stage writes: one row per rejected item, with a reason and what to do.

Rows are redacted (:func:`redact_text`): a message may quote a URL or an exception, and neither may carry a
secret into the run folder.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable

import pyarrow as pa

log = logging.getLogger("sarlang")

ERROR_SCHEMA = pa.schema(
    [
        ("stage", pa.string()),
        ("item", pa.string()),  # a uri, a tile id or uri#feature
        ("error_class", pa.string()),  # short machine-readable reason, e.g. no_crs, nodata, unreadable
        ("message", pa.string()),  # names the item and says what to do
        ("time", pa.string()),  # ISO-8601 UTC (kept out of shards that must be byte-identical: see below)
    ]
)


class ItemError(Exception):
    """An input item cannot be used; ``error_class`` is the short reason, the message says what to do."""

    def __init__(self, error_class: str, message: str):
        super().__init__(message)
        self.error_class = error_class


REDACTED = "***"
# s3://key:secret@bucket
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<userinfo>[^/?#@\s'\"]+)@", re.IGNORECASE)
# an echoed Authorization header
_AUTH_HEADER = re.compile(r"\b(?P<scheme>Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=-]{8,}")
_SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSW|CREDENTIAL|API_?KEY|ACCESS_KEY|(^|_)KEY$", re.IGNORECASE)


def _userinfo(m: re.Match) -> str:
    user, colon, _ = m["userinfo"].partition(":")
    return f"{m['scheme']}{user}:{REDACTED}@" if colon else f"{m['scheme']}{REDACTED}@"


def redact_urls(text: str) -> str:
    """``text`` with the password of every URL replaced (``s3://KEY:***@bucket``; a lone token before
    ``@`` goes whole). The one URL rule of the package: config values, logs and error rows use it."""
    return _URL_USERINFO.sub(_userinfo, text)


def has_credentials(url: str) -> bool:
    """Whether ``url`` carries ``user:password@`` or ``token@``."""
    return bool(_URL_USERINFO.search(url))


def redact_text(text: str, env_names: Iterable[str] = ()) -> str:
    """``text`` without secrets: the password in URLs (``s3://KEY:***@bucket``; a lone token before ``@``
    goes whole), Authorization header values (``Bearer ***``, ``Basic ***``: servers echo them in errors),
    and the values of secret-looking environment variables (names with SECRET, TOKEN,
    PASSWORD, API_KEY, ...; plus ``env_names``, such as the variable named by
    ``annotate.openai.api_key_env``). Values shorter than 8 characters are left alone: they would match
    ordinary words."""

    text = _AUTH_HEADER.sub(lambda m: f"{m['scheme']} {REDACTED}", redact_urls(text))
    names = {n for n in os.environ if _SECRET_ENV.search(n)} | set(env_names)
    for value in sorted({os.environ.get(n, "") for n in names}, key=len, reverse=True):
        if len(value) >= 8:
            text = text.replace(value, REDACTED)
    return text


def error_row(stage: str, item: str, error_class: str, message: str, timestamp: bool = True) -> dict:
    """One errors-table row (item and message redacted). ``timestamp=False`` keeps deterministic outputs
    byte-identical."""
    return {
        "stage": stage,
        "item": redact_text(item),
        "error_class": error_class,
        "message": redact_text(message),
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds") if timestamp else "",
    }


def errors_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ERROR_SCHEMA)


def reasons_json(rows: Iterable[dict]) -> str:
    """A shard's rejects per ``error_class``, as JSON: what a worker returns to the driver in its manifest
    row, so the driver never reads the errors table back to count them."""
    return json.dumps(dict(Counter(r["error_class"] for r in rows)), sort_keys=True)


def summed_reasons(manifest: Iterable[dict]) -> Counter:
    """The rejects per ``error_class`` of a stage, summed over its manifest rows (:func:`reasons_json`)."""
    total: Counter = Counter()
    for m in manifest:
        total.update(json.loads(m.get("reasons") or "{}"))
    return total


def _by_reason(reasons: Counter) -> str:
    return (
        ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
        or "no reason recorded"
    )


def nothing_written(stage: str, planned: int, written: int, reasons: Counter, hint: str = "") -> str | None:
    """Why a stage that planned items wrote none (its ``failure``: the command exits non-zero), or None when
    it wrote something or planned nothing. The message gives the reasons of the stage's errors table and
    ``hint``, what to change."""
    if planned <= 0 or written > 0:
        return None
    return (
        f"all {planned} planned items were rejected ({_by_reason(reasons)}); each is a row of the {stage} "
        "errors "
        f"table with its message (sarlang_ray.tables.read_errors).{' ' + hint if hint else ''}"
    )


def dominant_reasons(stage: str, planned: int, reasons: Counter, share: float) -> list[str]:
    """A warning per reason that rejected more than ``share`` of a stage's planned items
    (``run.warn_reject_share``): one cause taking out most of a stage is worth a look even when the stage
    wrote something."""
    return [
        f"{stage}: {n} of {planned} planned items ({n / planned:.0%}) rejected as {reason} (more than "
        f"run.warn_reject_share={share:g}); see the {stage} errors table"
        for reason, n in sorted(reasons.items())
        if planned > 0 and n > share * planned
    ]


def judge_outcome(stage: str, counts: dict, reasons: Counter, share: float, hint: str = "") -> dict:
    """A data stage's counts with its verdict added: ``failure`` when it planned items and wrote none (the
    stage raises :class:`~sarlang_ray.stages.stage.StageFailed` and the command exits non-zero), and
    ``warnings`` (logged now, printed in the summary) for every reason that rejected more than ``share`` of
    its planned items; ``rejects_by_reason`` is kept in the stage's marker."""
    counts["rejects_by_reason"] = dict(sorted(reasons.items()))
    problem = nothing_written(stage, counts.get("planned", 0), counts.get("written", 0), reasons, hint)
    if problem:
        counts["failure"] = problem
        return counts
    warnings = dominant_reasons(stage, counts.get("planned", 0), reasons, share)
    for w in warnings:
        log.warning("WARNING %s", w)
    if warnings:
        counts["warnings"] = warnings
    return counts
