"""`launch/report.py` writes one curves figure per run and a comparison figure, and names a missing run."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from ..conftest import REPO


def fake_run(path, name: str, slope: float) -> None:
    path.mkdir(parents=True)
    rows = []
    for step in range(6):
        row = {"step": step, "loss": 1.0 - slope * step, "accuracy": slope * step, "valid_rate": 0.5,
               "time/step": 1.0, "time/rollout_wait": 0.4, "time/teachers": 0.2, "time/learner": 0.3,
               "time/push": 0.1, "time/teacher/description": 0.1}  # fmt: skip
        for seg in ("description", "reasoning", "reference"):
            row[f"loss/{seg}"], row[f"kl/{seg}"] = 0.3 - 0.01 * step, 0.05 + slope * step
        if step % 3 == 2:
            row["eval/accuracy"] = 0.1 * step
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_writes_curves_for_each_run_and_one_comparison(tmp_path):
    fake_run(tmp_path / "vigos", "vigos", 0.1)
    fake_run(tmp_path / "opsd", "opsd", 0.05)
    runs = [str(tmp_path / "vigos"), str(tmp_path / "opsd")]
    cmd = [sys.executable, "launch/report.py", *runs, "--out", str(tmp_path / "cmp")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pngs = [tmp_path / "vigos/plots/curves.png", tmp_path / "opsd/plots/curves.png", tmp_path / "cmp/comparison.png"]
    assert proc.stdout.split() == [str(p) for p in pngs]
    images = [Image.open(p) for p in pngs]
    assert all(im.format == "PNG" and im.width >= 1000 for im in images)
    assert images[0].tobytes() != images[1].tobytes()  # different curves, different pictures


def test_report_names_a_directory_without_metrics(tmp_path):
    proc = subprocess.run([sys.executable, "launch/report.py", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "has no metrics.jsonl" in proc.stderr
