"""export: leakage-free splits, then the dataset in four forms, written shard by shard.

* ``export/parquet/<split>/<shard>.parquet``: one row per QC-passed pair with the SAR tile as an
  ``image`` {bytes, path} column and Hugging Face ``features`` metadata, so
  ``datasets.load_dataset("parquet", data_files=...)`` decodes images.
* ``export/llamafactory/``: ShareGPT JSON per split (``messages`` + ``images``, one ``<image>`` per image),
  ``dataset_info.json``, and the PNGs under ``images/``.
* ``export/sarlang1m/``: the SARLANG-1M release layout: ``SAR_images/``, ``captions/{concise,detailed}_<split>.csv``
  (``image,caption``), ``vqa/vqa_<split>.json`` in LLaMA-Factory form (plus ``application``,
  ``question_type`` and ``pair_id`` keys, which LLaMA-Factory ignores). :mod:`sarlang_ray.release` reads it back
  (``import_sarlang1m`` and ``release_image`` are re-exported here).
* ``export/dataset_card.md`` with counts and PNG plots.

Splits are by scene (``export.split_by: scene``) or region, so no scene lands in two splits: groups are
ordered by a seeded hash and each goes to the split furthest below its target share of tiles.
"""

from __future__ import annotations

import csv
import io as _io
import json
from collections import Counter

import pyarrow as pa
import shapely

from sarlang_ray import io, plots, tables
from sarlang_ray.config import WorkflowConfig
from sarlang_ray.errors import error_row, errors_table
from sarlang_ray.splits import SPLITS, SplitTile, geographic_splits, group_splits, leakage_report

PAIR_COLUMNS = ["pair_id", "tile_id", "scene_id", "gsd_m", "kind", "application", "question_type", "question", "answer"]
HF_FEATURES = {
    "pair_id": {"dtype": "string", "_type": "Value"}, "tile_id": {"dtype": "string", "_type": "Value"},
    "scene_id": {"dtype": "string", "_type": "Value"}, "gsd_m": {"dtype": "float64", "_type": "Value"},
    "kind": {"dtype": "string", "_type": "Value"}, "application": {"dtype": "string", "_type": "Value"},
    "question_type": {"dtype": "string", "_type": "Value"}, "question": {"dtype": "string", "_type": "Value"},
    "answer": {"dtype": "string", "_type": "Value"}, "split": {"dtype": "string", "_type": "Value"},
    "image": {"_type": "Image"},
}
EXPORT_SCHEMA = pa.schema(
    [(c, pa.float64() if c == "gsd_m" else pa.string()) for c in PAIR_COLUMNS]
    + [("split", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))]
).with_metadata({b"huggingface": json.dumps({"info": {"features": HF_FEATURES}}).encode()})


def _image_name(tile_id: str) -> str:
    return f"{tile_id}.png"


def split_tiles(cfg: WorkflowConfig) -> list[SplitTile]:
    """The tiles that have QC-passed pairs (the ones export writes), as split inputs; read shard by shard."""
    run_dir = cfg.run.run_dir
    out = []
    for tile_uri in tables.tile_shards(run_dir):
        ann_uri = io.join(tables.shard_root(run_dir, "annotate"), io.relative(tile_uri, tables.shard_root(run_dir, "align")))
        if not io.exists(ann_uri):
            continue
        ann = io.read_parquet(ann_uri, columns=["tile_id", "qc_passed"])
        used = {t for t, ok in zip(ann["tile_id"].to_pylist(), ann["qc_passed"].to_pylist()) if ok}
        cols = ["tile_id", "scene_id", "region", "footprint", "crs", "objects"]
        for t in io.read_parquet(tile_uri, columns=cols).to_pylist():
            if t["tile_id"] in used:
                out.append(SplitTile(t["tile_id"], t["scene_id"], t["region"], shapely.from_wkb(t["footprint"]), t["crs"],
                                     frozenset(o["label_id"] for o in t["objects"] if o["label_id"])))
    return out


