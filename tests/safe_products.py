"""Sentinel-1 GRD products for tests and benchmarks: the real SAFE zips of ../shared/data/real_sar (real
manifest, annotation, calibration and noise XML; measurement folder left empty upstream) completed with
measurement TIFFs built on each product's *real* pixel grid and GCPs (its geolocation grid, exactly as
the real measurement files carry them), holding uint16 digital numbers: a background and bright square
targets wherever the caller puts them."""

from __future__ import annotations

import shutil
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.control import GroundControlPoint
from rasterio.windows import Window

PRODUCTS = {
    "2015": "S1A_IW_GRDH_1SDV_20150222T170750_20150222T170815_004739_005DD8_3768.zip",
    "2021": "S1A_IW_GRDH_1SDV_20210119T031653_20210119T031718_036201_043ED0_8255.zip",
}


@dataclass
class Annotation:
    width: int
    height: int
    grid: list[dict]  # geolocation grid points: line, pixel, latitude, longitude, height


def annotation(zip_path: Path, pol: str = "vv") -> Annotation:
    with zipfile.ZipFile(zip_path) as zf:
        name = next(
            n for n in zf.namelist() if "/annotation/s1" in n and f"-{pol}-" in n and n.endswith(".xml")
        )
        root = ET.fromstring(zf.read(name))
    grid = [
        {k: float(p.findtext(k)) for k in ("line", "pixel", "latitude", "longitude", "height")}
        for p in root.iter("geolocationGridPoint")
    ]
    return Annotation(
        int(root.findtext(".//imageInformation/numberOfSamples")),
        int(root.findtext(".//imageInformation/numberOfLines")),
        grid,
    )


def write_measurement(
    path: Path,
    ann: Annotation,
    background: float,
    targets: list[tuple[float, float, int]],
    half: int = 3,
    with_gcps: bool = True,
    compress: str = "deflate",
) -> None:
    """A measurement TIFF (uint16 DN, tiled) on the product's grid with its GCPs. Each target (line, pixel,
    DN) is a square of 2*half pixels whose centre is the pixel-corner point (line, pixel): GDAL's GCP
    convention, so the square's centroid is where the GCPs place (line, pixel)."""
    gcps = [
        GroundControlPoint(row=p["line"], col=p["pixel"], x=p["longitude"], y=p["latitude"], z=p["height"])
        for p in ann.grid
    ]
    profile = {
        "driver": "GTiff",
        "width": ann.width,
        "height": ann.height,
        "count": 1,
        "dtype": "uint16",
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": compress,
    }
    if with_gcps:
        profile.update(gcps=gcps, crs="EPSG:4326")
    by_strip: dict[int, list] = {}
    for line, pixel, dn in targets:
        by_strip.setdefault(int(line - half) // 512, []).append((line, pixel, dn))
        by_strip.setdefault(int(line + half - 1) // 512, []).append((line, pixel, dn))
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, ann.height, 512):
            h = min(512, ann.height - r)
            block = np.full((h, ann.width), background, np.uint16)
            for line, pixel, dn in by_strip.get(r // 512, []):
                # int(): numpy floats' round() was a float before NumPy 2
                r0, r1 = int(round(line)) - half - r, int(round(line)) + half - r  # noqa: RUF046
                c0, c1 = int(round(pixel)) - half, int(round(pixel)) + half  # noqa: RUF046
                block[max(r0, 0) : max(r1, 0), max(c0, 0) : c1] = dn
            dst.write(block[None], window=Window(0, r, ann.width, h))


def build_product(
    real_sar: Path,
    key: str,
    out_dir: Path,
    background: float = 100,
    targets: list[tuple[float, float, int]] = (),
    as_zip: bool = True,
    with_gcps: bool = True,
) -> Path:
    """The real product ``key`` (2015 or 2021) with measurement TIFFs for VV and VH, as a SAFE zip (members
    stored, like the archives) or an unpacked .SAFE folder under ``out_dir``."""
    src = real_sar / "s1_grd_safe_metadata" / PRODUCTS[key]
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp, zipfile.ZipFile(src) as zf:
        zf.extractall(tmp)
        safe_dir = next(Path(tmp).glob("*.SAFE"))
        for pol in ("vv", "vh"):
            ann = annotation(src, pol)
            manifest = (safe_dir / "manifest.safe").read_text()
            href = next(
                h for h in manifest.split('href="')[1:] if h.startswith("./measurement/") and f"-{pol}-" in h
            )
            write_measurement(
                safe_dir / href.split('"')[0][2:], ann, background, list(targets), with_gcps=with_gcps
            )
        if not as_zip:
            dest = out_dir / safe_dir.name
            shutil.rmtree(dest, ignore_errors=True)
            shutil.move(str(safe_dir), dest)
            return dest
        dest = out_dir / PRODUCTS[key]
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as out:
            for path in sorted(safe_dir.rglob("*")):
                out.write(path, path.relative_to(tmp).as_posix())
        return dest
