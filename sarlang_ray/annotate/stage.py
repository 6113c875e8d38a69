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
``annotate/findings/<scene>/<name>.json`` (only for a shard that has some), so a resumed stage reports them
exactly as an uninterrupted one.
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
from sarlang_ray.errors import error_row, reasons_json
from sarlang_ray.rows import AnnotateTileRow
from sarlang_ray.tables import ANNOTATE_TILE_COLUMNS as TILE_COLUMNS
from sarlang_ray.tables import ANNOTATION_SCHEMA, read_error_rows, write_errors, write_rows_file

STAGE = "annotate"
KINDS = ("caption_concise", "caption_detailed", "vqa")


def load_backend(cfg: AnnotateSection, seed: int, max_pixels: int | None = None):
    if cfg.backend == "template":
        return TemplateAnnotator(
            seed=seed,
            identification_pairs=cfg.identification_pairs,
            max_per_family=cfg.max_per_family,
            visibility=Visibility.from_config(cfg),
        )
    if cfg.backend == "hf":
        from sarlang_ray.annotate.hf_backend import HFAnnotator

        return HFAnnotator(cfg, seed, max_pixels)
    if cfg.backend == "openai":
        from sarlang_ray.annotate.openai_backend import OpenAIAnnotator

        return OpenAIAnnotator(cfg)
    # generation runs for the whole stage on Ray Data LLM (vllm_backend.annotate_shards)
    if cfg.backend == "vllm":
        from sarlang_ray.annotate.vllm_backend import VLLMAnnotator

        return VLLMAnnotator(cfg, seed, max_pixels)
    if ":" not in cfg.backend:
        raise ValueError(
            f"unknown annotate.backend {cfg.backend!r}: use template, hf, vllm, openai or "
            "package.module:Class"
        )
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
    """Ray Data row function (actor pool): one tiles shard -> one annotations shard.

    ``retry``: a shard written before is not only counted again: the tiles of its errors table are annotated
    again and their pairs merged into it (in tile order, as one run would have written them); the others'
    pairs are kept as they are (``run.retry_errors=true``: paid requests that succeeded are not made twice).
    """

    def __init__(
        self,
        cfg: AnnotateSection,
        run_dir: str,
        seed: int,
        max_pixels: int | None = None,
        retry: bool = False,
    ):
        self.cfg = cfg
        self.backend = load_backend(cfg, seed, max_pixels)
        self.tiles = io.join(run_dir, "align", "shards")
        self.out = io.join(run_dir, STAGE, "shards")
        self.errors = io.join(run_dir, STAGE, "errors")
        self.findings = io.join(run_dir, STAGE, "findings")
        self.visibility = Visibility.from_config(cfg)
        self.retry = retry

    def _annotate_all(self, tiles: list[AnnotateTileRow]) -> list:
        """Pairs (or the exception) per tile; backends with ``annotate_many`` run tiles concurrently."""
        if hasattr(self.backend, "annotate_many"):
            return self.backend.annotate_many(tiles)
        out = []
        for tile in tiles:
            try:
                out.append(self.backend.annotate(tile))
            except Exception as exc:  # noqa: BLE001 - contained: this tile goes to the errors table
                out.append(exc)
        return out

    def __call__(self, row: dict) -> dict:
        name = row["shard"]
        out_uri = io.join(self.out, name)
        kept = None  # a retry: the pairs and findings of the tiles that succeeded before
        # written by an earlier run (interrupted, or finished and now retried) or a killed worker
        if io.exists(out_uri):
            ids = io.read_parquet(io.join(self.tiles, name), columns=["tile_id"])["tile_id"].to_pylist()
            done = io.read_parquet(out_uri).to_pylist()
            # the failed tiles: those without a pair (a tile the backend answered has one, QC-rejected or
            # not), so a retry killed between its writes loses no tile and annotates none twice
            failed = set(ids) - {r["tile_id"] for r in done} if self.retry else set()
            if not failed:
                return self._counted(name, len(ids), done)
            kept = done, self._read_findings(name)
        tiles = io.read_parquet(io.join(self.tiles, name), columns=TILE_COLUMNS).to_pylist()
        order, planned = {t["tile_id"]: i for i, t in enumerate(tiles)}, len(tiles)
        if kept is not None:
            tiles = [t for t in tiles if t["tile_id"] in failed]
        rows, errors, findings = self._annotate(tiles)
        if kept is not None:
            rows = sorted(kept[0] + rows, key=lambda r: (order[r["tile_id"]], r["pair_id"]))
            findings = kept[1] + findings
        # side files only when they have rows (a retry that fixed every tile removes the old ones); both
        # before the shard: a written shard has its errors and findings
        write_errors(io.join(self.errors, name), errors)
        write_rows_file(self._findings_uri(name), findings, io.write_json_atomic)
        io.write_parquet_atomic(out_uri, pa.Table.from_pylist(rows, schema=ANNOTATION_SCHEMA))
        return {
            "shard": name,
            "planned": planned,
            "written": planned - len(errors),
            "rejected": len(errors),
            "skipped": False,
            "retried": len(tiles) if kept is not None else 0,
            **_pair_counts(rows),
            "reasons": reasons_json(errors),
            "findings": json.dumps(findings),
        }

    def _annotate(self, tiles: list[AnnotateTileRow]) -> tuple[list[dict], list[dict], list[dict]]:
        """The annotation rows, error rows and contradiction findings of ``tiles``."""
        rows, errors, findings = [], [], []
        for tile, pairs in zip(tiles, self._annotate_all(tiles)):
            tid = tile["tile_id"]
            if isinstance(pairs, Exception):
                errors.append(
                    error_row(
                        STAGE,
                        tid,
                        "backend_error",
                        f"backend {self.cfg.backend!r} failed on {tid}: "
                        f"{type(pairs).__name__}: {pairs}. The tile is skipped; run annotate again with "
                        "run.retry_errors=true to retry the failed tiles only.",
                    )
                )
                continue
            problem = validate_pairs(pairs)
            if problem:
                errors.append(
                    error_row(
                        STAGE, tid, "malformed_output", f"backend {self.cfg.backend!r} on {tid}: {problem}."
                    )
                )
                continue
            checked, found = qc_tile(pairs, tile["objects"], self.cfg.qc, tile, self.visibility)
            backend = getattr(self.backend, "name", self.cfg.backend)
            findings += [
                {
                    **f.example(tid, [{**p, "pair_id": f"{tid}#{i:03d}"} for i, p in enumerate(checked)]),
                    "backend": backend,
                }
                for f in found
            ]
            rows += [
                {
                    "pair_id": f"{tid}#{i:03d}",
                    "tile_id": tid,
                    "scene_id": tile["scene_id"],
                    "gsd_m": tile["gsd_m"],
                    "kind": p["kind"],
                    "application": p["application"],
                    "question_type": p["question_type"],
                    "question": p["question"],
                    "answer": p["answer"],
                    "backend": backend,
                    "qc_passed": p["qc_passed"],
                    "qc_reasons": p["qc_reasons"],
                }
                for i, p in enumerate(checked)
            ]
        return rows, errors, findings

    def _counted(self, name: str, planned: int, done: list[dict]) -> dict:
        """The manifest row of a shard written before (``done``: its pairs), counted again by a resumed or
        retried stage: written are the tiles with pairs, the reasons those of its errors table."""
        shard_errors = read_error_rows(io.join(self.errors, name), ["error_class"])
        tiles = len({r["tile_id"] for r in done})
        return {
            "shard": name,
            "planned": planned,
            "written": tiles,
            "rejected": planned - tiles,
            "skipped": True,
            "retried": 0,
            **_pair_counts(done),
            "reasons": reasons_json(shard_errors),
            "findings": json.dumps(self._read_findings(name)),
        }

    def _findings_uri(self, name: str) -> str:
        return io.join(self.findings, name.rsplit(".", 1)[0] + ".json")

    def _read_findings(self, name: str) -> list[dict]:
        """A written shard's contradiction findings; [] when it has no file (the shard had none)."""
        uri = self._findings_uri(name)
        return io.read_json(uri) if io.exists(uri) else []


