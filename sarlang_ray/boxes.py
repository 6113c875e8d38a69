"""Box answers: parse the conventions VLMs write boxes in, and score them by IoU, as grounding benchmarks do.

A box answer is right when it overlaps the truth, not when its digits match: SARChat-Bench-2M's grounding and
referring tasks (and any of our pairs whose answer is a box) count a predicted box as right when its IoU with
the true box is at least 0.5. Models write boxes in several conventions, each with its own coordinate frame:

==========================================================  ===========================================
convention                                                  frame (``auto``)
==========================================================  ===========================================
``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` (Qwen2-VL)      0-1000 of the image
``<box>[[x1, y1, x2, y2]]</box>`` (InternVL)                 0-1000 of the image (0-1 if every value <= 1)
``{<x1><y1><x2><y2>}`` (SARChat-Bench-2M's answers)          pixels (0-1 if every value <= 1)
``[x1, y1, x2, y2]`` (Qwen2.5-VL, plain JSON)                 pixels (0-1 if every value <= 1)
==========================================================  ===========================================

``frame`` other than ``auto`` (``pixel``, ``norm1``, ``norm1000``) reads every box of a text in that frame: a
model that writes plain brackets on a 0-1000 scale is scored with ``evaluate.box_frame=norm1000``.

A box is converted to pixels of its image (width, height known) before comparing. Wrong, with the reason
counted per model: no box found (``no_box``, a parse failure), a box with x2 <= x1 or y2 <= y1
(``degenerate``), a box reaching outside the image by more than half a pixel (``outside``), a different number
of boxes than the truth has (``count``), a box below the IoU threshold (``iou``). Several truth boxes (a
"multi" referring answer): the predicted boxes are matched one to one (Hungarian, by IoU) and all must pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FRAMES = ("auto", "pixel", "norm1", "norm1000")
IOU_THRESHOLD = 0.5
OUTSIDE_TOLERANCE_PX = 0.5
REASONS = ("no_box", "degenerate", "outside", "count", "iou")

_N = r"\s*(-?\d+(?:\.\d+)?)\s*"
_QWEN = re.compile(rf"<\|box_start\|>\s*\({_N},{_N}\)\s*,\s*\({_N},{_N}\)\s*<\|box_end\|>")
_TAGGED = re.compile(rf"<box>\s*\[?\s*\[{_N},{_N},{_N},{_N}\]\s*\]?\s*</box>")
_ANGLE = re.compile(rf"\{{?\s*<{_N}>\s*<{_N}>\s*<{_N}>\s*<{_N}>\s*\}}?")
_PLAIN = re.compile(rf"\[{_N},{_N},{_N},{_N}\]")
# in this order: a later pattern never reads a span an earlier one matched
_CONVENTIONS = (
    ("qwen", _QWEN, "norm1000"),
    ("tagged", _TAGGED, "norm1000"),
    ("angle", _ANGLE, "pixel"),
    ("plain", _PLAIN, "pixel"),
)


@dataclass(frozen=True)
class Box:
    """A box in pixels of its image: x right, y down, (x1, y1) the top-left corner."""

    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)


@dataclass(frozen=True)
class RawBox:
    """A box as written: its four numbers, the convention it was found in, and the frame ``auto`` gives it."""

    values: tuple[float, float, float, float]
    convention: str
    frame: str


def find_boxes(text: str) -> list[RawBox]:
    """Every box written in ``text``, in reading order, with the frame its convention implies (``auto``)."""
    text = str(text or "")
    taken: list[tuple[int, int]] = []
    found: list[tuple[int, RawBox]] = []
    for name, pattern, frame in _CONVENTIONS:
        for m in pattern.finditer(text):
            if any(m.start() < e and s < m.end() for s, e in taken):
                continue
            x1, y1, x2, y2 = (float(v) for v in m.groups())  # every convention's pattern has four numbers
            values = (x1, y1, x2, y2)  # qwen's (x1,y1),(x2,y2) too
            auto = (
                "norm1" if all(0 <= v <= 1 for v in values) and any("." in g for g in m.groups()) else frame
            )
            taken.append((m.start(), m.end()))
            found.append((m.start(), RawBox(values, name, auto)))
    return [b for _, b in sorted(found, key=lambda t: t[0])]


def to_pixels(raw: RawBox, width: float, height: float, frame: str = "auto") -> Box:
    """``raw`` in pixels of a ``width`` x ``height`` image, read in ``frame`` (``auto``: the convention's)."""
    if frame not in FRAMES:
        raise ValueError(f"unknown box frame {frame!r}: use one of {FRAMES}")
    f = raw.frame if frame == "auto" else frame
    sx, sy = {"pixel": (1.0, 1.0), "norm1": (width, height), "norm1000": (width / 1000.0, height / 1000.0)}[f]
    x1, y1, x2, y2 = raw.values
    return Box(x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when they do not overlap or one is empty)."""
    w = min(a.x2, b.x2) - max(a.x1, b.x1)
    h = min(a.y2, b.y2) - max(a.y1, b.y1)
    inter = max(0.0, w) * max(0.0, h)
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def is_box_answer(text: str) -> bool:
    """Whether a (truth) answer is a box answer: it holds at least one box in a known convention."""
    return bool(find_boxes(text))


def parse(text: str, width: float, height: float, frame: str = "auto") -> tuple[list[Box], str | None]:
    """(boxes in pixels, None) or ([], reason) with reason ``no_box``, ``degenerate`` or ``outside``."""
    raws = find_boxes(text)
    if not raws:
        return [], "no_box"
    out = [to_pixels(r, width, height, frame) for r in raws]
    if any(b.x2 <= b.x1 or b.y2 <= b.y1 for b in out):
        return [], "degenerate"
    t = OUTSIDE_TOLERANCE_PX
    if any(b.x1 < -t or b.y1 < -t or b.x2 > width + t or b.y2 > height + t for b in out):
        return [], "outside"
    return out, None


def box_correct(
    prediction: str,
    truth: str,
    width: float,
    height: float,
    *,
    frame: str = "auto",
    truth_frame: str = "auto",
    threshold: float = IOU_THRESHOLD,
) -> tuple[bool, str | None, float]:
    """(right, why wrong or None, IoU) of a predicted box answer against the truth's box(es).

    The IoU reported is the smallest of the matched pairs (0 when nothing matched).

    Raises:
        ValueError: the truth holds no valid box inside the image (a broken reference, not a wrong answer).
    """
    truths, why = parse(truth, width, height, truth_frame)
    if why:
        raise ValueError(
            f"the reference answer {truth!r} is not a valid box inside a {width:g} x {height:g} image "
            f"({why}); check evaluate.truth_box_frame"
        )
    preds, why = parse(prediction, width, height, frame)
    if why:
        return False, why, 0.0
    if len(preds) != len(truths):
        return False, "count", 0.0
    if len(truths) == 1:
        value = iou(preds[0], truths[0])
    else:
        import numpy as np
        from scipy.optimize import linear_sum_assignment

        m = np.array([[iou(p, t) for t in truths] for p in preds])
        rows, cols = linear_sum_assignment(-m)
        value = float(m[rows, cols].min())
    return (True, None, value) if value >= threshold else (False, "iou", value)
