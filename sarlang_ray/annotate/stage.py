"""The annotate stage: tiles table shards -> annotation shards, on a Ray Data actor pool.

A backend is any object with a ``name`` and ``annotate(tile: dict) -> list[dict]`` (pairs with ``kind``,
``application``, ``question_type``, ``question``, ``answer``); ``annotate.backend`` names a built-in one
(``template``, ``hf``, ``openai``, ``vllm``) or ``package.module:Class`` of your own (constructed with the
annotate config section). ``vllm`` generates for the whole stage on Ray Data LLM first
(:func:`sarlang_ray.annotate.vllm_backend.annotate_shards`), then writes each shard through this class.
A backend that raises, or returns malformed pairs, loses that tile only: it goes to the errors table
with the reason and the run goes on. Counts reconcile per tile (planned = written + rejected) and per
pair (planned = passed QC + rejected by QC); ``annotate/qc_report.json`` counts each rule's hits. The
contradiction findings of each shard (rule, message, the statements involved) are kept beside it in
``annotate/findings/<scene>/<name>.json``, so a resumed stage reports them exactly as an uninterrupted one.
"""

from __future__ import annotations

import importlib
import json
from collections import Counter

import pyarrow as pa

from sarlang_ray import io
from sarlang_ray.annotate.consistency import RULES as CONTRADICTION_RULES
from sarlang_ray.annotate.qc import RULES, qc_tile
from sarlang_ray.annotate.template import TemplateAnnotator
from sarlang_ray.annotate.visibility import Visibility
from sarlang_ray.annotate.vocab import APPLICATIONS
from sarlang_ray.config import AnnotateSection
from sarlang_ray.errors import error_row, errors_table, reasons_json
from sarlang_ray.tables import ANNOTATE_TILE_COLUMNS as TILE_COLUMNS
from sarlang_ray.tables import ANNOTATION_SCHEMA

STAGE = "annotate"
KINDS = ("caption_concise", "caption_detailed", "vqa")


def load_backend(cfg: AnnotateSection, seed: int, max_pixels: int | None = None):
    if cfg.backend == "template":
        return TemplateAnnotator(seed=seed, identification_pairs=cfg.identification_pairs, max_per_family=cfg.max_per_family,
                                 visibility=Visibility.from_config(cfg))
    if cfg.backend == "hf":
        from sarlang_ray.annotate.hf_backend import HFAnnotator

        return HFAnnotator(cfg, seed, max_pixels)
    if cfg.backend == "openai":
        from sarlang_ray.annotate.openai_backend import OpenAIAnnotator

        return OpenAIAnnotator(cfg)
    if cfg.backend == "vllm":  # generation runs for the whole stage on Ray Data LLM (vllm_backend.annotate_shards)
        from sarlang_ray.annotate.vllm_backend import VLLMAnnotator

        return VLLMAnnotator(cfg, seed, max_pixels)
    if ":" not in cfg.backend:
        raise ValueError(f"unknown annotate.backend {cfg.backend!r}: use template, hf, vllm, openai or package.module:Class")
    module, cls = cfg.backend.split(":", 1)
    return getattr(importlib.import_module(module), cls)(cfg)


def backend_name(cfg: AnnotateSection) -> str:
    """The name the backend's pairs carry (their ``backend`` column), without loading a model."""
    if ":" not in cfg.backend:
        return cfg.backend
    module, cls = cfg.backend.split(":", 1)
    return getattr(getattr(importlib.import_module(module), cls, None), "name", cfg.backend)


def validate_pairs(pairs) -> str | None:
    """Why a backend's output is malformed, or None if it is fine."""
    if not isinstance(pairs, list) or not pairs:
        return f"expected a non-empty list of pairs, got {type(pairs).__name__}"
    for i, p in enumerate(pairs):
        if not isinstance(p, dict):
            return f"pair {i} is a {type(p).__name__}, not a dict"
        if p.get("kind") not in KINDS:
            return f"pair {i}: kind {p.get('kind')!r} not in {KINDS}"
        if p.get("application") not in APPLICATIONS:
            return f"pair {i}: application {p.get('application')!r} is not one of the seven"
        for key in ("question", "answer", "question_type"):
            if not isinstance(p.get(key), str) or not p[key].strip():
                return f"pair {i}: {key} is missing or empty"
    return None


