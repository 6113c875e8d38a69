"""The demo's tables before and after a refactor, shard by shard (issue 29: one execution model).

    # run the demo's data stages (tests/conftest.py demo_config: synth..export), the sarlang_ray on PYTHONPATH
    PYTHONPATH=/tmp/base python benchmarks/compare_runs.py run /tmp/runs/base
    PYTHONPATH=$PWD      python benchmarks/compare_runs.py run /tmp/runs/branch
    # every Parquet file of both run folders: the same relative paths, and pyarrow.Table.equals for each
    python benchmarks/compare_runs.py compare /tmp/runs/base /tmp/runs/branch [--json results/x.json]

Every Parquet file is compared: a file only one run has, or any table that differs (schema, values, row order)
is reported and makes the command exit 1. Two things differ between any two runs and are normalised first:
each run's own folder in paths (the archive lives under it: ``<run>``) and the wall-clock ``time`` column of
errors tables.
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
    print(
        json.dumps(
            {
                k: {c: v for c, v in s.items() if c in ("planned", "written", "rejected")}
                for k, s in summary["stages"].items()
            }
        )
    )


def _normal(table, name: str, root: Path):
    """What may differ between two runs of the same code: the run folder (the archive's paths under it are in
    the scenes table and in error messages) becomes ``<run>``, and the ``time`` column of an errors table
    (when the error was recorded: wall clock) is left out. Schema metadata is left out too; everything else is
    compared."""
    import pyarrow as pa
    import pyarrow.compute as pc

    errors = "errors" in Path(name).parts or Path(name).name.endswith("errors.parquet")
    if errors and "time" in table.column_names:
        table = table.drop_columns(["time"])
    for i, f in enumerate(table.schema):
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            table = table.set_column(i, f, pc.replace_substring(table.column(i), str(root), "<run>"))
    return table.replace_schema_metadata(None)


def compare(a: Path, b: Path) -> dict:
    import pyarrow.parquet as pq

    def tables(root: Path) -> dict[str, Path]:
        return {str(p.relative_to(root)): p for p in sorted(root.rglob("*.parquet"))}

    left, right = tables(a), tables(b)
    only = {"only_in_first": sorted(set(left) - set(right)), "only_in_second": sorted(set(right) - set(left))}
    different, rows = [], 0
    for name in sorted(set(left) & set(right)):
        # read as plain tables (no dataset partition discovery, no pandas metadata) and compare values and
        # schema
        ta, tb = _normal(pq.read_table(left[name]), name, a), _normal(pq.read_table(right[name]), name, b)
        rows += ta.num_rows
        if not ta.equals(tb):
            different.append(name)
    return {
        "first": str(a),
        "second": str(b),
        "files_compared": len(set(left) & set(right)),
        "rows_compared": rows,
        "different": different,
        **only,
        "identical": not different and not only["only_in_first"] and not only["only_in_second"],
    }


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
