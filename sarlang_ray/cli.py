"""Command line: ``sarlang <command> [workflow.yaml] [key=value ...]``.

Commands: ``run`` (all configured stages), one stage by name (``synth``, ``catalog``, ``tile``,
``align``, ``annotate``, ``export``, ``train``, ``evaluate``), ``config`` (print the resolved config), ``model
init-tiny DIR [--family F]`` (write a tiny offline VLM of a family) and ``model families`` (the family table),
``import RELEASE OUT.parquet [--sardet DIR] [--images DIR] [--embed-images] [--split S]`` (a SARLANG-1M
release as published, our own export's, or any LLaMA-Factory / ShareGPT JSON dataset, as a pairs table with an
errors table and a report), ``export-bench [workflow.yaml] [key=value ...]`` (the evaluated split as an
lmms-eval task and a VLMEvalKit TSV), ``score-bench PREDICTIONS`` (a harness's predictions scored with our
metrics), ``export-hf RUN_DIR|TABLE OUT`` (a Hugging Face dataset folder) and ``view RUN_DIR`` (a static site
to look at a run). Without a workflow file, the built-in defaults of :mod:`sarlang_ray.config` apply; they are
not ``workflows/demo.yaml`` (the demo also trains and evaluates, on its own tiny model): ``sarlang config``
prints what a command would use.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from sarlang_ray.config import STAGES, ConfigError, load_config, to_yaml

TOOLS = ("model", "import", "export-bench", "score-bench", "export-hf", "view")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own = {
        "import": _import,
        "score-bench": _score_bench,
        "model": _model,
        "export-hf": _export_hf,
        "view": _view,
    }
    if argv and argv[0] in own:  # commands with options of their own
        return own[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(prog="sarlang", description="SAR image-text dataset pipeline on Ray.")
    parser.add_argument("command", choices=["run", "config", *TOOLS, *STAGES], help="what to do")
    parser.add_argument("args", nargs="*", help="an optional workflow YAML, then key=value overrides")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Ray's progress bars, INFO lines and worker logs live (else they go to RUN_DIR/logs/)",
    )
    ns = parser.parse_args(argv)
    workflow = ns.args[0] if ns.args and "=" not in ns.args[0] else None
    overrides = ns.args[1:] if workflow else ns.args
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("sarlang").setLevel(logging.INFO)  # our stage log; third-party chatter stays at WARNING
    try:
        cfg = load_config(workflow, overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"sarlang: {exc}", file=sys.stderr)
        return 2
    if ns.command == "config":
        print(to_yaml(cfg))
        return 0
    if ns.command == "export-bench":
        return _export_bench(cfg, ns.json)
    from sarlang_ray import pipeline

    stages = None if ns.command == "run" else [ns.command]
    quiet = not (ns.verbose or ns.json)
    try:
        summary = _run_quietly(cfg, ns.command, stages) if quiet else pipeline.run(cfg, stages)
    except pipeline.StageFailed as exc:  # the work failed; what was written is on disk and in summary.json
        print(f"sarlang {ns.command}: failed: {exc}", file=sys.stderr)
        return 1
    # quiet: each stage's counts were printed as it ended
    print(
        json.dumps(summary, indent=2) if ns.json else pipeline.format_summary(summary, stage_lines=not quiet)
    )
    return 0


def _run_quietly(cfg, command: str, stages: list[str] | None) -> dict:
    """``pipeline.run`` with a person's terminal (sarlang_ray.console): stage lines, bars and counts here,
    Ray's own output in ``RUN_DIR/logs/<command>-<time>.log`` (a local file uploaded there at the end for an
    s3:// run)."""
    import os
    import shutil
    import tempfile
    import time

    from sarlang_ray import console, io, pipeline

    run_dir = cfg.run.run_dir
    name = f"{command}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.log"
    remote = io.is_remote(run_dir)
    local = os.path.join(
        tempfile.mkdtemp(prefix="sarlang-log-") if remote else os.path.abspath(run_dir), "logs", name
    )
    target = io.join(run_dir, "logs", name) if remote else local
    import ray

    ours = not ray.is_initialized()  # a Ray the command starts is shut down inside the capture: the workers'
    try:  # last lines, which the driver prints late, land in the log too
        with console.Capture(local) as cap:
            cap.write(
                f"sarlang {command} '{cfg.name}' -> {run_dir}; Ray's output: {target} (-v shows it here)"
            )
            failure: Exception | None = None
            try:
                summary = pipeline.run(cfg, stages, console=console.Console(cfg, cap.terminal))
            # not on an interrupt: its own path ends that Ray (stages.cluster, reaper
            except Exception as exc:  # noqa: BLE001
                failure = exc
            if ours and ray.is_initialized():
                ray.shutdown()
            if failure is not None:
                raise failure
            return summary
    finally:
        if remote:  # the capture has ended: the log is complete
            with open(local, "rb") as f:
                io.write_bytes_atomic(target, f.read())
            shutil.rmtree(os.path.dirname(os.path.dirname(local)), ignore_errors=True)