def run_export(cfg: WorkflowConfig) -> dict:
    run_dir, e = cfg.run.run_dir, cfg.export
    out = io.join(run_dir, "export")
    ratios = {"train": e.train, "val": e.val, "test": e.test}
    candidates = split_tiles(cfg)
    dropped: dict[str, str] = {}
    if e.split_by == "geographic":
        tile_split, dropped = geographic_splits(candidates, ratios, cfg.run.seed, e.block_m, e.buffer_m)
    else:
        tile_split = group_splits(candidates, e.split_by, ratios, cfg.run.seed)
    leakage = leakage_report(candidates, tile_split, e.buffer_m)
    leakage.update(split_by=e.split_by, dropped_tiles=len(dropped))
    io.write_json_atomic(io.join(out, "leakage.json"), leakage)
    io.write_parquet_atomic(io.join(out, "errors.parquet"), errors_table(
        [error_row("export", tid, "split_boundary", why) for tid, why in sorted(dropped.items())]))

    llama = {s: [] for s in SPLITS}
    captions = {(k, s): [] for k in ("concise", "detailed") for s in SPLITS}
    stats = {"pairs": Counter(), "applications": Counter(), "question_types": Counter(), "classes": Counter(),
             "landcover": Counter(), "gsd": Counter(), "tiles": Counter()}
    ann_root = io.join(run_dir, "annotate", "shards")
    tile_root = io.join(run_dir, "align", "shards")
    for tile_uri in tables.tile_shards(run_dir):
        name = io.relative(tile_uri, tile_root)
        tiles = {t["tile_id"]: t for t in io.read_parquet(tile_uri, columns=["tile_id", "scene_id", "gsd_m", "sar_png", "objects", "landcover"]).to_pylist()}
        ann_uri = io.join(ann_root, name)
        pairs = [p for p in io.read_parquet(ann_uri, columns=PAIR_COLUMNS + ["qc_passed"]).to_pylist()
                 if p["qc_passed"] and p["tile_id"] in tile_split] if io.exists(ann_uri) else []
        used = sorted({p["tile_id"] for p in pairs})
        for tid in used:  # images once per tile, in both image folders
            png = tiles[tid]["sar_png"]
            io.write_bytes_atomic(io.join(out, "llamafactory", "images", _image_name(tid)), png)
            io.write_bytes_atomic(io.join(out, "sarlang1m", "SAR_images", _image_name(tid)), png)
            t = tiles[tid]
            stats["tiles"][tile_split[tid]] += 1
            stats["gsd"][f"{t['gsd_m']:g}"] += 1
            stats["classes"].update(o["class"] for o in t["objects"])
            stats["landcover"].update({k: v for k, v in (t["landcover"] or [])})
        rows = {s: [] for s in SPLITS}
        for p in pairs:
            split = tile_split[p["tile_id"]]
            image = _image_name(p["tile_id"])
            rows[split].append({**{c: p[c] for c in PAIR_COLUMNS}, "split": split,
                                "image": {"bytes": tiles[p["tile_id"]]["sar_png"], "path": image}})
            stats["pairs"][split] += 1
            stats["applications"][p["application"]] += 1
            stats["question_types"][p["question_type"]] += 1
            record = {"messages": [{"role": "user", "content": "<image>" + p["question"]},
                                   {"role": "assistant", "content": p["answer"]}],
                      "images": [f"images/{image}"],
                      "pair_id": p["pair_id"], "application": p["application"], "question_type": p["question_type"]}
            llama[split].append(record)
            if p["kind"] != "vqa":
                captions[(p["kind"].split("_")[1], split)].append({"image": image, "caption": p["answer"]})
        for split, r in rows.items():
            if r:
                io.write_parquet_atomic(io.join(out, "parquet", split, name.replace("/", "__")), pa.Table.from_pylist(r, schema=EXPORT_SCHEMA))

    info = {}
    for split in SPLITS:
        io.write_json_atomic(io.join(out, "llamafactory", f"sarlang_{split}.json"), llama[split])
        info[f"sarlang_{split}"] = {"file_name": f"sarlang_{split}.json", "formatting": "sharegpt",
                                    "columns": {"messages": "messages", "images": "images"},
                                    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}
        vqa = [{**r, "images": [r["images"][0].replace("images/", "SAR_images/")]} for r in llama[split]
               if r["application"] != "image description"]
        io.write_json_atomic(io.join(out, "sarlang1m", "vqa", f"vqa_{split}.json"), vqa)
        for kind in ("concise", "detailed"):
            buf = _io.StringIO()
            w = csv.DictWriter(buf, fieldnames=["image", "caption"])
            w.writeheader()
            w.writerows(captions[(kind, split)])
            io.write_bytes_atomic(io.join(out, "sarlang1m", "captions", f"{kind}_{split}.csv"), buf.getvalue().encode())
    io.write_json_atomic(io.join(out, "llamafactory", "dataset_info.json"), info)
    counts = {"splits": {s: {"tiles": stats["tiles"][s], "pairs": stats["pairs"][s]} for s in SPLITS},
              "planned": len(candidates), "written": len(candidates) - len(dropped), "rejected": len(dropped),
              "question_types": len(stats["question_types"]),
              "leakage": {k: v for k, v in leakage.items() if k in ("leak_free", "pairs")}}
    write_card(out, cfg, stats, counts, leakage)
    return counts


