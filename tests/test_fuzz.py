"""Property tests (hypothesis): config overrides, label geometry -> tile pixels, scene footprints.

Each property says what must hold for *any* input: a valid result, or a clean rejection that names the
item and the reason, never another exception. VQA answer normalisation is fuzzed in test_metrics.py.
Example counts stay modest (60 each, no deadline) so the suite stays lean: about a minute on 2 cores.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from pyproj import CRS, Transformer
from shapely import STRtree
from shapely.geometry import Point, Polygon

from sarlang_ray.align import objects_in_tile, prepare_labels
from sarlang_ray.annotate import vocab
from sarlang_ray.catalog import inspect_scene, tile_crs_for
from sarlang_ray.config import AlignSection, CatalogSection, ConfigError, WorkflowConfig, load_config
from sarlang_ray.errors import ItemError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ config overrides
def _leaf_keys(node, prefix: str = "") -> list[str]:
    out = []
    for k in node:
        key = f"{prefix}{k}"
        if OmegaConf.is_dict(node[k]) and not key.endswith("landcover_classes"):
            out += _leaf_keys(node[k], key + ".")
        else:
            out.append(key)
    return out


KNOWN_KEYS = _leaf_keys(OmegaConf.structured(WorkflowConfig))
SECTIONS = sorted(
    {k.split(".")[0] for k in KNOWN_KEYS} | {k.rsplit(".", 1)[0] for k in KNOWN_KEYS if "." in k}
)
NAME = r"[a-z_][a-z0-9_]{0,10}"
keys = st.one_of(
    st.sampled_from(KNOWN_KEYS),  # a real key (with a value of any type below)
    st.sampled_from(SECTIONS),  # a whole section given a scalar
    st.from_regex(rf"{NAME}(\.{NAME}){{0,2}}", fullmatch=True),  # unknown keys, nested or not
    # list items addressed as keys
    st.builds(
        lambda k, i: f"{k}.{i}",
        st.sampled_from(["tile.gsds_m", "run.stages", "evaluate.prompts"]),
        st.integers(0, 3),
    ),
)
values = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "true",
            "false",
            "null",
            "~",
            "nan",
            "-inf",
            "[]",
            "{}",
            "[1, 'a']",
            "{a: 1}",
            "[",
            "{",
            "'",
            '"',
            "%",
            "&a",
            "*a",
            "!!python/object:os.system",
            "${}",
            "${oops}",
            "${run.seed}",
            "${oc.env:SARLANG_FUZZ_UNSET}",
            "${oc.decode:'[1'}",
            "- a",
            "a: b",
            ": ",
            "#",
        ]
    ),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
)


def _non_finite(obj, prefix: str = "") -> list[str]:
    """Keys of a typed config whose float values are NaN or infinite."""
    bad = []
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            bad += _non_finite(getattr(obj, f.name), f"{prefix}{f.name}.")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad += _non_finite(v, f"{prefix}{i}.")
    elif isinstance(obj, float) and not math.isfinite(obj):
        bad.append(prefix.rstrip("."))
    return bad


@FUZZ
@given(st.lists(st.tuples(keys, values), min_size=1, max_size=3))
def test_config_overrides_give_a_valid_config_or_a_config_error_naming_the_key(pairs):
    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        cfg = load_config(None, overrides)
    except ConfigError as exc:
        assert any(k in str(exc) for k, _ in pairs), f"{overrides}: the error names none of the keys: {exc}"
        return
    assert isinstance(cfg, WorkflowConfig)
    assert not _non_finite(cfg), f"{overrides} gave a config with non-finite numbers at {_non_finite(cfg)}"


@pytest.mark.parametrize(
    "override, key",
    [
        ("run.stages=[x", "run.stages"),  # unbalanced YAML flow sequence
        ("name='", "name"),  # unterminated quote
        ("tile=5", "tile"),  # a section given a scalar
        ("tile.gsds_m.0=2", "tile.gsds_m"),  # a list item addressed as a key
        ("export.train=nan", "export.train"),  # NaN passes every comparison: must be rejected by name
        ("evaluate=${run.seed}", "evaluate"),  # a section given an interpolation: fails only when resolved
        # a check of a section used in two places
        (
            "evaluate.vllm.concurrency=0",
            "evaluate.vllm.concurrency",
        ),
    ],
)
def test_config_edge_cases_found_by_fuzzing(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


# ------------------------------------------------------------------ places and CRSs
@st.composite
def sites(draw):
    """(tile CRS, lon, lat): UTM zones either side of the antimeridian, polar stereographic EPSG:3413 /
    3031 up to the poles, UPS beyond UTM's limits."""
    kind = draw(st.sampled_from(["utm", "utm_edge", "3413", "3031", "ups"]))
    if kind in ("utm", "utm_edge"):
        zone = draw(st.sampled_from([1, 60]) if kind == "utm_edge" else st.integers(1, 60))
        north = draw(st.booleans())
        lat = draw(st.floats(0.5, 83.5) if north else st.floats(-79.5, -0.5))
        if kind == "utm_edge":  # within a few km of lon 180, either side
            lon = 180 + draw(st.floats(-0.03, 0.03))
        else:
            lon = -183 + 6 * zone + draw(st.floats(-3.5, 3.5))
        lon = (lon + 180) % 360 - 180
        return CRS.from_epsg((32600 if north else 32700) + zone), lon, lat
    if kind == "3413":
        return CRS.from_epsg(3413), draw(st.floats(-180, 180)), draw(st.floats(60, 90))
    if kind == "3031":
        return CRS.from_epsg(3031), draw(st.floats(-180, 180)), draw(st.floats(-90, -60))
    north = draw(st.booleans())
    return (
        CRS.from_epsg(32661 if north else 32761),
        draw(st.floats(-180, 180)),
        draw(st.floats(84, 90) if north else st.floats(-90, -80)),
    )


