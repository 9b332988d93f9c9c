"""A group of N identical Ray actors built from a plain worker class, with fan-out verbs named for what they do.

Verbs that end in `_async` return a `Pending` at once, so that a caller issues every stage's calls before it
waits on any of them; the others wait (with the group's timeout, so a dead or hung actor raises, never hangs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Pending:
    """Calls in flight: `refs` return lists to concatenate in order (`flat`) or one value each."""

    refs: list
    flat: bool
    timeout_s: float

    def result(self) -> list:
        import ray

        parts = ray.get(self.refs, timeout=self.timeout_s)
        return [x for part in parts for x in part] if self.flat else parts


def split_by_cost(cost: Sequence[int], n: int) -> list[int]:
    """n + 1 bounds cutting items (in order) into n contiguous shards of about equal total cost."""
    total, bounds, acc = sum(cost), [0], 0
    for i, c in enumerate(cost):
        acc += c
        while len(bounds) < n and acc >= total * len(bounds) / n:
            bounds.append(i + 1)
    return bounds + [len(cost)] * (n + 1 - len(bounds))


def scatter(actors: Sequence, method: str, items: Sequence, cost: Sequence[int] | None, timeout_s: float,
            **kwargs) -> Pending:  # fmt: skip
    """`method(shard, **kwargs)` on each actor, shards contiguous and of about equal cost; results flat, in order."""
    bounds = split_by_cost(cost if cost is not None else [1] * len(items), len(actors))
    refs = [getattr(a, method).remote(list(items[lo:hi]), **kwargs)
            for a, lo, hi in zip(actors, bounds, bounds[1:], strict=False) if hi > lo]  # fmt: skip
    return Pending(refs, flat=True, timeout_s=timeout_s)


@dataclass
class Ready:
    """A result already in hand, with Pending's interface (rollouts restored from a checkpoint)."""

    value: list

    def result(self) -> list:
        return self.value


def wait_all(pending: dict[str, Pending]) -> tuple[dict[str, list], dict[str, float]]:
    """Results of several Pendings, and the seconds until each one had finished (from this call)."""
    import ray

    t0 = time.perf_counter()
    left = {ref: name for name, p in pending.items() for ref in p.refs}
    done_at = dict.fromkeys(pending, 0.0)
    timeout = max((p.timeout_s for p in pending.values()), default=0.0)
    while left:
        ready, _ = ray.wait(list(left), num_returns=1, timeout=timeout)
        if not ready:
            raise TimeoutError(f"no result from {sorted(set(left.values()))} within {timeout:.0f} s")
        done_at[left.pop(ready[0])] = time.perf_counter() - t0
    return {name: p.result() for name, p in pending.items()}, done_at


def logged(cls: type, log_dir: Path | None, prefix: str) -> type:
    """`cls` whose Ray actors write their output to `log_dir/<prefix>-<worker_index>.log` and forward our warnings to
    the driver's terminal (vigos_ray.console.actor_output); `cls` itself where there is no log folder (tests)."""
    if log_dir is None:
        return cls

    def __init__(self, *args, worker_index: int = 0, **kwargs):
        from vigos_ray.console import actor_output

        actor_output(log_dir, f"{prefix}-{worker_index}")
        cls.__init__(self, *args, worker_index=worker_index, **kwargs)

    # the same name, so Ray's process titles (ray::LearnerWorker) and error messages read as before
    return type(cls.__name__, (cls,), {"__init__": __init__, "__qualname__": cls.__qualname__})


def remote_call(actor, method: str | Callable, *args, **kwargs):
    """Call `method` on `actor`: a method by name, or a function run in the actor with the worker as its first
    argument (probes and queries that need not be part of a worker's interface)."""
    if callable(method):
        return actor.__ray_call__.remote(method, *args, **kwargs)
    return getattr(actor, method).remote(*args, **kwargs)


class WorkerGroup:
    """`call_all` runs a method on every actor; `scatter` splits a list across them and joins the results in order."""

    def __init__(self, cls: type, *, n: int, num_cpus: float, num_gpus: float, args: tuple = (), name: str = "",
                 timeout_s: float = 600.0, wait: bool = True, max_restarts: int = 0,
                 max_task_retries: int = 0, log_dir: Path | None = None):  # fmt: skip
        """`max_restarts`: Ray restarts a dead actor (re-running its constructor) up to this many times;
        `max_task_retries`: calls that were running on it are resubmitted to the restarted actor; `log_dir`: where
        each actor's output goes (`<name>-<i>.log`)."""
        import ray

        remote_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                                max_task_retries=max_task_retries)(logged(cls, log_dir, name))  # fmt: skip
        self.timeout_s = timeout_s
        self.actors = [
            remote_cls.options(name=f"{name}-{i}" if name else None).remote(*args, worker_index=i) for i in range(n)
        ]
        if wait:
            self.ready().result()

    def ready(self) -> Pending:
        """Resolves when every actor is constructed; construction errors (a bad model folder, an engine that
        fails to start) surface here rather than at the first call."""
        return Pending([a.__ray_ready__.remote() for a in self.actors], flat=False, timeout_s=self.timeout_s)

    def wait_restarted(self) -> None:
        """Block until every actor answers again (Ray is restarting a dead one: it refuses calls meanwhile)."""
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                self.ready().result()
                return
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def call_all(self, method: str | Callable, *args, **kwargs) -> list[Any]:
        """`method` (a method's name, or a function of the worker: `fn(worker, *args)`) on every actor."""
        import ray

        return ray.get([remote_call(a, method, *args, **kwargs) for a in self.actors], timeout=self.timeout_s)

    def call_all_async(self, method: str | Callable, *args, **kwargs) -> Pending:
        refs = [remote_call(a, method, *args, **kwargs) for a in self.actors]
        return Pending(refs, flat=False, timeout_s=self.timeout_s)

    def call_each(self, method: str, per_actor: Sequence[Any], **kwargs) -> list[Any]:
        """`method(per_actor[i], **kwargs)` on actor i, for every actor; results in actor order."""
        import ray

        if len(per_actor) != len(self.actors):
            raise ValueError(f"{len(per_actor)} arguments for {len(self.actors)} actors")
        refs = [getattr(a, method).remote(x, **kwargs) for a, x in zip(self.actors, per_actor, strict=True)]
        return ray.get(refs, timeout=self.timeout_s)

    def scatter_async(self, method: str, items: Sequence, cost: Sequence[int] | None = None, **kwargs) -> Pending:
        """Split `items` into contiguous shards of about equal total `cost` (default 1 each), one per actor."""
        return scatter(self.actors, method, items, cost, self.timeout_s, **kwargs)

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