def write_card(out: str, cfg: WorkflowConfig, stats: dict, counts: dict, leakage: dict) -> None:
    """dataset_card.md with counts, distributions, the leakage report, contradictions and PNG plots."""
    from sarlang_ray.annotate import consistency
    plt = plots.pyplot()
    charts = {
        "applications.png": ("Pairs per application", stats["applications"]),
        "classes.png": ("Objects per class", stats["classes"]),
        "landcover.png": ("Land cover (sum of tile fractions)", stats["landcover"]),
        "gsd.png": ("Tiles per GSD (m)", Counter(dict(sorted(stats["gsd"].items(), key=lambda kv: float(kv[0]))))),
    }
    twins = _twin_section(cfg.run.run_dir, out, plt)
    for fname, (title, counter) in charts.items():
        items = list(counter.items()) if fname == "gsd.png" else counter.most_common()
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.bar([f"{k} m" if fname == "gsd.png" else str(k) for k, _ in items], [v for _, v in items], color="#3b6ea5")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        plots.save_png(fig, io.join(out, "plots", fname))

    def table(counter: Counter, head: str) -> str:
        rows = "\n".join(f"| {k} | {v:g} |" for k, v in counter.most_common())
        return f"| {head} | count |\n|---|---|\n{rows}\n"

    splits = "\n".join(f"| {s} | {c['tiles']} | {c['pairs']} |" for s, c in counts["splits"].items())
    leaks = "\n".join(f"| {k} | {v['intersection_m2']:g} | {v['tile_pairs_within_buffer']} | {v['shared_objects']} |"
                      for k, v in leakage["pairs"].items())
    how = {"geographic": f"**geographic**: tiles on spatial blocks of {cfg.export.block_m:g} m (equal-area grid); tiles of "
                         f"different splits never share ground nor come closer than {cfg.export.buffer_m:g} m "
                         f"({leakage['dropped_tiles']} boundary tiles dropped, listed in `errors.parquet`)",
           "scene": "**scene** (weaker): no scene is in two splits, but scenes of the same ground can be",
           "region": "**region** (weaker): no region is in two splits"}[cfg.export.split_by]
    qtypes = Counter()
    for qt, n in stats["question_types"].items():
        qtypes[qt.split("/")[0]] += n
    card = f"""# Dataset card: {cfg.name}

SAR image-text pairs built by sarlang-ray (backend `{cfg.annotate.backend}`), QC-passed pairs only.
Splits {how} (seed {cfg.run.seed}).

| split | tiles | pairs |
|---|---|---|
{splits}

## Leakage between splits
Measured on the tiles written ({'no leakage' if leakage['leak_free'] else '**LEAKS**'}): ground area shared by
the footprints of two splits (geodesic), tile pairs that share ground or lie within {leakage['buffer_m']:g} m, label
objects that appear in both (`leakage.json`).

| splits | shared area (m²) | tile pairs within buffer | shared objects |
|---|---|---|---|
{leaks}

Distinct question types: {counts['question_types']}.

## Pairs per application
![applications](plots/applications.png)

{table(stats['applications'], 'application')}
## Pairs per question family
{table(qtypes, 'family')}
{consistency.card_section(cfg.run.run_dir, out, cfg.annotate)}
## Objects per class
![classes](plots/classes.png)

{table(stats['classes'], 'class')}
## Land cover
![landcover](plots/landcover.png)

{twins}
## Ground sample distance
![gsd](plots/gsd.png)

{table(stats['gsd'], 'GSD (m)')}
## Files
`parquet/<split>/` (Hugging Face `datasets`), `llamafactory/` (ShareGPT JSON + `dataset_info.json`),
`sarlang1m/` (SARLANG-1M layout: `SAR_images/`, `captions/*.csv`, `vqa/*.json`).
"""
    io.write_bytes_atomic(io.join(out, "dataset_card.md"), card.encode())


def _twin_section(run_dir: str, out: str, plt) -> str:
    """The card's optical-twin section: how each scene's twin was found, and a histogram of the time gaps
    between scenes and twins found by search (``plots/time_gap.png``), from the scenes table."""
    uri = tables.scenes_uri(run_dir)
    names = set(io.read_parquet(uri).schema.names) if io.exists(uri) else set()
    if "optical_gap_days" not in names:
        return ""
    scenes = io.read_parquet(uri, columns=["optical_source", "optical_gap_days", "optical_reason"]).to_pylist()
    how = Counter(s["optical_source"] or f"none ({s['optical_reason'] or 'no rule match'})" for s in scenes)
    gaps = [s["optical_gap_days"] for s in scenes if s["optical_gap_days"] is not None]
    text = "## Optical twins\n" + "\n".join(f"- {k}: {v} scene(s)" for k, v in sorted(how.items())) + "\n"
    if gaps:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.hist(gaps, bins=min(20, max(5, len(gaps))), color="#3b6ea5")
        ax.set_title("Time gap between SAR scene and optical twin")
        ax.set_xlabel("days")
        ax.set_ylabel("scenes")
        plots.save_png(fig, io.join(out, "plots", "time_gap.png"))
        text += (f"\nTime gap of the {len(gaps)} twins found by search: median {sorted(gaps)[len(gaps) // 2]:.2f} days, "
                 f"max {max(gaps):.2f} days (per scene in `catalog/scenes.parquet`: `optical_gap_days`).\n\n"
                 "![time gap](plots/time_gap.png)\n")
    return text + "\n"


# the release import lives in sarlang_ray.release; these names stay importable from here
from sarlang_ray.release import import_sarlang1m, release_image  # noqa: F401  (re-exported)
