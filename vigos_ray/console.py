"""What a person sees: our own log lines and one progress bar on the terminal; everything else in log files.

A command runs inside `Console(log_file)`: the process's stdout and stderr (file descriptors 1 and 2, so C
libraries, third-party progress bars and Ray's own prints too) go to `log_file`, and the terminal gets our loggers'
lines (`vigos_ray.*`, `workers.*`, `launch`), anyone's errors, our progress bars and our results. Ray actors do
the same into a file each (`actor_output`); their warnings and errors from our code are appended to an events
file that the driver's console tails, so each reaches the terminal once. A warning text prints the first time it
occurs; repeats are counted and summed up at the end.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OURS = ("vigos_ray", "workers", "launch", "__main__")
EVENTS = "events.jsonl"  # in a run's log folder: our actors' warnings and errors, one JSON object a line

_active: Console | None = None


def add_config_arguments(parser, example: str) -> None:
    """`--config FILE`, `key=value` overrides and `--print-config`, as every command in launch/ takes them."""
    parser.add_argument("--config", help="YAML file overriding the defaults in vigos_ray/config.py")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults < --config < overrides) and exit")  # fmt: skip
    parser.add_argument(
        "overrides", nargs="*",
        help=f"key=value overrides of any config key, e.g. {example}. Every key, its default and what it does: "
             "vigos_ray/config.py (one dataclass per section); `--print-config` shows the values a run would use",
    )  # fmt: skip


def command_config(args, *overrides: str):
    """(config, 0) from a command's `--config` and overrides (then `overrides`, the command's own); (None, 0) after
    `--print-config` printed it; (None, 2) after one `error:` line naming the bad key."""
    from vigos_ray.config import ConfigError, load_config, to_yaml

    try:
        cfg = load_config(args.config, [*args.overrides, *overrides])
    except ConfigError as err:
        error(f"error: {err}")
        return None, 2
    if args.print_config:
        from vigos_ray.hub import resolved_inputs

        say(to_yaml(cfg).rstrip())
        say("# resolved on this node (nothing downloaded):")
        say("\n".join(f"#   {line}" for line in resolved_inputs(cfg)))
        return None, 0
    return cfg, 0


def input_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input (config, data, model folders): a command prints them as one `error:` line and
    exits 2, without a traceback."""
    from vigos_ray.config import ConfigError
    from vigos_ray.data import DataError
    from vigos_ray.models import ModelFolderError

    return ConfigError, DataError, ModelFolderError


def run_ray_command(body) -> tuple[int, object]:
    """Run the body of a command that may start a Ray cluster (launch/run.py, launch/study.py); returns
    (exit code, the body's result). Bad input or an unmeetable resource request: one `error:` line, exit 2. A
    preemption notice: exit 143, so a job's retry policy restarts it and it resumes from its checkpoint. Ctrl-C:
    exit 130 (what was written stays on disk). A Ray cluster this command started is shut down whatever happens;
    one it joined (a test's, a job's) is left running."""
    import ray

    from vigos_ray.cluster import ResourceError
    from vigos_ray.preemption import EXIT_PREEMPTED, Preempted

    joined = ray.is_initialized()
    try:
        return 0, body()
    except (*input_errors(), ResourceError) as err:
        error(f"error: {err}")
        return 2, None
    except Preempted as err:
        error(f"preempted: {err}")
        return EXIT_PREEMPTED, None
    except KeyboardInterrupt:
        error("interrupted")
        return 130, None
    finally:
        if ray.is_initialized() and not joined:
            ray.shutdown()


def say(text: str = "") -> None:
    """A result line for the person at the terminal (stdout), whatever the process's file descriptors hold."""
    stream = _active.out if _active is not None else sys.stdout
    stream.write(text + "\n")
    stream.flush()


def error(text: str) -> None:
    """An error line for the terminal (stderr), and into the log file."""
    if _active is not None:
        _active.file_handler.stream.write(text + "\n")
    stream = _active.err if _active is not None else sys.stderr
    stream.write(text + "\n")
    stream.flush()


def progress(*args, **kwargs):
    """A tqdm progress bar on the terminal (the process's own stderr may be a log file)."""
    from tqdm import tqdm

    stream = _active.err if _active is not None else sys.stderr
    if not stream.isatty():  # a log file or CI: a line every 10 s, not every update
        kwargs.setdefault("mininterval", 10.0)
    return tqdm(*args, file=stream, dynamic_ncols=True, **kwargs)


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


def ours(record: logging.LogRecord) -> bool:
    """Records a person should see: our loggers' lines and anyone's errors."""
    return record.levelno >= logging.ERROR or record.name.split(".")[0] in OURS


class TqdmHandler(logging.StreamHandler):
    """Writes log lines above a running progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


class ActorFormatter(logging.Formatter):
    """Names the actor a forwarded record came from."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        actor = getattr(record, "actor", None)
        return f"{text} [{actor}]" if actor else text


