"""Command line: ``sarlang <command> [workflow.yaml] [key=value ...]``.

Commands: ``run`` (all configured stages), one stage by name (``synth``, ``catalog``, ``tile``,
``align``), ``config`` (print the resolved config). Without a workflow file, ``workflows/demo.yaml``
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
    parser.add_argument("command", choices=["run", "config", *STAGES], help="what to do")
    parser.add_argument("args", nargs="*", help="an optional workflow YAML, then key=value overrides")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    ns = parser.parse_args(argv)
    workflow = ns.args[0] if ns.args and "=" not in ns.args[0] else None
    overrides = ns.args[1:] if workflow else ns.args
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = load_config(workflow, overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"sarlang: {exc}", file=sys.stderr)
        return 2
    if ns.command == "config":
        print(to_yaml(cfg))
        return 0
    from sarlang_ray import pipeline

    summary = pipeline.run(cfg, None if ns.command == "run" else [ns.command])
    print(json.dumps(summary, indent=2) if ns.json else pipeline.format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
