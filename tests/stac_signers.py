"""A ``catalog.sign`` entry point for tests (``catalog.sign=stac_signers:sign``; Ray workers import it from
tests/, which conftest puts on their PYTHONPATH): appends a signature of the href's path, as a SAS token or an
S3 presigned URL would, which :mod:`http_files` checks on every request."""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

SECRET = b"sarlang-test-signing-key"


def signature(path: str) -> str:
    return hmac.new(SECRET, path.encode(), hashlib.sha256).hexdigest()[:32]


def sign(href: str) -> str:
    """``href`` with ``sig=<hmac of its path>`` added to its query."""
    parts = urlsplit(href)
    return f"{href}{'&' if parts.query else '?'}sig={signature(parts.path)}"