GSDS = st.sampled_from([0.5, 1.0, 2.0, 5.0, 10.0])
SIZES = st.sampled_from([64, 128, 256])


def _grid(crs: CRS, lon: float, lat: float, gsd: float, size: int) -> Affine:
    """North-up tile transform centred on (lon, lat)."""
    x, y = Transformer.from_crs(4326, crs, always_xy=True).transform(lon, lat)
    half = size * gsd / 2
    return Affine(gsd, 0, x - half, 0, -gsd, y + half)


@st.composite
def star_polygons(draw, size: int):
    """A simple (star-shaped) polygon in pixel coordinates, around, across or beside the tile."""
    cx, cy = draw(st.floats(-0.25 * size, 1.25 * size)), draw(st.floats(-0.25 * size, 1.25 * size))
    n = draw(st.integers(3, 10))
    r = draw(st.floats(0.5, size))
    angles = sorted(
        draw(st.lists(st.floats(0, 2 * math.pi, exclude_max=True), min_size=n, max_size=n, unique=True))
    )
    radii = draw(st.lists(st.floats(0.3, 1.0), min_size=n, max_size=n))
    poly = Polygon([(cx + r * k * math.cos(a), cy + r * k * math.sin(a)) for a, k in zip(angles, radii)])
    assume(poly.is_valid and poly.area > 1e-3)
    return poly


@st.composite
def label_cases(draw):
    crs, lon, lat = draw(sites())
    gsd, size = draw(GSDS), draw(SIZES)
    polygon_px = draw(star_polygons(size))
    label_crs = draw(st.sampled_from(["tile", "4326", "3857", "neighbour"]))
    return crs, lon, lat, gsd, size, polygon_px, label_crs


def _label_crs(choice: str, tile_crs: CRS) -> CRS:
    if choice == "tile":
        return tile_crs
    if choice == "4326":
        return CRS.from_epsg(4326)
    if choice == "3857":
        return CRS.from_epsg(3857)
    code = tile_crs.to_epsg()  # the next UTM zone (wrapping 60 -> 1), or the other polar stereographic
    if 32601 <= code <= 32660 or 32701 <= code <= 32760:
        base = code - code % 100
        return CRS.from_epsg(base + code % 100 % 60 + 1)
    return CRS.from_epsg(3413 if code in (3031, 32761) else 3031)


AROUND_THE_CENTRE = Polygon([(10, 10), (120, 20), (100, 110), (20, 100)])  # of a 128 px tile


