"""Bad input gets a clear error naming the item, the run goes on, and counts reconcile.

The gallery below is every class of bad input we know, each made here from real files (a synthetic
archive, real GeoTIFFs, hand-crafted TIFF headers), with the error class it must get and a word of the
advice its message must give. ``docs/reliability.md`` ("Inputs tried") is this gallery as rendered from
the run by ``test_the_gallery_in_docs_is_current``; ``SARLANG_UPDATE_DOCS=1`` rewrites it.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
import struct
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from affine import Affine
from conftest import REPO
from pyproj import Transformer
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from shapely.geometry import Point, Polygon, box

from sarlang_ray import pipeline
from sarlang_ray.config import ConfigError, SynthSection, load_config
from sarlang_ray.errors import ItemError
from sarlang_ray.synth import write_archive

DOC = REPO / "docs" / "reliability.md"

# (class of bad input, how it is made, file it is reported under, error_class, a word of the advice)
SCENES = [
    (
        "truncated GeoTIFF",
        "a real scene cut to its first third",
        "truncated_sar.tif",
        "unreadable",
        "re-download",
    ),
    ("not a TIFF inside", "TIFF magic bytes, then junk", "garbage_sar.tif", "unreadable", "corrupt"),
    ("no CRS", "a real scene written without CRS", "nocrs_sar.tif", "no_crs", "Georeference it"),
    (
        "too few GCPs",
        "georeferenced by 2 GCPs, no geotransform (a GCP-only file needs at least 3)",
        "gcps_sar.tif",
        "bad_gcps",
        "at least 3",
    ),
    (
        "all nodata",
        "a real scene with every pixel 0 (its nodata value)",
        "allnodata_sar.tif",
        "all_nodata",
        "nodata value",
    ),
    (
        "optical image as SAR",
        "the RGB optical twin copied into sar/",
        "rgb_given_as_sar.tif",
        "not_sar",
        "Move it",
    ),
    ("boolean mask as SAR", "a 1-bit (NBITS=1) raster", "mask_1bit_sar.tif", "not_sar", "Move it"),
    (
        "0/1 mask as SAR",
        "a uint8 water mask of 0 and 1 (as Sen1Floods11's) caught by a broad glob",
        "water_mask_sar.tif",
        "not_sar",
        "narrow catalog.sar_glob",
    ),
    ("complex SLC", "complex64 samples", "slc_complex_sar.tif", "complex_sar", "Detect it"),
    ("signed bytes", "int8 samples", "int8_sar.tif", "unsupported_dtype", "Convert it"),
    (
        "absurd size",
        "a 1 KB TIFF whose header claims 10^9 x 10^9 px",
        "huge_header_sar.tif",
        "too_large",
        "split it",
    ),
    (
        "giant block",
        "a header claiming 100000 x 1000 px in one deflated strip (381 MiB a block)",
        "giant_strip_sar.tif",
        "too_large",
        "Rewrite it tiled",
    ),
    ("zero size", "a header claiming 0 x 0 px", "zero_size_sar.tif", "unreadable", "remove it"),
    ("zero bands", "a header with SamplesPerPixel 0", "zero_bands_sar.tif", "unreadable", "remove it"),
    (
        "NaN geotransform",
        "ModelPixelScale (NaN, 10)",
        "nan_transform_sar.tif",
        "bad_transform",
        "Fix its georeferencing",
    ),
    (
        "zero-area footprint",
        "ModelTransformation with a pixel width of 0",
        "zero_pixel_sar.tif",
        "bad_transform",
        "Fix its georeferencing",
    ),
    (
        "across the antimeridian",
        "a UTM 60N scene centred on lon 180",
        "antimeridian_sar.tif",
        "bad_footprint",
        "Split it",
    ),
    (
        "around a pole",
        "an EPSG:3413 scene centred on the North Pole",
        "north_pole_sar.tif",
        "bad_footprint",
        "Split it",
    ),
]
TILES = [
    (
        "NaN and inf pixels",
        "a real scene, 70 % NaN and a block of inf",
        "naninf_sar.tif",
        "nodata",
        "raise the limit",
    ),
]
LABELS = [
    (
        "self-intersecting polygon",
        "a bow-tie polygon",
        "bad_geometries.parquet#feature=0",
        "invalid_geometry",
        "make_valid",
    ),
    ("empty geometry", "an empty polygon", "bad_geometries.parquet#feature=1", "empty_geometry", "Remove"),
    ("point label", "a point, not a polygon", "bad_geometries.parquet#feature=2", "not_polygon", "buffer"),
    ("no class", "a polygon with class None", "bad_geometries.parquet#feature=3", "no_class", "Fill it in"),
    ("labels without CRS", "GeoParquet written without a CRS", "no_crs.parquet", "no_crs", "set_crs"),
    (
        "no class column",
        "GeoParquet whose class column is called 'label'",
        "no_class_column.parquet",
        "no_class_column",
        "align.class_column",
    ),
    (
        "plain Parquet labels",
        "a pandas table with WKT strings, no GeoParquet metadata",
        "plain_table.parquet",
        "unreadable",
        "GeoParquet",
    ),
    (
        "labels in another CRS than declared",
        "UTM metres in a file that says EPSG:4326",
        "wrong_crs.parquet#feature=0",
        "bad_coordinates",
        "Check the file's CRS",
    ),
    (
        "label across the antimeridian",
        "a UTM 60N polygon across lon 180",
        "antimeridian_labels.parquet#feature=0",
        "bad_coordinates",
        "split polygons",
    ),
]


def _tiff(
    width: int,
    height: int,
    data: bytes = b"\0" * 64,
    *,
    bits: int = 32,
    sample_format: int = 3,
    samples: int = 1,
    compression: int = 1,
    pixel_scale: tuple | None = (10.0, 10.0, 0.0),
    model_transform: list | None = None,
) -> bytes:
    """A minimal little-endian GeoTIFF (UTM 31N) whose header says whatever we like: one strip holding
    ``data`` (usually far less than the header claims)."""
    short, long_, double = 3, 4, 12
    tags = {
        256: (long_, [width]),
        257: (long_, [height]),
        258: (short, [bits] * max(samples, 1)),
        259: (short, [compression]),
        262: (short, [1]),
        273: (long_, [0]),
        277: (short, [samples]),
        278: (long_, [max(height, 1)]),
        279: (long_, [len(data)]),
        339: (short, [sample_format] * max(samples, 1)),
        34735: (short, [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32631]),
    }
    if pixel_scale is not None:
        tags[33550] = (double, list(pixel_scale))
        tags[33922] = (double, [0, 0, 0, 500000.0, 5800000.0, 0])
    if model_transform is not None:
        tags[34264] = (double, model_transform)
    n = len(tags)
    extra_at = 8 + 2 + 12 * n + 4
    entries, extra = b"", b""
    for tag, (kind, values) in sorted(tags.items()):
        raw = struct.pack("<" + {short: "H", long_: "I", double: "d"}[kind] * len(values), *values)
        if len(raw) <= 4:
            entries += struct.pack("<HHI", tag, kind, len(values)) + raw.ljust(4, b"\0")
        else:
            entries += struct.pack("<HHII", tag, kind, len(values), extra_at + len(extra))
            extra += raw
    head = b"II*\0" + struct.pack("<IH", 8, n) + entries + b"\0\0\0\0" + extra
    strip_offset = 8 + 2 + 12 * sorted(tags).index(273) + 8
    head = head[:strip_offset] + struct.pack("<I", len(head)) + head[strip_offset + 4 :]
    return head + data


def _write(path: Path, data: np.ndarray, crs, transform, **kw) -> None:
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[1],
        height=data.shape[0],
        count=1,
        dtype=data.dtype,
        crs=crs,
        transform=transform,
        **kw,
    ) as dst:
        dst.write(data, 1)


def _make_bad_scenes(sar: Path, good: Path) -> None:
    with rasterio.open(good) as src:
        profile, data = src.profile, src.read(1)
    raw = good.read_bytes()  # truncated: header intact, most tiles missing
    (sar / "truncated_sar.tif").write_bytes(raw[: len(raw) // 3])
    (sar / "garbage_sar.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 8)  # TIFF magic, then junk
    p = dict(profile)
    p.pop("crs")
    with rasterio.open(sar / "nocrs_sar.tif", "w", **p) as dst:  # no CRS at all
        dst.write(data, 1)
    with rasterio.open(
        sar / "gcps_sar.tif", "w", driver="GTiff", width=32, height=32, count=1, dtype="float32"
    ) as dst:
        dst.gcps = (
            [GroundControlPoint(r, c, 4.1 + c / 3200, 51.9 - r / 3200) for r, c in ((0, 0), (32, 32))],
            CRS.from_epsg(4326),
        )
        dst.write(np.ones((32, 32), "float32"), 1)
    with rasterio.open(sar / "allnodata_sar.tif", "w", **profile) as dst:
        dst.write(np.zeros_like(data), 1)
    bad_pixels = data.copy()
    bad_pixels[:, :180] = np.nan  # most of the scene is NaN, some inf
    bad_pixels[200:, 200:] = np.inf
    with rasterio.open(sar / "naninf_sar.tif", "w", **profile) as dst:
        dst.write(bad_pixels, 1)
    shutil.copy(next((sar.parent / "optical").glob("*.tif")), sar / "rgb_given_as_sar.tif")

    utm = Affine(10, 0, 500000, 0, -10, 5800000)
    ones = np.ones((32, 32), "float32")
    _write(sar / "mask_1bit_sar.tif", ones.astype("uint8"), "EPSG:32631", utm, nbits=1)
    water = (np.add.outer(np.arange(32), np.arange(32)) < 24).astype("uint8")  # 0/1, no nodata declared
    _write(sar / "water_mask_sar.tif", water, "EPSG:32631", utm)
    _write(sar / "slc_complex_sar.tif", (ones + 1j * ones).astype("complex64"), "EPSG:32631", utm)
    _write(sar / "int8_sar.tif", ones.astype("int8"), "EPSG:32631", utm)
    (sar / "huge_header_sar.tif").write_bytes(_tiff(10**9, 10**9))
    (sar / "giant_strip_sar.tif").write_bytes(_tiff(100_000, 1000, compression=8))
    (sar / "zero_size_sar.tif").write_bytes(_tiff(0, 0, b""))
    (sar / "zero_bands_sar.tif").write_bytes(_tiff(4, 4, samples=0))
    (sar / "nan_transform_sar.tif").write_bytes(_tiff(4, 4, pixel_scale=(math.nan, 10.0, 0.0)))
    (sar / "zero_pixel_sar.tif").write_bytes(
        _tiff(
            4,
            4,
            pixel_scale=None,
            model_transform=[0.0, 0, 0, 500000, 0, -10, 0, 5800000, 0, 0, 0, 0, 0, 0, 0, 1],
        )
    )
    x, y = Transformer.from_crs(4326, 32660, always_xy=True).transform(180.0, 60.0)
    _write(sar / "antimeridian_sar.tif", ones, "EPSG:32660", Affine(100, 0, x - 1600, 0, -100, y + 1600))
    _write(sar / "north_pole_sar.tif", ones, "EPSG:3413", Affine(100, 0, -1600, 0, -100, 1600))


def _make_bad_labels(labels: Path) -> None:
    crs = gpd.read_parquet(next(labels.glob("*.parquet"))).crs
    bowtie = Polygon([(4.10, 51.93), (4.11, 51.94), (4.11, 51.93), (4.10, 51.94)])
    gpd.GeoDataFrame(
        {"class": ["ship", "car", "ship", None]},
        geometry=[bowtie, Polygon(), Point(4.1, 51.93), Point(4.1, 51.93).buffer(1e-4)],
        crs=crs,
    ).to_parquet(labels / "bad_geometries.parquet")
    square = Point(4.1, 51.93).buffer(1e-4)
    gpd.GeoDataFrame({"class": ["ship"]}, geometry=[square]).to_parquet(labels / "no_crs.parquet")
    gpd.GeoDataFrame({"label": ["ship"]}, geometry=[square], crs=4326).to_parquet(
        labels / "no_class_column.parquet"
    )
    pd.DataFrame({"class": ["ship"], "geometry": [square.wkt]}).to_parquet(labels / "plain_table.parquet")
    gpd.GeoDataFrame(
        {"class": ["ship"]},
        geometry=[box(594000, 5755000, 594050, 5755050)],  # UTM 31N metres
        crs=4326,
    ).to_parquet(labels / "wrong_crs.parquet")
    x, y = Transformer.from_crs(4326, 32660, always_xy=True).transform(180.0, 60.0)
    gpd.GeoDataFrame(
        {"class": ["ship"]}, geometry=[box(x - 500, y - 500, x + 500, y + 500)], crs=32660
    ).to_parquet(labels / "antimeridian_labels.parquet")


@pytest.fixture(scope="module")
def bad_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    archive = root / "archive"
    write_archive(SynthSection(out_dir=str(archive), scene_size_px=256), seed=3)
    _make_bad_scenes(archive / "sar", min((archive / "sar").glob("*.tif")))
    _make_bad_labels(archive / "labels")
    cfg = load_config(
        None,
        [
            f"run.run_dir={root / 'run'}",
            f"catalog.archive={archive}",
            "run.stages=[catalog,tile,align]",
            "ray.progress=false",
            "tile.tile_size=128",
        ],
    )
    summary = pipeline.run(cfg)
    errors = pipeline.read_errors(cfg.run.run_dir).to_pylist()
    return cfg, summary, errors


def _named(errors, name: str) -> list[dict]:
    """Error rows of one gallery file (scene or label file) or one feature of it."""
    if "#" in name or name.endswith((".parquet", ".tif")):
        return [e for e in errors if e["item"].endswith("/" + name)]
    return []


def _assert_rejected_once(errors, case, stage: str) -> None:
    """One error row for the gallery file, from ``stage``, with its class, its name and its advice."""
    _, _, name, error_class, advice = case
    found = _named(errors, name)
    assert len(found) == 1, found
    e = found[0]
    assert e["stage"] == stage and e["error_class"] == error_class, e
    assert name in e["message"] and advice in e["message"], e["message"]


@pytest.mark.parametrize("case", SCENES, ids=[c[2] for c in SCENES])
def test_bad_scene_is_rejected_at_catalog_with_reason(bad_run, case):
    _assert_rejected_once(bad_run[2], case, "catalog")


@pytest.mark.parametrize("case", LABELS, ids=[c[2] for c in LABELS])
def test_bad_labels_are_rejected_at_align_with_reason(bad_run, case):
    _assert_rejected_once(bad_run[2], case, "align")


def test_nan_and_inf_pixels_are_nodata_and_never_reach_a_png(bad_run):
    cfg, _, errors = bad_run
    scene = [s for s in pipeline.read_scenes(cfg.run.run_dir) if s["sar_uri"].endswith("naninf_sar.tif")]
    assert len(scene) == 1, "a scene with some NaN/inf pixels is still usable"
    sid = scene[0]["scene_id"]
    dropped = [e for e in errors if e["stage"] == "tile" and e["item"].startswith(sid)]
    assert dropped and all(e["error_class"] == "nodata" and "NaN" in e["message"] for e in dropped)
    kept = [t for t in pipeline.read_tiles(cfg.run.run_dir).to_pylist() if t["scene_id"] == sid]
    assert kept and all(np.isfinite(t["db_mean"]) and t["nodata_fraction"] <= 0.5 for t in kept)


def test_bad_label_features_and_files_are_rejected_the_rest_is_used(bad_run):
    _cfg, summary, errors = bad_run
    bowtie = next(e for e in errors if e["error_class"] == "invalid_geometry")
    assert "Self-intersection" in bowtie["message"] and "#feature=0" in bowtie["item"]
    labels = summary["stages"]["align"]["labels"]
    assert labels["planned"] == labels["written"] + labels["rejected"]
    assert labels["files_rejected"] == sum("#" not in c[2] for c in LABELS)
    assert summary["objects_per_class"], "the good labels were still aligned"


def test_the_run_goes_on_and_counts_reconcile(bad_run):
    cfg, summary, errors = bad_run
    stages = summary["stages"]
    assert stages["catalog"]["planned"] == 4 + len(TILES) + len(SCENES)
    assert stages["catalog"]["rejected"] == len(SCENES)
    for stage in ("catalog", "tile", "align"):
        c = stages[stage]
        assert c["planned"] == c["written"] + c["rejected"], stage
    assert stages["tile"]["rejected"] == sum(e["stage"] == "tile" for e in errors)
    n_tiles = pipeline.read_tiles(cfg.run.run_dir, columns=["tile_id"]).num_rows
    assert n_tiles == stages["align"]["written"] > 0


def test_repair_mode_keeps_fixable_polygons(tmp_path):
    from sarlang_ray.align import prepare_labels
    from sarlang_ray.config import AlignSection

    bowtie = Polygon([(0, 0), (1, 1), (1, 0), (0, 1)])
    path = tmp_path / "l.parquet"
    gpd.GeoDataFrame({"class": ["ship"]}, geometry=[bowtie], crs=4326).to_parquet(path)
    labels, errors, planned = prepare_labels([str(path)], AlignSection(invalid_geometry="repair"))
    assert planned == 1 and not errors and len(labels) == 1 and labels.geometry.iloc[0].is_valid


def test_unknown_config_key_is_a_clear_error():
    with pytest.raises(ConfigError, match="tile_szie"):
        load_config(None, ["tile.tile_szie=1"])


def test_a_polar_scene_in_lon_lat_is_tiled_in_ups(tmp_path):
    """UTM stops at 84 N / 80 S: a geographic scene beyond gets the UPS zone as its tile CRS."""
    from sarlang_ray.catalog import inspect_scene
    from sarlang_ray.config import CatalogSection, TileSection
    from sarlang_ray.tiling import grid_for

    for lat, ups in ((86.0, "EPSG:32661"), (-82.0, "EPSG:32761")):
        path = tmp_path / f"polar_{lat}_sar.tif"
        _write(path, np.ones((64, 256), "float32"), "EPSG:4326", Affine(1e-4, 0, 10.0, 0, -1e-4, lat))
        scene = inspect_scene(
            str(path), CatalogSection(archive=str(tmp_path), optical_rule=None, landcover_rule=None)
        )
        assert scene["tile_crs"] == ups
        grid = grid_for(scene, 5.0, TileSection(tile_size=64))
        assert grid.n_windows >= 1 and math.isfinite(grid.x0) and math.isfinite(grid.y0)


def test_a_lying_header_is_rejected_without_reading_pixels(tmp_path):
    """The size check comes from the header: no block is read, so nothing is allocated."""
    import subprocess
    import sys

    path = tmp_path / "huge_sar.tif"
    path.write_bytes(_tiff(10**9, 10**9))
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"  # 3 GiB of address space at most
        "from sarlang_ray.catalog import inspect_scene\nfrom sarlang_ray.config import CatalogSection\n"
        "from sarlang_ray.errors import ItemError\n"
        "try:\n    inspect_scene(sys.argv[1], CatalogSection(archive='/'))\n"
        "except ItemError as e:\n    print(e.error_class)\n"
        # VmHWM: the peak RSS of this program's own memory (getrusage's ru_maxrss also counts the forked copy
        # of the parent before exec, so it grows with the test session's size)
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "too_large" and int(out[1]) < 600 * 1024, out  # peak RSS under 600 MB (KiB on Linux)


# ------------------------------------------------------------------ the gallery, as docs/reliability.md shows
# it
def _outside_the_pipeline(tmp_path: Path) -> list[tuple[str, str, str, str]]:
    """(class, how it is made, error_class, message) for the bad inputs that never reach a stage."""
    from sarlang_ray.export import import_sarlang1m

    rows = []
    for cls, override in (
        ("unknown config key", "tile.tile_szie=1"),
        ("config value of the wrong type", "tile.tile_size=big"),
        ("config value that is not YAML", "run.stages=[catalog"),
        ("non-finite config number", "export.train=nan"),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(None, [override])
        rows.append((cls, f"override `{override}`", "ConfigError", str(info.value)))
    release = tmp_path / "release"
    (release / "vqa").mkdir(parents=True)
    turn = [{"role": "user", "content": "<image>How many ships?"}, {"role": "assistant", "content": "2"}]
    for cls, how, records in (
        (
            "release image path leaving the release",
            "`../../etc/passwd` as a VQA record's image",
            [{"messages": turn, "images": ["../../etc/passwd"]}],
        ),
        ("malformed release record", "a VQA record without messages", [{"images": ["SAR_images/t.png"]}]),
    ):
        (release / "vqa" / "vqa_train.json").write_text(json.dumps(records))
        with pytest.raises(ItemError) as info:
            import_sarlang1m(str(release))
        rows.append((cls, how, info.value.error_class, str(info.value).replace(str(tmp_path), "<tmp>")))
    zipped = tmp_path / "release.zip"
    zipped.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip
    with pytest.raises(ItemError) as info:
        import_sarlang1m(str(zipped))
    rows.append(
        (
            "release that is not a folder",
            "a .zip given as `sarlang import RELEASE`",
            info.value.error_class,
            str(info.value).replace(str(tmp_path), "<tmp>"),
        )
    )
    return rows


def gallery_rows(bad_run, tmp_path) -> list[tuple[str, str, str, str]]:
    cfg, _, errors = bad_run
    archive = cfg.catalog.archive
    rows = []
    for cls, how, name, error_class, _ in SCENES + LABELS:
        (e,) = _named(errors, name)
        rows.append((cls, how, e["error_class"], e["message"].replace(archive, "<archive>")))
    for cls, how, name, error_class, _ in TILES:
        e = min((e for e in errors if e["stage"] == "tile" and name in e["message"]), key=lambda e: e["item"])
        rows.append((cls, how, e["error_class"], e["message"].replace(archive, "<archive>")))
    return rows + _outside_the_pipeline(tmp_path)


def _table(rows) -> str:
    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    lines = ["| # | class of bad input | how it is made | error_class | message |", "|---|---|---|---|---|"]
    lines += [
        f"| {i} | {cell(c)} | {cell(h)} | `{cell(k)}` | {cell(m)} |" for i, (c, h, k, m) in enumerate(rows, 1)
    ]
    return "\n".join(lines)


def test_the_gallery_in_docs_is_current(bad_run, tmp_path):
    rows = gallery_rows(bad_run, tmp_path)
    assert len(rows) >= 15 and len({r[0] for r in rows}) == len(rows)
    table = _table(rows)
    text = DOC.read_text()
    i = text.index("<!-- gallery:start -->\n") + len("<!-- gallery:start -->\n")
    j = text.index("\n<!-- gallery:end -->")
    current = text[i:j]
    if os.environ.get("SARLANG_UPDATE_DOCS") == "1":
        DOC.write_text(text[:i] + table + text[j:])
        current = table
    assert current == table, (
        "docs/reliability.md's gallery is out of date; rewrite it with "
        "SARLANG_UPDATE_DOCS=1 pytest tests/test_bad_inputs.py -k gallery"
    )


def _code_error_classes() -> set[str]:
    """Every literal error_class in the package: ItemError("x", ...) and error_row(stage, item, "x", ...)."""
    found = set()
    for path in (REPO / "sarlang_ray").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                index = {"ItemError": 0, "error_row": 2}.get(name)
                if (
                    index is not None
                    and len(node.args) > index
                    and isinstance(node.args[index], ast.Constant)
                ):
                    found.add(node.args[index].value)
    return found


def test_every_error_class_in_the_code_is_documented_and_vice_versa():
    text = DOC.read_text()
    section = text[text.index("## Error classes") :]
    section = section[: section.index("\n## ", 1)]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE))
    code = _code_error_classes()
    assert len(code) >= 20, code
    assert documented == code, (
        f"in the code, not in docs/reliability.md: {sorted(code - documented)}; "
        f"in the doc, not in the code: {sorted(documented - code)}"
    )


def test_align_errors_are_classed_by_cause(demo_run, tmp_path, monkeypatch):
    """An all-nodata tile is `nodata`, an unreadable optical twin `unreadable` (the only one told to
    re-download), and a programming error `bug` with where it was raised; the other tiles are written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sarlang_ray import align

    cfg, _ = demo_run
    src = Path(cfg.run.run_dir)
    run = tmp_path / "run"
    shutil.copytree(src / "catalog", run / "catalog")
    shutil.copytree(src / "tile", run / "tile")
    scenes = pq.read_table(run / "catalog" / "scenes.parquet").to_pylist()
    scene = next(s for s in scenes if s["optical_uri"] and s["landcover_uri"])
    shard = min((run / "tile" / "shards" / scene["scene_id"]).glob("*.parquet"))
    name = str(shard.relative_to(run / "tile" / "shards"))
    tiles = pq.read_table(shard)
    empty = tiles["tile_id"][0].as_py()
    fractions = [1.0] + tiles["nodata_fraction"].to_pylist()[1:]
    pq.write_table(
        tiles.set_column(
            tiles.schema.get_field_index("nodata_fraction"),
            "nodata_fraction",
            pa.array(fractions, pa.float32()),
        ),
        shard,
    )

    def errors_of() -> dict[str, tuple[str, str]]:
        for d in ("shards", "errors"):
            shutil.rmtree(run / "align" / d, ignore_errors=True)
        done = align.AlignShard(cfg.align, str(run), None)({"shard": name})
        rows = pq.read_table(run / "align" / "errors" / name).to_pylist()
        assert done["planned"] == tiles.num_rows == done["written"] + done["rejected"] and done[
            "rejected"
        ] == len(rows)
        return {r["item"]: (r["error_class"], r["message"]) for r in rows}

    errors = errors_of()
    assert (
        list(errors) == [empty]
        and errors[empty][0] == "nodata"
        and "tile.max_nodata_fraction" in errors[empty][1]
    )

    # the optical twin truncated (a download cut short): every other tile of the scene is unreadable
    optical = Path(scene["optical_uri"])
    cut = tmp_path / optical.name
    cut.write_bytes(optical.read_bytes()[:2000])
    pq.write_table(
        pa.Table.from_pylist(
            [{**s, "optical_uri": str(cut) if s is scene else s["optical_uri"]} for s in scenes],
            schema=pq.read_schema(run / "catalog" / "scenes.parquet"),
        ),
        run / "catalog" / "scenes.parquet",
    )
    errors = errors_of()
    assert len(errors) == tiles.num_rows and errors.pop(empty)[0] == "nodata"
    assert {c for c, _ in errors.values()} == {"unreadable"}
    assert all("re-download" in m and str(cut) in m for _, m in errors.values())

    # a programming error (planted: the land-cover step raises) is a bug, with where, and no re-download
    # advice
    pq.write_table(
        pa.Table.from_pylist(scenes, schema=pq.read_schema(run / "catalog" / "scenes.parquet")),
        run / "catalog" / "scenes.parquet",
    )

    def broken(lc, classes):
        return min(classes.items())[1] + 1  # str + int: TypeError

    monkeypatch.setattr(align, "landcover_fractions", broken)
    errors = errors_of()
    assert errors.pop(empty)[0] == "nodata" and {c for c, _ in errors.values()} == {"bug"}
    for _, message in errors.values():
        assert "raised TypeError" in message
        assert "in broken" in message and "in align_tile" in message and "re-download" not in message
