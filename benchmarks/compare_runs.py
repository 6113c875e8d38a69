"""The demo's tables before and after a refactor, shard by shard (issue 29: one execution model).

    # run the demo's data stages (tests/conftest.py demo_config: synth..export) with the sarlang_ray on PYTHONPATH
    PYTHONPATH=/tmp/base python benchmarks/compare_runs.py run /tmp/runs/base
    PYTHONPATH=$PWD      python benchmarks/compare_runs.py run /tmp/runs/branch
    # every Parquet file of both run folders: the same relative paths, and pyarrow.Table.equals for each
    python benchmarks/compare_runs.py compare /tmp/runs/base /tmp/runs/branch [--json results/x.json]

Nothing is skipped: a file only one run has, or any table that differs (schema, metadata-free values, row order),
is reported and makes the command exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def run(run_dir: Path) -> None:
    sys.path.insert(0, str(Path(os.environ.get("PYTHONPATH", ".").split(":")[0]) / "tests"))
    from conftest import demo_config

    from sarlang_ray import pipeline

    summary = pipeline.run(demo_config(run_dir))
    print(json.dumps({k: {c: v for c, v in s.items() if c in ("planned", "written", "rejected")}
                      for k, s in summary["stages"].items()}))


def compare(a: Path, b: Path) -> dict:
    import pyarrow.parquet as pq

    def tables(root: Path) -> dict[str, Path]:
        return {str(p.relative_to(root)): p for p in sorted(root.rglob("*.parquet"))}

    left, right = tables(a), tables(b)
    only = {"only_in_first": sorted(set(left) - set(right)), "only_in_second": sorted(set(right) - set(left))}
    different, rows = [], 0
    for name in sorted(set(left) & set(right)):
        # read as plain tables (no dataset partition discovery, no pandas metadata) and compare values and schema
        ta, tb = pq.read_table(left[name]), pq.read_table(right[name])
        ta, tb = ta.replace_schema_metadata(None), tb.replace_schema_metadata(None)
        rows += ta.num_rows
        if not ta.equals(tb):
            different.append(name)
    return {"first": str(a), "second": str(b), "files_compared": len(set(left) & set(right)), "rows_compared": rows,
            "different": different, **only,
            "identical": not different and not only["only_in_first"] and not only["only_in_second"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("run_dir", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("first", type=Path)
    c.add_argument("second", type=Path)
    c.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.run_dir)
        return 0
    result = compare(args.first, args.second)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
