"""Pictures a person would rather look at than read: a tile's SAR and optical side by side, boxes drawn."""

from __future__ import annotations

import io as _io

from PIL import Image, ImageDraw

from sarlang_ray.rows import AlignedTileRow

CLASS_COLOURS = {
    "ship": (255, 64, 64),
    "aircraft": (255, 200, 0),
    "car": (0, 220, 255),
    "storage tank": (255, 0, 255),
    "bridge": (255, 128, 0),
    "harbour": (0, 128, 255),
    "building": (0, 255, 128),
    "road": (160, 160, 160),
}


def tile_figure(tile: AlignedTileRow, classes: tuple[str, ...] | None = None, scale: int = 2) -> Image.Image:
    """SAR tile (left) and optical twin (right) with object boxes; ``classes`` limits what is drawn."""
    sar = Image.open(_io.BytesIO(tile["sar_png"])).convert("RGB")
    panels = [sar]
    if (optical := tile.get("optical_png")) is not None:
        panels.append(Image.open(_io.BytesIO(optical)).convert("RGB"))
    w, h = sar.size
    canvas = Image.new("RGB", (w * len(panels), h))
    for i, p in enumerate(panels):
        canvas.paste(p, (i * w, 0))
    canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    objects = tile.get("objects")  # a list (pyarrow rows) or an array (pandas rows)
    for obj in objects if objects is not None else []:
        if classes and obj["class"] not in classes:
            continue
        x0, y0, x1, y1 = (v * scale for v in obj["bbox_xyxy"])
        colour = CLASS_COLOURS.get(obj["class"], (255, 255, 255))
        for i in range(len(panels)):
            draw.rectangle([x0 + i * w * scale, y0, x1 + i * w * scale, y1], outline=colour, width=1)
    return canvas