@FUZZ
@given(label_cases())
# crosses the antimeridian
@example((CRS.from_epsg(32660), 180.0, 60.0, 10.0, 128, AROUND_THE_CENTRE, "4326"))
# same, from UTM 60N labels
@example((CRS.from_epsg(32660), 180.0, 60.0, 10.0, 128, AROUND_THE_CENTRE, "tile"))
@example((CRS.from_epsg(3413), 0.0, 90.0, 10.0, 128, AROUND_THE_CENTRE, "4326"))  # around the North Pole
# South Pole, labels in 3413
@example((CRS.from_epsg(3031), 0.0, -90.0, 10.0, 128, AROUND_THE_CENTRE, "neighbour"))
def test_label_polygons_land_on_the_right_tile_pixels_or_are_rejected_with_a_reason(case):
    """Pixel polygon -> tile CRS -> label CRS -> (label file) -> prepare_labels (EPSG:4326) -> tile CRS ->
    objects_in_tile: the box comes back within 0.01 px, or the feature is in the errors table."""
    crs, lon, lat, gsd, size, polygon_px, label_choice = case
    transform = _grid(crs, lon, lat, gsd, size)
    assume(all(math.isfinite(v) for v in tuple(transform)[:6]))
    label_crs = _label_crs(label_choice, crs)
    xs, ys = zip(*(transform @ p for p in polygon_px.exterior.coords))
    lx, ly = Transformer.from_crs(crs, label_crs, always_xy=True).transform(xs, ys)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "labels.parquet")
        gpd.GeoDataFrame({"class": ["ship"]}, geometry=[Polygon(zip(lx, ly))], crs=label_crs).to_parquet(path)
        labels, errors, planned = prepare_labels([path], AlignSection(), tmp)
    assert planned == 1 and len(labels) + len(errors) == 1
    if errors:
        e = errors[0]
        assert e["item"] == f"{path}#feature=0" and e["error_class"] in (
            "bad_coordinates",
            "invalid_geometry",
        ), e
        assert path in e["message"]
        event(f"rejected: {e['error_class']}")
        return
    in_tile = labels.to_crs(crs)
    objects = objects_in_tile(in_tile, STRtree(in_tile.geometry.values), transform, size, 0.0)
    visible = polygon_px.intersection(Polygon([(0, 0), (size, 0), (size, size), (0, size)]))
    if visible.area < 1e-2:  # touching or a sliver of float noise: either answer is right
        event("outside the tile")
        return
    event(f"round trip via {label_choice}")
    assert len(objects) == 1, (objects, visible.bounds)
    got = np.array(objects[0]["bbox_xyxy"])
    # sandwiched between the box of the visible part grown by 0.01 px and that of its 0.01 px erosion: an edge
    # lying on the tile border (a vertex at y = -1e-134, say) may fall either side of it after reprojection
    outer = np.array(
        polygon_px.buffer(0.01).intersection(Polygon([(0, 0), (size, 0), (size, size), (0, size)])).bounds
    )
    assert (got[:2] >= outer[:2] - 0.01).all() and (got[2:] <= outer[2:] + 0.01).all(), (got, outer)
    inner = visible.buffer(-0.01)
    if not inner.is_empty:
        assert (got[:2] <= np.array(inner.bounds[:2]) + 1e-6).all() and (
            got[2:] >= np.array(inner.bounds[2:]) - 1e-6
        ).all()
    polygon = shapely.from_wkb(objects[0]["polygon"])
    assert polygon.symmetric_difference(visible).area <= 1e-3 + 1e-6 * visible.area
    assert objects[0]["area_px"] == pytest.approx(visible.area, rel=1e-4, abs=1e-3)
    assert 0 <= objects[0]["angle_deg"] < 180


# ------------------------------------------------------------------ scene footprints
def _crosses_antimeridian_or_pole(crs: CRS, transform: Affine, w: int, h: int) -> bool:
    """Independent truth: a pole inside the grid, or grid points on both sides of lon +-180."""
    to_crs = Transformer.from_crs(4326, crs, always_xy=True)
    inv = ~transform
    for pole in (90, -90):
        px, py = to_crs.transform(0, pole)
        if math.isfinite(px) and math.isfinite(py):
            c, r = inv @ (px, py)
            if -1 <= c <= w + 1 and -1 <= r <= h + 1:
                return True
    cols, rows = np.meshgrid(np.linspace(0, w, 33), np.linspace(0, h, 33))
    cols, rows = cols.ravel(), rows.ravel()
    xs, ys = (
        transform.a * cols + transform.b * rows + transform.c,
        transform.d * cols + transform.e * rows + transform.f,
    )
    lon, _ = Transformer.from_crs(crs, 4326, always_xy=True).transform(xs, ys)
    lon = np.asarray(lon)
    return bool((lon > 170).any() and (lon < -170).any())


