"""What a person sees: `sarlang run` on the demo workflow (as `make run` runs it) prints a short, readable
terminal, with Ray's own output in the run folder's log; plot legends stay clear of the data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_run_prints_at_most_80_lines_with_counts_and_leaderboard(made_run):
    # what `make run` runs (its run folder moved out of the repository): the whole demo, bars and all
    run_dir, returncode, out = made_run
    assert returncode == 0, out[-3000:]
    lines = out.splitlines()
    assert len(lines) <= 80, out
    assert "\x1b[" not in out  # no escape codes off a terminal

    stages = yaml.safe_load((REPO / "workflows" / "demo.yaml").read_text())["run"]["stages"]
    for stage in stages:  # each stage's counts, as its marker holds them
        folder = run_dir / "archive" if stage == "synth" else run_dir / stage  # synth writes to synth.out_dir
        marker = json.loads((folder / "_SUCCESS.json").read_text())
        counts = marker.get("counts", marker)
        line = next((x for x in lines if re.match(rf"\s+{stage} done in ", x)), None)
        assert line is not None, (stage, out)
        if "planned" in counts:
            assert (
                f"planned {counts['planned']} = written {counts['written']} + rejected {counts['rejected']}"
                in line
            )
    board = (run_dir / "evaluate" / "leaderboard.md").read_text().strip().splitlines()
    assert board and all(row in lines for row in board)  # the leaderboard, every row of it
    # the whole recipe ran: the untrained and the fine-tuned tiny VLM on SAR with the paper's prompts, both
    # baselines
    for row in (
        "| base | sar | paper |",
        "| finetuned | sar | paper |",
        "majority answer (lower bound)",
        "template oracle (upper bound)",
    ):
        assert any(row in x for x in board), row
    assert (run_dir / "tiny-vlm" / "model.safetensors").exists()  # train.init_tiny wrote the model
    assert (run_dir / "evaluate" / "plots" / "vqa_per_application.png").exists()
    assert (run_dir / "summary.json").exists() and (run_dir / "export" / "dataset_card.md").exists()

    logs = list((run_dir / "logs").glob("run-*.log"))
    assert len(logs) == 1 and str(logs[0]) in lines[0]  # named at the start
    log = logs[0].read_text(errors="replace")
    assert "Started a local Ray instance" in log and len(log.splitlines()) > len(lines), len(log.splitlines())


def test_legend_sits_outside_the_bars(tmp_path):
    """A legend drawn by plots.legend_outside overlaps no bar, even bars that reach the top of the axes."""
    from PIL import Image

    from sarlang_ray import plots

    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i in range(3):
        ax.bar([j + 0.25 * i for j in range(4)], [100, 95, 100, 98], 0.25, label=f"model {i} / sar / paper")
    legend = plots.legend_outside(ax, fontsize=7)
    uri = plots.save_png(fig, str(tmp_path / "p.png"), dpi=fig.dpi)
    fig.canvas.draw()  # the layout as saved
    box, axes_box = legend.get_window_extent(), ax.get_window_extent()
    for patch in ax.patches:
        assert not box.overlaps(patch.get_window_extent()), (box, patch.get_window_extent())
    assert box.x0 >= axes_box.x1  # beside the axes, so over no data of any height
    width, height = Image.open(uri).size
    assert width >= box.x1 - axes_box.x0 and height >= box.y1 - box.y0  # the picture holds axes and legend
