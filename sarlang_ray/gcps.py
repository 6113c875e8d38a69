"""Scenes georeferenced by ground control points (Sentinel-1 GRD, COG_SAFE, any GCP-only raster).

A GRD measurement file has no geotransform: ~200 GCPs (the annotation's geolocation grid, pixel/line ->
lon/lat/height) tie it to the ground. Collapsing them into one affine is ~100 m to ~2 km off on an IW
swath (docs/sentinel1.md, benchmarks/results/grd.json), so every use goes through GDAL's own GCP
transformers: thin-plate spline (``tps``, exact at every GCP, the default) or a polynomial of order 1-3.
``affine`` (one least-squares affine, what TorchGeo's fallback does) exists to measure that error.

GCP lists travel as plain lists ``[row, col, x, y, z]`` so they fit in a scene row (JSON).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pyproj import Geod, Transformer
from rasterio.control import GroundControlPoint
from rasterio.transform import GCPTransformer, from_gcps
from shapely.geometry import Polygon

METHODS = ("tps", "polynomial", "affine")


def to_lists(gcps: list[GroundControlPoint]) -> list[list[float]]:
    return [[g.row, g.col, g.x, g.y, 0.0 if g.z is None else g.z] for g in gcps]


def from_lists(
    rows: list[list[float]], row_off: float = 0.0, col_off: float = 0.0
) -> list[GroundControlPoint]:
    """GCPs from lists, shifted into a window starting at (row_off, col_off) of the raster."""
    return [GroundControlPoint(row=r - row_off, col=c - col_off, x=x, y=y, z=z) for r, c, x, y, z in rows]


@dataclass
class Georef:
    """A raster's GCPs (in ``crs``, EPSG:4326 for Sentinel-1) and how they are interpolated."""

    gcps: list[list[float]]
    crs: str
    method: str = "tps"
    order: int = 3

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown GCP method {self.method!r}; use one of {METHODS}")
        self._tr = None

    def affine(self):
        """The least-squares affine through the GCPs (GDAL's GDALGCPsToGeoTransform)."""
        return from_gcps(from_lists(self.gcps))

    def _transformer(self):
        if self._tr is None:
            if self.method == "affine":
                self._tr = self.affine()
            # TPS for windows and outlines of both methods: exact at the GCPs; polynomial warps differ < 1 px
            else:
                self._tr = GCPTransformer(from_lists(self.gcps), tps=True)
        return self._tr

    def xy(self, rows, cols) -> tuple[np.ndarray, np.ndarray]:
        """Ground coordinates (GCP CRS) of pixel positions (row, col measured from the top-left corner)."""
        rows, cols = np.asarray(rows, float), np.asarray(cols, float)
        tr = self._transformer()
        if self.method == "affine":
            xs, ys = tr * (cols, rows)
            return np.asarray(xs), np.asarray(ys)
        xs, ys = tr.xy(rows, cols, offset="ul")
        return np.asarray(xs, float), np.asarray(ys, float)

    def rowcol(self, xs, ys) -> tuple[np.ndarray, np.ndarray]:
        """Fractional pixel positions (row, col) of ground coordinates."""
        tr = self._transformer()
        if self.method == "affine":
            cols, rows = ~tr * (np.asarray(xs, float), np.asarray(ys, float))
            return np.asarray(rows), np.asarray(cols)
        rows, cols = tr.rowcol(np.asarray(xs, float), np.asarray(ys, float), op=lambda v: v)
        return np.asarray(rows, float), np.asarray(cols, float)

    def warp_options(self, row_off: float, col_off: float) -> dict:
        """Keyword arguments of ``rasterio.warp.reproject`` for a source window starting at (row_off,
        col_off): the GCPs shifted into the window and GDAL's transformer options (an affine for ``affine``).
        """
        if self.method == "affine":
            from affine import Affine

            return {
                "src_transform": self.affine() * Affine.translation(col_off, row_off),
                "src_crs": self.crs,
            }
        opts: dict[str, Any] = {"gcps": from_lists(self.gcps, row_off, col_off), "src_crs": self.crs}
        if self.method == "tps":
            opts["SRC_METHOD"] = "GCP_TPS"
        else:
            opts.update(SRC_METHOD="GCP_POLYNOMIAL", MAX_GCP_ORDER=self.order)
        return opts

    def outline_4326(self, width: int, height: int, densify: int = 32) -> Polygon:
        """The pixel grid's outline in lon/lat, each side densified (GCP CRS -> EPSG:4326)."""
        s = np.linspace(0, 1, densify + 1)[:-1]
        cols = np.concatenate([s * width, np.full_like(s, width), (1 - s) * width, np.zeros_like(s)])
        rows = np.concatenate([np.zeros_like(s), s * height, np.full_like(s, height), (1 - s) * height])
        xs, ys = self.xy(rows, cols)
        if self.crs not in ("EPSG:4326", "OGC:CRS84"):
            xs, ys = Transformer.from_crs(self.crs, "EPSG:4326", always_xy=True).transform(xs, ys)
        return Polygon(zip(xs, ys))

    def ground_gsd(self, width: int, height: int) -> tuple[float, float]:
        """Ground size in metres of one pixel step along columns and rows at the scene centre (WGS 84)."""
        r, c = height / 2, width / 2
        xs, ys = self.xy([r, r, r + 1], [c, c + 1, c])
        if self.crs not in ("EPSG:4326", "OGC:CRS84"):
            xs, ys = Transformer.from_crs(self.crs, "EPSG:4326", always_xy=True).transform(xs, ys)
        geod = Geod(ellps="WGS84")
        return (abs(geod.inv(xs[0], ys[0], xs[1], ys[1])[2]), abs(geod.inv(xs[0], ys[0], xs[2], ys[2])[2]))

    def relief_m(self) -> float:
        """Spread of the GCP heights: the terrain the ellipsoid-height geolocation has to assume."""
        z = [g[4] for g in self.gcps]
        return float(max(z) - min(z)) if z else 0.0
