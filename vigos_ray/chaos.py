"""Fault injection for a training run, as a long preemptible job meets it (`launch/chaos.py`).

`run_with_faults` runs `launch/run.py ARGS` in a subprocess and, at points drawn from a seed, kills its processes:
a rollout worker, a teacher worker (any pool), a learner rank, the driver itself (SIGKILL or SIGTERM), the driver
while it writes a checkpoint, a rollout worker while a weight push is under way. Between faults the run makes
progress. A driver or learner death ends the process as it would in production; the harness starts the same
command again, as a job scheduler would, until it exits 0. Every fault is logged with the step and the stage it
hit (the driver keeps its current step and stage in `logs/stage`), and every process the run started is
remembered, so that one left behind is found.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vigos_ray.checkpoint import DRIVER_FILE

KINDS = ("rollout", "teacher", "learner", "driver_kill", "driver_term", "checkpoint", "push")
REPO = Path(__file__).resolve().parents[1]
RESTARTING = ("driver_kill", "driver_term", "checkpoint", "learner")  # the driver dies and is started again


@dataclass(frozen=True)
class Fault:
    kind: str
    after_steps: int  # injected once the run has finished this many steps (recomputed ones count again)...
    delay: float  # ...plus this fraction of a step; for `in_recovery`, of 20 s after the driver's restart
    in_recovery: bool = False  # while the driver restarted by the previous fault is still starting up


@dataclass
class Injected:
    kind: str
    step: int  # the step and stage the driver was in (from logs/stage)
    stage: str
    target: str  # what was killed: "driver (pid N)", "rollout-0 (pid N)", ...
    at_s: float  # seconds since the harness started


def plan_faults(seed: int, n: int, steps: int, kinds: tuple[str, ...] = KINDS) -> list[Fault]:
    """`n` faults after distinct numbers of finished steps, 1..steps-2 (at most one per step, none in the last:
    fewer if the run is shorter), kinds drawn from `kinds`; the same for the same seed. A fault that follows one
    that restarts the driver is, one time in two, a worker or learner killed during that restart."""
    rng = random.Random(seed)
    at = sorted(rng.sample(range(1, steps - 1), max(0, min(n, steps - 2))))
    faults: list[Fault] = []
    for a in at:
        kind, delay = rng.choice(kinds), round(rng.uniform(0.0, 0.9), 3)
        recovering = bool(faults) and faults[-1].kind in RESTARTING and kind in ("rollout", "teacher", "learner")
        if recovering and rng.random() < 0.5:
            faults.append(Fault(kind, faults[-1].after_steps, delay, in_recovery=True))
        else:
            faults.append(Fault(kind, a, delay))
    return faults


@dataclass
class ChaosResult:
    injected: list[Injected]
    not_injected: list[Fault]  # the run ended before their moment (e.g. no checkpoint stage came)
    restarts: int
    seconds: float
    leftover: list[str]  # processes the run started that outlived it


def run_with_faults(args: list[str], run_dir: Path, faults: list[Fault], log: Path, max_restarts: int = 30,
                    timeout_s: float = 3600.0) -> ChaosResult:  # fmt: skip
    """Run `launch/run.py args` (whose run folder is `run_dir`) to completion while injecting `faults` in order;
    its output goes to `log`. Raises if the run fails for another reason or needs more than `max_restarts`."""
    import psutil

    t0 = time.monotonic()
    pending, injected, seen = list(faults), [], {}
    restarts, armed, polls, done, lines = 0, None, 0, 0, 0  # done: steps finished, recomputed ones included
    hit_restarts = 0  # the incarnation the last fault hit
    with log.open("a") as out:
        while True:
            out.write(f"=== chaos: start {restarts} ===\n")
            out.flush()
            (run_dir / "logs" / "stage").unlink(missing_ok=True)  # the last incarnation's stage is not this one's
            started, since = time.monotonic(), time.time()
            proc = subprocess.Popen([sys.executable, "launch/run.py", *args], cwd=REPO, stdout=out,
                                    stderr=subprocess.STDOUT)  # fmt: skip
            try:
                while proc.poll() is None:
                    if polls % 5 == 0:
                        _remember_tree(proc.pid, seen, psutil)
                    polls += 1
                    now_lines = _steps(run_dir)
                    done, lines = done + max(0, now_lines - lines), now_lines  # a resume truncates: no progress
                    recovering = restarts > hit_restarts  # this incarnation began after the last fault
                    if pending and done >= pending[0].after_steps and (recovering or not pending[0].in_recovery):
                        fault = pending[0]
                        if fault.in_recovery:
                            armed = armed or started + fault.delay * 20.0
                        else:
                            armed = armed or time.monotonic() + fault.delay * (_step_time(run_dir) or 1.0)
                        if time.monotonic() >= armed and (hit := _inject(fault, proc, run_dir, t0, since)):
                            injected.append(hit)
                            out.write(f"=== chaos: {json.dumps(asdict(hit))} ===\n")
                            out.flush()
                            pending.pop(0)
                            armed, hit_restarts = None, restarts
                    if time.monotonic() - t0 > timeout_s:
                        proc.kill()
                        raise TimeoutError(f"the chaos run took more than {timeout_s:.0f} s; see {log}")
                    waiting_for_stage = pending and pending[0].kind in ("checkpoint", "push") and armed
                    time.sleep(0.01 if waiting_for_stage else 0.2)
            finally:
                if proc.poll() is None:  # the harness itself failed: the run must not outlive it
                    proc.kill()
                    proc.wait()
            if proc.returncode == 0:  # done (faults still pending: the plan outran the run)
                break
            restarts += 1
            if restarts > max_restarts:
                raise RuntimeError(f"the run failed {restarts} times (last exit {proc.returncode}); see {log}")
    return ChaosResult(injected, pending, restarts, time.monotonic() - t0, _outliving(seen, psutil))


def _outliving(seen: dict, psutil, grace_s: float = 120.0) -> list[str]:
    """The processes in `seen` still alive `grace_s` after the run ended. Ray's helpers of a SIGKILLed driver (its
    log monitor, dashboard agent) notice the lost head only at their next heartbeat: up to about a minute."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = {pid: name for pid, (name, created) in seen.items() if _alive(pid, created, psutil)}
        if not alive or time.monotonic() > deadline:
            return [f"{name} (pid {pid})" for pid, name in alive.items()]
        time.sleep(1.0)


