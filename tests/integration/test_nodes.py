"""Node faults on a multi-node Ray cluster (ray.cluster_utils.Cluster, in a subprocess of its own so that it never
touches the session's cluster): Ray's node-draining notice as the driver reads it, and a teacher pool that loses
the node its worker lives on."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from ..conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


class NodeScorer:
    """Answers every row with (row, the Ray node it ran on)."""

    def __init__(self, worker_index: int = 0):
        pass

    def score(self, rows: list) -> list:
        import ray

        return [(row, ray.get_runtime_context().get_node_id()) for row in rows]


def scenario() -> dict:
    """Head without CPUs + node A (2 CPUs) hosting a pool's teacher worker: drain A, then lose it and bring up B."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.core.generated import autoscaler_pb2

    from vigos_ray.config import TeacherPoolConfig
    from vigos_ray.preemption import DrainWatch, ray_draining_nodes
    from workers.pool import TeacherPool

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"})
    node_a = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address)
    out: dict = {"head": cluster.head_node.node_id, "a": node_a.node_id}
    try:
        pool = TeacherPool(NodeScorer, TeacherPoolConfig(min_workers=1, max_workers=1, num_cpus=1), (), "t", 120.0)
        pool.ready().result()
        out["before"] = pool.scatter_async("score", list(range(6))).result()

        out["draining_before"] = sorted(ray_draining_nodes())
        gcs = ray._raylet.GcsClient(address=cluster.address)
        reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
        out["drain_accepted"] = gcs.drain_node(node_a.node_id, reason, "test", int(time.time() * 1000) + 60_000)[0]
        watch_a, watch_head = DrainWatch({node_a.node_id}, every_s=0.0), DrainWatch({out["head"]}, every_s=0.0)
        deadline = time.monotonic() + 30
        while not (seen := watch_a.check()) and time.monotonic() < deadline:
            time.sleep(0.2)
        out["seen_a"], out["seen_head"] = sorted(seen), sorted(watch_head.check())

        cluster.remove_node(node_a)  # the node goes: its worker dies with it
        out["b"] = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1").node_id  # the autoscaler's replacement
        t0 = time.monotonic()
        out["after"] = pool.scatter_async("score", list(range(6))).result()  # resubmitted to the restarted worker
        out["after_s"] = time.monotonic() - t0
        out["status"] = pool.status()
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


def test_a_draining_node_is_seen_and_a_lost_teacher_node_is_replaced_without_losing_rows():
    code = "import json; from tests.integration.test_nodes import scenario; print('RESULT', json.dumps(scenario()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT ") :])
    a, b = out["a"], out["b"]
    assert [row for row, _ in out["before"]] == list(range(6)) and {n for _, n in out["before"]} == {a}
    assert out["draining_before"] == [] and out["drain_accepted"]
    assert out["seen_a"] == [a] and out["seen_head"] == []  # the watch names only the node being drained
    assert [row for row, _ in out["after"]] == list(range(6)) and {n for _, n in out["after"]} == {b}
    assert out["status"] == {"workers": 1, "starting": 0}
