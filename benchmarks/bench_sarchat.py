"""SARChat-Bench-2M at scale: import time and driver memory of a release in its published layout, and the cost
of scoring box answers by IoU against scoring the same number of short answers by the strict string rule.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_sarchat.py [--records 200000]

Writes benchmarks/results/sarchat.json. The release: the nine test files of SARChat's infer/swift-eval.py,
records spread over them in the README's test-set proportions, 64 shared images (the import checks each
record's image by path; pixels are not read). Ratios are against a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sarlang_ray import boxes, metrics, release

# README test-set sizes per task; the files of each task share them equally
TEST = {
    "classify": 10024,
    "describe": 6032,
    "classify_count": 11704,
    "classify_grounding_single": 5804,
    "classify_grounding_multi": 5804,
    "classify_identify_single": 87782,
    "classify_identify_multi": 87783,
    "classify_refer_single": 5851,
    "classify_refer_multi": 5852,
}
TAG = {
    "classify": "cls",
    "describe": "describe",
    "classify_count": "count",
    "classify_grounding_single": "grounding",
    "classify_grounding_multi": "grounding",
    "classify_identify_single": "identify",
    "classify_identify_multi": "identify",
    "classify_refer_single": "refer",
    "classify_refer_multi": "refer",
}


def build(root: Path, n: int) -> int:
    for i in range(64):
        p = root / "images" / f"{i:07d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(p)
    total, scale = 0, n / sum(TEST.values())
    for name, size in TEST.items():
        k = max(1, round(size * scale))
        recs = [
            {
                "messages": [
                    {"role": "user", "content": f"<image>[{TAG[name]}] Question {j} about the image?"},
                    {
                        "role": "assistant",
                        "content": "{<10><20><110><220>}"
                        if "refer" in name or "grounding" in name
                        else "ship",
                    },
                ],
                "images": [f"images/{j % 64:07d}.png"],
            }
            for j in range(k)
        ]
        (root / f"SARChat_{name}_test.json").write_text(json.dumps(recs))
        total += k
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--answers", type=int, default=100_000)
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "SARChat"
        records = build(root, ns.records)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        result = release.import_release(str(root))
        import_s = time.perf_counter() - t0
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert result.totals["imported"] == records
    rng = np.random.default_rng(0)
    truths = [f"{{<{a}><{b}><{a + 100}><{b + 120}>}}" for a, b in rng.integers(0, 300, (ns.answers, 2))]
    preds = [
        f"[{a + d}, {b + d}, {a + 100 + d}, {b + 120 + d}]"
        for (a, b), d in zip(rng.integers(0, 300, (ns.answers, 2)), rng.integers(-30, 30, ns.answers))
    ]
    t0 = time.perf_counter()
    right = sum(boxes.box_correct(p, t, 512, 512)[0] for p, t in zip(preds, truths))
    box_s = time.perf_counter() - t0
    words = ["ship", "aircraft", "car", "tank", "bridge", "harbor"]
    sp, st = [words[i % 6] for i in range(ns.answers)], [words[(i * 7) % 6] for i in range(ns.answers)]
    t0 = time.perf_counter()
    sum(metrics.vqa_correct(p, t, "strict") for p, t in zip(sp, st))
    strict_s = time.perf_counter() - t0
    out = {
        "records": records,
        "pairs": result.table.num_rows,
        "import_s": round(import_s, 2),
        "import_records_per_s": round(records / import_s),
        "import_peak_rss_growth_mb": round((rss1 - rss0) / 1024),
        "answers": ns.answers,
        "box_iou_s": round(box_s, 3),
        "strict_string_s": round(strict_s, 3),
        "box_vs_strict_ratio": round(box_s / strict_s, 2),
        "box_right_share": round(right / ns.answers, 3),
        "tasks": dict(sorted((t, result.table["task"].to_pylist().count(t)) for t in release.SARCHAT_TASKS)),
    }
    path = Path(__file__).parent / "results" / "sarchat.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