class AnnotateShard:
    """Ray Data row function (actor pool): one tiles shard -> one annotations shard."""

    def __init__(self, cfg: AnnotateSection, run_dir: str, seed: int, max_pixels: int | None = None):
        self.cfg = cfg
        self.backend = load_backend(cfg, seed, max_pixels)
        self.tiles = io.join(run_dir, "align", "shards")
        self.out = io.join(run_dir, STAGE, "shards")
        self.errors = io.join(run_dir, STAGE, "errors")
        self.findings = io.join(run_dir, STAGE, "findings")
        self.visibility = Visibility.from_config(cfg)

    def _annotate_all(self, tiles: list[dict]) -> list:
        """Pairs (or the exception) per tile; backends with ``annotate_many`` run tiles concurrently."""
        if hasattr(self.backend, "annotate_many"):
            return self.backend.annotate_many(tiles)
        out = []
        for tile in tiles:
            try:
                out.append(self.backend.annotate(tile))
            except Exception as exc:  # contained: this tile goes to the errors table
                out.append(exc)
        return out

    def __call__(self, row: dict) -> dict:
        name = row["shard"]
        out_uri = io.join(self.out, name)
        if io.exists(out_uri):  # written by an earlier (interrupted) run or a killed worker: count it again
            done = io.read_parquet(out_uri, columns=["tile_id", "qc_passed", "qc_reasons"])
            shard_errors = io.read_parquet(io.join(self.errors, name), columns=["error_class"]).to_pylist()
            n_err = len(shard_errors)
            tiles = len(set(done["tile_id"].to_pylist()))
            hits = Counter(r for reasons in done["qc_reasons"].to_pylist() for r in reasons)
            return {"shard": name, "planned": tiles + n_err, "written": tiles, "rejected": n_err, "skipped": True,
                    "reasons": reasons_json(shard_errors),
                    "pairs": done.num_rows, "pairs_passed": sum(done["qc_passed"].to_pylist()), "qc_hits": _hits_json(hits),
                    "findings": json.dumps(io.read_json(self._findings_uri(name)))}
        tiles = io.read_parquet(io.join(self.tiles, name), columns=TILE_COLUMNS).to_pylist()
        rows, errors, hits, findings = [], [], Counter(), []
        for tile, pairs in zip(tiles, self._annotate_all(tiles)):
            tid = tile["tile_id"]
            if isinstance(pairs, Exception):
                errors.append(error_row(STAGE, tid, "backend_error", f"backend {self.cfg.backend!r} failed on {tid}: "
                                        f"{type(pairs).__name__}: {pairs}. The tile is skipped; re-run to retry it."))
                continue
            problem = validate_pairs(pairs)
            if problem:
                errors.append(error_row(STAGE, tid, "malformed_output", f"backend {self.cfg.backend!r} on {tid}: {problem}."))
                continue
            checked, found = qc_tile(pairs, tile["objects"], self.cfg.qc, tile, self.visibility)
            backend = getattr(self.backend, "name", self.cfg.backend)
            findings += [{**f.example(tid, [{**p, "pair_id": f"{tid}#{i:03d}"} for i, p in enumerate(checked)]),
                          "backend": backend} for f in found]
            for i, p in enumerate(checked):
                hits.update(p["qc_reasons"])
                rows.append({"pair_id": f"{tid}#{i:03d}", "tile_id": tid, "scene_id": tile["scene_id"], "gsd_m": tile["gsd_m"],
                             "kind": p["kind"], "application": p["application"], "question_type": p["question_type"],
                             "question": p["question"], "answer": p["answer"], "backend": backend,
                             "qc_passed": p["qc_passed"], "qc_reasons": p["qc_reasons"]})
        io.write_parquet_atomic(io.join(self.errors, name), errors_table(errors))
        io.write_json_atomic(self._findings_uri(name), findings)  # before the shard: a written shard has its findings
        io.write_parquet_atomic(out_uri, pa.Table.from_pylist(rows, schema=ANNOTATION_SCHEMA))
        return {"shard": name, "planned": len(tiles), "written": len(tiles) - len(errors), "rejected": len(errors),
                "skipped": False, "reasons": reasons_json(errors), "pairs": len(rows), "pairs_passed": sum(r["qc_passed"] for r in rows),
                "qc_hits": _hits_json(hits), "findings": json.dumps(findings)}

    def _findings_uri(self, name: str) -> str:
        return io.join(self.findings, name.rsplit(".", 1)[0] + ".json")


def contradiction_report(findings: list[dict], backend: str, examples: int = 3) -> dict:
    """The ``contradictions`` entry of qc_report.json: findings per rule, per rule and backend (the name the
    pairs carry; ``backend`` when there is no finding), the tiles with one, and a few examples per rule in a
    stable order (tile id), whatever order the shards finished in."""
    counts = Counter(f["rule"] for f in findings)
    by_backend: dict[str, Counter] = {}
    for f in findings:
        by_backend.setdefault(f["backend"], Counter())[f["rule"]] += 1
    ordered = sorted(findings, key=lambda f: (f["tile_id"], f["message"], json.dumps(f["statements"])))
    return {"findings": {r: counts[r] for r in CONTRADICTION_RULES},
            "by_backend": {b: {r: c[r] for r in CONTRADICTION_RULES} for b, c in sorted(by_backend.items())}
            or {backend: {r: 0 for r in CONTRADICTION_RULES}},
            "tiles": len({f["tile_id"] for f in findings}),
            "examples": {r: [f for f in ordered if f["rule"] == r][:examples] for r in CONTRADICTION_RULES if counts[r]}}


def _hits_json(hits: Counter) -> str:
    """QC rule hits of one shard, for the stage's qc_report.json."""
    return json.dumps({k: hits[k] for k in RULES if hits[k]})
