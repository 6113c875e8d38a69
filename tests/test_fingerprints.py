"""Every config key, changed on its own: the stages that redo are the ones docs/architecture.md's table says.

The walk runs the real :meth:`Stage.run` (fingerprints, markers on disk, ``run.force``, invalidation of later
stages) with each stage's body replaced by a recorder, so no Ray is started and no data is made: a stage
"redoes" when ``Stage.run`` calls its body. The table is parsed from the doc, so the doc and the code cannot
drift.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import shutil
import typing

import pytest
import yaml
from conftest import REPO

from sarlang_ray import config as config_module
from sarlang_ray.config import ConfigError, WorkflowConfig, load_config
from sarlang_ray.stages.stage import ORDER, RESOURCE_KEYS, registry

DOC = REPO / "docs" / "architecture.md"
TABLE = "### What a changed key redoes"

# keys whose generic change (see _changed) is not a valid value: one valid other value each
ALTERNATES = {
    "run.stages": "[synth,catalog,tile]",
    "run.raster_reader": "fsspec",
    "ray.address": "auto",
    "catalog.no_twin": "reject",
    "catalog.units": "db",
    "catalog.rotated": "reject",
    "catalog.calibration": "beta0",
    "catalog.search.bbox": "[0, 0, 1, 1]",
    "catalog.search.filter": "{platform: sentinel-1a}",
    "catalog.sign": "planetary_computer",
    "catalog.gcp_method": "polynomial",
    "catalog.gcp_order": "2",
    "tile.bands": "composite",
    "tile.aoi": "[0, 0, 1, 1]",
    "catalog.optical_rule": "['/sar/(.*)\\.tif$', '/opt/\\1.tif']",
    "catalog.landcover_rule": "['/sar/(.*)\\.tif$', '/lc/\\1.tif']",
    "tile.speckle.filter": "lee",
    "tile.stretch.mode": "fixed",
    "align.invalid_geometry": "repair",
    "align.landcover_preset": "worldcover",
    "align.optical_bands": "[3,2,1]",
    "annotate.backend": "hf",
    "annotate.openai.caption_image": "sar",
    "annotate.hf.caption_image": "sar",
    "annotate.hf.dtype": "float32",
    "annotate.vllm.device": "cpu",
    "annotate.vllm.accelerator_type": "H100",
    "annotate.qc.colour": "reject",
    "annotate.qc.count": "reject",
    "annotate.qc.hallucination": "repair",
    "annotate.qc.vague": "off",
    "annotate.qc.duplicate": "off",
    "annotate.qc.contradiction": "reject",
    "annotate.implied_by": "{building: water}",
    "export.split_by": "scene",
    "export.planner": "driver",
    "export.train": "0.6",
    "export.val": "0.2",
    "export.test": "0.1",
    "train.method": "full",
    "train.precision": "fp32",
    "train.strategy": "fsdp",
    "evaluate.images": "[sar, sar_equalized]",
    "evaluate.split": "val",
    "evaluate.vqa_mode": "strict",
    "evaluate.judge": "openai",
    "evaluate.judge_model": "all-MiniLM-L12",
    "evaluate.baselines": "[majority]",
    "evaluate.dtype": "float32",
    "evaluate.engine": "vllm",
    "evaluate.vllm.device": "cpu",
    "evaluate.vllm.accelerator_type": "H100",
    "bench.formats": "[lmms_eval]",
    "bench.name": "task_x",
    "evaluate.box_frame": "norm1000",
    "evaluate.truth_box_frame": "pixel",
    # resource keys: an autoscaling range as well as the walk's fixed number
    "catalog.concurrency": "[1, 4]",
    "tile.concurrency": "[2, 8]",
    "align.concurrency": "[1, 4]",
    "annotate.concurrency": "[1, 2]",
    "export.concurrency": "[1, 3]",
    "evaluate.concurrency": "[1, 2]",
}
# keys changed together with another (the shares of the splits sum to 1)
TOGETHER = {
    "export.train": ["export.test=0.3"],
    "export.val": ["export.test=0.1"],
    "export.test": ["export.train=0.8"],
    "train.strategy": ["train.method=full"],
}


def _leaves(obj, prefix: str = ""):
    """(dotted key, value, type) of every leaf of a typed config; a list of sections (evaluate.prompts) gives
    ``evaluate.prompts[].<field>`` of its first item."""
    hints = typing.get_type_hints(type(obj), vars(config_module))
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, key + ".")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for sub, v, t in _leaves(value[0]):
                yield f"{key}[].{sub}", v, t
        else:
            yield key, value, hints[f.name]


def _dump(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")


def _generic(value, hint) -> str:
    """Another value of the same type, as an override's text."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    kind = typing.get_origin(hint) or hint
    if kind is typing.Union or type(hint).__name__ == "UnionType":
        kind = typing.get_origin(args[0]) or args[0]
    if isinstance(value, bool):
        return str(not value).lower()
    if isinstance(value, int):
        return str(value + 2)  # odd stays odd (speckle windows)
    if isinstance(value, float):
        return repr(value / 2 if value else 0.5)
    if isinstance(value, str):
        return value + "2"
    if isinstance(value, list):
        return _dump(
            value + [value[-1] * 2 if isinstance(value[-1], float) else value[-1] + "2"] if value else ["x"]
        )
    if isinstance(value, dict):
        if not value:
            return _dump({"seed": 1})
        k = next(iter(value))
        return _dump({**value, k: value[k] / 2 if isinstance(value[k], float) else value[k] + "2"})
    # None: a value of the declared type
    return {int: "128", float: "2.0", str: "x", list: "[x]", dict: "{a: b}", bool: "true"}[kind]


