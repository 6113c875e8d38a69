"""`sarlang view`: the site of a run, opened in headless Chromium (Debian's chromium + chromium-driver,
installed by `make setup`) and checked against the run's Parquet tables read here with pyarrow.

The run: the demo's catalog/tile/align, re-annotated with a backend whose extra answers QC rejects (the demo's
template pairs all pass), exported, with the evaluation of the trained fixture (same tiles, same pair ids)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# where the screenshots go besides the test's folder: `SARLANG_VIEW_SHOTS=docs/img pytest tests/test_view.py`
SHOTS_ENV = "SARLANG_VIEW_SHOTS"


@pytest.fixture(scope="module")
def viewed_run(demo_run, trained_run, tmp_path_factory):
    from sarlang_ray import pipeline
    from sarlang_ray.config import load_config

    cfg, _ = demo_run
    tr, _ = trained_run
    run_dir = tmp_path_factory.mktemp("viewed") / "run"
    shutil.copytree(
        cfg.run.run_dir, run_dir, ignore=shutil.ignore_patterns("annotate", "export", "archive", "view")
    )
    again = load_config(
        str(REPO / "workflows" / "demo.yaml"),
        [
            f"run.run_dir={run_dir}",
            f"synth.out_dir={cfg.synth.out_dir}",
            "ray.progress=false",
            "annotate.backend=annotate_backends:HallucinatingBackend",
            "run.stages=[catalog,tile,align,annotate,export]",
        ],
    )
    pipeline.run(again, ["annotate", "export"])
    shutil.copytree(Path(tr.run.run_dir) / "evaluate", run_dir / "evaluate")  # after: a run would redo it
    out = run_dir / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "sarlang_ray", "view", str(run_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, out


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail(
            "headless Chromium is missing: `make setup` installs Debian's chromium and chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1300,1000",
    ):
        opts.add_argument(arg)
    # a driver path: no selenium-manager
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _open(driver, site: Path, page: str, hash_: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get("about:blank")
    driver.get((site / page).as_uri() + (f"#{hash_}" if hash_ else ""))
    WebDriverWait(driver, 30).until(lambda d: d.find_element("tag name", "body").get_attribute("data-ready"))
    assert driver.find_element("tag name", "body").get_attribute("data-ready") == "1", driver.find_element(
        "id", "main"
    ).text


def _shot(driver, tmp: Path, name: str):
    """Screenshots of each page: in the test's folder, and in SARLANG_VIEW_SHOTS when set (docs/img)."""
    driver.save_screenshot(str(tmp / f"{name}.png"))
    if os.environ.get(SHOTS_ENV):
        Path(os.environ[SHOTS_ENV]).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(os.environ[SHOTS_ENV]) / f"view-{name}.png"))


def _export_rows(run_dir: Path) -> list[dict]:
    files = sorted((run_dir / "export" / "parquet").glob("*/*.parquet"))
    return pq.read_table(files, columns=["tile_id", "split", "application"]).to_pylist() if files else []


def _annotations(run_dir: Path) -> list[dict]:
    return pq.read_table(sorted((run_dir / "annotate" / "shards").glob("*/*.parquet"))).to_pylist()