class Console:
    """The terminal of one command (a context manager). With `log_file`, file descriptors 1 and 2 point at it while
    the command runs; `events`: an actors' events file to tail (launch/run.py's `logs/events.jsonl`)."""

    def __init__(self, log_file: Path | None = None, events: Path | None = None, level: int = logging.INFO):
        self.log_file, self.events, self.level = log_file, events, level
        self.repeats = RepeatCounter()
        self._saved: list[int] = []
        self._stop = threading.Event()
        self._tail: threading.Thread | None = None

    def __enter__(self) -> Console:
        global _active
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = [os.dup(1), os.dup(2)]
        self.out = os.fdopen(os.dup(self._saved[0]), "w", buffering=1)
        self.err = os.fdopen(os.dup(self._saved[1]), "w", buffering=1)
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            log = open(self.log_file, "a", buffering=1)  # noqa: SIM115 (closed in __exit__)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            log.close()
        self.terminal = TqdmHandler(self.err)
        self.terminal.setFormatter(ActorFormatter(FORMAT))
        self.terminal.addFilter(ours)
        self.terminal.addFilter(self.repeats)
        # straight into the log file (sys.stderr may not write to fd 2: pytest's capture replaces it)
        self._log = open(self.log_file, "a", buffering=1) if self.log_file is not None else None  # noqa: SIM115
        self.file_handler = logging.StreamHandler(self._log or sys.stderr)
        self.file_handler.setFormatter(ActorFormatter(FORMAT))
        root = logging.getLogger()
        self._root_level = root.level
        root.addHandler(self.terminal)
        root.addHandler(self.file_handler)
        root.setLevel(self.level)
        logging.captureWarnings(True)  # libraries' `warnings.warn` goes to the log file, ours to the terminal
        _active = self
        if self.events is not None:
            self._tail = threading.Thread(target=self._follow, args=(self.events,), daemon=True, name="events")
            self._tail.start()
        return self

    def __exit__(self, kind, value, tb) -> None:
        global _active
        if self._tail is not None:
            self._stop.set()
            self._tail.join(timeout=5)
        if kind is not None and not issubclass(kind, SystemExit):  # the traceback goes to the log file too
            self.file_handler.stream.write("".join(traceback.format_exception(kind, value, tb)))
        lines = self.repeats.summary()
        if lines:
            logging.getLogger("vigos_ray").info("repeated warnings, shown once above:\n  %s", "\n  ".join(lines))
        root = logging.getLogger()
        root.removeHandler(self.terminal)
        root.removeHandler(self.file_handler)
        root.setLevel(self._root_level)
        logging.captureWarnings(False)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self.out.close()
        self.err.close()
        if self._log is not None:
            self._log.close()
        _active = None

    def _follow(self, path: Path) -> None:
        """Re-log the actors' events (written by `actor_output`) here, from the end the file had at the start."""
        offset = path.stat().st_size if path.exists() else 0
        while True:
            stopping = self._stop.wait(0.5)
            if path.exists():
                with open(path) as f:
                    f.seek(offset)
                    chunk = f.read()
                whole = chunk[: chunk.rfind("\n") + 1]  # a line still being written waits for the next round
                offset += len(whole.encode())
                for line in whole.splitlines():
                    event = json.loads(line)
                    logging.getLogger(event["name"]).log(event["level"], "%s", event["msg"],
                                                         extra={"actor": event["actor"]})  # fmt: skip
            if stopping:
                return


class EventWriter(logging.Handler):
    """In an actor: appends our warnings and anyone's errors to the run's events file (one short write each,
    appended atomically on a local or shared file system)."""

    def __init__(self, path: Path, actor: str):
        super().__init__(logging.WARNING)
        self.path, self.actor = path, actor
        self.addFilter(ours)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = {"name": record.name, "level": record.levelno, "msg": record.getMessage(), "actor": self.actor}
            with open(self.path, "a") as f:
                f.write(json.dumps(event) + "\n")
        except Exception:
            self.handleError(record)


def actor_output(log_dir: Path, actor: str) -> Path:
    """Called first in an actor's constructor: its stdout and stderr (every library's prints, warnings, progress
    bars) go to `log_dir/<actor>.log`, appended across restarts; our warnings and anyone's errors are also
    forwarded to the driver's terminal through `log_dir/events.jsonl`. Returns the log file."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{actor}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    with open(path, "a") as f:
        f.write(f"--- {actor} (pid {os.getpid()}) starts at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, EventWriter | _ActorFile)]:
        root.removeHandler(handler)  # a constructor run again in the same process
    file_handler = _ActorFile(sys.stderr)
    file_handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(file_handler)
    root.addHandler(EventWriter(log_dir / EVENTS, actor))
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    return path


class _ActorFile(logging.StreamHandler):
    """An actor's own log lines, into its log file."""