def _override(base: WorkflowConfig, key: str, value, hint) -> list[str]:
    new = ALTERNATES.get(key) or _generic(value, hint)
    if "[]." in key:  # a field of every item of a list of sections: the whole list, first item changed
        section, field = key.split("[].")
        items = [
            dataclasses.asdict(p)
            for p in getattr(getattr(base, section.split(".")[0]), section.split(".")[1])
        ]
        items[0][field] = new if isinstance(value, str) else yaml.safe_load(new)
        return [f"{section}={_dump(items)}"]
    return [f"{key}={new}", *TOGETHER.get(key, [])]


class Walk:
    """A finished run of ``base`` (markers only, every stage's body a recorder), and what ``Stage.run``
    recomputes, in order, when it is run again with a change."""

    def __init__(self, root, base: list[str]):
        self.root, self.calls = root, []
        self.stages = {
            name: dataclasses.replace(
                stage, body=lambda cfg, name=name: self.calls.append(name) or {"planned": 0}, needs_ray=False
            )
            for name, stage in registry().items()
        }
        self.base = base
        self.redone([])  # the finished run
        shutil.copytree(root, f"{root}.done")

    def redone(self, change: list[str]) -> list[str]:
        if os.path.exists(f"{self.root}.done"):  # back to the finished run
            shutil.rmtree(self.root)
            shutil.copytree(f"{self.root}.done", self.root)
        cfg = load_config(None, self.base + change)
        self.calls.clear()
        for name in ORDER:
            self.stages[name].run(cfg)
        return list(self.calls)


def base_overrides(root, setting: str | None = None) -> list[str]:
    return [
        f"run.run_dir={root}/run",
        f"synth.out_dir={root}/archive",
        f"run.stages=[{','.join(ORDER)}]",
        *([s.strip() for s in setting.split(",")] if setting else []),
    ]


def read_table() -> list[tuple[str | None, list[str], list[str]]]:
    """(setting or None, key patterns, stages redone) of every row of the doc's table, in order."""
    text = DOC.read_text()
    body = text[text.index(TABLE) :].split("\n\n", 2)[1]
    rows = []
    for line in body.splitlines()[2:]:
        setting, keys, stages = (c.strip() for c in line.strip().strip("|").split("|"))
        patterns = re.findall(r"`([^`]+)`", keys)
        names = {"nothing": [], "every stage": list(ORDER)}.get(
            stages, [s.strip() for s in stages.split(",")]
        )
        assert set(names) <= set(ORDER), line
        rows.append((",".join(re.findall(r"`([^`]+)`", setting)) or None, patterns, names))
    return rows