@pytest.mark.slow
def test_site_in_headless_chromium(viewed_run, browser, tmp_path):
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from sarlang_ray import metrics

    run_dir, site = viewed_run
    exported = _export_rows(run_dir)
    pairs = _annotations(run_dir)

    # the grid, filtered in the page's own selects: split=test, application=instance counting
    _open(browser, site, "index.html")
    Select(browser.find_element("id", "f-split")).select_by_value("test")
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1"
    )
    Select(browser.find_element("id", "f-application")).select_by_value("instance counting")
    WebDriverWait(browser, 30).until(
        lambda d: (
            d.find_element("tag name", "body").get_attribute("data-ready") == "1"
            and "application=instance" in d.current_url
        )
    )
    shown = {c.get_attribute("data-tile-id") for c in browser.find_elements("css selector", "#grid .card")}
    expected = {
        r["tile_id"] for r in exported if r["split"] == "test" and r["application"] == "instance counting"
    }
    assert expected and shown == expected
    assert browser.find_element("id", "count").text == str(len(expected))
    _shot(browser, tmp_path, "grid")

    # a tile's page: every pair of the tile (annotations table, QC-rejected ones included), a rejected pair's
    # reason
    by_tile = defaultdict(list)
    for p in pairs:
        by_tile[p["tile_id"]].append(p)
    rejected = [p for p in pairs if not p["qc_passed"]]
    assert rejected, "the backend's hallucinated answers should be rejected by QC"
    test_tiles = {r["tile_id"] for r in exported if r["split"] == "test"}
    tile = next(t for t in sorted(test_tiles) if any(not p["qc_passed"] for p in by_tile[t]))
    _open(browser, site, "tile.html", tile)
    rows = browser.find_elements("css selector", "#pairs tr.pair")
    assert sorted(r.get_attribute("data-pair-id") for r in rows) == sorted(
        p["pair_id"] for p in by_tile[tile]
    )
    cells = {r.get_attribute("data-pair-id"): r for r in rows}
    for p in by_tile[tile]:
        qc = cells[p["pair_id"]].find_element("css selector", "td.qc").text
        assert qc == ("passed" if p["qc_passed"] else "rejected: " + ", ".join(p["qc_reasons"]))
    assert any("hallucination" in cells[p["pair_id"]].text for p in by_tile[tile] if not p["qc_passed"])

    # the model answers beside the truth (predictions files read here), wrong ones marked
    preds = {
        f.stem: {r["pair_id"]: r for r in pq.read_table(f).to_pylist()}
        for f in sorted((run_dir / "evaluate" / "predictions").glob("*.parquet"))
    }
    assert preds
    checked = wrong = 0
    for p in by_tile[tile]:
        row = cells[p["pair_id"]]
        assert row.find_element("css selector", "td.truth").text == p["answer"]
        for model, rows_of in preds.items():
            if p["pair_id"] not in rows_of:
                continue
            cell = row.find_element("css selector", f'td.answer[data-model="{model}"]')
            pred = rows_of[p["pair_id"]]["prediction"]
            assert cell.text.startswith(pred.strip()[:40])
            if p["kind"] not in ("caption_concise", "caption_detailed"):
                right = metrics.vqa_correct(pred, p["answer"], "strict", question=p["question"])
                assert ("wrong" in cell.get_attribute("class").split()) == (not right)
                wrong += not right
                checked += 1
    assert checked and wrong, (checked, wrong)  # a tiny model gets some wrong: the marks are exercised
    _shot(browser, tmp_path, "tile")
    browser.execute_script("document.querySelector('#pairs tr.rejected').scrollIntoView()")
    _shot(browser, tmp_path, "tile-pairs")

    # the map: one footprint per exported tile, coloured by its split
    _open(browser, site, "map.html")
    drawn = {
        e.get_attribute("data-tile-id"): e.get_attribute("data-split")
        for e in browser.find_elements("css selector", "svg.map path.tile")
    }
    assert len(browser.find_elements("css selector", "svg.map path.tile")) == len(
        {r["tile_id"] for r in exported}
    )
    assert drawn == {r["tile_id"]: r["split"] for r in exported}
    _shot(browser, tmp_path, "map")

    # the reports: leakage, errors table (rows from the run's tables), leaderboard (one row per leaderboard
    # row)
    _open(browser, site, "leakage.html")
    assert browser.find_element("id", "verdict").text in ("no leakage", "LEAKS")
    _shot(browser, tmp_path, "leakage")
    _open(browser, site, "errors.html")
    from sarlang_ray import tables

    n_errors = tables.read_errors(str(run_dir)).num_rows
    assert len(browser.find_elements("css selector", "#errors tr")) - 1 == n_errors
    _shot(browser, tmp_path, "errors")
    _open(browser, site, "leaderboard.html")
    import json

    board = json.loads((run_dir / "evaluate" / "leaderboard.json").read_text())
    assert len(browser.find_elements("css selector", "#leaderboard tr")) - 1 == len(board["rows"])
    _shot(browser, tmp_path, "leaderboard")


