"""The GPU check's parts that run anywhere: its answer on a machine without a GPU, the parameter count it divides
by, and the table it computes from a run's metrics."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ..conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from gpu_check import language_parameters, summary  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    done = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().splitlines() == [
        "gpu-check: needs a CUDA GPU (H100/H200 class); this machine has none, so nothing was run"
    ]


def test_language_parameters_are_counted_from_the_headers(tiny_fast):
    from vigos_ray.models import load_model

    model = load_model(tiny_fast)
    expected = sum(p.numel() for n, p in model.named_parameters() if "visual" not in n)
    assert language_parameters(tiny_fast) == expected


def test_the_table_is_the_median_of_the_steps_after_the_first():
    def step(seconds: float, push_full: int = 0) -> dict:
        return {"time/step": seconds, "time/rollout_wait": seconds / 2, "time/teachers": 1.0, "time/learner": 2.0,
                "time/push": 0.5, "rollouts": 16, "len/completion": 512.0, "tok_per_s/teacher/reasoning": 1e5,
                "tok_per_s/learner": 2e4, "push/bytes": 3e8, "push/gbps": 6.0, "push/full": push_full}  # fmt: skip

    records = [step(100.0, push_full=1), step(8.0), step(10.0), step(12.0)]
    rows = dict(summary(records, params=3_000_000_000, peak_tflops=1000.0, lora=True))
    assert rows["step (3 steps after the first, median)"] == "10.00 s" and rows["  rollout_wait"] == "5.00 s"
    assert rows["rollout decode"] == f"{16 * 512 / 5:,.0f} tokens/s"
    assert rows["teacher reasoning"] == "100,000 tokens/s, 60.0% of bf16 peak"  # 1e5 x 2 x 3e9 / 1e15
    assert rows["learner (LoRA: 4 x params per token)"] == "20,000 tokens/s, MFU 24.0%"
    assert rows["push"] == "300 MB at 6.00 GB/s (full: 0 of 3)"
