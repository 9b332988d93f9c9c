"""A group of N identical Ray actors built from a plain worker class, with fan-out verbs named for what they do."""

from __future__ import annotations

from typing import Any


class WorkerGroup:
    """`call_all` runs a method on every actor; `scatter` splits a list across them and joins the results in order."""

    def __init__(self, cls: type, n: int, num_cpus: float, num_gpus: float, args: tuple = (), name: str = "",
                 timeout_s: float = 600.0):  # fmt: skip
        import ray

        remote_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(cls)
        self.timeout_s = timeout_s
        self.actors = [
            remote_cls.options(name=f"{name}-{i}" if name else None).remote(*args, worker_index=i) for i in range(n)
        ]
        # Construction errors (bad model folder, engine start failure) surface here, not at the first call.
        ray.get([a.__ray_ready__.remote() for a in self.actors], timeout=timeout_s)

    def call_all(self, method: str, *args, **kwargs) -> list[Any]:
        import ray

        refs = [getattr(a, method).remote(*args, **kwargs) for a in self.actors]
        return ray.get(refs, timeout=self.timeout_s)

    def scatter(self, method: str, items: list, **kwargs) -> list:
        """Split `items` into contiguous shards (one per actor), run `method(shard)` on each, concatenate."""
        import ray

        n = len(self.actors)
        bounds = [len(items) * i // n for i in range(n + 1)]
        refs = [
            getattr(a, method).remote(items[lo:hi], **kwargs)
            for a, lo, hi in zip(self.actors, bounds, bounds[1:], strict=False)
            if hi > lo
        ]
        return [x for part in ray.get(refs, timeout=self.timeout_s) for x in part]

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
