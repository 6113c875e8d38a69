"""Typed modes and sections that check themselves: every mode is a Literal field whose bad value is refused on
load naming the key and the allowed values; every section is a ``Section`` whose ``check`` runs at load time,
and gives the same words for a section built in code. No Ray: config only."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from sarlang_ray import config as config_module
from sarlang_ray.config import CatalogSection, ConfigError, Section, VLLMSection, WorkflowConfig, load_config
from sarlang_ray.stages.stage import registry


def _modes(obj, prefix: str = ""):
    """(dotted key, allowed values, is a list) of every Literal field of a typed config."""
    hints = typing.get_type_hints(type(obj), vars(config_module))
    for f in dataclasses.fields(obj):
        key, value, hint = f"{prefix}{f.name}", getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            yield from _modes(value, key + ".")
            continue
        is_list = typing.get_origin(hint) is list
        inner = typing.get_args(hint)[0] if is_list else hint
        args = (
            [inner]
            if typing.get_origin(inner) is typing.Literal
            else [a for a in typing.get_args(inner) if a is not type(None)]
        )
        if len(args) == 1 and typing.get_origin(args[0]) is typing.Literal:
            yield key, typing.get_args(args[0]), is_list


MODES = list(_modes(WorkflowConfig()))
# values that need another key to be valid
NEEDS = {
    "evaluate.vqa_mode=judge": ["evaluate.judge=openai"],
    "train.strategy=fsdp": ["train.method=full"],
    "evaluate.judge=embedding": ["evaluate.judge_model=m"],
    "evaluate.judge=served": ["evaluate.judge_model=m"],
}


def test_the_modes_are_typed():
    keys = {k for k, _, _ in MODES}
    assert {
        "catalog.no_twin",
        "tile.speckle.filter",
        "annotate.qc.colour",
        "evaluate.engine",
        "train.strategy",
        "annotate.vllm.device",
        "evaluate.images",
        "bench.formats",
    } <= keys
    assert len(MODES) >= 30, keys


@pytest.mark.parametrize("key, allowed, is_list", MODES, ids=[k for k, _, _ in MODES])
def test_a_bad_mode_is_refused_naming_the_key_and_the_choices(key, allowed, is_list):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}=[{allowed[0]}, bogus_mode]" if is_list else f"{key}=bogus_mode"])
    message = str(info.value)
    assert key in message and "bogus_mode" in message, message
    assert all(str(a) in message for a in allowed), message
    for value in allowed:  # and every allowed value loads, as the plain string it is
        extra = NEEDS.get(f"{key}={value}", [])
        cfg = load_config(None, [f"{key}=[{value}]" if is_list else f"{key}={value}", *extra])
        got = cfg
        for part in key.split("."):
            got = getattr(got, part)
        assert (got == [value] if is_list else got == value) and type(got[0] if is_list else got) is str


def test_every_section_checks_itself_at_load_and_when_built_in_code():
    cfg = WorkflowConfig()
    sections = [cfg] + [
        v for v in (getattr(cfg, f.name) for f in dataclasses.fields(cfg)) if dataclasses.is_dataclass(v)
    ]
    assert all(isinstance(s, Section) for s in sections)
    assert cfg.check() == []  # the defaults are valid
    # the same words for the same bad value, whether it came through load_config or was built in code
    built = dataclasses.replace(cfg, catalog=CatalogSection(no_twin="drop", min_overlap=5.0))
    with pytest.raises(ConfigError) as info:
        load_config(None, ["catalog.min_overlap=5"])
    assert next(p for p in built.check() if "min_overlap" in p) in str(info.value)
    assert "catalog.no_twin must be keep or reject, not 'drop'" in built.check()
    # a section used in two places names the one it sits in (annotate.vllm, evaluate.vllm)
    assert VLLMSection(concurrency=0).check("evaluate.vllm") == ["evaluate.vllm.concurrency must be >= 1"]
    with pytest.raises(ConfigError, match=r"annotate\.vllm\.max_model_len must be >= 1"):
        load_config(None, ["annotate.vllm.max_model_len=0"])


def test_off_in_a_workflow_file_is_the_word_off(tmp_path):
    """YAML 1.1 reads a bare off as false; the Literal modes that take off get the word."""
    workflow = tmp_path / "w.yaml"
    workflow.write_text("annotate:\n  qc:\n    colour: off\n    vague: off\nevaluate:\n  judge: off\n")
    cfg = load_config(str(workflow))
    assert (cfg.annotate.qc.colour, cfg.annotate.qc.vague, cfg.evaluate.judge) == ("off", "off", "off")


def test_fingerprints_see_the_modes_as_plain_strings():
    cfg = load_config(None, ["annotate.backend=hf", "tile.speckle.filter=lee", "evaluate.judge=openai"])
    for stage in registry().values():
        settings = stage.settings(cfg)
        # plain JSON, nothing that encodes differently
        assert json.loads(json.dumps(settings)) == settings, stage.name
    assert registry()["tile"].settings(cfg)["tile"]["speckle"]["filter"] == "lee"


def test_a_workflow_file_that_is_not_a_mapping_is_refused(tmp_path):
    workflow = tmp_path / "list.yaml"
    workflow.write_text("- tile\n- align\n")
    with pytest.raises(ConfigError, match="a workflow is a mapping of sections"):
        load_config(str(workflow))