def test_card_shows_a_sample_mosaic_and_the_split_map(demo_run):
    """The demo's dataset card: a mosaic of random test tiles (named in the card, each a test tile) and the
    exported tiles per region and split on a map (the counts it states match the tables read here)."""
    import re
    from collections import Counter

    from PIL import Image

    cfg, _ = demo_run
    export = Path(cfg.run.run_dir) / "export"
    card = (export / "dataset_card.md").read_text()
    assert "![samples](plots/samples.png)" in card and "![split map](plots/split_map.png)" in card
    samples_line = next(
        x for x in card.splitlines() if x.startswith(tuple("0123456789")) and "random test tiles" in x
    )
    shown = re.findall(r"`([^`]+)`", samples_line.split(":", 1)[1])
    rows = _export_rows(Path(cfg.run.run_dir))
    test_tiles = {r["tile_id"] for r in rows if r["split"] == "test"}
    assert len(shown) == len(set(shown)) == min(6, len(test_tiles)) and set(shown) <= test_tiles
    width, height = Image.open(export / "plots" / "samples.png").size
    assert width > 600 and height > 300
    map_line = next(x for x in card.splitlines() if x.startswith("Footprints of the exported tiles"))
    stated = {
        (region, split): int(n)
        for region, body in re.findall(r"(\w+): ((?:\w+ \d+(?:, )?)+)", map_line.split(":", 1)[1])
        for split, n in re.findall(r"(\w+) (\d+)", body)
    }
    split_of = {r["tile_id"]: r["split"] for r in rows}
    region_of = {
        t["tile_id"]: t["region"]
        for t in pq.read_table(
            sorted((Path(cfg.run.run_dir) / "align" / "shards").glob("*/*.parquet")),
            columns=["tile_id", "region"],
        ).to_pylist()
    }
    assert stated == dict(Counter((region_of[t], s) for t, s in split_of.items()))


def test_site_of_an_s3_run_written_to_s3(demo_run, s3, tmp_path):
    """A run folder on s3:// gives, on s3://, the same site as its local copy gives locally: the same files,
    the same index (the data files name the run folder, so that is compared with the folder name swapped)."""
    import fsspec

    from sarlang_ray import view

    cfg, _ = demo_run
    local_run = Path(cfg.run.run_dir)
    fs = fsspec.filesystem("s3")
    for part in ("align", "annotate", "export", "catalog", "tile"):
        fs.put(str(local_run / part), f"sarlang/runs/viewed/{part}", recursive=True)
    remote = view.build_site("s3://sarlang/runs/viewed", "s3://sarlang/sites/viewed")
    local = view.build_site(str(local_run), str(tmp_path / "site"))
    assert remote["tiles"] == local["tiles"] > 0 and remote["exported"] == local["exported"] == len(
        {r["tile_id"] for r in _export_rows(local_run)}
    )
    remote_files = {f.split("sarlang/sites/viewed/", 1)[1] for f in fs.find("sarlang/sites/viewed")}
    local_files = {
        str(p.relative_to(tmp_path / "site")) for p in (tmp_path / "site").rglob("*") if p.is_file()
    }
    assert remote_files == local_files
    for name in ("data/sample.js", "data/pages/0.js"):
        got = (
            fs.cat(f"sarlang/sites/viewed/{name}")
            .decode()
            .replace("s3://sarlang/runs/viewed", str(local_run))
        )
        assert got == (tmp_path / "site" / name).read_text()


def test_serve_hands_out_the_site_files(tmp_path):
    """`sarlang view --serve`'s server: the site's files over HTTP on 127.0.0.1, byte for byte."""
    import threading
    import urllib.request

    from sarlang_ray import view

    (tmp_path / "data").mkdir()
    (tmp_path / "index.html").write_text("<!doctype html><p>site</p>")
    (tmp_path / "data" / "manifest.js").write_text("SV.manifest = {};")
    server = view.make_server(str(tmp_path), 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for name in ("index.html", "data/manifest.js"):
            with urllib.request.urlopen(f"{base}/{name}", timeout=10) as r:
                assert r.read() == (tmp_path / name).read_bytes()
    finally:
        server.shutdown()
        server.server_close()