def contradiction_report(findings: list[dict], backend: str, examples: int = 3) -> dict:
    """The ``contradictions`` entry of qc_report.json: findings per rule, per rule and backend (the name the
    pairs carry; ``backend`` when there is no finding), the tiles with one, and a few examples per rule in a
    stable order (tile id), whatever order the shards finished in."""
    counts = Counter(f["rule"] for f in findings)
    by_backend: dict[str, Counter] = {}
    for f in findings:
        by_backend.setdefault(f["backend"], Counter())[f["rule"]] += 1
    ordered = sorted(findings, key=lambda f: (f["tile_id"], f["message"], json.dumps(f["statements"])))
    return {
        "findings": {r: counts[r] for r in CONTRADICTION_RULES},
        "by_backend": {b: {r: c[r] for r in CONTRADICTION_RULES} for b, c in sorted(by_backend.items())}
        or {backend: {r: 0 for r in CONTRADICTION_RULES}},
        "tiles": len({f["tile_id"] for f in findings}),
        "examples": {
            r: [f for f in ordered if f["rule"] == r][:examples] for r in CONTRADICTION_RULES if counts[r]
        },
    }


def _pair_counts(rows: list[dict]) -> dict:
    """A shard's pair counts for its manifest row: pairs, QC-passed pairs, QC rule hits (the stage's
    qc_report.json) and QC-passed pairs per application (the run summary), the last two as JSON."""
    hits = Counter(r for p in rows for r in p["qc_reasons"])
    apps = Counter(p["application"] for p in rows if p["qc_passed"])
    return {
        "pairs": len(rows),
        "pairs_passed": sum(p["qc_passed"] for p in rows),
        "qc_hits": json.dumps({k: hits[k] for k in RULES if hits[k]}),
        "applications": json.dumps(dict(sorted(apps.items()))),
    }
