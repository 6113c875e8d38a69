"""Sentinel-1 products as distributed: SAFE folders and zips, their calibration and thermal-noise LUTs.

A GRD product is a folder ``<name>.SAFE`` (or a zip holding it; Copernicus ``COG_SAFE`` products have the
same layout with COG measurement files) with, per polarisation, a measurement TIFF of uint16 digital
numbers (no CRS, no geotransform: ~200 GCPs), a product annotation XML (image size, the geolocation
grid), a calibration XML (sigmaNought, betaNought, gamma and dn LUTs on a sparse line x pixel grid) and a
noise XML (thermal-noise LUTs in two schemas: IPF 2.x ``noiseVectorList``, range only; IPF >= 2.9
``noiseRangeVectorList`` x ``noiseAzimuthVectorList``).

This module knows nothing of Ray or the run folder. It

* finds the parts of a product from its ``manifest.safe`` (:func:`open_product`), reading a zip *in place*
  (the central directory and the few XML members, by ranged reads on ``s3://``; the measurement TIFF is
  read by GDAL through ``/vsizip/``, block by block, never unpacked);
* parses the LUTs (:class:`Lut`, :func:`read_calibration`, :func:`read_noise`) and evaluates them on any
  pixel window, bilinear in line and pixel as ESA specifies (:meth:`Radiometry.intensity`), so only a
  tile's pixels are ever calibrated: ``sigma0 = (DN^2 - noise) / A_sigma^2``.

Why not a library: GDAL's SAFE driver (GDAL 3.10 in rasterio's wheels) exposes the measurement bands and
the GCPs but no thermal-noise removal, and its calibrated sub-datasets need the whole product layout on a
file system; xarray-sentinel calibrates whole-product DataArrays and brings xarray and xmlschema into
every tile worker. Parsing the three LUT files is ~100 lines of ElementTree; the tests check them against
an independent bilinear computation (scipy) on the real products of both noise schemas.
"""

from __future__ import annotations

import functools
import posixpath
import re
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field

import numpy as np

from sarlang_ray import io

CALIBRATIONS = ("sigma0", "beta0", "gamma0", "none")
_LUT_TAG = {"sigma0": "sigmaNought", "beta0": "betaNought", "gamma0": "gamma"}
_PRODUCT_NAME = re.compile(r"S1[ABCD]_(IW|EW|SM|WV|S\d)_(GRD[HMF]?|SLC|OCN)_", re.IGNORECASE)


class SafeError(ValueError):
    """A SAFE product that cannot be read as one: the message names the product and what is missing."""


def is_product(uri: str) -> bool:
    """Whether a path names a SAFE product: a ``.SAFE`` folder, its ``manifest.safe``, or a zip of one
    (``.SAFE.zip`` or a Sentinel-1 product name ending in ``.zip``)."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    low = name.lower()
    return (
        low.endswith((".safe", ".safe.zip"))
        or low == "manifest.safe"
        or (low.endswith(".zip") and bool(_PRODUCT_NAME.match(name)))
    )


@dataclass
class Band:
    """One polarisation of a product: where its measurement and LUT files are."""

    polarisation: str
    measurement: str  # a path GDAL opens (``/vsizip/...`` inside a zip, else the file's uri)
    annotation: str | None
    calibration: str | None
    noise: str | None


@dataclass
class Product:
    uri: str  # as found in the archive (zip, .SAFE folder, or its manifest.safe)
    name: str  # the product name, without .SAFE / .zip
    mission: str | None = None
    mode: str | None = None
    product_type: str | None = None
    pass_direction: str | None = None
    start_time: str | None = None
    ipf_version: str | None = None
    bands: list[Band] = field(default_factory=list)


def _rel(href: str) -> str:
    """A manifest href (``./measurement/x.tiff``) as a path relative to the .SAFE folder."""
    return posixpath.normpath(href.removeprefix("./"))


class _Reader:
    """Reads members of a product: files of a folder (local or remote), or members of a zip in place."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.zip = self.uri.lower().endswith(".zip")
        if self.zip:
            fs, path = io.filesystem(self.uri)
            # seekable: zipfile reads the central directory and members by range
            self._file = fs.open(path, "rb")
            try:
                self._zf = zipfile.ZipFile(self._file)
            except zipfile.BadZipFile as exc:
                self._file.close()
                raise SafeError(f"{uri} is not a readable zip ({exc}): re-download the product") from None
            names = self._zf.namelist()
            manifests = [n for n in names if n.lower().endswith(".safe/manifest.safe")]
            if not manifests:
                self.close()
                raise SafeError(f"{uri} holds no <name>.SAFE/manifest.safe: not a SAFE product zip")
            self.root = manifests[0].rsplit("/", 1)[0]  # the .SAFE folder inside the zip
            self._names = set(names)
        else:
            self.root = (
                self.uri[: -len("/manifest.safe")]
                if self.uri.lower().endswith("/manifest.safe")
                else self.uri
            )

    def read(self, rel: str) -> bytes:
        rel = _rel(rel)
        if self.zip:
            member = f"{self.root}/{rel}"
            if member not in self._names:
                raise SafeError(f"{self.uri}: member {member} is missing")
            return self._zf.read(member)
        return io.read_bytes(io.join(self.root, rel))

    def exists(self, rel: str) -> bool:
        rel = _rel(rel)
        return f"{self.root}/{rel}" in self._names if self.zip else io.exists(io.join(self.root, rel))

    def gdal_path(self, rel: str) -> str:
        """A path GDAL (``io.open_raster``) opens for a member."""
        rel = _rel(rel)
        if not self.zip:
            return io.join(self.root, rel)
        if io.is_remote(self.uri):
            scheme, path = self.uri.split("://", 1)
            if scheme not in ("s3", "s3a"):
                raise SafeError(f"{self.uri}: SAFE zips are read in place on local disks and s3:// only")
            return f"/vsizip//vsis3/{path}/{self.root}/{rel}"
        return f"/vsizip/{self.uri}/{self.root}/{rel}"

    def member_uri(self, rel: str) -> str:
        """A uri :func:`read_member` reads back (``zip_uri!member`` inside a zip)."""
        rel = _rel(rel)
        return f"{self.uri}!{self.root}/{rel}" if self.zip else io.join(self.root, rel)

    def close(self) -> None:
        if self.zip:
            self._zf.close()
            self._file.close()


