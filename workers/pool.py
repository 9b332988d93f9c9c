"""An autoscaled pool of teacher actors: grows when scoring calls run slow, shrinks when they have been quick.

Plain Ray actors and this small controller (DESIGN decision 5: Ray Serve retries nothing after a replica dies and
hangs when its minimum cannot be placed). A new worker starts in the background and serves once it is ready;
one that cannot be placed stays `starting`, capacity is requested from Ray's autoscaler, and the pool keeps
scoring with the workers it has, so training never waits for a worker that may never come.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray

from vigos_ray.config import TeacherPoolConfig
from workers.group import Pending, logged, remote_call, scatter

log = logging.getLogger(__name__)


class TeacherPool:
    def __init__(self, cls: type, cfg: TeacherPoolConfig, args: tuple, name: str, timeout_s: float = 600.0,
                 restarts: int = 3, log_dir: Path | None = None):  # fmt: skip
        self.cfg, self.args, self.name, self.timeout_s = cfg, args, name, timeout_s
        # restarted however often it dies over a run; one call is resubmitted at most `restarts` times
        self.remote_cls = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_restarts=-1,
                                     max_task_retries=restarts)(logged(cls, log_dir, name))  # fmt: skip
        self.actors: list = []  # serving
        self.starting: dict = {}  # ready-ref -> (actor, time it was asked for)
        self._next_index = 0
        self._last_slow = time.monotonic()
        self._warned_pending = False
        for _ in range(self.floor):
            self._add()

    @property
    def floor(self) -> int:
        return max(self.cfg.min_workers, 1)  # a step needs one scorer of every role

    def ready(self) -> Pending:
        """Resolves when the workers asked for so far are constructed (start-up waits on this)."""
        return Pending(list(self.starting), flat=False, timeout_s=self.timeout_s)

    def _add(self) -> None:
        actor = self.remote_cls.options(name=f"{self.name}-{self._next_index}").remote(
            *self.args, worker_index=self._next_index
        )
        self._next_index += 1
        self.starting[actor.__ray_ready__.remote()] = (actor, time.monotonic())
        try:  # real on an autoscaling cluster, a no-op on a fixed one
            from ray.autoscaler.sdk import request_resources

            bundle = {"CPU": self.cfg.num_cpus, **({"GPU": self.cfg.num_gpus} if self.cfg.num_gpus else {})}
            request_resources(bundles=[bundle] * (len(self.actors) + len(self.starting)))
        except Exception as err:  # no autoscaler here: say so once, keep going
            log.debug("request_resources unavailable: %s", err)

    def _promote(self) -> None:
        if not self.starting:
            return
        done, _ = ray.wait(list(self.starting), num_returns=len(self.starting), timeout=0)
        for ref in done:
            actor, _ = self.starting.pop(ref)
            ray.get(ref)  # a constructor error surfaces here
            self.actors.append(actor)
        waiting = [time.monotonic() - t for _, t in self.starting.values()]
        if waiting and max(waiting) > 60 and not self._warned_pending:
            log.warning("%s: a new worker has waited %.0f s for %g CPU / %g GPU; scoring continues with %d",
                        self.name, max(waiting), self.cfg.num_cpus, self.cfg.num_gpus, len(self.actors))  # fmt: skip
            self._warned_pending = True

    def call_all(self, method: str | Callable, *args) -> list[Any]:
        """`method` (a method's name, or a function of the worker: `fn(worker, *args)`) on every worker."""
        self._promote()
        return ray.get([remote_call(a, method, *args) for a in self.actors], timeout=self.timeout_s)

    def scatter_async(self, method: str, items: Sequence, cost: Sequence[int] | None = None) -> Pending:
        """`method(shard)` on every serving worker, shards of about equal cost, results concatenated in order."""
        self._promote()
        if not self.actors:
            raise RuntimeError(f"{self.name}: no worker is serving (still starting: {len(self.starting)})")
        return scatter(self.actors, method, items, cost, self.timeout_s)

    def observe(self, seconds: float) -> None:
        """Feed the wall time of one scoring call: slower than `scale_up_s` grows the pool by one worker; no call
        slower than half of it for `idle_s` releases one (never below the floor)."""
        now = time.monotonic()
        if seconds > self.cfg.scale_up_s / 2:
            self._last_slow = now
        size = len(self.actors) + len(self.starting)
        if seconds > self.cfg.scale_up_s and size < self.cfg.max_workers:
            log.info("%s: a call took %.1f s > %.1f s; adding worker %d", self.name, seconds, self.cfg.scale_up_s,
                     size + 1)  # fmt: skip
            self._add()
        elif now - self._last_slow > self.cfg.idle_s and size > self.floor:
            self._release()
            self._last_slow = now

    def _release(self) -> None:
        if self.starting:  # first give up on a worker that is not serving yet
            ref = next(iter(self.starting))
            actor, _ = self.starting.pop(ref)
        else:
            actor = self.actors.pop()
        ray.kill(actor)
        log.info("%s: idle; released a worker (%d serving, %d starting)", self.name, len(self.actors),
                 len(self.starting))  # fmt: skip

    def status(self) -> dict[str, int]:
        self._promote()
        return {"workers": len(self.actors), "starting": len(self.starting)}

    def shutdown(self) -> None:
        for actor in [*self.actors, *(a for a, _ in self.starting.values())]:
            ray.kill(actor)
        self.actors, self.starting = [], {}
