"""Words shared by the annotators and QC: class names, plurals, synonyms, positions, numbers."""

from __future__ import annotations

import re

APPLICATIONS = (
    "image description",
    "object identification",
    "object classification",
    "instance counting",
    "region referring",
    "object positioning",
    "others",
)

# class -> (plural, synonyms that mean the same class in free text)
CLASS_WORDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ship": ("ships", ("ship", "ships", "boat", "boats", "vessel", "vessels")),
    "aircraft": (
        "aircraft",
        ("aircraft", "airplane", "airplanes", "aeroplane", "aeroplanes", "plane", "planes", "jet", "jets"),
    ),
    "car": ("cars", ("car", "cars", "vehicle", "vehicles", "automobile", "automobiles")),
    "storage tank": (
        "storage tanks",
        ("storage tank", "storage tanks", "tank", "tanks", "oil tank", "oil tanks"),
    ),
    "bridge": ("bridges", ("bridge", "bridges")),
    "harbour": ("harbours", ("harbour", "harbours", "harbor", "harbors", "port", "ports", "dock", "docks")),
    "building": ("buildings", ("building", "buildings", "house", "houses")),
    "road": ("roads", ("road", "roads", "street", "streets")),
}

POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)

NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)


def plural(cls: str, n: int = 2) -> str:
    return cls if n == 1 else CLASS_WORDS.get(cls, (cls + "s", ()))[0]


def count_phrase(cls: str, n: int) -> str:
    word = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    return f"{word} {plural(cls, n)}"


def position_of(bbox: list[float], size: int) -> str:
    """Which ninth of the tile holds the box centre (3 x 3 grid, row-major from the top left)."""
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    col = min(2, max(0, int(3 * cx / size)))
    row = min(2, max(0, int(3 * cy / size)))
    return POSITIONS[row * 3 + col]


def box_text(bbox: list[float], size: int) -> str:
    """Region format: [x0, y0, x1, y1] as integers on a 0-1000 scale of the tile (x right, y down)."""
    # int(): bbox values may be numpy floats, whose round() was a float before NumPy 2
    return "[" + ", ".join(str(int(round(v / size * 1000))) for v in bbox) + "]"  # noqa: RUF046


_SYNONYM_TO_CLASS = {syn.casefold(): cls for cls, (_, syns) in CLASS_WORDS.items() for syn in syns}
_MENTION = re.compile(
    r"\b(" + "|".join(sorted(map(re.escape, _SYNONYM_TO_CLASS), key=len, reverse=True)) + r")\b",
    re.IGNORECASE,
)


def mentioned_classes(text: str) -> dict[str, list[tuple[int, int]]]:
    """Class -> spans of its mentions (any synonym, singular or plural) in free text."""
    out: dict[str, list[tuple[int, int]]] = {}
    for m in _MENTION.finditer(text):
        # re.I also matches Unicode case variants that str.lower() leaves alone ("ſhip" for "ship", the Kelvin
        # sign for "k"); casefold() maps them back to the synonym they matched
        out.setdefault(_SYNONYM_TO_CLASS[m.group(1).casefold()], []).append(m.span())
    return out
