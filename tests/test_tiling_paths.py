"""The fast paths of the tile stage against the general ones, on real SAR files:

* the compiled refined Lee filter equals the original implementation (tests/reference_filters.py);
* a tile filtered on its own (read with a halo) equals the scene filtered whole: no seams;
* a native-resolution tile read straight from the file equals the warped one, byte for byte (SAR in tile,
  the optical twin in align);
* a coarse level of a COG with overviews decodes about as many pixels as it writes, and agrees with the
  full-resolution average."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import reference_filters
from affine import Affine
from rasterio.enums import Resampling

from sarlang_ray import sar
from sarlang_ray.config import load_config
from sarlang_ray.tiling import TileChunk, grid_for, pixel_window, read_window, warp_window

# The tolerance the compiled filter is held to against the reference: the same sums up to float rounding
# (1e-6 relative), except at pixels where two axes' gradients tie within rounding and the reference's
# running sums break the tie the other way: at most 0.1 % of pixels (quantised 8-bit Umbra data has the
# most ties: 0.04 %; pyroSAR and OPERA have none).
FILTER_RTOL, MAX_TIED_SHARE = 1e-6, 1e-3
REAL = {  # file (relative to ../shared/data/real_sar) -> units
    "pyrosar_s1_grd_geocoded/S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif": "db",
    "umbra_gec_mount_yasur/umbra_mount_yasur.tiff": "amplitude",
    (
        "opera_rtc_s1_t137_crops/2021-11-19/"
        "OPERA_L2_RTC-S1_T137-292318-IW1_20211119T015854Z_20250830T120333Z_S1A_30_v1.0_VV.tif"
    ): "intensity",
    "sen1floods11_spain_7370579/Spain_7370579_S1Hand.tif": "db",
}


def _intensity(path, units, size=None):
    with rasterio.open(path) as src:
        block = src.read(1, masked=True)
    x = sar.to_intensity(block.astype(np.float32).filled(np.nan), units)
    return x if size is None else x[:size, :size]


@pytest.mark.parametrize("name", sorted(REAL))
@pytest.mark.parametrize("window", [3, 7])
def test_the_compiled_refined_lee_equals_the_reference_on_real_tiles(real_sar, name, window):
    x = _intensity(real_sar / name, REAL[name], size=300)
    ours = sar.refined_lee_filter(x, window, looks=4.0)
    ref = reference_filters.refined_lee_filter(x, window, looks=4.0)
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    ok = np.isfinite(ref)
    close = np.isclose(ours[ok], ref[ok], rtol=FILTER_RTOL, atol=0)
    assert (~close).mean() <= MAX_TIED_SHARE, (~close).mean()
    assert abs(sar.to_db(ours[ok]).mean() - sar.to_db(ref[ok]).mean()) < 0.01  # dB, over the tile


def _tile_chunk(tmp_path, *overrides):
    return TileChunk(load_config(None, [f"run.run_dir={tmp_path}", *overrides]).tile, str(tmp_path))


def _scene(src, path, units):
    """The scenes-table fields the tile stage reads, for a north-up file tiled in its own CRS."""
    t = src.transform
    return {
        "scene_id": "s",
        "sar_uri": str(path),
        "crs": src.crs.to_string(),
        "tile_crs": src.crs.to_string(),
        "transform": list(t)[:6],
        "width": src.width,
        "height": src.height,
        "gsd_m": abs(t.a),
        "band": 1,
        "units": units,
        "rotated": False,
    }


def test_tiles_filtered_alone_equal_the_scene_filtered_whole(real_sar, tmp_path):
    """pyroSAR's Sentinel-1 GRD scene, 64 px tiles at its native 20 m: every tile's refined-Lee pixels equal
    the whole scene's, except within the filter's reach of the scene border (mirrored there)."""
    path = real_sar / "pyrosar_s1_grd_geocoded/S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif"
    worker = _tile_chunk(tmp_path, "tile.tile_size=64", "tile.speckle.window=7")
    whole = sar.refined_lee_filter(_intensity(path, "db"), 7, worker.cfg.speckle.looks)
    reach = sar.halo_for(7)
    with rasterio.open(path) as src:
        scene = _scene(src, path, "db")
        grid = grid_for(scene, scene["gsd_m"], worker.cfg)
        compared = 0
        for r in range(grid.n_rows):
            for c in range(grid.n_cols):
                _, filtered = worker.filtered_intensity(src, scene, grid, grid.window_transform(r, c))
                rows = slice(r * 64, min(r * 64 + 64, src.height))
                cols = slice(c * 64, min(c * 64 + 64, src.width))
                part, expected = (
                    filtered[: rows.stop - rows.start, : cols.stop - cols.start],
                    whole[rows, cols].copy(),
                )
                keep = np.zeros_like(expected, dtype=bool)  # away from the scene border
                keep[
                    max(0, reach - rows.start) : src.height - reach - rows.start,
                    max(0, reach - cols.start) : src.width - reach - cols.start,
                ] = True
                assert np.array_equal(part[keep], expected[keep]), (r, c)
                compared += keep.sum()
        assert compared > 0.9 * src.width * src.height
    assert worker.stats["direct"] == grid.n_windows  # every native tile took the direct read


@pytest.mark.parametrize("name", [n for n in sorted(REAL) if "pyrosar" in n or "opera" in n])
def test_native_tiles_read_directly_equal_the_warped_ones(real_sar, name):
    path = real_sar / name
    with rasterio.open(path) as src:
        size, t = 48, src.transform
        to_float = lambda b: sar.to_intensity(b.astype(np.float32).filled(np.nan), REAL[name])
        n = 0
        # windows inside, across and beyond the edges, halo-like offsets
        for row in range(-8, src.height, 40):
            for col in range(-8, src.width, 40):
                tile_t = t @ Affine.translation(col, row)
                window = pixel_window(src, tile_t, src.crs.to_string(), size)
                assert window is not None
                direct = read_window(src, 1, window, size, to_float)
                warped = warp_window(src, 1, tile_t, src.crs.to_string(), size, Resampling.nearest, to_float)
                assert np.array_equal(direct, warped, equal_nan=True), (row, col)
                n += 1
        assert n >= 9
        # coarser: not a pixel grid
        assert pixel_window(src, t @ Affine.scale(2), src.crs.to_string(), size) is None
        # off by half a pixel
        assert pixel_window(src, t @ Affine.translation(0.5, 0), src.crs.to_string(), size) is None


def test_a_coarse_level_of_a_cog_reads_its_overviews(tmp_path):
    """A 0.5 m linear-intensity COG with overviews: the 10 m tiles decode at most 2x the pixels they
    write, and agree with averaging every full-resolution pixel within 0.2 dB on average."""
    from rasterio.shutil import copy as rio_copy

    rng = np.random.default_rng(0)
    n = 4096
    yy, xx = np.mgrid[0:n, 0:n]
    field = (0.02 + 0.2 * (np.sin(xx / 300.0) > 0.3) + 0.1 * (yy > 2000)).astype(np.float32)
    data = field * rng.gamma(4, 0.25, (n, n)).astype(np.float32)
    plain = tmp_path / "plain.tif"
    profile = {
        "driver": "GTiff",
        "width": n,
        "height": n,
        "count": 1,
        "dtype": "float32",
        "crs": "EPSG:32631",
        "transform": Affine(0.5, 0, 600000, 0, -0.5, 5800000),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
    }
    with rasterio.open(plain, "w", **profile) as dst:
        dst.write(data, 1)
    cog = tmp_path / "scene.tif"
    # overviews down to 256 px: 2x ... 16x
    rio_copy(plain, cog, driver="COG", RESAMPLING="AVERAGE", OVERVIEWS="AUTO", BLOCKSIZE=256)
    worker = _tile_chunk(tmp_path, "tile.tile_size=128")
    warp_all = _tile_chunk(tmp_path, "tile.tile_size=128", "tile.use_overviews=false")
    with rasterio.open(cog) as src:
        assert src.overviews(1), "the COG driver wrote overviews"
        scene = _scene(src, cog, "intensity")
        grid = grid_for(scene, 10.0, worker.cfg)
        diffs = []
        for r in range(grid.n_rows):
            for c in range(grid.n_cols):
                t = grid.window_transform(r, c)
                fast = worker.read_intensity(src, scene, t, grid.crs, 128)
                full = warp_all.read_intensity(src, scene, t, grid.crs, 128)
                ok = np.isfinite(fast) & np.isfinite(full)
                diffs.append(np.abs(sar.to_db(fast[ok]) - sar.to_db(full[ok])).mean())
    written = grid.n_windows * 128 * 128
    assert worker.stats["overview"] == grid.n_windows and warp_all.stats["warp"] == grid.n_windows
    assert worker.stats["pixels_read"] <= 2 * written < warp_all.stats["pixels_read"]
    assert np.mean(diffs) < 0.2, diffs


def test_tile_actors_size_gdals_block_cache_from_the_config(tmp_path):
    """tile.gdal_cache_mb sets GDAL's block cache of the actor's process in MB (rasterio takes bytes: 256
    passed as is would leave a 256-byte cache, and every halo read would decode its blocks again)."""
    from rasterio.env import get_gdal_config, set_gdal_config

    before = get_gdal_config("GDAL_CACHEMAX")
    try:
        _tile_chunk(tmp_path, "tile.gdal_cache_mb=64")
        assert get_gdal_config("GDAL_CACHEMAX") == 64 * 2**20
    finally:
        set_gdal_config("GDAL_CACHEMAX", int(before))


@pytest.mark.parametrize("gsd_factor, crs", [(1.0, None), (2.5, None), (0.6, None), (1.7, "EPSG:3857")])
def test_a_multiband_warp_equals_each_band_warped_alone(real_sar, gsd_factor, crs):
    """Align warps the optical twin's three bands in one pass: on the real Sentinel-2 twin of Sen1Floods11
    (its nodata border included), each band equals its own one-band warp, bit for bit, finer, coarser, at
    native resolution and into another CRS."""
    path = real_sar / "sen1floods11_spain_7370579" / "Spain_7370579_S2Hand.tif"
    with rasterio.open(path) as src:
        with rasterio.open(real_sar / "sen1floods11_spain_7370579" / "Spain_7370579_S1Hand.tif") as s1:
            left, top = s1.transform.c, s1.transform.f  # a tile corner off the twin's own pixel grid
        dst_crs = crs or src.crs.to_string()
        if crs:
            from pyproj import Transformer

            left, top = Transformer.from_crs(src.crs, crs, always_xy=True).transform(left, top)
        size, bands = 96, [4, 3, 2]
        for k in range(3):  # tiles along the diagonal, the first one over the scene's edge
            gsd = abs(src.transform.a) * gsd_factor * (1.0 if not crs else 1.1)
            t = Affine(gsd, 0, left - 7.3 * gsd + k * 40 * gsd, 0, -gsd, top + 5.1 * gsd - k * 40 * gsd)
            resampling = Resampling.average if gsd_factor > 1 else Resampling.bilinear
            together = warp_window(src, bands, t, dst_crs, size, resampling)
            alone = np.stack([warp_window(src, b, t, dst_crs, size, resampling) for b in bands])
            assert together.shape == (3, size, size)
            assert np.array_equal(together, alone, equal_nan=True), (k, np.nanmax(np.abs(together - alone)))
            if k == 0:
                # the edge tile: nodata and data
                assert np.isnan(together).any() and np.isfinite(together).any()


def test_a_multiband_warp_keeps_each_bands_own_nodata():
    """A band with nodata where the others have data (a saturated or masked channel): the one-pass warp
    averages each band over its own valid pixels, as the one-band warp does (GDAL's default would take a
    pixel as valid in every band once any band has it)."""
    from rasterio.io import MemoryFile

    rng = np.random.default_rng(5)
    data = rng.uniform(0, 1, (3, 64, 64)).astype(np.float32)
    data[1, 10:30, 10:30] = np.nan  # only the second band
    profile = {
        "driver": "GTiff",
        "width": 64,
        "height": 64,
        "count": 3,
        "dtype": "float32",
        "crs": "EPSG:32631",
        "transform": Affine(10, 0, 500000, 0, -10, 4000000),
        "nodata": np.nan,
    }
    with MemoryFile() as mem:
        with mem.open(**profile) as dst:
            dst.write(data)
        with mem.open() as src:
            t = Affine(30, 0, 500000 + 3, 0, -30, 4000000 - 7)  # 3x coarser, off the pixel grid
            together = warp_window(src, [1, 2, 3], t, "EPSG:32631", 20, Resampling.average)
            alone = np.stack(
                [warp_window(src, b, t, "EPSG:32631", 20, Resampling.average) for b in (1, 2, 3)]
            )
    # on the patch's edge the band's own average skips its nodata; inside it there is nothing to average
    assert np.isfinite(alone[1, 3, 3]) and np.isnan(alone[1, 5, 5]) and np.isfinite(alone[[0, 2], 5, 5]).all()
    assert np.array_equal(together, alone, equal_nan=True)


def test_the_optical_twin_on_the_tile_grid_is_read_not_warped(real_sar):
    """Align reads the optical twin (and land cover) straight from its pixels when the tile grid is the
    twin's own, as tile does for SAR: on the real Sentinel-2 twin of Sen1Floods11 (int16, nodata 0, 13
    bands), three bands read in one pass equal the nearest-neighbour warp bit for bit, for tiles inside,
    across and beyond its edges; a tile off the pixel grid, or another resampling, is warped."""
    from sarlang_ray.tiling import grid_read

    resampling = Resampling.nearest

    path = real_sar / "sen1floods11_spain_7370579" / "Spain_7370579_S2Hand.tif"
    with rasterio.open(path) as src:
        crs, t, size, bands, stats, n = src.crs.to_string(), src.transform, 64, [4, 3, 2], {}, 0
        for row in range(-20, src.height, 150):
            for col in range(-20, src.width, 150):
                tile_t = t @ Affine.translation(col, row)
                read = grid_read(src, bands, tile_t, crs, size, resampling, stats=stats)
                warped = warp_window(src, bands, tile_t, crs, size, resampling)
                assert read.shape == (3, size, size)
                assert np.array_equal(read, warped, equal_nan=True), (row, col)
                n += 1
        assert stats["direct"] == n >= 9 and "warp" not in stats
        assert np.isnan(grid_read(src, bands, t @ Affine.translation(-20, -20), crs, size, resampling)).any()
        off = t @ Affine.translation(0.5, 0.25)
        assert np.array_equal(
            grid_read(src, bands, off, crs, size, resampling, stats=stats),
            warp_window(src, bands, off, crs, size, resampling),
            equal_nan=True,
        )
        assert stats["warp"] == 1
        grid_read(src, bands, t, crs, size, Resampling.average, stats=stats)  # on the grid, but averaging
        assert stats["warp"] == 2
