"""`python launch/run.py` under `ray job submit`, its config errors, and the resource check. (Run directly, as a
newcomer runs it, it is exercised by tests/integration/test_recovery.py: stopped, restarted, finished.)"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vigos_ray.cluster import ResourceError, check_ray_resources
from vigos_ray.config import load_config

from ..conftest import REPO

pytestmark = pytest.mark.integration


def test_ray_job_submit_runs_the_pipeline_on_a_head_started_on_loopback(tmp_path, tiny_fast):
    from vigos_ray.weight_sync import free_port

    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port, dashboard = free_port("127.0.0.1"), free_port("127.0.0.1")
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    # --block: the head's processes end with this one, so the test never touches the session's own cluster
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=6",
         f"--temp-dir={temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        entry = (f"cd {REPO} && {sys.executable} launch/run.py run.steps=2 run.output_dir={tmp_path}/runs "
                 f"model.path={tiny_fast} run.cache_dir={tmp_path}/cache learner.prompts_per_step=2 "
                 "rollout.max_new_tokens=12 run.mode=async weight_sync.transport=object_store")  # fmt: skip
        submit = [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--", "bash", "-c", entry]
        for _ in range(30):  # the dashboard's job server comes up a few seconds after the head
            proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=400)
            if "Failed to connect" not in proc.stdout + proc.stderr:
                break
            time.sleep(2)
        assert proc.returncode == 0 and "succeeded" in proc.stdout + proc.stderr, proc.stdout[-3000:]
        records = (tmp_path / "runs" / "vigos" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["version"] for r in records] == [1, 2]
    finally:
        head.terminate()
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


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


BAD_MODELS = {  # case -> (overrides given tmp_path, student and other-vocabulary folders; expected message)
    "missing folder": (lambda tmp, student, other: [f"model.path={tmp}/nope"],
                       "is not a directory; point model.path at a Hugging Face model folder"),
    "other architecture": (lambda tmp, student, other: [f"model.path={tmp}/llama"],
                           "holds a 'llama' model; supported: qwen2_vl, qwen2_5_vl"),
    "teacher vocabulary": (lambda tmp, student, other: [f"model.path={student}",
                                                        f"teachers.reasoning.checkpoint={other}"],
                           "teachers.reasoning.checkpoint"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_run_py_names_a_bad_model_or_teacher_folder_before_any_actor_starts(tmp_path, tiny_fast, tiny_qwen_vocab,
                                                                            case):  # fmt: skip
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    overrides, message = BAD_MODELS[case]
    cmd = [sys.executable, "launch/run.py", f"run.output_dir={tmp_path}/runs", f"run.cache_dir={tmp_path}/cache",
           *overrides(tmp_path, tiny_fast, tiny_qwen_vocab)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert message in proc.stderr.splitlines()[-1], proc.stderr[-3000:]
    assert "Started a local Ray instance" not in proc.stderr  # refused before a cluster (or an actor) started