def read_member(uri: str) -> bytes:
    """The bytes of a product member named by :meth:`_Reader.member_uri` (``archive.zip!path`` or a plain
    uri)."""
    if "!" in uri and uri.split("!", 1)[0].lower().endswith(".zip"):
        archive, member = uri.split("!", 1)
        fs, path = io.filesystem(archive)
        with fs.open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            return zf.read(member)
    return io.read_bytes(io.sign_href(uri))  # a STAC item's LUT asset: signed like its rasters (catalog.sign)


def _text(root: ET.Element, suffix: str) -> str | None:
    """The text of the first element whose tag (namespace stripped) is ``suffix``."""
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] == suffix and el.text and el.text.strip():
            return el.text.strip()
    return None


def open_product(uri: str) -> Product:
    """Parse a product's manifest: its metadata and, per polarisation, its measurement and LUT files.

    Raises:
        SafeError: no manifest, or a measurement the manifest names is missing (an incomplete download).
    """
    reader = _Reader(uri)
    try:
        manifest = ET.fromstring(reader.read("manifest.safe"))
        name = reader.root.rsplit("/", 1)[-1]
        name = name[: -len(".SAFE")] if name.upper().endswith(".SAFE") else name
        software = next((el for el in manifest.iter() if el.tag.endswith("software")), None)
        product = Product(
            uri=uri,
            name=name,
            mission="Sentinel-1" + (_text(manifest, "number") or ""),
            mode=_text(manifest, "mode"),
            product_type=_text(manifest, "productType"),
            pass_direction=(_text(manifest, "pass") or "").lower() or None,
            start_time=_text(manifest, "startTime"),
            ipf_version=software.get("version") if software is not None else None,
        )
        hrefs = [
            href for el in manifest.iter() if el.tag.endswith("fileLocation") and (href := el.get("href"))
        ]
        files: dict[str, dict[str, str]] = {
            "measurement": {},
            "annotation": {},
            "calibration": {},
            "noise": {},
        }
        for href in hrefs:
            base = href.rsplit("/", 1)[-1].lower()
            m = re.search(r"-(vv|vh|hh|hv)-", base)
            if m is None:
                continue
            pol = m.group(1).upper()
            if "/measurement/" in href:
                files["measurement"][pol] = href
            elif base.startswith("calibration-"):
                files["calibration"][pol] = href
            elif base.startswith("noise-"):
                files["noise"][pol] = href
            elif "/annotation/" in href and base.endswith(".xml") and base.startswith("s1"):
                files["annotation"][pol] = href
        if not files["measurement"]:
            raise SafeError(f"{uri}: its manifest.safe names no measurement file: not a Level-1 product")
        for pol in sorted(files["measurement"], key=lambda p: ("VV", "HH", "VH", "HV").index(p)):
            href = files["measurement"][pol]
            if not reader.exists(href):
                raise SafeError(
                    f"{uri}: the measurement {href.lstrip('./')} named by its manifest is missing (an "
                    "incomplete download or a metadata-only copy): re-download the product"
                )
            product.bands.append(
                Band(
                    polarisation=pol,
                    measurement=reader.gdal_path(href),
                    annotation=reader.member_uri(files["annotation"][pol])
                    if pol in files["annotation"]
                    else None,
                    calibration=reader.member_uri(files["calibration"][pol])
                    if pol in files["calibration"]
                    else None,
                    noise=reader.member_uri(files["noise"][pol]) if pol in files["noise"] else None,
                )
            )
        return product
    finally:
        reader.close()


