"""The errors table that every stage writes: one row per rejected item, with a reason and what to do."""

from __future__ import annotations

import datetime as dt

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


def error_row(stage: str, item: str, error_class: str, message: str, timestamp: bool = True) -> dict:
    """One errors-table row. ``timestamp=False`` keeps deterministic outputs byte-identical."""
    return {
        "stage": stage,
        "item": item,
        "error_class": error_class,
        "message": message,
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds") if timestamp else "",
    }


def errors_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ERROR_SCHEMA)
