"""One resource vocabulary: every stage section has num_cpus, num_gpus, memory_gb and concurrency (N, [min,
max] or null); the old keys (tile.max_tasks, align.max_actors, annotate.max_actors) still load, with a warning
naming the new key, and give what the new spelling gives. No Ray: config only."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
from conftest import REPO

from sarlang_ray.config import (
    LEGACY_BOUNDS,
    RESOURCE_SECTIONS,
    ConfigDeprecationWarning,
    ConfigError,
    StageResources,
    WorkflowConfig,
    load_config,
    resource_keys,
)
from sarlang_ray.stages.stage import RESOURCE_KEYS, registry

STAGE_SECTIONS = ("catalog", "tile", "align", "annotate", "export", "evaluate")


def test_every_data_stage_section_has_the_same_resource_keys():
    cfg = WorkflowConfig()
    assert set(RESOURCE_SECTIONS) == set(STAGE_SECTIONS)
    for name in STAGE_SECTIONS:
        fields = {f.name: f.type for f in dataclasses.fields(getattr(cfg, name))}
        assert {k: fields[k] for k in ("num_cpus", "num_gpus", "memory_gb", "concurrency")} == {
            "num_cpus": "float",
            "num_gpus": "float",
            "memory_gb": "float | None",
            "concurrency": "int | list[int] | None",
        }, name
        assert set(resource_keys(getattr(cfg, name))) == {"num_cpus", "num_gpus", "memory_gb", "concurrency"}
    # fingerprints leave them out by field name, so none of them can redo a stage
    assert {f.name for f in dataclasses.fields(StageResources)} <= RESOURCE_KEYS


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("tile.max_tasks=16", "tile.concurrency=[1, 16]", (1, 16)),
        ("align.max_actors=8", "align.concurrency=[1, 8]", (1, 8)),
        ("annotate.max_actors=3", "annotate.concurrency=[1, 3]", (1, 3)),
    ],
)
def test_an_old_key_loads_with_a_warning_naming_the_new_key_and_means_the_same(old, new, expected):
    section = old.split(".")[0]
    with pytest.warns(ConfigDeprecationWarning) as caught:
        legacy = load_config(None, ["align.num_cpus=2", old])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and old.split("=")[0] in messages[0] and new.split("=")[0] in messages[0], (
        messages
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns about nothing
        current = load_config(None, ["align.num_cpus=2", new])
    assert resource_keys(getattr(legacy, section)) == resource_keys(getattr(current, section))
    assert resource_keys(getattr(current, section))["concurrency"] == expected
    # and the stages' fingerprints are the same for both spellings (resource keys never redo a stage)
    for stage in registry().values():
        assert stage.settings(legacy) == stage.settings(current), stage.name


def test_old_keys_in_a_workflow_file_load_too(tmp_path):
    workflow = tmp_path / "old.yaml"
    workflow.write_text(
        "tile:\n  max_tasks: 32\nalign:\n  max_actors: null\nannotate:\n  concurrency: 4\n  max_actors: 9\n"
    )
    with pytest.warns(ConfigDeprecationWarning) as caught:
        cfg = load_config(str(workflow))
    text = " ".join(str(w.message) for w in caught)
    assert all(f"{key} in {workflow}" in text for key in LEGACY_BOUNDS), text
    assert resource_keys(cfg.tile)["concurrency"] == (1, 32)
    assert resource_keys(cfg.align)["concurrency"] is None  # null was the old key's default: nothing changes
    # a fixed size won over the old key, and still does
    assert resource_keys(cfg.annotate)["concurrency"] == 4
    assert "annotate.concurrency=4 fixes the number" in text


def test_a_fixed_concurrency_given_earlier_still_wins_over_an_old_key_given_later(tmp_path):
    workflow = tmp_path / "w.yaml"
    workflow.write_text("align:\n  concurrency: 6\n")
    with pytest.warns(ConfigDeprecationWarning, match="align.max_actors=2 is ignored"):
        cfg = load_config(str(workflow), ["align.max_actors=2"])
    assert resource_keys(cfg.align)["concurrency"] == 6


def test_train_keeps_ray_trains_keys_mapped_to_the_same_shape():
    cfg = load_config(None, ["train.num_workers=4", "train.use_gpu=true", "train.cpus_per_worker=8"])
    assert resource_keys(cfg.train) == {"num_cpus": 8.0, "num_gpus": 1.0, "memory_gb": None, "concurrency": 4}


def test_the_resource_keys_of_a_loaded_config():
    cfg = load_config(
        None,
        [
            "catalog.num_cpus=0.5",
            "export.memory_gb=2",
            "annotate.num_gpus=1",
            "evaluate.concurrency=[1, 4]",
            "tile.concurrency=12",
        ],
    )
    assert resource_keys(cfg.catalog) == {
        "num_cpus": 0.5,
        "num_gpus": 0.0,
        "memory_gb": None,
        "concurrency": None,
    }
    assert resource_keys(cfg.export)["memory_gb"] == 2.0
    assert resource_keys(cfg.annotate)["num_gpus"] == 1.0
    assert resource_keys(cfg.evaluate)["concurrency"] == (1, 4)
    assert resource_keys(cfg.tile)["concurrency"] == 12
    assert resource_keys(WorkflowConfig().evaluate)["concurrency"] == 1  # one model per trial by default


@pytest.mark.parametrize(
    "override, words",
    [
        ("align.concurrency=0", "align.concurrency must be N >= 1"),
        ("tile.concurrency=[0, 4]", "tile.concurrency must be"),
        ("annotate.concurrency=[4, 2]", "annotate.concurrency must be"),
        ("export.concurrency=[1, 2, 3]", "export.concurrency must be"),
        ("catalog.concurrency=many", "catalog.concurrency"),
        ("evaluate.concurrency=1.5", "evaluate.concurrency"),
        ("catalog.num_cpus=-1", "catalog.num_cpus must be >= 0"),
        ("evaluate.num_gpus=-0.5", "evaluate.num_gpus must be >= 0"),
        ("export.memory_gb=0", "export.memory_gb must be > 0 or null"),
        ("align.max_actors=0", "align.max_actors (replaced by align.concurrency) must be >= 1"),
        ("tile.max_tasks=x", "tile.max_tasks"),
    ],
)
def test_a_bad_resource_value_is_rejected_naming_its_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert words in str(info.value)


def test_the_shipped_workflows_use_only_the_new_keys(tmp_path):
    for workflow in sorted((REPO / "workflows").glob("*.yaml")):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConfigDeprecationWarning)
            load_config(str(workflow), [f"run.run_dir={tmp_path}/run", f"catalog.archive={tmp_path}/archive"])
