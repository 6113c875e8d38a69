"""``sarlang view RUN_DIR``: a static site to look at a run's data (tiles, twins, boxes, pairs, QC, model
answers).

People trust an image-text dataset after they have looked at it; Parquet is not something to look at. The site
is one folder of plain files (``index.html``, ``tile.html``, ``map.html``, ``leakage.html``, ``errors.html``,
``leaderboard.html``, ``app.js``, data as ``.js`` files, PNGs) that opens from ``file://`` or any static host:
data files are scripts that hand their content to the page (a browser refuses ``fetch`` of local files, not
``<script src>``), and nothing is fetched from the internet (the map draws footprints in SVG; a basemap tile
URL is optional).

It scales with the run, not with the driver: one Ray task per tiles-table shard (``align/shards/``) reads that
shard, its annotations, its exported split membership, its error rows and the model answers for its pairs, and
writes the tile pages, images, thumbnails and one *page* of the grid's index (``data/pages/<n>.js``). The
driver keeps only counters per filter value and a sample of at most ``sample`` tiles per filter value (the
tiles with the smallest hash of their id, so the sample is reproducible and the same tile serves several
values); the grid filters that sample in the browser and pages through the full index shard by shard.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io as _io
import json
import re
from collections import Counter
from importlib import resources

import pyarrow as pa
import pyarrow.compute as pc

from sarlang_ray import io, tables

STATIC = ("app.js", "style.css")
# the site's pages: file -> title; each is view_static/page.html with its title and the page app.js renders
PAGES = {
    "index": "Tiles",
    "tile": "Tile",
    "map": "Map",
    "leakage": "Leakage",
    "errors": "Errors",
    "leaderboard": "Leaderboard",
}
# the grid's filters: fields of an index row
FILTERS = (
    "split",
    "application",
    "gsd",
    "scene",
    "class",
    "qc",
    "error",
)
NOT_EXPORTED = "not exported"
TILE_COLUMNS = [
    "tile_id",
    "scene_id",
    "gsd_m",
    "region",
    "footprint",
    "sar_png",
    "optical_png",
    "objects",
    "landcover",
    "width",
    "height",
]


def _safe(name: str) -> str:
    """A file name for a tile id (ids are [A-Za-z0-9._-] already; anything else becomes _)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _script(var: str, key: str | None, obj) -> bytes:
    """A data file the pages load with <script src>: ``SV.<var>[key] = {...}`` (or ``SV.<var> = {...}``)."""
    target = f"SV.{var}" + (f"[{json.dumps(key)}]" if key is not None else "")
    data = json.dumps(obj, default=str)
    return f"window.SV = window.SV || {{}}; SV.{var} = SV.{var} || {{}}; {target} = {data};\n".encode()


def _sample_key(tile_id: str) -> str:
    return hashlib.sha1(tile_id.encode()).hexdigest()[:12]


def _lonlat_rings(wkb: bytes | None, digits: int = 6) -> list:
    """Exterior ring(s) of a WKB footprint (EPSG:4326) as [[lon, lat], ...] lists."""
    if wkb is None:
        return []
    import shapely

    geom = shapely.from_wkb(wkb)
    polys = list(getattr(geom, "geoms", [geom]))
    return [
        [[round(x, digits), round(y, digits)] for x, y in p.exterior.coords] for p in polys if not p.is_empty
    ]


