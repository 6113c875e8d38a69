import subprocess
import sys

import pytest
from conftest import REPO

from sarlang_ray.cli import main
from sarlang_ray.config import ConfigError, load_config, to_yaml


def test_demo_workflow_loads_and_overrides_apply():
    cfg = load_config(str(REPO / "workflows/demo.yaml"), ["tile.tile_size=128", "tile.gsds_m=[1,2]"])
    assert cfg.tile.tile_size == 128
    assert cfg.tile.gsds_m == [1.0, 2.0]
    assert cfg.catalog.archive == cfg.synth.out_dir  # interpolation resolved
    assert "tile_size: 128" in to_yaml(cfg)


@pytest.mark.parametrize(
    "override, key",
    [("tile.tile_sise=128", "tile_sise"), ("nonsense.x=1", "nonsense"), ("tile.speckle.windw=5", "windw")],
)
def test_unknown_key_is_rejected_naming_it(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_wrong_type_is_rejected_naming_the_key():
    with pytest.raises(ConfigError, match="tile_size"):
        load_config(None, ["tile.tile_size=big"])


def test_unknown_key_in_yaml_file_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tile:\n  tilesize: 128\n")
    with pytest.raises(ConfigError, match="tilesize"):
        load_config(str(bad))


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="stride"):
        load_config(None, ["tile.tile_size=64", "tile.stride=128"])
    with pytest.raises(ConfigError, match="speckle.filter"):
        load_config(None, ["tile.speckle.filter=gaussian"])


def test_cli_reports_unknown_key_and_exits_2(capsys):
    assert main(["config", "tile.bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_python_dash_m_prints_the_resolved_config():
    out = subprocess.run(
        [sys.executable, "-m", "sarlang_ray", "config", "tile.tile_size=96"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "tile_size: 96" in out


def test_saved_config_redacts_secrets_but_keeps_key_names():
    cfg = load_config(
        str(REPO / "workflows" / "demo.yaml"),
        ["catalog.archive=s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/archive"],
    )
    text = to_yaml(cfg)
    assert "wJalrXUtnFEMI" not in text and "s3://AKIAEXAMPLE:***@bucket/archive" in text
    assert "api_key_env: OPENAI_API_KEY" in text  # the variable's name, never its value
    with pytest.raises(ConfigError, match="base_url must not hold user:password"):
        load_config(None, ["annotate.openai.base_url=https://bob:hunter2@llm.example/v1"])


def test_list_overrides_need_no_inner_quotes(tmp_path):
    """`catalog.sar_glob=[*/*.tif]` as the docs write it (bare, `*` would be a YAML alias)."""
    cfg = load_config(None, ["catalog.sar_glob=[*/*.tif, sar/**/*.tif]", "tile.gsds_m=[1, 2.5]"])
    assert cfg.catalog.sar_glob == ["*/*.tif", "sar/**/*.tif"] and cfg.tile.gsds_m == [1.0, 2.5]
    assert load_config(None, ["catalog.sar_glob=['a b/*.tif']"]).catalog.sar_glob == ["a b/*.tif"]


def test_a_landcover_legend_replaces_the_default_one(tmp_path):
    cfg = load_config(None, ["align.landcover_classes={10: tree cover, 80: permanent water}"])
    assert cfg.align.landcover_classes == {10: "tree cover", 80: "permanent water"}
    workflow = tmp_path / "worldcover.yaml"
    workflow.write_text("align:\n  landcover_classes: {50: built-up}\n")
    from_file = load_config(str(workflow))
    assert from_file.align.landcover_classes == {50: "built-up"}
    assert from_file.name == "worldcover", "the summary names the workflow actually run"


@pytest.mark.parametrize(
    "override, words",
    [
        ("catalog.no_twin=bogus", "catalog.no_twin must be keep or reject"),
        ("catalog.min_overlap=5", "catalog.min_overlap"),
        ("catalog.time_window_days=0", "catalog.time_window_days"),
        ("catalog.band=0", "catalog.band"),
        ("annotate.backend=gpt", "annotate.backend"),
        ("annotate.openai.caption_image=thermal", "annotate.openai.caption_image"),
        ("evaluate.dtype=int4", "evaluate.dtype"),
        ("tile.stretch.low=99", "tile.stretch.low"),
    ],
)
def test_every_value_check_runs_when_the_config_is_loaded(override, words, capsys):
    """`sarlang config ...` exits 2 naming the key, so a bad value never reaches a stage (or a Ray start)."""
    assert main(["config", override]) == 2
    assert words in capsys.readouterr().err


def test_sarlang_config_with_a_bad_catalog_value_exits_non_zero():
    proc = subprocess.run(
        [sys.executable, "-m", "sarlang_ray", "config", "catalog.no_twin=bogus"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "catalog.no_twin" in proc.stderr and not proc.stdout


def test_off_on_the_command_line_is_off():
    """YAML 1.1 reads a bare `off` as false; the QC rules and the judge take it as the word it is."""
    cfg = load_config(None, ["annotate.qc.colour=off", "annotate.qc.contradiction=off", "evaluate.judge=off"])
    assert (cfg.annotate.qc.colour, cfg.annotate.qc.contradiction, cfg.evaluate.judge) == (
        "off",
        "off",
        "off",
    )
