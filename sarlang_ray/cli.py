"""Command line: ``sarlang <command> [workflow.yaml] [key=value ...]``.

Commands: ``run`` (all configured stages), one stage by name (``synth``, ``catalog``, ``tile``,
``align``, ``annotate``, ``export``, ``train``, ``evaluate``), ``config`` (print the resolved config), ``model init-tiny DIR``
(write a tiny offline VLM), ``import RELEASE OUT.parquet`` (a SARLANG-1M-style release as an
annotations table). Without a workflow file, ``workflows/demo.yaml``
settings are the built-in defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from sarlang_ray.config import STAGES, ConfigError, load_config, to_yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sarlang", description="SAR image-text dataset pipeline on Ray.")
    parser.add_argument("command", choices=["run", "config", "model", "import", *STAGES], help="what to do")
    parser.add_argument("args", nargs="*", help="an optional workflow YAML, then key=value overrides")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    ns = parser.parse_args(argv)
    if ns.command == "model":
        return _model(ns.args)
    if ns.command == "import":
        return _import(ns.args)
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
    from sarlang_ray import pipeline

    try:
        summary = pipeline.run(cfg, None if ns.command == "run" else [ns.command])
    except pipeline.StageFailed as exc:  # the work failed; what was written is on disk and in summary.json
        print(f"sarlang {ns.command}: failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2) if ns.json else pipeline.format_summary(summary))
    return 0


def _model(args: list[str]) -> int:
    """``sarlang model init-tiny DIR``: write a tiny offline VLM (see sarlang_ray.models)."""
    if len(args) != 2 or args[0] != "init-tiny":
        print("usage: sarlang model init-tiny DIR", file=sys.stderr)
        return 2
    from sarlang_ray.models import init_tiny_vlm

    print(f"tiny VLM written to {init_tiny_vlm(args[1])}")
    return 0


def _import(args: list[str]) -> int:
    """``sarlang import RELEASE_DIR OUT.parquet``: a SARLANG-1M-style release as an annotations table."""
    if len(args) != 2:
        print("usage: sarlang import RELEASE_DIR OUT.parquet", file=sys.stderr)
        return 2
    from sarlang_ray import io
    from sarlang_ray.errors import ItemError
    from sarlang_ray.export import import_sarlang1m

    try:
        table = import_sarlang1m(args[0])
    except ItemError as exc:  # an unsafe path, a malformed record, not a release: say so, no traceback
        print(f"sarlang import: {exc}", file=sys.stderr)
        return 2
    io.write_parquet_atomic(args[1], table)
    print(f"{table.num_rows} pairs from {args[0]} written to {args[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
