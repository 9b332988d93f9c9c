"""`python launch/run.py` as a newcomer runs it: the default run (quiet console, the method at work, a summary),
stopped by SIGTERM and started again, bad records, a dead learner rank.

They call `launch/run.py`'s `main` in this process on the session's Ray cluster (a real SIGTERM to this process
included), which proves what a subprocess would and saves a cluster start each; the `slow` kill -9 test runs real
subprocesses. Where the rollout engine is not what a test is about, it samples with the HF backend (no vLLM
engine start).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from ray.exceptions import RayActorError, RayTaskError

from launch.run import main as run_main
from vigos_ray.config import load_config
from vigos_ray.models import load_model

from ..conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def overrides(out: Path, tiny: Path, *extra: str) -> list[str]:
    """A short run: OPSD's single teacher pool and HF sampling, where neither is what the test is about."""
    return [f"run.output_dir={out}", f"run.cache_dir={out}/cache", "run.name=r", f"model.path={tiny}",
            "learner.prompts_per_step=2", "rollout.max_new_tokens=12", "learner.lr=1e-3", "run.steps=4",
            "loss.objective=opsd", "rollout.backend=hf", *extra]  # fmt: skip


def wait_for_steps(metrics: Path, n: int, alive, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        assert alive(), "the run ended before it was interrupted"
        time.sleep(0.2)
    raise TimeoutError(f"{metrics} did not reach {n} steps")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def third_party_noise(console: str) -> list[str]:
    """Lines of a console that are not ours: Ray worker prefixes, Python warnings, other progress bars."""
    lines = [part for line in console.splitlines() for part in line.split("\r") if part.strip()]
    ours = re.compile(
        r"^(\d{4}-\d\d-\d\d [\d:,]+ (INFO|WARNING|ERROR) (vigos_ray|workers|launch)[.:]"
        r"|train:|warm start:|logs: |trained \d+ steps|  |model:|metrics:|checkpoints:|plot:|evaluate:"
        r"|preempted: )"
    )
    return [line for line in lines if not ours.match(line)]


def run_preempted(args: list[str], metrics: Path, after_steps: int) -> int:
    """`launch/run.py`'s main with a real SIGTERM to this process once `after_steps` steps are done, as a job
    scheduler sends a preemption notice; returns its exit code."""
    running = threading.Event()

    def preempt() -> None:
        wait_for_steps(metrics, after_steps, running.is_set)
        if running.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a notice that comes too late reaches no one
    try:
        running.set()
        threading.Thread(target=preempt, daemon=True).start()
        return run_main(args)
    finally:
        running.clear()
        signal.signal(signal.SIGTERM, previous)


def test_the_default_run_trains_every_segment_on_a_quiet_console(tmp_path, cache_dir, tiny_warm, ray_cluster, capfd):
    """`make run` as a user runs it (the default config: the warm-started tiny model, 20 steps). The console holds
    our lines only; the summary shows every teacher at work. (Preemption and resume: the bad-record test below.)"""
    run_dir = tmp_path / "vigos"
    assert run_main([f"run.output_dir={tmp_path}", f"run.cache_dir={cache_dir}"]) == 0
    out, err = capfd.readouterr()
    assert third_party_noise(out + err) == [], third_party_noise(out + err)
    assert f"logs: {run_dir / 'logs'}/" in out and (run_dir / "logs" / "rollout-0.log").is_file()

    steps = records(run_dir)
    assert [r["version"] for r in steps] == list(range(1, 21))  # every step once: none skipped, none repeated
    assert sum(r["valid_rate"] for r in steps) > 0 and sum(r["accuracy"] for r in steps) > 0
    for segment in ("perception", "reasoning", "reference"):  # every teacher supervised tokens, with a pull
        assert sum(r[f"tokens/{segment}"] for r in steps) > 0, segment
        assert sum(r[f"kl/{segment}"] for r in steps) > 0, segment
    summary = out[out.index("trained 20 steps") :]
    for row in ("valid rollouts", "batch accuracy"):
        assert re.search(rf"{row} +[0-9.]+ +[0-9.]+\n", summary), summary
    for segment in ("perception", "reasoning", "reference"):  # a window whose steps gave a teacher no tokens says so
        cells = [r"[0-9.]+ \(\d+\)" if sum(r[f"tokens/{segment}"] for r in window) else "no tokens"
                 for window in (steps[:5], steps[-5:])]  # fmt: skip
        assert re.search(rf"KL {segment} \(tokens\) +{cells[0]} +{cells[1]}\n", summary), summary
    assert f"evaluate:    python launch/eval.py --model {run_dir}" in summary
    assert (run_dir / "plots" / "curves.png").is_file() and (run_dir / "final" / "config.json").is_file()
    assert load_config(run_dir / "config.yaml").run.steps == 20  # the resolved config, reloadable
    trained, initial = load_model(run_dir / "final").state_dict(), load_model(tiny_warm).state_dict()
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)  # the exported model is the trained one


@pytest.mark.slow
def test_kill_9_of_the_driver_and_a_restart_end_with_the_uninterrupted_runs_weights(tmp_path, tiny_fast):
    from safetensors.torch import load_file

    def command(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "launch/run.py", *overrides(out, tiny_fast, *extra)]

    whole = tmp_path / "whole"
    ref = subprocess.run(command(whole), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]

    broken = tmp_path / "broken"
    cmd = command(broken, "checkpoint.every_steps=1")
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        wait_for_steps(broken / "r" / "metrics.jsonl", 2, lambda: proc.poll() is None)
        proc.send_signal(signal.SIGKILL)  # no handler runs: whatever was being written stays half-written
        proc.wait(timeout=60)
    restart = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert restart.returncode == 0, restart.stderr[-3000:]

    a = load_file(whole / "r" / "final" / "model.safetensors")
    b = load_file(broken / "r" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["version"] for r in records(broken / "r")] == [r["version"] for r in records(whole / "r")] == [1, 2, 3, 4]


