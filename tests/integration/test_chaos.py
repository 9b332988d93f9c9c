"""Chaos runs: faults of several kinds at random points of one run (some during the recovery from the previous),
restarted as a job scheduler would; the run ends as a clean run of the same config does: final weights bit for
bit, every step's deterministic metrics (loss, per-segment KL, token counts, versions, data cursor, sample ids)
equal, no process left behind, no checkpoint incomplete."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.run import main as run_main
from vigos_ray.chaos import KINDS, differences, incomplete_checkpoints, plan_faults, run_with_faults

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def args(out: Path, tiny: Path, *extra: str) -> list[str]:
    return [f"run.output_dir={out}", f"run.cache_dir={out}/cache", f"model.path={tiny}", "learner.prompts_per_step=2",
            "rollout.max_new_tokens=12", "learner.lr=1e-3", "run.cpu_threads=1", "checkpoint.every_steps=2",
            *extra]  # fmt: skip


def check(clean: Path, chaos: Path, result, faults) -> None:
    assert [hit.kind for hit in result.injected] == [f.kind for f in faults], (result.injected, faults)
    assert differences(clean, chaos) == []
    assert result.leftover == [], result.leftover
    assert incomplete_checkpoints(chaos / "checkpoints") == []


def test_a_short_chaos_run_ends_bit_identical_to_a_clean_run(tmp_path, tiny_fast, ray_cluster):
    """Sync mode, 6 steps, OPSD's one teacher pool and HF sampling: a rollout worker killed, a preemption notice
    (SIGTERM: checkpoint, exit 143, restart), and a teacher worker killed while that restart starts up."""
    run = args(tmp_path, tiny_fast, "run.steps=6", "loss.objective=opsd", "rollout.backend=hf", "learner.workers=1")
    faults = plan_faults(10, 3, 6, ("rollout", "teacher", "push", "driver_term"))
    assert [(f.kind, f.in_recovery) for f in faults] == [("rollout", False), ("driver_term", False), ("teacher", True)]
    result = run_with_faults([*run, "run.name=chaos"], tmp_path / "chaos", faults, tmp_path / "chaos.log")
    assert result.restarts == 1 and result.injected[2].stage == "start-up"
    assert run_main([*run, "run.name=clean"]) == 0  # in this process, on the session's cluster
    check(tmp_path / "clean", tmp_path / "chaos", result, faults)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 10 restarts of the driver, ~45 s each here, and the clean run
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_long_chaos_run_with_every_kind_of_fault_ends_bit_identical(tmp_path, tiny_fast, seed):
    """30 steps, the real vLLM engine and all three teacher pools, 12 faults of every kind (`launch/chaos.py`,
    which also runs the clean run and compares)."""
    from launch.chaos import main as chaos_main

    run = args(tmp_path, tiny_fast, "run.steps=30", "run.name=chaos")
    assert chaos_main(["--seed", str(seed), "--faults", "12", "--kinds", ",".join(KINDS), *run]) == 0  # all agree
    injected = (tmp_path / "chaos" / "chaos.log").read_text().count("=== chaos: {")
    assert injected >= 10  # a checkpoint or push fault may find no such stage before the run ends


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_long_async_chaos_run_ends_bit_identical(tmp_path, tiny_fast):
    """Async mode with the staleness bound: the batches sampled ahead of training are in every checkpoint, so
    driver and learner deaths replay exactly, and a batch lost with its rollout worker while sampled ahead is
    sampled again under the version it was issued under (the learner keeps it)."""
    from launch.chaos import main as chaos_main

    run = args(tmp_path, tiny_fast, "run.steps=30", "run.mode=async", "run.max_staleness=1", "run.name=chaos")
    assert chaos_main(["--seed", "4", "--faults", "10", "--kinds", ",".join(KINDS), *run]) == 0
