"""The embedded sample archive: small, realistic SAR scenes with optical twins, land cover and labels.

``sarlang synth`` writes, from a fixed seed and in seconds::

    archive/
      sar/<scene>_sar.tif              float32 linear intensity, tiled + deflate, nodata=0 borders
      optical/<scene>_optical.tif      uint8 RGB on the same grid (the co-registered optical twin)
      landcover/<scene>_landcover.tif  uint8 classes (1 water, 2 built-up, 3 vegetation, 4 bare, 5 road)
      labels/<city>.parquet            GeoParquet polygons in EPSG:4326 with a ``class`` column
      optical/collection.json          a STAC collection of the optical scenes (footprint, datetime,
                                       eo:cloud_cover), for finding twins by search (catalog.optical)

Scene k (in scene_specs order) is acquired at ``FIRST_ACQUISITION + k * ACQUISITION_STEP`` (tag
``ACQUISITION_DATETIME`` of the SAR file) and its optical twin ``k + 1`` hours later with ``5 * k`` %
cloud cover, so a search ranks each scene's own twin first (the optical scenes of the other scenes of its
city are at least ``ACQUISITION_STEP`` away, or cover too little of it).

Two cities in different UTM zones share one procedural layout generator (sea, river, port with piers
and ships, tank farm, city blocks with buildings and streets, bridges, parked cars, an airport with
aircraft). Each scene renders a window of a city at its own GSD (0.5 m to 10 m).

The SAR rendering is a simple physical caricature, enough for the pipeline to be tested on imagery that
*looks* like SAR: per-material backscatter (sigma0) averaged in intensity over 2x2 sub-pixels, radar
shadow behind buildings and tanks (illumination from the west), a bright double-bounce line at the
walls facing the sensor, bright ships on dark water, then multiplicative gamma speckle with a
configurable number of looks.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import geopandas as gpd
import numpy as np
import rasterio
from rasterio.features import rasterize
from rasterio.transform import from_origin
from shapely import STRtree, affinity
from shapely.geometry import LineString, Point, Polygon, box
from shapely.ops import unary_union

from sarlang_ray.config import SynthSection

FIRST_ACQUISITION = dt.datetime(2024, 6, 1, 10, 0, tzinfo=dt.timezone.utc)
ACQUISITION_STEP = dt.timedelta(days=7)
LABEL_CLASSES = ("ship", "aircraft", "car", "storage tank", "bridge", "harbour", "building", "road")
LANDCOVER = {1: "water", 2: "built-up", 3: "vegetation", 4: "bare soil", 5: "road"}
WATER, BUILT, VEG, BARE, ROAD = 1, 2, 3, 4, 5
INCIDENCE_DEG = 35.0  # radar incidence angle: sets the shadow length behind tall objects
DIHEDRAL_SIGMA0 = 8.0  # wall-ground double bounce, per metre of strip width


@dataclass(frozen=True)
class City:
    name: str
    lon: float
    lat: float
    epsg: int  # UTM zone of the city
    grid_angle_deg: float  # orientation of the street grid


@dataclass(frozen=True)
class SceneSpec:
    city: str
    gsd_m: float
    centre_xy: tuple[float, float]  # metres from the city centre (east, north)


CITIES = (
    City("rotterdam", 4.10, 51.93, 32631, 0.0),
    City("shanghai", 121.60, 31.30, 32651, 12.0),
)
BASE_SCENES = (
    SceneSpec("rotterdam", 0.5, (-950.0, -760.0)),  # port: piers, moored ships, tanks, parked cars
    SceneSpec("rotterdam", 5.0, (0.0, 0.0)),  # the whole city
    SceneSpec("shanghai", 1.0, (-2250.0, 1450.0)),  # airport apron with aircraft
    SceneSpec("shanghai", 10.0, (0.0, -500.0)),  # city and open sea
)


@dataclass
class Feature:
    geom: Polygon
    cls: str | None  # label class (None: background, not labelled)
    sigma0: float  # radar backscatter, linear intensity
    rgb: tuple[int, int, int]
    landcover: int
    height_m: float = 0.0  # > 0: casts radar shadow and has a double-bounce wall


@overload
def _shore_y(x: float) -> float: ...
@overload
def _shore_y(x: np.ndarray) -> np.ndarray: ...
def _shore_y(x: float | np.ndarray) -> float | np.ndarray:
    return -800.0 + 120.0 * np.sin(np.asarray(x) / 700.0)


@overload
def _river_x(y: float) -> float: ...
@overload
def _river_x(y: np.ndarray) -> np.ndarray: ...
def _river_x(y: float | np.ndarray) -> float | np.ndarray:
    return 420.0 + 100.0 * np.sin(np.asarray(y) / 500.0)


def _rgb(values: np.ndarray | list[int]) -> tuple[int, int, int]:
    """Three colour components as Python ints (a feature's ``rgb``)."""
    r, g, b = (int(v) for v in values)
    return r, g, b


def _rect(cx: float, cy: float, length: float, width: float, angle_deg: float) -> Polygon:
    poly = box(cx - length / 2, cy - width / 2, cx + length / 2, cy + width / 2)
    return affinity.rotate(poly, angle_deg, origin=(cx, cy))


def _aircraft(cx: float, cy: float, span: float, heading_deg: float) -> Polygon:
    fuselage = box(cx - span * 0.5, cy - span * 0.06, cx + span * 0.5, cy + span * 0.06)
    wings = box(cx - span * 0.08, cy - span * 0.5, cx + span * 0.1, cy + span * 0.5)
    tail = box(cx - span * 0.5, cy - span * 0.18, cx - span * 0.4, cy + span * 0.18)
    return affinity.rotate(unary_union([fuselage, wings, tail]), heading_deg, origin=(cx, cy))


def city_layout(city: City, rng: np.random.Generator) -> list[Feature]:
    """Procedural city in local metres (origin at the city centre, x east, y north), back to front."""
    half = 7000.0
    xs = np.linspace(-half, half, 200)
    sea = Polygon([(-half, -half), *zip(xs, _shore_y(xs)), (half, -half)])
    ys = np.linspace(float(_shore_y(420.0)) - 5, half, 200)
    river = Polygon([*zip(_river_x(ys) - 80, ys), *zip((_river_x(ys) + 80)[::-1], ys[::-1])])
    land = box(-half, -half, half, half)
    feats: list[Feature] = [Feature(land, None, 0.06, (88, 118, 64), VEG)]
    for _ in range(25):  # bare-soil fields
        cx, cy = rng.uniform(-half, half, 2)
        length, width = rng.uniform(150, 500, 2)
        feats.append(
            Feature(_rect(cx, cy, length, width, rng.uniform(0, 90)), None, 0.025, (150, 128, 96), BARE)
        )
    built_zone = box(-1600, float(_shore_y(-1600)) - 10, 2600, 2900)
    feats.append(Feature(built_zone, None, 0.09, (128, 124, 118), BUILT))
    airport = box(-2900, 400, -1700, 2600)
    feats.append(Feature(airport, None, 0.03, (140, 140, 132), BUILT))
    feats.append(Feature(box(-2650, 500, -2590, 2500), None, 0.004, (60, 60, 62), BARE))  # runway (smooth)
    feats.append(Feature(sea, None, 0.0025, (28, 58, 104), WATER))
    feats.append(Feature(river, None, 0.0025, (34, 66, 110), WATER))

    # port: one harbour polygon (quay strip + piers), moored ships between piers, anchored ships offshore
    quay = box(-1500, float(_shore_y(-1500)) - 40, -350, float(_shore_y(-1500)) + 60)
    piers = [
        box(px - 30, float(_shore_y(px)) - 340, px + 30, float(_shore_y(px)) + 20)
        for px in (-1380, -1080, -780, -480)
    ]
    harbour = unary_union([quay, *piers])
    feats.append(Feature(harbour, "harbour", 0.12, (170, 168, 160), BUILT))
    for px in (-1380, -1080, -780, -480):
        for side in (-1, 1):
            if rng.random() < 0.85:
                length = rng.uniform(80, 200)
                cy = float(_shore_y(px)) - 60 - length / 2 - rng.uniform(0, 60)
                feats.append(
                    Feature(
                        _rect(px + side * 52, cy, length, length / 6.5, 90), "ship", 4.0, (200, 60, 50), WATER
                    )
                )
    for _ in range(14):
        x = rng.uniform(-3000, 3000)
        y = float(_shore_y(x)) - rng.uniform(500, 3000)
        length = rng.uniform(40, 260)
        feats.append(
            Feature(
                _rect(x, y, length, length / 6.0, rng.uniform(0, 180)), "ship", 5.0, (230, 230, 225), WATER
            )
        )

    # tank farm behind the quay
    y0 = float(_shore_y(-1400)) + 130
    for i in range(6):
        for j in range(3):
            r = rng.uniform(10, 24)
            c = Point(-1460 + i * 70, y0 + j * 70).buffer(r, 32)
            feats.append(
                Feature(c, "storage tank", 0.25, (235, 235, 230), BUILT, height_m=rng.uniform(10, 20))
            )

    # parking lot next to the port with parked cars
    lot_x, lot_y = -760.0, float(_shore_y(-760)) + 120
    feats.append(
        Feature(box(lot_x - 70, lot_y - 40, lot_x + 70, lot_y + 40), None, 0.006, (70, 70, 72), ROAD)
    )
    for i in range(24):
        for j in range(3):
            if rng.random() < 0.7:
                col = _rgb(rng.integers(20, 235, 3))
                car = _rect(lot_x - 64 + i * 5.6, lot_y - 28 + j * 26, 4.6, 1.9, 90 + rng.normal(0, 3))
                feats.append(Feature(car, "car", 0.9, col, ROAD))

    # city blocks on a (rotated) street grid: roads as segments between intersections, buildings inside
    rot, origin = city.grid_angle_deg, (0.0, 0.0)
    spacing, road_w = 150.0, 16.0
    roads, blocks = [], []
    for gx in np.arange(-1500, 2600, spacing):
        for gy in np.arange(-500, 2900, spacing):
            for seg, crosses_river in (
                (LineString([(gx, gy), (gx + spacing, gy)]), True),
                (LineString([(gx, gy), (gx, gy + spacing)]), False),
            ):
                roads.append(
                    (
                        affinity.rotate(seg.buffer(road_w / 2, cap_style="flat"), rot, origin=origin),
                        crosses_river,
                    )
                )
            blocks.append((gx + spacing / 2, gy + spacing / 2))
    water = unary_union([sea, river])
    for road, crosses_river in roads:
        centre = road.centroid
        if not built_zone.contains(centre):
            continue
        if water.intersects(road):
            # a street meeting the river becomes a bridge over it (clipped to the water plus abutments)
            crossing = road.intersection(river.buffer(25))
            if crosses_river and crossing.area > 2000 and river.contains(crossing.centroid):
                feats.append(Feature(crossing, "bridge", 0.6, (150, 150, 150), ROAD, height_m=8.0))
            continue
        feats.append(Feature(road, "road", 0.008, (58, 58, 60), ROAD))
        if rng.random() < 0.12:  # parked cars along this segment
            (x0, y0_), (x1, y1) = road.exterior.coords[0], road.exterior.coords[2]
            angle = math.degrees(math.atan2(y1 - y0_, x1 - x0)) % 180
            line = LineString([road.exterior.coords[0], road.exterior.coords[1]])
            long_side = max(line.length, 1)
            if long_side < 30:
                line = LineString([road.exterior.coords[1], road.exterior.coords[2]])
            n = int(line.length // 7)
            for k in range(1, n - 1):
                p = line.interpolate(k * 7.0)
                col = _rgb(rng.integers(20, 235, 3))
                feats.append(
                    Feature(_rect(p.x, p.y, 4.6, 1.9, angle + rng.normal(0, 2)), "car", 0.9, col, ROAD)
                )
    for bx, by in blocks:
        c = affinity.rotate(Point(bx, by), rot, origin=origin)
        if not built_zone.contains(c) or water.buffer(60).contains(c) or water.intersects(c.buffer(75)):
            continue
        n = int(rng.integers(1, 4))
        for k in range(n):
            w, h = rng.uniform(18, 55), rng.uniform(18, 55)
            ox = (k - (n - 1) / 2) * 40
            b = _rect(
                c.x + ox * math.cos(math.radians(rot)), c.y + ox * math.sin(math.radians(rot)), w, h, rot
            )
            roof = _rgb(rng.choice([[150, 70, 60], [120, 120, 125], [200, 195, 185], [90, 80, 75]]))
            feats.append(Feature(b, "building", 0.14, roof, BUILT, height_m=rng.uniform(6, 60)))

    # airport apron with rows of parked aircraft
    for row in range(3):
        for k in range(8):
            span = rng.uniform(28, 64)
            feats.append(
                Feature(
                    _aircraft(
                        -2450 + row * 230, 900 + k * 150 + rng.normal(0, 8), span, 180 + rng.normal(0, 4)
                    ),
                    "aircraft",
                    1.6,
                    (236, 238, 240),
                    BUILT,
                )
            )
    return _drop_overlapping_labels(feats)


def _drop_overlapping_labels(feats: list[Feature]) -> list[Feature]:
    """Labelled objects must not hide each other (the label would lie): keep the first of overlaps."""
    # compact objects may not overlap anything labelled; streets may meet streets and bridges
    labelled = [i for i, f in enumerate(feats) if f.cls is not None and f.cls != "harbour"]
    linear = {"road", "bridge"}
    tree = STRtree([feats[i].geom for i in labelled])
    left, right = tree.query([feats[i].geom for i in labelled], predicate="intersects")
    dropped: set[int] = set()
    for a, b in sorted(zip(left.tolist(), right.tolist())):
        both_linear = feats[labelled[a]].cls in linear and feats[labelled[b]].cls in linear
        if a < b and a not in dropped and not both_linear:
            dropped.add(b)
    drop_idx = {labelled[k] for k in dropped}
    return [f for i, f in enumerate(feats) if i not in drop_idx]


def _sar_layers(feats: list[Feature]) -> tuple[list[tuple[Polygon, float]], list[LineString]]:
    """Geometry and sigma0 in drawing order with radar shadows added; and the double-bounce walls.

    Illumination comes from the west (sensor at -x): the shadow falls east of tall objects, and the walls
    whose outward normal points west form a dihedral with the ground (a bright line).
    """
    shadow_len = math.tan(math.radians(INCIDENCE_DEG))
    base, shadows, tall, bounces = [], [], [], []
    for f in feats:
        if f.height_m <= 0:
            base.append((f.geom, f.sigma0))
            continue
        shift = f.height_m * shadow_len
        shadows.append((unary_union([f.geom, affinity.translate(f.geom, xoff=shift)]).convex_hull, 0.0008))
        tall.append((f.geom, f.sigma0))
        ring = list(f.geom.exterior.coords)
        for (x0, y0), (x1, y1) in itertools.pairwise(ring):
            # exterior rings from shapely are CCW after orient; outward normal of edge (dx,dy) is (dy,-dx)
            dx, dy = x1 - x0, y1 - y0
            nx = dy if f.geom.exterior.is_ccw else -dy
            if nx < -0.3 * math.hypot(dx, dy):
                bounces.append(LineString([(x0, y0), (x1, y1)]))
    return base + shadows + tall, bounces


def _render(
    layers: Sequence[tuple[Polygon, object]], shape: tuple[int, int], transform, fill, dtype
) -> np.ndarray:
    """Rasterise (geometry, value-index) in order; later shapes overwrite earlier ones."""
    return rasterize(
        ((g, i) for i, (g, _) in enumerate(layers)),
        out_shape=shape,
        transform=transform,
        fill=fill,
        dtype=dtype,
    )


def render_scene(feats: list[Feature], transform, size: int, looks: float, rng: np.random.Generator):
    """SAR intensity, optical RGB and land cover for one scene window (feature coords in scene CRS)."""
    sub = 2  # sub-pixels per pixel side: objects smaller than a pixel still add their energy
    fine_t = transform @ transform.scale(1 / sub, 1 / sub)
    fine_shape = (size * sub, size * sub)
    window = box(*rasterio.transform.array_bounds(size, size, transform)[::-1][::-1])
    left, bottom, right, top = rasterio.transform.array_bounds(size, size, transform)
    window = box(left, bottom, right, top).buffer(200)
    visible = [f for f in feats if f.geom.intersects(window)]

    sar_layers, walls = _sar_layers(visible)
    idx = _render(sar_layers, fine_shape, fine_t, 0, "int32")
    sigma = np.array([s for _, s in sar_layers], dtype=np.float32)[idx]
    if walls:
        # a dihedral returns DIHEDRAL_SIGMA0 over a ~1 m wide strip: spread that energy over the sub-pixel
        sub_px = abs(fine_t.a)
        line = rasterize(
            walls, out_shape=fine_shape, transform=fine_t, all_touched=True, dtype="uint8"
        ).astype(bool)
        sigma[line] = np.maximum(sigma[line], DIHEDRAL_SIGMA0 * min(1.0, 1.0 / sub_px))
    sigma = sigma.reshape(size, sub, size, sub).mean(axis=(1, 3))
    speckle = rng.gamma(shape=looks, scale=1.0 / looks, size=sigma.shape).astype(np.float32)
    sar = sigma * speckle

    opt_layers = [(f.geom, f.rgb) for f in visible]
    idx = _render(opt_layers, fine_shape, fine_t, 0, "int32")
    rgb = np.array([c for _, c in opt_layers], dtype=np.float32)[idx]
    rgb = rgb.reshape(size, sub, size, sub, 3).mean(axis=(1, 3))
    rgb = np.clip(rgb + rng.normal(0, 4, rgb.shape), 0, 255).astype(np.uint8).transpose(2, 0, 1)

    lc_layers = [(f.geom, f.landcover) for f in visible]
    idx = _render(lc_layers, (size, size), transform, 0, "int32")
    landcover = np.array([c for _, c in lc_layers], dtype=np.uint8)[idx]
    return sar, rgb, landcover


def _nodata_border(size: int, rng: np.random.Generator) -> np.ndarray:
    """A slanted swath edge: True where the scene has no data (like the border of a real product)."""
    rows, cols = np.mgrid[0:size, 0:size]
    slope = rng.uniform(0.1, 0.3)
    width = rng.uniform(0.03, 0.08) * size
    return cols < width + slope * (size - rows) * 0.3


def scene_specs(scale: int) -> list[tuple[str, SceneSpec]]:
    """Scene ids and specs; copies beyond the first shift each window so every scene is distinct."""
    out = []
    for copy in range(scale):
        for spec in BASE_SCENES:
            dx, dy = (copy * 310.0, copy * -170.0) if copy else (0.0, 0.0)
            shifted = SceneSpec(spec.city, spec.gsd_m, (spec.centre_xy[0] + dx, spec.centre_xy[1] + dy))
            gsd = f"{spec.gsd_m:g}".replace(".", "p")
            out.append((f"{spec.city}_{gsd}m_{copy:02d}", shifted))
    return out


def write_archive(cfg: SynthSection, seed: int = 0) -> dict:
    """Write the sample archive to ``cfg.out_dir`` (local). Returns counts for the summary."""
    out = cfg.out_dir
    for sub in ("sar", "optical", "landcover", "labels"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    cities = {c.name: c for c in CITIES}
    layouts: dict[str, list[Feature]] = {}
    layouts_utm: dict[str, list[Feature]] = {}
    for i, city in enumerate(CITIES):
        layouts[city.name] = city_layout(city, np.random.default_rng([seed, i]))
        centre = gpd.GeoSeries.from_xy([city.lon], [city.lat], crs=4326).to_crs(city.epsg)[0]
        labelled = [f for f in layouts[city.name] if f.cls is not None]
        layouts_utm[city.name] = [
            Feature(
                affinity.translate(f.geom, centre.x, centre.y),
                f.cls,
                f.sigma0,
                f.rgb,
                f.landcover,
                f.height_m,
            )
            for f in layouts[city.name]
        ]
        gdf = gpd.GeoDataFrame(
            {
                "class": [f.cls for f in labelled],
                "city": city.name,
                "object_id": [f"{city.name}-{k:05d}" for k in range(len(labelled))],
            },
            geometry=[f.geom for f in layouts_utm[city.name] if f.cls is not None],
            crs=city.epsg,
        ).to_crs(4326)
        gdf.to_parquet(os.path.join(out, "labels", f"{city.name}.parquet"), write_covering_bbox=True)

    n_scenes = 0
    for k, (scene_id, spec) in enumerate(scene_specs(cfg.scale)):
        city = cities[spec.city]
        centre = gpd.GeoSeries.from_xy([city.lon], [city.lat], crs=4326).to_crs(city.epsg)[0]
        size = cfg.scene_size_px
        half = size * spec.gsd_m / 2
        # snap the origin to the pixel grid of the scene's GSD (as real products are)
        left = round((centre.x + spec.centre_xy[0] - half) / spec.gsd_m) * spec.gsd_m
        top = round((centre.y + spec.centre_xy[1] + half) / spec.gsd_m) * spec.gsd_m
        transform = from_origin(left, top, spec.gsd_m, spec.gsd_m)
        feats = layouts_utm[city.name]
        rng = np.random.default_rng([seed, 1000 + k])
        sar, rgb, landcover = render_scene(feats, transform, size, cfg.looks, rng)
        nodata = _nodata_border(size, rng)
        sar[nodata] = 0.0
        rgb[:, nodata] = 0
        landcover[nodata] = 0
        common = {
            "driver": "GTiff",
            "width": size,
            "height": size,
            "crs": f"EPSG:{city.epsg}",
            "transform": transform,
            "tiled": True,
            "blockxsize": 256,
            "blockysize": 256,
            "compress": "deflate",
        }
        with rasterio.open(
            os.path.join(out, "sar", f"{scene_id}_sar.tif"),
            "w",
            count=1,
            dtype="float32",
            nodata=0.0,
            predictor=3,
            **common,
        ) as dst:
            dst.write(sar, 1)
            acquired = FIRST_ACQUISITION + k * ACQUISITION_STEP
            dst.update_tags(
                SENSOR="sarlang-synthetic X-band",
                POLARISATION="VV",
                UNITS="intensity",
                REGION=city.name,
                ACQUISITION_DATETIME=acquired.strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
            dst.set_band_description(1, "VV")
        with rasterio.open(
            os.path.join(out, "optical", f"{scene_id}_optical.tif"),
            "w",
            count=3,
            dtype="uint8",
            nodata=0,
            photometric="RGB",
            **common,
        ) as dst:
            dst.write(rgb)
        with rasterio.open(
            os.path.join(out, "landcover", f"{scene_id}_landcover.tif"),
            "w",
            count=1,
            dtype="uint8",
            nodata=0,
            **common,
        ) as dst:
            dst.write(landcover, 1)
            dst.update_tags(CLASSES=",".join(f"{v}={n}" for v, n in LANDCOVER.items()))
        n_scenes += 1
    write_optical_collection(out, scene_specs(cfg.scale))
    return {
        "scenes": n_scenes,
        "cities": len(CITIES),
        "labels": {c: sum(f.cls is not None for f in layouts[c]) for c in layouts},
    }


def write_optical_collection(out: str, specs: list[tuple[str, SceneSpec]]) -> str:
    """``optical/collection.json``: a self-contained STAC collection with one item per optical scene
    (geometry: the raster's outline; datetime: the SAR scene's + k + 1 hours; ``eo:cloud_cover`` 5 * k %;
    asset ``visual``, a relative href). Returns its path."""
    import pystac

    from sarlang_ray.catalog import footprint_4326

    items, boxes, times = [], [], []
    for k, (scene_id, _spec) in enumerate(specs):
        path = os.path.join(out, "optical", f"{scene_id}_optical.tif")
        with rasterio.open(path) as src:
            footprint = footprint_4326(src)
        when = FIRST_ACQUISITION + k * ACQUISITION_STEP + dt.timedelta(hours=k + 1)
        item = pystac.Item(
            f"{scene_id}_optical",
            footprint.__geo_interface__,
            list(footprint.bounds),
            when,
            {"eo:cloud_cover": 5.0 * k, "platform": "sarlang-synthetic optical"},
        )
        item.add_asset(
            "visual",
            pystac.Asset(os.path.abspath(path), media_type=pystac.MediaType.GEOTIFF, roles=["visual"]),
        )
        items.append(item)
        boxes.append(footprint.bounds)  # the item's bbox
        times.append(when)  # its datetime
    bounds = [
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    ]
    collection = pystac.Collection(
        "sarlang-synthetic-optical",
        "Optical scenes of the synthetic archive (the SAR scenes' twins)",
        pystac.Extent(pystac.SpatialExtent([bounds]), pystac.TemporalExtent([[min(times), max(times)]])),
    )
    for item in items:
        collection.add_item(item)
    root = os.path.join(out, "optical")
    collection.normalize_hrefs(os.path.abspath(root))
    collection.make_all_asset_hrefs_relative()
    collection.save(pystac.CatalogType.SELF_CONTAINED)
    return os.path.join(root, "collection.json")
