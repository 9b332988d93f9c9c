"""Preemption notices: SIGTERM asks the driver to finish its step, write a checkpoint and exit non-zero.

A second SIGTERM, or `checkpoint.grace_s` seconds after the first, exits at once. That is safe at any moment:
a checkpoint becomes visible only by an atomic rename, so an interrupted save leaves the previous one in place.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)
EXIT_PREEMPTED = 143  # 128 + SIGTERM: schedulers and `ray job` retry policies read it as "terminated"


class Preempted(RuntimeError):
    """The run stopped at a safe point after a preemption notice; its checkpoint is written."""


class Preemption:
    """Context manager that turns SIGTERM into `requested` (main thread only; elsewhere it does nothing)."""

    def __init__(self, grace_s: float):
        self.grace_s, self.requested = grace_s, False
        self._previous = None

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._notice)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _notice(self, signum, frame) -> None:
        if self.requested:
            log.error("second SIGTERM: exiting now; the last complete checkpoint stays as it is")
            os._exit(EXIT_PREEMPTED)
        self.requested = True
        log.warning("SIGTERM: finishing this step, then checkpoint and exit (again, or %.0f s, exits at once)",
                    self.grace_s)  # fmt: skip
        timer = threading.Timer(self.grace_s, lambda: os._exit(EXIT_PREEMPTED))
        timer.daemon = True
        timer.start()
