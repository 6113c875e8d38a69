"""What makes results trustworthy on real data: splits without leakage across dates and polarisations, and
failures that say so (a stage that plans nothing exits non-zero with the reason)."""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict

import pytest

from sarlang_ray import cli, pipeline
from sarlang_ray.config import load_config

OPERA = [
    "catalog.sar_glob=[opera_rtc_s1_t137_crops/*/*.tif]",
    "ray.progress=false",
    "run.stages=[catalog,tile,align,annotate,export]",
]


@pytest.fixture(scope="module")
def opera_run(ray_session, real_sar, tmp_path_factory):
    """The 60 OPERA RTC crops (15 bursts x 2 dates x VV/VH, 30 m) through catalog ... export."""
    run_dir = tmp_path_factory.mktemp("opera") / "run"
    cfg = load_config(
        None,
        [
            f"run.run_dir={run_dir}",
            f"catalog.archive={real_sar}",
            *OPERA,
            "tile.gsds_m=[30,60]",
            "tile.tile_size=50",
        ],
    )
    return cfg, pipeline.run(cfg)


def test_every_date_and_polarisation_of_a_burst_lands_in_one_split(opera_run):
    cfg, summary = opera_run
    scenes = {s["scene_id"]: s for s in pipeline.read_scenes(cfg.run.run_dir)}
    burst_of = {sid: re.search(r"T137-\d+-IW\d", s["sar_uri"]).group(0) for sid, s in scenes.items()}
    assert len(set(burst_of.values())) == 15
    splits_of_burst: dict[str, set] = defaultdict(set)
    from pathlib import Path

    import pyarrow.parquet as pq

    n = 0
    for f in Path(cfg.run.run_dir, "export", "parquet").glob("*/*.parquet"):
        t = pq.read_table(f, columns=["scene_id", "split"]).to_pylist()
        for r in t:
            splits_of_burst[burst_of[r["scene_id"]]].add(r["split"])
        n += len(t)
    assert n > 0 and all(len(s) == 1 for s in splits_of_burst.values()), dict(splits_of_burst)
    assert set().union(*splits_of_burst.values()) == {"train", "val", "test"}
    report = json.loads(Path(cfg.run.run_dir, "export", "leakage.json").read_text())
    assert report["leak_free"] and all(
        p["intersection_m2"] == 0 and p["shared_objects"] == 0 for p in report["pairs"].values()
    )
    e = summary["stages"]["export"]
    assert e["planned"] == e["written"] + e["rejected"]
    # by brute force over the exported tiles (shapely in each tile's UTM zone, not the planner): no two tiles
    # of different splits closer than export.buffer_m (tiles of one UTM zone: the 15 bursts' track)
    import numpy as np
    import shapely
    from pyproj import Transformer
    from shapely.ops import transform as reproject

    split_of = {}
    for f in Path(cfg.run.run_dir, "export", "parquet").glob("*/*.parquet"):
        split_of |= dict(zip(*pq.read_table(f, columns=["tile_id", "split"]).to_pydict().values()))
    tiles = [
        t
        for t in pipeline.read_tiles(cfg.run.run_dir, columns=["tile_id", "footprint", "crs"]).to_pylist()
        if t["tile_id"] in split_of
    ]
    by_crs = defaultdict(list)
    for t in tiles:
        by_crs[t["crs"]].append(t)
    for crs, group in by_crs.items():
        to_utm = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
        geoms = np.array([reproject(to_utm.transform, shapely.from_wkb(t["footprint"])) for t in group])
        a, b = shapely.STRtree(geoms).query(geoms, predicate="dwithin", distance=cfg.export.buffer_m)
        assert len(a) > len(group)  # neighbours were compared, not only each tile with itself
        assert all(
            split_of[group[i]["tile_id"]] == split_of[group[j]["tile_id"]]
            for i, j in zip(a.tolist(), b.tolist())
        )


def test_a_tile_stage_that_plans_nothing_says_why_and_exits_non_zero(opera_run, tmp_path, capsys):
    """A 30 m archive with the default pyramid (0.5 to 10 m): every level is finer than the data."""
    cfg, _ = opera_run
    run_dir = tmp_path / "run"
    shutil.copytree(f"{cfg.run.run_dir}/catalog", run_dir / "catalog")
    rc = cli.main(["tile", f"run.run_dir={run_dir}", f"catalog.archive={cfg.catalog.archive}", *OPERA])
    err = capsys.readouterr().err
    assert rc == 1
    assert "every pyramid level" in err and "finer than the archive's 30 m" in err
    assert "Add 30" in err and "tile.include_native=true" in err
    assert not (run_dir / "tile" / "_SUCCESS.json").exists()


def test_a_catalog_without_a_usable_scene_says_why_and_exits_non_zero(
    ray_session, real_sar, tmp_path, capsys
):
    """A glob that only catches Sentinel-2 optical files: every file rejected as not_sar, nothing to tile."""
    rc = cli.main(
        [
            "catalog",
            f"run.run_dir={tmp_path / 'run'}",
            f"catalog.archive={real_sar}",
            "ray.progress=false",
            "catalog.sar_glob=[sen1floods11_spain_7370579/*_S2Hand.tif]",
            "run.stages=[catalog]",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "none of the 1 files" in err and "not_sar: 1" in err and "catalog/errors.parquet" in err
    assert not (tmp_path / "run" / "catalog" / "_SUCCESS.json").exists()
    errors = pipeline.read_errors(str(tmp_path / "run")).to_pylist()
    assert [e["error_class"] for e in errors] == ["not_sar"]
