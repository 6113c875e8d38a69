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


def legend_outside(ax, **kwargs):
    """A legend to the right of the axes, never over the data (bars reach the top of a plot: any corner inside
    can hide one); ``save_png`` grows the canvas to hold it."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kwargs)


def save_png(fig, uri: str, dpi: int = 100) -> str:
    """Write a figure as PNG to ``uri`` atomically, close it, return ``uri``. ``bbox_inches="tight"`` keeps
    what sits outside the axes (a legend from ``legend_outside``) in the picture."""
    buf = _io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    io.write_bytes_atomic(uri, buf.getvalue())
    return uri
