"""`python launch/run.py` as a newcomer runs it, and the resource check against a live Ray cluster."""

import json
import os
import subprocess
import sys

import pytest

from vigos_ray.cluster import ResourceError, check_ray_resources
from vigos_ray.config import load_config

from ..conftest import REPO

pytestmark = pytest.mark.integration


def test_run_py_samples_real_rollouts_and_says_training_is_not_built(tmp_path):
    cmd = [sys.executable, "launch/run.py", f"run.output_dir={tmp_path}/runs", f"run.cache_dir={tmp_path}/cache",
           "learner.prompts_per_step=3", "rollout.max_new_tokens=8", "run.name=smoke"]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "smoke"
    assert load_config(run_dir / "config.yaml").learner.prompts_per_step == 3  # the resolved config, reloadable
    rollouts = [json.loads(line) for line in (run_dir / "rollouts-step0.jsonl").read_text().splitlines()]
    assert len(rollouts) == 3 and all(r["sample_id"].startswith("easyvqa-train-") for r in rollouts)
    assert all(1 <= len(r["completion_ids"]) <= 8 and len(r["logprobs"]) == len(r["completion_ids"]) for r in rollouts)
    assert "no training happened" in proc.stderr  # it never pretends to have trained


def test_run_py_rejects_a_bad_key_before_starting_anything(tmp_path):
    proc = subprocess.run([sys.executable, "launch/run.py", "rollout.temprature=1.0"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "Did you mean 'rollout.temperature'" in proc.stderr and "Traceback" not in proc.stderr


def test_gpu_request_is_checked_against_the_live_cluster(ray_cluster):
    check_ray_resources(load_config())  # the CPU default fits
    cfg = load_config(
        overrides=[
            "teachers.reasoning.num_gpus=1",
            "teachers.reasoning.min_workers=2",
            "teachers.reasoning.max_workers=2",
        ]
    )
    with pytest.raises(ResourceError, match=r"asks for 2 GPUs \(teachers.reasoning.min_workers=2 x "):
        check_ray_resources(cfg)
