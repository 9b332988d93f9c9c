"""Run checkpoints that are complete or absent: written to `step_N.tmp/`, renamed to `step_N/`, then `latest`.

A checkpoint holds the learner's sharded model and optimizer (torch.distributed.checkpoint, one shard per rank),
its scheduler and policy version, and the driver's state: the next step, the data cursor, and in async mode the
batches already sampled but not yet trained (samples and rollouts). Rollout seeds derive from (run.seed, step,
sample id), so no sampler RNG state is needed to replay a step exactly. `latest` is replaced atomically after the
rename; a directory still named `.tmp` (a save that was killed) is never read and is removed by the next save.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vigos_ray.config import CheckpointConfig, ConfigError

log = logging.getLogger(__name__)
DRIVER_FILE = "driver.pkl"  # written last inside the temporary directory


@dataclass
class DriverState:
    step: int  # the next step to run
    version: int  # the learner's policy version after `step` optimizer steps
    data: dict[str, Any]  # PromptStream.state_dict()
    inflight: list[tuple[list, list]] = field(default_factory=list)  # async: (samples, rollouts) not yet trained


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    found = []
    for path in root.glob("step_*"):
        m = re.fullmatch(r"step_(\d+)", path.name)
        if m and path.is_dir() and (path / DRIVER_FILE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest(root: Path) -> Path | None:
    """The checkpoint `latest` names, else the newest complete one (a crash between rename and pointer)."""
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / DRIVER_FILE).is_file():
            return path
        log.warning("%s names %s, which is incomplete; falling back to the newest complete checkpoint", pointer, path)
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


def resume_path(cfg: CheckpointConfig, root: Path) -> Path | None:
    """Where to resume from: `auto` = the latest complete checkpoint of this run (or none), `never`, or a PATH."""
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return latest(root)
    path = Path(cfg.resume).expanduser()
    if not (path / DRIVER_FILE).is_file():
        raise ConfigError(
            f"config key 'checkpoint.resume': {path} is not a complete checkpoint (no {DRIVER_FILE}); "
            "name a step_N directory, or use auto / never"
        )
    return path


class Checkpointer:
    """Decides when a step ends with a checkpoint (every N steps, every M minutes) and publishes them."""

    def __init__(self, cfg: CheckpointConfig, root: Path):
        self.cfg, self.root = cfg, root
        self._last = time.monotonic()

    def due(self, steps_done: int) -> bool:
        by_steps = self.cfg.every_steps > 0 and steps_done % self.cfg.every_steps == 0
        by_time = self.cfg.every_minutes > 0 and time.monotonic() - self._last >= 60 * self.cfg.every_minutes
        return by_steps or by_time

    def save(self, state: DriverState, save_learner) -> Path:
        """`save_learner(dir)` writes the learner's part; then the driver's part, the rename and `latest`."""
        t0 = time.perf_counter()
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        final = self.root / f"step_{state.step}"
        tmp = final.with_name(final.name + ".tmp")
        tmp.mkdir()
        save_learner(tmp)
        with (tmp / (DRIVER_FILE + ".part")).open("wb") as f:
            pickle.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp / (DRIVER_FILE + ".part"), tmp / DRIVER_FILE)
        if final.exists():  # the same step saved again (preemption right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = self.root / "latest.part"
        pointer.write_text(final.name)
        os.replace(pointer, self.root / "latest")
        self._prune()
        self._last = time.monotonic()
        log.info("checkpoint %s written in %.1f s", final, time.perf_counter() - t0)
        return final

    def _prune(self) -> None:
        dirs = step_dirs(self.root)
        for _, path in dirs[: max(len(dirs) - self.cfg.keep, 0)]:
            shutil.rmtree(path, ignore_errors=True)


def load_driver_state(path: Path) -> DriverState:
    with (path / DRIVER_FILE).open("rb") as f:
        return pickle.load(f)
