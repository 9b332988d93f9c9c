"""What a person sees: INFO lines with time and source, and warnings counted rather than repeated.

A warning (or a Python `warnings` message, routed into logging) prints the first time its text occurs; later
occurrences of the same text are counted, and `summary()` lists the counts at the end of a command. (Code that
meets many variants of one problem logs the first of each kind itself: see vigos_ray/data.py.) Ray de-duplicates the
actors' own log lines across processes itself ("[repeated Nx across cluster]").
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections import Counter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_config_arguments(parser, example: str) -> None:
    """`--config FILE` and `key=value` overrides, as every command in launch/ takes them."""
    parser.add_argument("--config", help="YAML file overriding the defaults in vigos_ray/config.py")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")


def input_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input (config, data, model folders): a command prints them as one `error:` line and
    exits 2, without a traceback."""
    from vigos_ray.config import ConfigError
    from vigos_ray.data import DataError
    from vigos_ray.models import ModelFolderError

    return ConfigError, DataError, ModelFolderError


def run_ray_command(body, repeats) -> tuple[int, object]:
    """Run the body of a command that may start a Ray cluster (launch/run.py, launch/study.py); returns
    (exit code, the body's result). Bad input or an unmeetable resource request: one `error:` line, exit 2. A
    preemption notice: exit 143, so a job's retry policy restarts it and it resumes from its checkpoint. Ctrl-C:
    exit 130 (what was written stays on disk). Ray is shut down and repeated warnings summed whatever happens."""
    from vigos_ray.cluster import ResourceError
    from vigos_ray.preemption import EXIT_PREEMPTED, Preempted

    try:
        return 0, body()
    except (*input_errors(), ResourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2, None
    except Preempted as err:
        print(f"preempted: {err}", file=sys.stderr)
        return EXIT_PREEMPTED, None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130, None
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        report_repeats(repeats)


class RepeatCounter(logging.Filter):
    """Passes each warning text once (errors always); counts the repeats."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.levelno >= logging.ERROR:
            return True
        key = (record.name, record.getMessage())
        self.counts[key] += 1
        return self.counts[key] == 1

    def summary(self) -> list[str]:
        repeated = [(name, msg, n) for (name, msg), n in self.counts.items() if n > 1]
        return [f"{n - 1} more x ({name}) {msg.splitlines()[0][:100]}" for name, msg, n in repeated]


class TqdmHandler(logging.StreamHandler):
    """Writes log lines above a running progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup_console(level: int = logging.INFO) -> RepeatCounter:
    counter = RepeatCounter()
    handler = TqdmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(counter)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # `warnings.warn` (deprecations from libraries) goes through the same counter
    warnings.simplefilter("default")
    return counter


def report_repeats(counter: RepeatCounter) -> None:
    lines = counter.summary()
    if lines:
        logging.getLogger("vigos_ray").info("repeated warnings, shown once above:\n  %s", "\n  ".join(lines))