def _view(args: list[str]) -> int:
    """``sarlang view RUN_DIR [--out DIR] [--serve]``: a static site to browse a run (see
    sarlang_ray.view)."""
    parser = argparse.ArgumentParser(
        prog="sarlang view",
        description=(
            "Write a static site (index.html, data, thumbnails; opens from a file or any static host) to "
            "look at a run: "
            "tiles with filters, each tile's SAR and optical twin with boxes, pairs, QC verdicts and model "
            "answers, a map "
            "of footprints by split, the leakage report, the errors table and the leaderboard."
        ),
    )
    parser.add_argument("run_dir", help="the run folder (local or s3://)")
    parser.add_argument("--out", help="where to write the site (default RUN_DIR/view)")
    parser.add_argument(
        "--sample", type=int, default=100, help="tiles kept per filter value in the grid (default 100)"
    )
    parser.add_argument(
        "--basemap", help="an XYZ tile URL template ({z}/{x}/{y}) drawn under the map's footprints"
    )
    parser.add_argument(
        "--serve", action="store_true", help="then serve it on http://127.0.0.1:PORT (local sites)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (ray.address=...)")
    ns = parser.parse_args(args)
    from sarlang_ray import io, pipeline, view

    try:
        cfg = load_config(None, [f"run.run_dir={ns.run_dir}", *ns.overrides])
    except ConfigError as exc:
        print(f"sarlang view: {exc}", file=sys.stderr)
        return 2
    pipeline.ensure_ray(cfg)
    try:
        made = view.build_site(ns.run_dir, ns.out, sample=ns.sample, basemap=ns.basemap)
    except FileNotFoundError as exc:
        print(f"sarlang view: {exc}", file=sys.stderr)
        return 1
    print(
        f"{made['tiles']} tiles ({made['exported']} exported, {made['errors']} error rows) in "
        f"{made['pages']} pages; "
        f"site: {io.join(made['out'], 'index.html')}"
    )
    if ns.serve:
        if io.is_remote(made["out"]):
            print(
                "sarlang view: --serve serves local folders; a site on object storage is served by its host",
                file=sys.stderr,
            )
            return 2
        view.serve(made["out"], ns.port)
    return 0


