"""Warnings are counted, not repeated: the first of each text prints, its repeats are summed at the end."""

from __future__ import annotations

import logging
import warnings

from vigos_ray.console import RepeatCounter


def test_a_repeated_warning_prints_once_and_is_counted():
    counter = RepeatCounter()
    log = logging.getLogger("test.console")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    handler.addFilter(counter)
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        for _ in range(5):
            log.warning("slow call to %s", "teacher-0")  # the same text five times
        log.warning("slow call to %s", "teacher-1")  # another text
        log.error("errors are never held back")
        log.error("errors are never held back")
        log.info("info %d", 1)
    finally:
        log.removeHandler(handler)
    assert seen == ["slow call to teacher-0", "slow call to teacher-1", "errors are never held back",
                    "errors are never held back", "info 1"]  # fmt: skip
    assert counter.summary() == ["4 more x (test.console) slow call to teacher-0"]


def test_python_warnings_go_through_the_counter():
    counter = RepeatCounter()
    logging.captureWarnings(True)
    handler = logging.Handler()
    records = []
    handler.emit = records.append
    handler.addFilter(counter)
    py_warnings = logging.getLogger("py.warnings")
    py_warnings.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            for _ in range(3):
                warnings.warn("old argument", FutureWarning, stacklevel=1)
    finally:
        py_warnings.removeHandler(handler)
        logging.captureWarnings(False)
    assert len(records) == 1 and "old argument" in records[0].getMessage()