def expected(rows, key: str, setting: str | None) -> tuple[int, list[str]] | None:
    """The first row that matches ``key`` under ``setting``: the rows of resource names (``*.x``) first, then
    the setting's own rows, then the defaults'."""

    def match(r):
        return any(fnmatch.fnmatchcase(key, p) for p in r[1])

    resource = [i for i, r in enumerate(rows) if r[0] is None and all(p.startswith("*.") for p in r[1])]
    own = [i for i, r in enumerate(rows) if setting is not None and r[0] == setting]
    defaults = [i for i, r in enumerate(rows) if r[0] is None and i not in resource]
    for i in resource + own + defaults:
        if match(rows[i]):
            return i, rows[i][2]
    return None


@pytest.mark.slow
def test_every_key_redoes_what_the_architecture_table_says(tmp_path):
    rows = read_table()
    used: set[int] = set()
    wrong, unlisted = [], []
    settings = [None] + sorted({r[0] for r in rows if r[0] is not None})
    n = 0
    for setting in settings:
        walk = Walk(
            tmp_path / f"setting{settings.index(setting)}",
            base_overrides(tmp_path / f"setting{settings.index(setting)}", setting),
        )
        cfg = load_config(None, walk.base)
        for key, value, hint in _leaves(cfg):
            if setting is not None and not any(
                fnmatch.fnmatchcase(key, p) for r in rows if r[0] == setting for p in r[1]
            ):
                continue  # a setting's walk covers the keys of its own rows
            n += 1
            change = _override(cfg, key, value, hint)
            try:
                got = walk.redone(change)
            except ConfigError as exc:
                pytest.fail(
                    f"{key}: the walk's change {change} is not a valid value ({exc}); add one to ALTERNATES"
                )
            row = expected(rows, key, setting)
            if row is None:
                unlisted.append(f"{key} (redoes {', '.join(got) or 'nothing'})")
                continue
            used.add(row[0])
            if got != row[1]:
                wrong.append(
                    f"{key}{f' with {setting}' if setting else ''}: redoes {got}, the table says {row[1]}"
                )
    assert not unlisted, "keys no row of the table matches: " + "; ".join(unlisted)
    assert not wrong, "\n".join(wrong)
    assert used == set(range(len(rows))), (
        f"rows no key uses: {[rows[i] for i in sorted(set(range(len(rows))) - used)]}"
    )
    assert n > 200  # every key was walked


def test_the_tables_resource_rows_are_the_runners_resource_keys():
    resource = {
        p[2:]
        for setting, patterns, names in read_table()
        if setting is None and not names
        for p in patterns
        if p.startswith("*.")
    }
    assert resource == set(RESOURCE_KEYS)


def test_a_class_map_change_does_not_retile_and_a_prompt_rename_redoes_evaluate(tmp_path):
    """The issue's cases, spelled out (the table test covers them among every other key)."""
    walk = Walk(tmp_path / "run", base_overrides(tmp_path / "run"))
    assert walk.redone(["catalog.labels_class_map={highway: road}"]) == [
        "align",
        "annotate",
        "export",
        "train",
        "evaluate",
    ]
    assert walk.redone(["evaluate.prompts=[{name: short}]"]) == ["evaluate"]
    assert walk.redone(["annotate.openai.model=gpt-x"]) == []  # backend=template reads no endpoint
    judged = Walk(tmp_path / "judged", base_overrides(tmp_path / "judged", "evaluate.judge=openai"))
    # the judge's model: a new leaderboard
    assert judged.redone(["annotate.openai.model=gpt-x"]) == ["evaluate"]
    assert walk.redone(["tile.concurrency=1", "align.num_cpus=0.5", "annotate.concurrency=[1, 2]"]) == []
    # the old key (translated: tests/test_config_resources.py)
    assert walk.redone(["annotate.max_actors=2"]) == []
