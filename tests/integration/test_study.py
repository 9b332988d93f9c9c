"""A shortened run of the study command (issues #8, #21): the warm start answers in format, training changes what
the model answers, and the held-out items of the shortcut-prone data are reported by prior conflict. Slow (about
4 minutes on 2 cores): `pytest -m slow tests/integration/test_study.py`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vigos_ray.easyvqa import shortcut_records

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def test_short_study_warm_start_is_in_format_and_training_changes_the_model(tmp_path, cache_dir):
    overrides = [f"run.output_dir={tmp_path}", f"run.cache_dir={cache_dir}", "run.name=short", "run.steps=6",
                 "study.seeds=[0]", "warm_start.steps=300", "warm_start.vision_steps=100", "study.palr_items=8",
                 "eval.limit=16", "eval.every_steps=3", "eval.during_train_items=4",
                 "learner.prompts_per_step=4"]  # fmt: skip
    proc = subprocess.run([sys.executable, "launch/study.py", *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "short"
    evals = {arm: json.loads((root / "eval" / f"{arm}-s0.json").read_text()) for arm in ("vigos", "opsd", "none")}

    # the warm start writes the format nearly always (SPEC's valid-format check, graded on every sample)
    assert evals["none"]["valid_format"] >= 0.8
    # same items, same sampling seeds: a trained arm answers differently only because its weights changed
    start = [item["responses"] for item in evals["none"]["per_item"]]
    for arm in ("vigos", "opsd"):
        assert [item["responses"] for item in evals[arm]["per_item"]] != start, f"{arm} answers like the start"
        trained = _weights(root / "arms" / f"{arm}-s0" / "final")
        warm = _weights(root / "warm_start")
        assert max((trained[n] - warm[n]).abs().max().item() for n in warm) > 0

    results = json.loads((root / "results.json").read_text())
    assert set(results["summary"]) == {"vigos", "opsd", "none"}
    # the held-out items alternate prior-conflict and prior-consistent (data.source=easyvqa_shortcut)
    held_out = shortcut_records("test", seed=0)[:16]  # drawn from the study's run.seed, eval.limit=16
    assert [item["id"] for item in evals["none"]["per_item"]] == [r["id"] for r in held_out]
    assert {"prior-conflict", "prior-consistent", "image sensitivity"} <= set(results["summary"]["vigos"])
    assert set(results["differences"]) == {"vigos - none", "opsd - none", "vigos - opsd"}
    assert results["palr"]["vigos"]["pooled"]["description"] == 0.0  # the perception teacher never sees an answer
    assert (root / "comparison.png").is_file() and "| vigos |" in (root / "results.md").read_text()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")
