"""Figures as PNG files (local or s3://): the one place that sets up matplotlib off-screen."""

from __future__ import annotations

import io as _io

from sarlang_ray import io


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display on cluster nodes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, uri: str, dpi: int = 100) -> str:
    """Write a figure as PNG to ``uri`` atomically, close it, return ``uri``."""
    buf = _io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    io.write_bytes_atomic(uri, buf.getvalue())
    return uri