@dataclass
class Lut:
    """A LUT on a sparse grid: one vector of values per annotated line, each with its own pixel positions
    (IPF >= 2.9 noise vectors differ in length from line to line)."""

    lines: np.ndarray  # (K,) ascending
    pixels: list[np.ndarray]  # K arrays, ascending
    values: list[np.ndarray]  # K arrays, same lengths

    def on_window(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The LUT at every (row, col) of a window, (len(rows), len(cols)) float64: linear along pixel
        within each vector, then linear along line between the two vectors around each row (bilinear on a
        regular grid); constant beyond the first / last vector, as ESA's and SNAP's readers do."""
        k = len(self.lines)
        i1 = np.clip(np.searchsorted(self.lines, rows, side="right"), 1, max(k - 1, 1))
        i0 = i1 - 1
        used = np.unique(np.concatenate([i0, i1])) if k > 1 else np.array([0])
        along = {i: np.interp(cols, self.pixels[i], self.values[i]) for i in used.tolist()}
        if k == 1:
            return np.broadcast_to(along[0], (len(rows), len(cols))).copy()
        span = (self.lines[i1] - self.lines[i0]).astype(np.float64)
        w = np.clip((rows - self.lines[i0]) / np.where(span == 0, 1, span), 0.0, 1.0)[:, None]
        a = np.stack([along[i] for i in i0.tolist()])
        b = np.stack([along[i] for i in i1.tolist()])
        return a * (1 - w) + b * w


def _child_text(el: ET.Element, tag: str) -> str:
    """The text of ``el``'s child ``tag``, which the annotation schema requires (a clear error where it is
    missing, instead of ``float(None)``)."""
    text = el.findtext(tag)
    if text is None:
        raise SafeError(
            f"<{el.tag}> has no <{tag}>: a truncated or non-Sentinel-1 annotation. Re-download the product."
        )
    return text


def _floats(el: ET.Element | None) -> np.ndarray:
    return np.array((el.text or "").split(), dtype=np.float64) if el is not None else np.zeros(0)


def _vectors(root: ET.Element, vector_tag: str, value_tag: str) -> Lut | None:
    lines, pixels, values = [], [], []
    for v in root.iter(vector_tag):
        lines.append(float(_child_text(v, "line")))
        pixels.append(_floats(v.find("pixel")))
        values.append(_floats(v.find(value_tag)))
    if not lines:
        return None
    order = np.argsort(lines, kind="stable")
    return Lut(np.asarray(lines)[order], [pixels[i] for i in order], [values[i] for i in order])


@functools.lru_cache(maxsize=32)
def read_calibration(uri: str, calibration: str) -> Lut:
    """The calibration LUT (``sigma0``, ``beta0`` or ``gamma0``) of one polarisation."""
    if calibration not in _LUT_TAG:
        raise ValueError(f"unknown calibration {calibration!r}; use one of {CALIBRATIONS}")
    root = ET.fromstring(read_member(uri))
    lut = _vectors(root, "calibrationVector", _LUT_TAG[calibration])
    if lut is None:
        raise SafeError(f"{uri} holds no calibrationVector: not a Sentinel-1 calibration annotation")
    return lut


@dataclass
class AzimuthBlock:
    """One block of the IPF >= 2.9 azimuth noise: a LUT over lines, valid on a line x sample rectangle."""

    first_line: int
    last_line: int
    first_sample: int
    last_sample: int
    lines: np.ndarray
    values: np.ndarray


@dataclass
class Noise:
    schema: str  # "ipf2" (noiseVectorList) or "ipf3" (noiseRangeVectorList x noiseAzimuthVectorList)
    range: Lut
    azimuth: list[AzimuthBlock]

    def on_window(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Thermal noise power (DN^2 units) on a window: range LUT x azimuth LUT of the block each pixel is
        in."""
        out = self.range.on_window(rows, cols)
        for b in self.azimuth:
            rsel = (rows >= b.first_line) & (rows <= b.last_line)
            csel = (cols >= b.first_sample) & (cols <= b.last_sample)
            if rsel.any() and csel.any():
                factor = np.interp(rows[rsel], b.lines, b.values)
                out[np.ix_(rsel, csel)] *= factor[:, None]
        return out


