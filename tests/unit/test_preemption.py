"""Preemption notices without a cluster: the drain watch's polling and what it turns into."""

from __future__ import annotations

import logging

from vigos_ray.preemption import DrainWatch, Preemption


class FakeGcs:
    """Stands in for Ray's node table: the nodes draining now, and how often it was asked."""

    def __init__(self):
        self.draining: set[str] = set()
        self.calls = 0

    def __call__(self) -> set[str]:
        self.calls += 1
        return set(self.draining)


def test_a_drain_of_a_watched_node_is_a_preemption_notice_and_other_nodes_are_not():
    gcs = FakeGcs()
    with Preemption(grace_s=1e6, drain=DrainWatch({"learner-node", "driver-node"}, every_s=0.0, draining=gcs)) as p:
        assert not p.requested
        gcs.draining = {"teacher-node"}  # its actors are restarted elsewhere: keep training
        assert not p.requested
        gcs.draining = {"teacher-node", "learner-node"}
        assert p.requested
        gcs.draining = set()
        assert p.requested  # a notice is not withdrawn: the run still checkpoints and exits


def test_the_watch_asks_ray_at_most_once_per_interval():
    gcs = FakeGcs()
    watch = DrainWatch({"n"}, every_s=3600.0, draining=gcs)
    gcs.draining = {"n"}
    assert watch.check() == {"n"}
    assert watch.check() == set() and gcs.calls == 1  # within the interval: no call, nothing new


def test_a_ray_without_a_readable_node_table_is_reported_once_and_ignored(caplog):
    def broken() -> set[str]:
        raise AttributeError("no get_all_node_info")

    watch = DrainWatch({"n"}, every_s=0.0, draining=broken)
    with caplog.at_level(logging.WARNING):
        assert watch.check() == set() and watch.check() == set()
    assert caplog.text.count("cannot read Ray's node-draining state") == 1
