"""The autoscaled teacher pool on the session's Ray cluster, with a fake scorer whose calls take a known time."""

from __future__ import annotations

import os
import time

import pytest

from vigos_ray.config import TeacherPoolConfig
from workers.pool import TeacherPool

pytestmark = pytest.mark.integration


class SlowScorer:
    """Sleeps `delay` seconds per row and answers with its process id, so a test sees who did the work."""

    def __init__(self, delay: float, worker_index: int = 0):
        self.delay = delay

    def score(self, rows: list) -> list[int]:
        time.sleep(self.delay * len(rows))
        return [os.getpid()] * len(rows)


def timed_call(pool: TeacherPool, rows: list) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    out = pool.scatter_async("score", rows).result()
    seconds = time.perf_counter() - t0
    pool.observe(seconds)
    return out, seconds


@pytest.mark.e2e  # ~10 s of scaling by the clock: run after the default suite
def test_a_slow_pool_grows_to_its_maximum_and_an_idle_one_shrinks_to_its_minimum(ray_cluster):
    cfg = TeacherPoolConfig(min_workers=1, max_workers=3, num_cpus=0.5, scale_up_s=0.4, idle_s=1.0)
    pool = TeacherPool(SlowScorer, cfg, args=(0.1,), name="slow")
    try:
        pool.ready().result()
        sizes, seconds = [], []
        for _ in range(40):  # 12 rows x 0.1 s: 1.2 s on one worker, 0.4 s on three
            out, took = timed_call(pool, list(range(12)))
            sizes.append(pool.status()["workers"])
            seconds.append(took)
            if sizes[-1] == 3 and len(set(out)) == 3:
                break
            time.sleep(0.5)  # new workers start in the background
        assert sizes[0] == 1 and max(sizes) == 3 and sizes == sorted(sizes)  # grew one at a time, never over max
        assert len(set(out)) == 3 and seconds[-1] < seconds[0] / 2  # the work is spread, the call got faster

        for _ in range(40):  # now 1 row per call: quick, so after idle_s the pool sheds workers
            timed_call(pool, [0])
            sizes.append(pool.status()["workers"])
            if sizes[-1] == 1:
                break
            time.sleep(0.3)
        assert sizes[-1] == 1 and min(sizes) == 1
        assert pool.status() == {"workers": 1, "starting": 0}
    finally:
        pool.shutdown()


def all_cpus_free(ray, timeout_s: float = 30.0) -> float:
    """The cluster's CPU count, once actors of earlier tests (killed asynchronously) have given theirs back."""
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < total:
        assert time.monotonic() < deadline, f"CPUs still held after {timeout_s} s: {ray.available_resources()}"
        time.sleep(0.1)
    return total


def test_a_worker_the_cluster_cannot_place_stays_starting_while_scoring_goes_on(ray_cluster):
    # Sized against the whole cluster, not a snapshot of what is free: in CI a snapshot taken while an earlier
    # test's actors were still being torn down made 0.6 x free small enough for two workers to fit.
    cpus = all_cpus_free(ray_cluster)
    cfg = TeacherPoolConfig(min_workers=1, max_workers=2, num_cpus=0.6 * cpus, scale_up_s=0.05, idle_s=100)
    pool = TeacherPool(SlowScorer, cfg, args=(0.05,), name="big")
    try:
        pool.ready().result()
        out, _ = timed_call(pool, [1, 2])  # slow: asks for a second worker, which does not fit
        for _ in range(3):
            time.sleep(0.5)
            assert timed_call(pool, [1, 2, 3])[0] == [out[0]] * 3  # still served, by the one worker it has
        assert pool.status() == {"workers": 1, "starting": 1}
    finally:
        pool.shutdown()