@functools.lru_cache(maxsize=32)
def read_noise(uri: str) -> Noise:
    """The thermal-noise LUTs of one polarisation, either schema."""
    root = ET.fromstring(read_member(uri))
    if root.find("noiseRangeVectorList") is not None:
        rng = _vectors(root, "noiseRangeVector", "noiseRangeLut")
        blocks = []
        for v in root.iter("noiseAzimuthVector"):
            lines = _floats(v.find("line"))
            if not lines.size:
                continue
            blocks.append(
                AzimuthBlock(
                    int(_child_text(v, "firstAzimuthLine")),
                    int(_child_text(v, "lastAzimuthLine")),
                    int(_child_text(v, "firstRangeSample")),
                    int(_child_text(v, "lastRangeSample")),
                    lines,
                    _floats(v.find("noiseAzimuthLut")),
                )
            )
        schema = "ipf3"
    else:
        rng = _vectors(root, "noiseVector", "noiseLut")
        blocks, schema = [], "ipf2"
    if rng is None:
        raise SafeError(f"{uri} holds no noise vectors: not a Sentinel-1 noise annotation")
    return Noise(schema, rng, blocks)


@dataclass
class Radiometry:
    """How one band's digital numbers become backscatter: ``(DN^2 - noise) / A^2``, noise optional."""

    calibration: str  # sigma0 | beta0 | gamma0 | none
    lut: Lut | None
    noise: Noise | None
    floor: float  # linear value given to pixels that noise removal takes to zero or below

    @classmethod
    def for_band(cls, band: dict, calibration: str, noise_removal: bool, floor_db: float) -> Radiometry:
        """From a scene row's band record (``calibration`` and ``noise`` member uris, or None)."""
        if calibration != "none" and not band.get("calibration"):
            raise SafeError(
                f"{band['uri']}: no calibration annotation for {band['polarisation']}; "
                "set catalog.calibration=none to tile digital numbers"
            )
        lut = read_calibration(band["calibration"], calibration) if calibration != "none" else None
        noise = read_noise(band["noise"]) if noise_removal and band.get("noise") else None
        return cls(calibration, lut, noise, float(10 ** (floor_db / 10)))

    def intensity(self, dn: np.ndarray, row_off: int, col_off: int) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated linear intensity (float32) of a window of DN (NaN stays NaN), and where noise removal
        took valid pixels to zero or below (those get the floor). ``row_off``/``col_off``: where the window
        starts in the product."""
        rows = np.arange(row_off, row_off + dn.shape[0], dtype=np.float64)
        cols = np.arange(col_off, col_off + dn.shape[1], dtype=np.float64)
        power = dn.astype(np.float32) ** 2
        low = np.zeros(dn.shape, bool)
        if self.noise is not None:
            power -= self.noise.on_window(rows, cols).astype(np.float32)
            low = power <= 0  # NaN compares False: no-data stays no-data
        if self.lut is not None:
            a = self.lut.on_window(rows, cols).astype(np.float32)
            power /= a * a
        if self.noise is not None:
            power[low] = self.floor
        return power, low


def pixel_spacing(annotation_uri: str) -> tuple[float, float] | None:
    """The product's nominal (range, azimuth) pixel spacing in metres (10 m x 10 m for IW GRDH), or None."""
    root = ET.fromstring(read_member(annotation_uri))
    rng, az = root.findtext(".//rangePixelSpacing"), root.findtext(".//azimuthPixelSpacing")
    return (float(rng), float(az)) if rng and az else None


def geolocation_grid(annotation_uri: str) -> list[dict]:
    """The annotation's geolocation grid: ``{line, pixel, latitude, longitude, height}`` per point."""
    root = ET.fromstring(read_member(annotation_uri))
    return [
        {k: float(_child_text(p, k)) for k in ("line", "pixel", "latitude", "longitude", "height")}
        for p in root.iter("geolocationGridPoint")
    ]