def _model(args: list[str]) -> int:
    """``sarlang model init-tiny DIR [--family F] [--seed N]``: write a tiny offline VLM of family ``F`` (a
    family name, a model type or the hub name it stands in for, e.g. ``Qwen/Qwen2-VL-2B-Instruct``); ``sarlang
    model families``: the family table (see sarlang_ray.families)."""
    from sarlang_ray import families

    parser = argparse.ArgumentParser(prog="sarlang model", description=_model.__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    init = sub.add_parser("init-tiny", help="write a tiny VLM with random weights, built offline")
    init.add_argument(
        "out_dir", help="folder to write (config, safetensors weights, processor, chat template)"
    )
    init.add_argument(
        "--family",
        default="llava",
        help=f"one of {sorted(families.FAMILIES)}, or a hub name / model type of one (default llava)",
    )
    init.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    sub.add_parser("families", help="print the VLM family table")
    ns = parser.parse_args(args)
    if ns.action == "families":
        for f in families.FAMILIES.values():
            print(
                f"{f.name:11} {f.processor:20} knob={f.image_knob:12} tied={f.tied!s:5} "
                f"lora={f.lora_targets} hub={','.join(f.hub_prefixes)}"
            )
        return 0
    from sarlang_ray.tiny_models import init_tiny_vlm

    try:
        family = families.tiny_for(ns.family)
    except KeyError as exc:
        print(f"sarlang model init-tiny: {exc.args[0]}", file=sys.stderr)
        return 2
    print(f"tiny {family} VLM written to {init_tiny_vlm(ns.out_dir, seed=ns.seed, family=family)}")
    return 0


def _import(args: list[str]) -> int:
    """``sarlang import RELEASE OUT.parquet``: a release as a pairs table (``OUT.parquet``), its errors table
    (``OUT.errors.parquet``) and report (``OUT.report.json``). Exits 1 when no record could be imported."""
    parser = argparse.ArgumentParser(
        prog="sarlang import",
        description=(
            "Read a SARLANG-1M release as published (SARimages*/ and Text/ after unzipping Text.zip), our "
            "own export's "
            "sarlang1m/ folder, or any LLaMA-Factory / ShareGPT / ms-swift JSON dataset (a folder or one "
            "file) into a pairs "
            "table that `sarlang evaluate evaluate.dataset=OUT.parquet` scores."
        ),
    )
    parser.add_argument(
        "release", help="the unpacked release folder (local or s3://), or one JSON/JSONL/CSV file"
    )
    parser.add_argument("out", help="the pairs table to write (.parquet); errors and report go beside it")
    parser.add_argument(
        "--sardet", help="folder with SARDet-100K's images (SARVQA1 names them, e.g. 0009787.jpg)"
    )
    parser.add_argument(
        "--images", help="another image folder, searched before the release's own (e.g. the original TIFs)"
    )
    parser.add_argument(
        "--split", action="append", choices=["train", "val", "test"], help="only these splits (repeatable)"
    )
    parser.add_argument(
        "--embed-images", action="store_true", help="put the image bytes in the table (small sets)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    ns = parser.parse_args(args)
    from sarlang_ray import release
    from sarlang_ray.errors import ItemError

    try:
        result = release.import_release(
            ns.release,
            splits=tuple(ns.split) if ns.split else None,
            sardet=ns.sardet,
            images=ns.images,
            embed_images=ns.embed_images,
        )
    except ItemError as exc:  # not a release: say so, no traceback
        print(f"sarlang import: {exc}", file=sys.stderr)
        return 2
    report = release.write_import(result, ns.out)
    print(json.dumps(report, indent=2, default=str) if ns.json else release.format_report(result))
    stem = ns.out.removesuffix(".parquet")
    print(
        f"{result.table.num_rows} pairs written to {ns.out} (errors: {stem}.errors.parquet, report: "
        f"{stem}.report.json)"
    )
    if not result.table.num_rows:
        print(
            f"sarlang import: no pair could be imported from {ns.release}: see the reasons above and in "
            f"{stem}.errors.parquet",
            file=sys.stderr,
        )
        return 1
    return 0


def _export_bench(cfg, as_json: bool) -> int:
    """``sarlang export-bench [workflow.yaml] [key=value ...]``: see sarlang_ray.harness."""
    from sarlang_ray import harness

    try:
        manifest = harness.export_bench(cfg)
    except (FileNotFoundError, ValueError) as exc:
        print(f"sarlang export-bench: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(manifest, indent=2))
        return 0
    print(
        f"{manifest['samples']} samples ({manifest['images']} images) of the {manifest['split']} split of "
        f"{manifest['dataset']}"
    )
    for fmt, files in manifest["files"].items():
        print(f"  {fmt}: {files.get('yaml') or files.get('tsv')}\n    run: {files['run']}")
    return 0


def _score_bench(args: list[str]) -> int:
    """``sarlang score-bench PREDICTIONS``: a harness's predictions (VLMEvalKit's prediction file for a TSV of
    export-bench, or lmms-eval's --log_samples jsonl) scored with our metrics."""
    parser = argparse.ArgumentParser(prog="sarlang score-bench", description=_score_bench.__doc__)
    parser.add_argument(
        "predictions", help="VLMEvalKit prediction file (.tsv/.csv/.xlsx) or lmms-eval samples (.jsonl)"
    )
    ns = parser.parse_args(args)
    from sarlang_ray import harness

    try:
        scores = harness.score_predictions(ns.predictions)
    except (FileNotFoundError, ValueError) as exc:
        print(f"sarlang score-bench: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(scores, indent=2, sort_keys=True))
    return 0


def _export_hf(args: list[str]) -> int:
    """``sarlang export-hf RUN_DIR|IMPORTED_TABLE OUT``: a dataset folder in the Hugging Face layout (Parquet
    shards per split with an Image feature, README.md with the Hub's YAML header); see sarlang_ray.hf_export.
    """
    parser = argparse.ArgumentParser(prog="sarlang export-hf", description=_export_hf.__doc__)
    parser.add_argument(
        "source", help="a run folder with an export, or a pairs table (.parquet) from `sarlang import`"
    )
    parser.add_argument("out", help="the dataset folder to write (local or s3://)")
    parser.add_argument("--license", default="other", help="the Hub licence id of the card (default: other)")
    parser.add_argument(
        "--name", help="the dataset's pretty name (default: the source's folder or file name)"
    )
    parser.add_argument(
        "--rows-per-shard", type=int, default=1000, help="rows per Parquet shard of an imported table"
    )
    ns = parser.parse_args(args)
    from sarlang_ray import hf_export

    try:
        manifest = hf_export.export_hf(
            ns.source, ns.out, license=ns.license, name=ns.name, rows_per_shard=ns.rows_per_shard
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"sarlang export-hf: {exc}", file=sys.stderr)
        return 1
    print(
        ", ".join(f"{s}: {n} rows in {manifest['shards'][s]} shard(s)" for s, n in manifest["rows"].items())
        + f" written to {ns.out} (card: {manifest['readme']}); load it with datasets.load_dataset({ns.out!r})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