def test_a_bad_record_met_mid_run_stops_it_naming_the_record_and_the_trained_steps_stay(
    tmp_path, tiny_fast, ray_cluster, capfd
):
    from vigos_ray.easyvqa import write_easyvqa_jsonl

    good = [json.loads(line) for line in write_easyvqa_jsonl(tmp_path / "easyvqa", "test").read_text().splitlines()[:2]]
    bad = {"id": "q-bad", "problem": "What shape is it?", "answer": "circle", "image": "no/such.png"}
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [*good, bad]))
    code = run_main(overrides(tmp_path, tiny_fast, "data.source=files", f"data.train_files=[{data}]",
                              "data.shuffle=false", "data.on_bad_record=raise", "checkpoint.every_steps=1",
                              "run.steps=2", "learner.workers=1"))  # fmt: skip
    err = capfd.readouterr().err
    assert code == 2, err[-3000:]
    assert f"error: bad record at {data}:3 (id 'q-bad'): image file" in err
    assert "or set data.on_bad_record=skip" in err and "Traceback" not in err
    run_dir = tmp_path / "r"
    assert [r["version"] for r in records(run_dir)] == [1]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_1"


def test_every_bad_record_kind_is_skipped_with_one_warning_and_counted_across_a_preemption_and_resume(
    tmp_path, tiny_fast, ray_cluster, capfd
):
    """Bad records of every kind skipped (a 12 MP image trains); the run is stopped by a preemption notice
    (SIGTERM: the step ends, a checkpoint is written, exit 143) and the same command resumes it: every step once,
    the data cursor and the skip counts carried over."""
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
    args = overrides(tmp_path, tiny_fast, "data.source=files", f"data.train_files=[{data}]", "data.shuffle=false",
                     "data.max_prompt_tokens=1024", "run.steps=3", "learner.workers=1")  # fmt: skip
    run_dir = tmp_path / "r"
    code = run_preempted(args, run_dir / "metrics.jsonl", after_steps=1)
    first = "".join(capfd.readouterr())
    assert code == 143, first[-3000:]
    assert "preempted: stopped after step" in first
    stopped_at = (run_dir / "checkpoints" / "latest").read_text()
    steps_done = int(stopped_at.removeprefix("step_"))
    assert 1 <= steps_done < 3 and not (run_dir / "final").exists()
    kinds = ["malformed", "missing_image", "undecodable_image", "empty_problem", "missing_answer", "prompt_too_long"]
    for kind, line in zip(kinds, range(2, 8), strict=True):  # one warning per kind, naming the record's line
        assert first.count(f"further '{kind}' records are counted") == 1, kind
        assert f"skipping bad record at {data}:{line} " in first, (kind, first[-3000:])

    assert run_main(args) == 0  # the same command again
    out, err = capfd.readouterr()
    assert third_party_noise(first) == [] and third_party_noise(out + err) == [], third_party_noise(first + out + err)
    assert f"resumed from {run_dir / 'checkpoints' / stopped_at} at step {steps_done}" in err
    assert "skipping bad record" not in err  # the counts came back with the cursor: no warning twice
    steps = records(run_dir)
    assert [r["version"] for r in steps] == [1, 2, 3]  # every step once: none skipped, none repeated
    # 4 good records, 2 prompts a step: all trained, the 12 MP image included; step 3 starts the 2nd epoch,
    # which meets the bad records again
    assert [r["rollouts"] for r in steps] == [2, 2, 2]
    assert {k: v for k, v in steps[-1].items() if k.startswith("data/skipped/")} == {
        f"data/skipped/{kind}": 2 for kind in kinds
    }


def test_a_dead_learner_rank_fails_the_run_fast_and_leaves_the_last_checkpoint_usable(tmp_path, tiny_fast,
                                                                                       ray_cluster):  # fmt: skip
    from vigos_ray.checkpoint import latest, load_driver_state

    run_dir = tmp_path / "r"
    killed_at: list[float] = []

    def kill_a_rank() -> None:  # once a checkpoint exists, SIGKILL learner rank 1 (its pid is in its log file)
        wait_for_steps(run_dir / "metrics.jsonl", 1, lambda: True)
        for _ in range(300):  # the step's metrics are written before its checkpoint
            if (run_dir / "checkpoints" / "latest").exists():
                break
            time.sleep(0.1)
        pid = int(re.findall(r"\(pid (\d+)\) starts", (run_dir / "logs" / "learner-1.log").read_text())[-1])
        killed_at.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_a_rank, daemon=True)
    killer.start()
    with pytest.raises((RayActorError, RayTaskError)):  # what Ray raised, as a terminal would show it
        run_main(overrides(tmp_path, tiny_fast, "checkpoint.every_steps=1", "run.steps=50"))
    assert killed_at and time.monotonic() - killed_at[0] < 120
    checkpoint = latest(run_dir / "checkpoints")
    assert checkpoint is not None and load_driver_state(checkpoint).step >= 1
    assert (checkpoint / "learner" / ".metadata").is_file()  # the DCP shards are complete
    assert "Traceback" in (run_dir / "logs" / "driver.log").read_text()  # the failure is in the run's log too
