"""`python launch/run.py` as a newcomer runs it, stopped and started again as a preempted or crashed job is."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vigos_ray.config import load_config
from vigos_ray.models import load_model

from ..conftest import REPO

pytestmark = pytest.mark.integration


def command(out: Path, tiny: Path, *overrides: str) -> list[str]:
    return [sys.executable, "launch/run.py", f"run.output_dir={out}", f"run.cache_dir={out}/cache", "run.name=r",
            f"model.path={tiny}", "learner.prompts_per_step=2", "rollout.max_new_tokens=12", "learner.lr=1e-3",
            "run.steps=4", *overrides]  # fmt: skip


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for_steps(metrics: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, "the run ended before it was interrupted"
        time.sleep(0.2)
    raise TimeoutError(f"{metrics} did not reach {n} steps")


def versions(run_dir: Path) -> list[int]:
    return [json.loads(line)["version"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_mid_run_writes_a_checkpoint_exits_nonzero_and_a_restart_resumes_from_it(tmp_path, tiny_fast):
    cmd = command(tmp_path, tiny_fast)  # no periodic checkpoints: the one found after SIGTERM is the notice's
    run_dir = tmp_path / "r"
    proc = start(cmd, tmp_path / "first.log")
    wait_for_steps(run_dir / "metrics.jsonl", 1, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143, (tmp_path / "first.log").read_text()[-3000:]
    stopped_at = (run_dir / "checkpoints" / "latest").read_text()
    steps_done = int(stopped_at.removeprefix("step_"))
    assert 1 <= steps_done < 4 and not (run_dir / "final").exists()
    assert "preempted: stopped after step" in (tmp_path / "first.log").read_text()

    proc = start(cmd, tmp_path / "second.log")
    assert proc.wait(timeout=400) == 0, (tmp_path / "second.log").read_text()[-3000:]
    log = (tmp_path / "second.log").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / stopped_at} at step {steps_done}" in log
    assert versions(run_dir) == [1, 2, 3, 4]  # every step once: none skipped, none repeated in the metrics
    assert load_config(run_dir / "config.yaml").learner.prompts_per_step == 2  # the resolved config, reloadable
    trained, initial = load_model(run_dir / "final").state_dict(), load_model(tiny_fast).state_dict()
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)  # the exported model is the trained one


@pytest.mark.slow
def test_kill_9_of_the_driver_and_a_restart_end_with_the_uninterrupted_runs_weights(tmp_path, tiny_fast):
    from safetensors.torch import load_file

    whole = tmp_path / "whole"
    ref = subprocess.run(command(whole, tiny_fast), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]

    broken = tmp_path / "broken"
    cmd = command(broken, tiny_fast, "checkpoint.every_steps=1")
    proc = start(cmd, tmp_path / "killed.log")
    wait_for_steps(broken / "r" / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGKILL)  # no handler runs: whatever was being written stays half-written
    proc.wait(timeout=60)
    proc = start(cmd, tmp_path / "restart.log")
    assert proc.wait(timeout=400) == 0, (tmp_path / "restart.log").read_text()[-3000:]

    a = load_file(whole / "r" / "final" / "model.safetensors")
    b = load_file(broken / "r" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert versions(broken / "r") == versions(whole / "r") == [1, 2, 3, 4]


def test_a_bad_record_met_mid_run_stops_it_naming_the_record_and_the_trained_steps_stay(tmp_path, tiny_fast):
    from vigos_ray.easyvqa import write_easyvqa_jsonl

    good = [json.loads(line) for line in write_easyvqa_jsonl(tmp_path / "easyvqa", "test").read_text().splitlines()[:2]]
    bad = {"id": "q-bad", "problem": "What shape is it?", "answer": "circle", "image": "no/such.png"}
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [*good, bad]))
    cmd = command(tmp_path, tiny_fast, "data.source=files", f"data.train_files=[{data}]", "data.shuffle=false",
                  "data.on_bad_record=raise", "checkpoint.every_steps=1", "run.steps=2")  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: bad record at {data}:3 (id 'q-bad'): image file" in proc.stderr
    assert "or set data.on_bad_record=skip" in proc.stderr and "Traceback" not in proc.stderr
    run_dir = tmp_path / "r"
    assert versions(run_dir) == [1] and (run_dir / "checkpoints" / "latest").read_text() == "step_1"


def test_every_bad_record_kind_is_skipped_with_one_warning_and_counted_and_a_huge_image_trains(tmp_path, tiny_fast):
    from PIL import Image

    from vigos_ray.easyvqa import write_easyvqa_jsonl

    good = [json.loads(line) for line in write_easyvqa_jsonl(tmp_path / "easyvqa", "test").read_text().splitlines()]
    Image.new("RGB", (4000, 3000), (200, 30, 30)).save(tmp_path / "huge.png")  # 12 MP: downscaled to max_pixels
    rows = [
        good[0],
        '{"id": "broken", "problem": ',  # malformed JSON
        {"id": "no-image", "problem": "What colour?", "answer": "red", "image": "no/such.png"},
        {"id": "bad-b64", "problem": "What colour?", "answer": "red", "image_b64": "bm90IGFuIGltYWdl"},
        {"id": "no-problem", "problem": " ", "answer": "red", "image": good[1]["image"]},
        {"id": "no-answer", "problem": "What colour?", "image": good[1]["image"]},
        {"id": "long", "problem": "Describe it. " * 400, "answer": "red", "image": good[1]["image"]},
        good[1],
        {"id": "huge", "problem": "What colour is the shape?", "answer": "red", "image": str(tmp_path / "huge.png")},
        good[2],
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    cmd = command(tmp_path, tiny_fast, "data.source=files", f"data.train_files=[{data}]", "data.shuffle=false",
                  "data.max_prompt_tokens=1024", "run.steps=2")  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kinds = ["malformed", "missing_image", "undecodable_image", "empty_problem", "missing_answer", "prompt_too_long"]
    for kind, line in zip(kinds, range(2, 8), strict=True):  # one warning per kind, naming the record's line
        assert proc.stderr.count(f"further '{kind}' records are counted") == 1, kind
        assert f"skipping bad record at {data}:{line} " in proc.stderr, (kind, proc.stderr[-3000:])
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    # 4 good records for 2 steps x 2 prompts: all of them trained, the 12 MP image included, none skipped beyond
    assert [r["rollouts"] for r in records] == [2, 2]
    assert {k: v for k, v in records[-1].items() if k.startswith("data/skipped/")} == {
        f"data/skipped/{kind}": 1 for kind in kinds
    }


def test_a_dead_learner_rank_fails_the_run_fast_and_leaves_the_last_checkpoint_usable(tmp_path, tiny_fast):
    from vigos_ray.checkpoint import latest, load_driver_state

    cmd = command(tmp_path, tiny_fast, "checkpoint.every_steps=1", "run.steps=50")
    proc = start(cmd, tmp_path / "run.log")
    wait_for_steps(tmp_path / "r" / "metrics.jsonl", 1, proc)
    for _ in range(300):  # the step's metrics are written before its checkpoint
        if (tmp_path / "r" / "checkpoints" / "latest").exists():
            break
        time.sleep(0.1)
    ranks = subprocess.run(["pgrep", "-f", "ray::LearnerWorker"], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, ranks
    t0 = time.monotonic()
    os.kill(int(ranks[-1]), signal.SIGKILL)
    code = proc.wait(timeout=300)
    assert code != 0 and time.monotonic() - t0 < 120, (tmp_path / "run.log").read_text()[-3000:]
    checkpoint = latest(tmp_path / "r" / "checkpoints")
    assert checkpoint is not None and load_driver_state(checkpoint).step >= 1
    assert (checkpoint / "learner" / ".metadata").is_file()  # the DCP shards are complete
