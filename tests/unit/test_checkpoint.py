"""Checkpoint publication: complete or absent, `latest` last, interrupted saves ignored, old ones pruned."""

from __future__ import annotations

import pytest

from vigos_ray.checkpoint import DRIVER_FILE, Checkpointer, DriverState, latest, load_driver_state, resume_path
from vigos_ray.config import CheckpointConfig, ConfigError


def state(step: int) -> DriverState:
    return DriverState(step=step, version=step, data={"epoch": 0, "position": 4 * step, "seed": 0, "bad": {}})


def write_shard(path):
    (path / "learner").mkdir()
    (path / "learner" / "shard").write_bytes(b"x" * 10)


def test_a_published_checkpoint_is_named_by_latest_and_holds_the_driver_state(tmp_path):
    ckpt = Checkpointer(CheckpointConfig(keep=2), tmp_path)
    path = ckpt.save(state(3), write_shard)
    assert path.name == "step_3" and (tmp_path / "latest").read_text() == "step_3"
    assert load_driver_state(latest(tmp_path)).data["position"] == 12
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.part"))


def test_a_save_killed_midway_leaves_the_previous_checkpoint_in_charge(tmp_path):
    ckpt = Checkpointer(CheckpointConfig(keep=2), tmp_path)
    ckpt.save(state(2), write_shard)

    def dies(path):
        write_shard(path)
        raise KeyboardInterrupt  # the process is gone before the driver state and the rename

    with pytest.raises(KeyboardInterrupt):
        ckpt.save(state(4), dies)
    assert (tmp_path / "step_4.tmp").is_dir()  # what a kill leaves behind
    assert latest(tmp_path).name == "step_2"
    assert resume_path(CheckpointConfig(resume="auto"), tmp_path).name == "step_2"
    ckpt.save(state(5), write_shard)  # the next save clears the leftover
    assert not (tmp_path / "step_4.tmp").exists() and latest(tmp_path).name == "step_5"


def test_a_pointer_to_an_incomplete_directory_falls_back_to_the_newest_complete_one(tmp_path):
    ckpt = Checkpointer(CheckpointConfig(keep=3), tmp_path)
    ckpt.save(state(1), write_shard)
    ckpt.save(state(2), write_shard)
    (tmp_path / "step_2" / DRIVER_FILE).unlink()
    assert latest(tmp_path).name == "step_1"


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    ckpt = Checkpointer(CheckpointConfig(keep=2), tmp_path)
    for step in (1, 2, 3, 4):
        ckpt.save(state(step), write_shard)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_3", "step_4"]


def test_resume_settings(tmp_path):
    assert resume_path(CheckpointConfig(resume="auto"), tmp_path / "none") is None  # a fresh run
    Checkpointer(CheckpointConfig(), tmp_path).save(state(1), write_shard)
    assert resume_path(CheckpointConfig(resume="never"), tmp_path) is None
    assert resume_path(CheckpointConfig(resume=str(tmp_path / "step_1")), tmp_path).name == "step_1"
    with pytest.raises(ConfigError, match="checkpoint.resume.*not a complete checkpoint"):
        resume_path(CheckpointConfig(resume=str(tmp_path / "missing")), tmp_path)


def test_steps_and_minutes_make_a_checkpoint_due(tmp_path, monkeypatch):
    import vigos_ray.checkpoint as checkpoint

    clock = [0.0]
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: clock[0])
    ckpt = Checkpointer(CheckpointConfig(every_steps=3, every_minutes=10), tmp_path)
    assert [ckpt.due(s) for s in (1, 2, 3, 6)] == [False, False, True, True]
    clock[0] = 601.0
    assert ckpt.due(1)
