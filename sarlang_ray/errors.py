"""The errors table that every stage writes: one row per rejected item, with a reason and what to do.

Rows are redacted (:func:`redact_text`): a message may quote a URL or an exception, and neither may carry a
secret into the run folder.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterable

import pyarrow as pa

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
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<userinfo>[^/?#@\s'\"]+)@", re.I)  # s3://key:secret@bucket
_AUTH_HEADER = re.compile(r"\b(?P<scheme>Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=-]{8,}")  # an echoed Authorization header
_SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSW|CREDENTIAL|API_?KEY|ACCESS_KEY|(^|_)KEY$", re.I)


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