def _inject(fault: Fault, proc, run_dir: Path, t0: float, since: float) -> Injected | None:
    """Kill what `fault` names, now; None where its moment is not there yet (a checkpoint or push fault waits for
    the driver to be in that stage) or its target is between lives."""
    step, stage = _stage(run_dir)
    if fault.kind in ("checkpoint", "push") and stage != fault.kind:
        return None
    if fault.kind in ("driver_kill", "driver_term", "checkpoint"):
        proc.send_signal(signal.SIGTERM if fault.kind == "driver_term" else signal.SIGKILL)
        target = f"driver (pid {proc.pid})"
    else:
        role = {"rollout": "rollout", "push": "rollout", "teacher": "teacher", "learner": "learner"}[fault.kind]
        actors = _actor_pids(run_dir / "logs", role, since)
        if not actors:
            return None
        name, pid = random.Random(f"{fault}").choice(sorted(actors.items()))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        target = f"{name} (pid {pid})"
    return Injected(fault.kind, step, stage, target, round(time.monotonic() - t0, 1))


def _steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _step_time(run_dir: Path) -> float | None:
    """The median step's seconds so far (a step that recovered from a fault is not a typical one)."""
    path = run_dir / "metrics.jsonl"
    try:
        times = [float(json.loads(line)["time/step"]) for line in path.read_text().splitlines()]
    except (OSError, ValueError, KeyError):
        return None
    return statistics.median(times) if times else None


def _stage(run_dir: Path) -> tuple[int, str]:
    try:
        step, stage = (run_dir / "logs" / "stage").read_text().split()
        return int(step), stage
    except (OSError, ValueError):
        return -1, "start-up"


def _actor_pids(log_dir: Path, role: str, since: float) -> dict[str, int]:
    """The live process of each actor of `role` (`rollout-0`, `teacher-reasoning-1`, ...) started after `since`
    (epoch seconds: this run's driver; an earlier driver's actors may still be exiting), from the line each actor
    writes first into its log."""
    import psutil

    out = {}
    for path in log_dir.glob(f"{role}-*.log"):
        pids = re.findall(r"\(pid (\d+)\) starts", path.read_text(errors="replace"))
        try:
            if pids and psutil.Process(int(pids[-1])).create_time() >= since:
                out[path.stem] = int(pids[-1])
        except psutil.Error:
            pass
    return out


def _remember_tree(pid: int, seen: dict, psutil) -> None:
    try:
        for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            if p.pid not in seen:
                seen[p.pid] = (" ".join(p.cmdline()[:3])[:160] or p.name(), p.create_time())
    except psutil.Error:
        pass


def _alive(pid: int, created: float, psutil) -> bool:
    try:
        p = psutil.Process(pid)
        return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# Metrics that a step computes from its samples and weights alone (not timings, pool sizes or push sizes: a
# restarted run pushes every tensor once more).
DETERMINISTIC = ("step", "version", "loss", "kl/", "clipped/", "tokens/", "grad_norm", "lr", "data/", "valid_rate",
                 "accuracy", "len/", "rollouts")  # fmt: skip


def differences(clean: Path, chaos: Path) -> list[str]:
    """How the chaos run's outcome differs from the clean run's (empty: none): the final weights, bit for bit, and
    every step's deterministic metrics."""
    import torch
    from safetensors.torch import load_file

    out = []
    a, b = load_file(clean / "final" / "model.safetensors"), load_file(chaos / "final" / "model.safetensors")
    if a.keys() != b.keys():
        out.append(f"final weights: different tensors ({sorted(a.keys() ^ b.keys())[:3]})")
    out += [f"final weights: {k} differs" for k in sorted(a.keys() & b.keys()) if not torch.equal(a[k], b[k])][:5]
    ra, rb = _records(clean), _records(chaos)
    if [r["step"] for r in ra] != [r["step"] for r in rb]:
        out.append(f"steps: clean {[r['step'] for r in ra]}, chaos {[r['step'] for r in rb]}")
    for x, y in zip(ra, rb, strict=False):
        keys = {k for k in x.keys() | y.keys() if k.startswith(DETERMINISTIC)}
        out += [f"step {x['step']}: {k} {x.get(k)} != {y.get(k)}" for k in sorted(keys) if x.get(k) != y.get(k)]
    return out


def incomplete_checkpoints(root: Path) -> list[str]:
    """Checkpoint folders that are not whole: a `.tmp` left by a killed save, or a step without its parts."""
    bad = [str(p) for p in root.glob("step_*.tmp")]
    for step in root.glob("step_*"):
        whole = (step / "learner" / ".metadata").is_file() and (step / DRIVER_FILE).is_file()
        if step.suffix != ".tmp" and not whole:
            bad.append(str(step))
    return bad


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
