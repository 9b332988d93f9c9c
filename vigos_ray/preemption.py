"""Preemption notices: SIGTERM, or Ray draining a node the run cannot lose, asks the driver to finish its step,
write a checkpoint and exit non-zero.

A second SIGTERM, or `checkpoint.grace_s` seconds after the first notice, exits at once. That is safe at any
moment: a checkpoint becomes visible only by an atomic rename, so an interrupted save leaves the previous one.

Ray drains a node before taking it away (a cloud preemption announced to Ray, a KubeRay scale-down, `ray drain-node`);
its state in the GCS turns DRAINING. Rollout and teacher actors on such a node are restarted elsewhere when it
goes, but learner ranks hold FSDP state that exists nowhere else, so a draining learner (or driver) node is a
preemption notice.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Collection

log = logging.getLogger(__name__)
EXIT_PREEMPTED = 143  # 128 + SIGTERM: schedulers and `ray job` retry policies read it as "terminated"


class Preempted(RuntimeError):
    """The run stopped at a safe point after a preemption notice; its checkpoint is written."""


def ray_draining_nodes() -> set[str]:
    """Hex ids of the Ray nodes now draining. Ray has no public API for this yet; we read the GCS's node table."""
    import ray
    from ray.core.generated import gcs_pb2

    gcs = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
    draining = gcs_pb2.NodeSnapshot.State.Value("DRAINING")
    return {node.hex() for node, info in gcs.get_all_node_info().items() if info.state_snapshot.state == draining}


class DrainWatch:
    """Whether Ray is draining any of `nodes`; asks the GCS at most every `every_s` seconds."""

    def __init__(self, nodes: Collection[str], every_s: float = 5.0,
                 draining: Callable[[], set[str]] = ray_draining_nodes):  # fmt: skip
        self.nodes, self.every_s, self._draining = set(nodes), every_s, draining
        self._last = -float("inf")

    def check(self) -> set[str]:
        """The watched nodes that are draining (empty between polls)."""
        if time.monotonic() - self._last < self.every_s:
            return set()
        self._last = time.monotonic()
        try:
            return self.nodes & self._draining()
        except Exception as err:  # a Ray without this table: say so once, keep training on SIGTERM alone
            log.warning("cannot read Ray's node-draining state (%s); only SIGTERM counts as a preemption notice", err)
            self.every_s = float("inf")
            return set()


class Preemption:
    """Context manager that turns SIGTERM (main thread only) or a drain of a watched node into `requested`."""

    def __init__(self, grace_s: float, drain: DrainWatch | None = None):
        self.grace_s, self.drain = grace_s, drain
        self._requested = False
        self._previous = None

    @property
    def requested(self) -> bool:
        if not self._requested and self.drain is not None and (nodes := self.drain.check()):
            self._start(f"Ray is draining node(s) {', '.join(sorted(n[:12] for n in nodes))} of this run")
        return self._requested

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._notice)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _notice(self, signum, frame) -> None:
        if self._requested:
            log.error("second preemption notice: exiting now; the last complete checkpoint stays as it is")
            os._exit(EXIT_PREEMPTED)
        self._start("SIGTERM")

    def _start(self, why: str) -> None:
        self._requested = True
        log.warning("%s: finishing this step, then checkpoint and exit (a 2nd SIGTERM, or %.0f s, exits at once)",
                    why, self.grace_s)  # fmt: skip
        timer = threading.Timer(self.grace_s, lambda: os._exit(EXIT_PREEMPTED))
        timer.daemon = True
        timer.start()