def _thumbnail(sar_png: bytes, objects: list, px: int) -> bytes:
    from PIL import Image, ImageDraw

    from sarlang_ray.viz import CLASS_COLOURS

    img = Image.open(_io.BytesIO(sar_png)).convert("RGB")
    scale = px / max(img.size)
    img = img.resize(
        (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BILINEAR
    )
    draw = ImageDraw.Draw(img)
    for o in objects or []:
        x0, y0, x1, y1 = (v * scale for v in o["bbox_xyxy"])
        draw.rectangle([x0, y0, x1, y1], outline=CLASS_COLOURS.get(o["class"], (255, 255, 255)), width=1)
    buf = _io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _filtered(uri: str, column: str, values: list[str], columns: list[str] | None = None) -> list[dict]:
    """Rows of one Parquet file whose ``column`` is in ``values`` (read with the filter pushed down)."""
    import pyarrow.parquet as pq

    if not values or not io.exists(uri):
        return []
    fs, path = io.arrow_filesystem(uri)
    cols = None if columns is None else sorted({*columns, column})
    # row groups skipped by statistics
    if pa.types.is_string(pq.read_schema(path, filesystem=fs).field(column).type):
        return pq.read_table(
            path, filesystem=fs, columns=cols, filters=pc.field(column).isin(pa.array(values, pa.string()))
        ).to_pylist()
    t = pq.read_table(path, filesystem=fs, columns=cols)  # an empty errors table may type its columns null
    if not t.num_rows:
        return []
    return t.filter(
        pc.is_in(t[column].cast(pa.string()), value_set=pa.array(values, pa.string()))
    ).to_pylist()


def shard_jobs(run_dir: str, out: str, thumb_px: int, sample: int) -> list[dict]:
    """One small descriptor per tiles-table shard (its path names the annotate, export and error files of the
    same tiles)."""
    align_root = tables.shard_root(run_dir, "align")
    preds = (
        sorted(io.glob(io.join(run_dir, "evaluate", "predictions"), "*.parquet"))
        if io.exists(io.join(run_dir, "evaluate", "predictions"))
        else []
    )
    board = io.join(run_dir, "evaluate", "leaderboard.json")
    vqa_mode = io.read_json(board).get("vqa_mode", "strict") if io.exists(board) else "strict"
    jobs = []
    for i, uri in enumerate(tables.tiles_table_shards(run_dir)):
        rel = io.relative(uri, align_root)  # <scene>/<gsd>-<chunk>.parquet
        jobs.append(
            {
                "index": i,
                "run_dir": run_dir,
                "rel": rel,
                "out": out,
                "thumb_px": thumb_px,
                "sample": sample,
                "predictions": preds,
                "vqa_mode": vqa_mode,
            }
        )
    return jobs


def view_shard(job: dict) -> dict:
    """The site's files for the tiles of one shard; returns counters per filter value and a sample of index
    rows."""
    from sarlang_ray import metrics

    run_dir, rel, out = job["run_dir"], job["rel"], job["out"]
    # a judge's verdicts are not kept
    mode = job["vqa_mode"] if job["vqa_mode"] in ("strict", "sarlang1m") else "strict"
    tiles = io.read_parquet(
        io.join(tables.shard_root(run_dir, "align"), rel), columns=TILE_COLUMNS
    ).to_pylist()
    ids = [t["tile_id"] for t in tiles]
    ann_uri = io.join(tables.shard_root(run_dir, "annotate"), rel)
    pairs = io.read_parquet(ann_uri).to_pylist() if io.exists(ann_uri) else []
    export_name = rel.replace("/", "__")
    # the export's membership file of this shard (export/tiles/: there whether or not its Parquet was merged)
    split_of = {
        r["tile_id"]: r["split"]
        for r in _filtered(
            io.join(run_dir, "export", "tiles", export_name), "tile_id", ids, ["tile_id", "split"]
        )
    }
    errors: dict[str, list[dict]] = {}
    error_uris = [io.join(run_dir, stage, "errors", rel) for stage in ("tile", "align", "annotate")]
    error_uris += [io.join(run_dir, "export", "errors.parquet")]
    for uri in error_uris:
        for r in _filtered(uri, "item", ids, ["stage", "item", "error_class", "message"]):
            errors.setdefault(r["item"], []).append({k: r[k] for k in ("stage", "error_class", "message")})
    answers: dict[str, dict] = {}  # pair_id -> {model file: prediction}
    models = []
    for uri in job["predictions"]:
        name = uri.rsplit("/", 1)[-1].removesuffix(".parquet")
        models.append(name)
        for r in _filtered(uri, "tile_id", ids, ["pair_id", "prediction"]):
            answers.setdefault(r["pair_id"], {})[name] = r["prediction"]
    by_tile: dict[str, list[dict]] = {}
    for p in pairs:
        by_tile.setdefault(p["tile_id"], []).append(p)

    rows: list[dict] = []
    counts: dict[str, Counter] = {f: Counter() for f in FILTERS}
    samples: dict[str, dict[str, list]] = {f: {} for f in FILTERS}
    for t in tiles:
        tid, name = t["tile_id"], _safe(t["tile_id"])
        tp = by_tile.get(tid, [])
        objects = t["objects"] or []
        io.write_bytes_atomic(io.join(out, "img", f"{name}.sar.png"), t["sar_png"])
        if t["optical_png"] is not None:
            io.write_bytes_atomic(io.join(out, "img", f"{name}.opt.png"), t["optical_png"])
        io.write_bytes_atomic(
            io.join(out, "thumbs", f"{name}.png"), _thumbnail(t["sar_png"], objects, job["thumb_px"])
        )
        pair_rows = []
        for p in tp:
            row = {
                k: p[k]
                for k in (
                    "pair_id",
                    "kind",
                    "application",
                    "question_type",
                    "question",
                    "answer",
                    "qc_passed",
                )
            }
            row["qc_reasons"] = list(p["qc_reasons"] or [])
            row["answers"] = []
            for model, pred in (answers.get(p["pair_id"]) or {}).items():
                # captions have no right answer
                vqa = p["kind"] not in (
                    "caption_concise",
                    "caption_detailed",
                )
                correct = (
                    metrics.vqa_correct(pred, p["answer"], mode, question=p["question"]) if vqa else None
                )
                row["answers"].append({"model": model, "prediction": pred, "correct": correct})
            pair_rows.append(row)
        split = split_of.get(tid, NOT_EXPORTED)
        tile_errors = errors.get(tid, [])
        detail = {
            "tile_id": tid,
            "file": name,
            "scene_id": t["scene_id"],
            "region": t["region"],
            "gsd_m": t["gsd_m"],
            "split": split,
            "width": t["width"],
            "height": t["height"],
            "has_optical": t["optical_png"] is not None,
            "objects": [
                {
                    "class": o["class"],
                    "bbox": [round(float(v), 1) for v in o["bbox_xyxy"]],
                    "visible_fraction": o["visible_fraction"],
                    "label_id": o["label_id"],
                }
                for o in objects
            ],
            # a Parquet map reads as pairs
            "landcover": dict(sorted(t["landcover"] or [], key=lambda kv: -kv[1])),
            "pairs": pair_rows,
            "models": models,
            "errors": tile_errors,
            "vqa_mode": job["vqa_mode"],
        }
        io.write_bytes_atomic(io.join(out, "data", "tiles", f"{name}.js"), _script("tiles", tid, detail))
        rejected = sorted({r for p in tp if not p["qc_passed"] for r in p["qc_reasons"] or []})
        row = {
            "id": tid,
            "file": name,
            "scene": t["scene_id"],
            "region": t["region"],
            "gsd": f"{t['gsd_m']:g} m",
            "split": split,
            "class": sorted({o["class"] for o in objects}),
            "application": sorted({p["application"] for p in tp if p["qc_passed"]}),
            "qc": ["rejected: " + r for r in rejected] or ["passed" if tp else "no pairs"],
            "error": sorted({e["error_class"] for e in tile_errors}) or ["none"],
            "pairs": len(tp),
            "fp": _lonlat_rings(t["footprint"]),
        }
        rows.append(row)
        key = _sample_key(tid)
        for f in FILTERS:
            for value in row[f] if isinstance(row[f], list) else [row[f]]:
                counts[f][value] += 1
                kept = samples[f].setdefault(value, [])
                kept.append((key, row))
                if len(kept) > job["sample"]:
                    kept.sort(key=lambda kv: kv[0])
                    kept.pop()
    io.write_bytes_atomic(
        io.join(out, "data", "pages", f"{job['index']}.js"), _script("pages", str(job["index"]), rows)
    )
    return {
        "index": job["index"],
        "tiles": len(rows),
        "exported": sum(r["split"] != NOT_EXPORTED for r in rows),
        "counts": {f: dict(c) for f, c in counts.items()},
        "samples": samples,
    }


def _merge_samples(kept: dict, part: dict, n: int) -> None:
    for f, values in part.items():
        for value, rows in values.items():
            both = sorted(
                kept.setdefault(f, {}).get(value, []) + [tuple(r) for r in rows], key=lambda kv: kv[0]
            )
            kept[f][value] = both[:n]


def _scenes(run_dir: str) -> list[dict]:
    uri = tables.scenes_uri(run_dir)
    if not io.exists(uri):
        return []
    rows = io.read_parquet(uri, columns=["scene_id", "region", "gsd_m", "footprint"]).to_pylist()
    return [
        {
            "id": r["scene_id"],
            "region": r["region"],
            "gsd": r["gsd_m"],
            "fp": _lonlat_rings(r["footprint"], 5),
        }
        for r in rows
    ]


def _errors_page(run_dir: str, out: str, max_rows: int) -> dict:
    """Counts of the errors table per stage and class, and its first ``max_rows`` rows (one column set
    read)."""
    t = tables.read_errors(run_dir)
    cols = [c for c in ("stage", "item", "error_class", "message") if c in t.schema.names]
    t = t.select(cols)
    counts = Counter(zip(t["stage"].to_pylist(), t["error_class"].to_pylist())) if t.num_rows else Counter()
    data = {
        "total": t.num_rows,
        "counts": [{"stage": s, "error_class": c, "n": n} for (s, c), n in counts.most_common()],
        "rows": t.slice(0, max_rows).to_pylist(),
    }
    io.write_bytes_atomic(io.join(out, "data", "errors.js"), _script("errors", None, data))
    return {"errors": t.num_rows}


def _copy_json(run_dir: str, rel: str, out: str, var: str) -> bool:
    uri = io.join(run_dir, rel)
    obj = io.read_json(uri) if io.exists(uri) else None
    io.write_bytes_atomic(io.join(out, "data", f"{var}.js"), _script(var, None, obj))
    return obj is not None


def build_site(
    run_dir: str,
    out: str | None = None,
    sample: int = 100,
    thumb_px: int = 128,
    basemap: str | None = None,
    max_errors: int = 2000,
    max_in_flight: int | None = None,
) -> dict:
    """Write the site of ``run_dir`` (local or ``s3://``) to ``out`` (default ``RUN_DIR/view``); return its
    manifest.

    Ray must be initialised (the CLI connects as the pipeline does). ``sample``: tiles kept per filter value
    for the grid; ``basemap``: an XYZ tile URL template (``https://.../{z}/{x}/{y}.png``) drawn under the
    map's footprints when the browser can reach it."""
    import ray

    run_dir = run_dir.rstrip("/")
    out = (out or io.join(run_dir, "view")).rstrip("/")
    if not io.exists(io.join(run_dir, "align", "_SUCCESS.json")) and not tables.tiles_table_shards(run_dir):
        raise FileNotFoundError(
            f"{run_dir} holds no tiles table (align/shards/): run `sarlang run` (at least up to "
            "align) into it first"
        )
    io.makedirs(out)
    static = resources.files("sarlang_ray") / "view_static"
    for name in STATIC:
        io.write_bytes_atomic(io.join(out, name), (static / name).read_bytes())
    shell = (static / "page.html").read_text()
    for page, title in PAGES.items():
        io.write_bytes_atomic(
            io.join(out, f"{page}.html"), shell.replace("{title}", title).replace("{page}", page).encode()
        )
    jobs = shard_jobs(run_dir, out, thumb_px, sample)
    task = ray.remote(num_cpus=1, max_retries=2)(view_shard)
    width = max_in_flight or max(2, int(ray.cluster_resources().get("CPU", 2)) * 2)
    counts: dict[str, Counter] = {f: Counter() for f in FILTERS}
    kept: dict = {}
    pages, n_tiles, n_exported = [], 0, 0
    pending: list[ray.ObjectRef] = []
    todo = list(jobs)
    while todo or pending:  # a bounded window of tasks: results are merged (and dropped) as they come back
        while todo and len(pending) < width:
            pending.append(task.remote(todo.pop(0)))
        done, pending = ray.wait(pending, num_returns=1)
        part = ray.get(done[0])
        pages.append({"index": part["index"], "tiles": part["tiles"]})
        n_tiles += part["tiles"]
        n_exported += part["exported"]
        for f, c in part["counts"].items():
            counts[f].update(c)
        _merge_samples(kept, part["samples"], sample)
    sampled: dict[str, dict] = {}
    for values in kept.values():
        for _, row in (kv for rows in values.values() for kv in rows):
            sampled[row["id"]] = row
    rows = sorted(sampled.values(), key=lambda r: r["id"])
    io.write_bytes_atomic(io.join(out, "data", "sample.js"), _script("sample", None, rows))
    errors = _errors_page(run_dir, out, max_errors)
    has = {
        "leakage": _copy_json(run_dir, "export/leakage.json", out, "leakage"),
        "leaderboard": _copy_json(run_dir, "evaluate/leaderboard.json", out, "leaderboard"),
    }
    summary_uri = io.join(run_dir, "summary.json")
    manifest = {
        "run_dir": run_dir,
        "tiles": n_tiles,
        "exported": n_exported,
        "sample_per_value": sample,
        "sampled": len(rows),
        "pages": sorted(pages, key=lambda p: p["index"]),
        "counts": {f: dict(sorted(c.items())) for f, c in counts.items()},
        "scenes": _scenes(run_dir),
        "basemap": basemap,
        "summary": io.read_json(summary_uri) if io.exists(summary_uri) else None,
        **errors,
        "has": has,
    }
    io.write_bytes_atomic(io.join(out, "data", "manifest.js"), _script("manifest", None, manifest))
    return {k: v for k, v in manifest.items() if k not in ("scenes", "summary", "pages")} | {
        "out": out,
        "pages": len(pages),
    }


def make_server(folder: str, port: int = 8000, host: str = "127.0.0.1") -> http.server.ThreadingHTTPServer:
    """An HTTP server of a local site folder (port 0: any free port; ``server_address`` says which)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder)
    return http.server.ThreadingHTTPServer((host, port), handler)


def serve(folder: str, port: int = 8000, host: str = "127.0.0.1") -> None:
    """Serve a local site folder over HTTP until interrupted (``sarlang view --serve``)."""
    with make_server(folder, port, host) as httpd:
        print(f"serving {folder} on http://{host}:{httpd.server_address[1]}/ (Ctrl-C stops)", flush=True)
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass


__all__ = ["FILTERS", "NOT_EXPORTED", "build_site", "make_server", "serve", "shard_jobs", "view_shard"]