@st.composite
def scene_grids(draw):
    if draw(st.integers(0, 4)) == 0:  # a geographic scene (EPSG:4326) anywhere, poles included
        lon, lat = draw(st.floats(-180, 180)), draw(st.floats(-89.9, 89.9))
        step = draw(st.sampled_from([1e-4, 1e-3, 1e-2]))
        crs, transform = CRS.from_epsg(4326), Affine(step, 0, lon, 0, -step, lat)
        w = h = draw(st.sampled_from([16, 64, 256]))
        assume(lat - h * step > -90)
        return crs, transform, w, h
    crs, lon, lat = draw(sites())
    gsd = draw(st.sampled_from([1.0, 10.0, 100.0, 1000.0]))
    w, h = draw(st.sampled_from([16, 64, 256])), draw(st.sampled_from([16, 64, 256]))
    return crs, _grid(crs, lon, lat, gsd, max(w, h)), w, h


@FUZZ
@given(scene_grids())
def test_scene_footprints_round_trip_or_are_rejected_as_bad_footprint(grid):
    """A real GeoTIFF per example through catalog.inspect_scene: either a scene row whose footprint maps
    back onto the pixel outline (and contains the scene centre), or bad_footprint for scenes that cross
    the antimeridian or contain a pole; never another error class, never an exception."""
    crs, transform, w, h = grid
    assume(all(math.isfinite(v) for v in tuple(transform)[:6]))
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "scene_sar.tif")
        data = np.random.default_rng(0).gamma(4.0, 0.25, (h, w)).astype("float32")
        with rasterio.open(
            path,
            "w",
            driver="GTiff",
            width=w,
            height=h,
            count=1,
            dtype="float32",
            crs=crs,
            transform=transform,
        ) as dst:
            dst.write(data, 1)
        try:
            scene = inspect_scene(path, CatalogSection(archive=tmp, optical_rule=None, landcover_rule=None))
        except ItemError as exc:
            assert exc.error_class == "bad_footprint" and path in str(exc), exc
            assert _crosses_antimeridian_or_pole(crs, transform, w, h), (
                f"rejected a scene that is fine: {exc}"
            )
            event("rejected: bad_footprint")
            return
    event(f"accepted: tiles in {scene['tile_crs']}" if crs.is_geographic else "accepted")
    footprint = shapely.from_wkb(scene["footprint"])
    assert footprint.is_valid and footprint.area > 0
    lon, lat = np.asarray(footprint.exterior.coords).T
    x, y = Transformer.from_crs(4326, crs, always_xy=True).transform(lon, lat)
    inv = ~transform
    x, y = np.asarray(x), np.asarray(y)
    cols, rows = inv.a * x + inv.b * y + inv.c, inv.d * x + inv.e * y + inv.f
    s = np.linspace(0, 1, 17)[:-1]
    want_c = np.concatenate([s * w, np.full_like(s, w), (1 - s) * w, np.zeros_like(s), [0]])
    want_r = np.concatenate([np.zeros_like(s), s * h, np.full_like(s, h), (1 - s) * h, [0]])
    np.testing.assert_allclose(cols, want_c, atol=1e-4)
    np.testing.assert_allclose(rows, want_r, atol=1e-4)
    clon, clat = Transformer.from_crs(crs, 4326, always_xy=True).transform(*(transform @ (w / 2, h / 2)))
    assert footprint.contains(Point(clon, clat)), "the footprint is the outside of the scene"
    tile_crs = CRS.from_user_input(scene["tile_crs"])
    assert tile_crs.is_projected and tile_crs.axis_info[0].unit_name == "metre"
    assert scene["tile_crs"] == tile_crs_for(rasterio.crs.CRS.from_wkt(crs.to_wkt()), footprint)


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=80), st.sampled_from(sorted({s for _, syns in vocab.CLASS_WORDS.values() for s in syns}))
)
# LATIN SMALL LONG S: matched "ship" under re.I but .lower() kept it (KeyError)
@example("a \u017fhip", "ship")
def test_class_mentions_in_any_text_never_raise_and_point_at_a_synonym(text, synonym):
    """QC's hallucination rule reads class mentions out of free LLM text: arbitrary Unicode must not crash
    it, every span must cover a synonym of the class it is filed under, and an inserted synonym is found."""
    found = vocab.mentioned_classes(f"{text} {synonym} {text}")
    assert vocab._SYNONYM_TO_CLASS[synonym.casefold()] in found
    for cls, spans in found.items():
        for start, end in spans:
            assert vocab._SYNONYM_TO_CLASS[f"{text} {synonym} {text}"[start:end].casefold()] == cls
