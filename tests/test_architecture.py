"""Imports point one way: cli -> pipeline -> stages -> domain modules -> tables / io / config.

Every module has a layer (LAYERS, bottom first) and imports only its own layer or lower ones. Checked twice:
statically (every import statement, function-level ones included, so a cycle cannot hide
inside a function) and by importing each stage module in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "sarlang_ray"
ORCHESTRATION = {"sarlang_ray.pipeline", "sarlang_ray.cli", "sarlang_ray.__main__"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every sarlang_ray module a file imports, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("sarlang_ray")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sarlang_ray"):
            out.add(node.module)
            out |= {
                f"{node.module}.{a.name}"
                for a in node.names
                if (PKG.parent / node.module.replace(".", "/") / f"{a.name}.py").exists()
            }
    return out


GRAPH = {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


STAGE_MACHINERY = ("stages.cluster", "stages.execution", "stages.stage")
# bottom first; a module imports only modules of its own layer or of a lower one
LAYERS = [
    (
        "base",
        {"sarlang_ray", "errors", "io", "config", "prompts", "reaper", "tables", "plots", "viz", "rows"},
    ),
    (
        "primitives",
        {
            "gcps",
            "safe",
            "stac",
            "sar",
            "companions",
            "splits",
            "metrics",
            "families",
            "boxes",
            "search",
            "annotate",
            "annotate.vocab",
            "annotate.visibility",
        },
    ),
    ("model runtime", {"models", "vllm_engine", "judge"}),
    (
        "domain",
        {
            "catalog",
            "tiling",
            "align",
            "synth",
            "release",
            "export",
            "train",
            "evaluate",
            "harness",
            "tiny_models",
            "hf_export",
            "view",
            "annotate.template",
            "annotate.consistency",
            "annotate.qc",
            "annotate.stage",
            "annotate.openai_backend",
            "annotate.hf_backend",
            "annotate.vllm_backend",
        },
    ),
    # what every stage shares: the Ray connection, how work runs, fingerprints and markers (never a stage
    # module)
    ("stage machinery", set(STAGE_MACHINERY)),
    (
        "stages",
        {"stages", *(m.removeprefix("sarlang_ray.") for m in GRAPH if m.startswith("sarlang_ray.stages."))}
        - set(STAGE_MACHINERY),
    ),
    ("orchestration", {"pipeline", "cli", "console", "__main__"}),
]
LAYER = {
    ("sarlang_ray." + m if m != "sarlang_ray" else m): rank
    for rank, (_, mods) in enumerate(LAYERS)
    for m in mods
}


def test_every_module_has_a_layer():
    missing = sorted(set(GRAPH) - set(LAYER))
    assert not missing, f"give these modules a layer in LAYERS (tests/test_architecture.py): {missing}"


def test_no_import_points_up_a_layer():
    upward = {
        m: sorted(f"{d} ({LAYERS[LAYER[d]][0]})" for d in deps if d in LAYER and LAYER[d] > LAYER[m])
        for m, deps in GRAPH.items()
        if m in LAYER
    }
    upward = {m: ds for m, ds in upward.items() if ds}
    assert not upward, upward


def test_no_module_below_the_orchestrator_imports_it():
    offenders = {
        m: sorted(i & ORCHESTRATION) for m, i in GRAPH.items() if m not in ORCHESTRATION and i & ORCHESTRATION
    }
    assert not offenders, offenders


def test_domain_modules_do_not_import_the_stages():
    stages = {m for m in GRAPH if m.startswith("sarlang_ray.stages")}
    offenders = {
        m: sorted(i & stages)
        for m, i in GRAPH.items()
        if m not in stages and m not in ORCHESTRATION and i & stages
    }
    assert not offenders, offenders


def test_tables_sit_below_everything_but_io_config_and_errors():
    assert GRAPH["sarlang_ray.tables"] <= {
        "sarlang_ray",
        "sarlang_ray.io",
        "sarlang_ray.errors",
        "sarlang_ray.config",
    }


def test_the_import_graph_has_no_cycle():
    known = set(GRAPH)
    edges = {m: {i for i in deps if i in known and i != m} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError(" -> ".join([*path, m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(edges[m]):
            if d != "sarlang_ray":  # the package itself (from sarlang_ray import x) is not a module edge
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(edges):
        visit(m, [])


@pytest.mark.parametrize(
    "module",
    sorted(
        [
            "sarlang_ray.export",
            "sarlang_ray.evaluate",
            "sarlang_ray.train",
            "sarlang_ray.tables",
            *(m for m in GRAPH if m.startswith("sarlang_ray.stages.")),
        ]
    ),
)
def test_each_stage_module_imports_without_the_orchestrator(module):
    code = (
        f"import sys, {module}; bad = [m for m in ('sarlang_ray.pipeline', 'sarlang_ray.cli') if m in "
        "sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


# ---------------------------------------------------------------- one execution model
# the stage modules that run work other than through execution.map: the Ray Train and Ray Tune entry points
# (train, evaluate), the stage machinery itself (execution runs the work, cluster connects, stage decides)
NOT_MAPPED = {
    "sarlang_ray.stages.train",
    "sarlang_ray.stages.evaluate",
    *(f"sarlang_ray.{m}" for m in STAGE_MACHINERY),
}
# ray.<these>: running work by hand
RAY_WORK = {
    "remote",
    "get",
    "wait",
    "put",
    "data",
    "train",
    "tune",
    "cancel",
}


def work_outside_map(source: str) -> list[str]:
    """Where a module runs Ray work by hand: ``ray.remote/get/wait/put/cancel``, ``ray.data``, ``ray.train``,
    ``ray.tune``, any ``.remote(`` call, ``map_batches``, or a private back-end of execution imported."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "ray" and node.attr in RAY_WORK:
                found.append(f"line {node.lineno}: ray.{node.attr}")
            elif node.attr in ("remote", "map_batches", "iter_rows", "from_items"):
                found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ray"):
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module == "sarlang_ray.stages.execution":
            found += [
                f"line {node.lineno}: execution.{a.name}"
                for a in node.names
                if a.name.startswith("_") or a.name in ("pool", "item_blocks")
            ]
    return found


def test_the_scan_finds_work_run_by_hand():
    assert work_outside_map("import ray\nray.get(ray.remote(f).remote(1))\n")
    assert work_outside_map("def f(ds):\n    return ds.map_batches(g)\n")
    assert work_outside_map("import ray\nds = ray.data.from_items([])\n")
    assert work_outside_map("from sarlang_ray.stages.execution import _tasks\n")
    assert not work_outside_map(
        "from sarlang_ray.stages import execution\nexecution.map(work)\nray.cluster_resources()\n"
    )


@pytest.mark.parametrize(
    "module", sorted(m for m in GRAPH if m.startswith("sarlang_ray.stages.") and m not in NOT_MAPPED)
)
def test_data_stages_run_work_only_through_map(module):
    path = PKG.parent / (module.replace(".", "/") + ".py")
    found = work_outside_map(path.read_text())
    assert not found, f"{module} runs work by hand ({found}): declare a Work and call execution.map"
    if module != "sarlang_ray.stages.synth":  # synth writes the sample archive in the driver: no items
        assert "execution.map(" in path.read_text() or "annotate_shards(" in path.read_text()
