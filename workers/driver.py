"""The ViGOS loop on Ray: prompts -> rollouts -> spans -> teacher targets -> train step -> weight push -> log.

Sync mode is strictly on-policy: a step's rollouts are sampled after the previous step's weights arrived. Async
mode keeps up to `run.max_staleness` batches of rollouts in flight, sampled while earlier steps score and train;
every rollout carries the version it was sampled with, and no step trains on a rollout older than the bound.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from ray.exceptions import RayActorError

from vigos_ray.checkpoint import Checkpointer, DriverState, load_driver_state, resume_path
from vigos_ray.config import Config, save_config
from vigos_ray.console import progress
from vigos_ray.data import PromptStream
from vigos_ray.evaluation import during_training, eval_files, read_items
from vigos_ray.metrics import Metrics, step_record
from vigos_ray.objective import plan_batch
from vigos_ray.preemption import DrainWatch, Preempted, Preemption
from vigos_ray.preflight import held_out_data, preflight, prompt_stream
from vigos_ray.spans import TokenTable, parse_completion
from workers.group import Ready
from workers.pipeline import Pipeline

log = logging.getLogger(__name__)


def run(cfg: Config, log_dir: Path | None = None, checked: tuple | None = None) -> Path:
    """Train to `run.steps`, resuming from this run's latest checkpoint unless `checkpoint.resume=never`; returns
    the run directory (config.yaml, metrics.jsonl, checkpoints/, final/). Raises Preempted after a SIGTERM.
    `log_dir`: where each actor's output goes (None: through Ray to this process). `checked`: what `preflight(cfg)`
    returned, where the caller ran it already (before starting Ray)."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    model_path, processor = checked or preflight(cfg)
    prompts = prompt_stream(cfg, processor)
    held_out = None
    if cfg.eval.every_steps:  # read before any actor starts, so a bad eval file costs no start-up
        held_out = read_items(eval_files(cfg, held_out_data(cfg)), cfg, cfg.eval.during_train_items)
    checkpoints = Checkpointer(cfg.checkpoint, run_dir / "checkpoints")
    resume = resume_path(cfg.checkpoint, checkpoints.root)
    pipe = Pipeline(cfg, model_path, log_dir.resolve() if log_dir else None)
    log.info("actors up and initial weights pushed in %.1f s", pipe.startup_s)
    try:
        start = None
        if resume is not None:
            start = load_driver_state(resume)
            pipe.restore(resume)
            prompts.load_state_dict(start.data)
            log.info("resumed from %s at step %d (policy version %d)", resume, start.step, pipe.version)
            if start.step >= cfg.run.steps:
                log.info("the run is already complete (run.steps=%d); writing final/ again", cfg.run.steps)
        metrics = Metrics(cfg, run_dir, from_step=start.step if start else 0)
        mark = stage_file(log_dir / "stage") if log_dir else None
        with metrics, Preemption(cfg.checkpoint.grace_s, DrainWatch(critical_nodes(pipe))) as preemption:
            train(cfg, pipe, processor, prompts, metrics.write, start, checkpoints, preemption, held_out, mark)
        final = export(pipe, run_dir / "final")
        log.info("trained %d steps; model written to %s, metrics to %s", cfg.run.steps, final, metrics.path)
    finally:
        pipe.shutdown()
    return run_dir


def train(
    cfg: Config,
    pipe: Pipeline,
    processor,
    prompts: PromptStream,
    on_step: Callable[[dict], None],
    start: DriverState | None = None,
    checkpoints: Checkpointer | None = None,
    preemption: Preemption | None = None,
    held_out: list | None = None,
    mark: Callable[[int, str], None] | None = None,
) -> None:
    """Steps `start.step`..`run.steps`-1 through `pipe`; `on_step` gets each step's metrics after its weight push
    (with `eval/*` numbers on `held_out` items every `eval.every_steps` steps). A step ends with a checkpoint when
    one is due, at the last step, and after a preemption notice (then raises). `mark(step, stage)` is told each
    stage as it starts (`launch/chaos.py` reads it to say where a fault hit)."""
    mark = mark or (lambda step, stage: None)
    table = TokenTable.for_tokenizer(processor.tokenizer)
    ahead = cfg.run.max_staleness if cfg.run.mode == "async" else 0
    first = start.step if start else 0
    inflight = deque((s, Ready(r)) for s, r in start.inflight) if start else deque()  # (samples, rollouts)
    for step in (bar := progress(range(first, cfg.run.steps), desc="train", unit="step", initial=first)):
        t0 = time.perf_counter()
        mark(step, "rollout")
        while len(inflight) <= ahead and step + len(inflight) < cfg.run.steps:
            samples = prompts.next_batch(cfg.learner.prompts_per_step)
            seed = cfg.run.seed * 1_000_003 + step + len(inflight)
            inflight.append((samples, pipe.generate_async(samples, seed=seed)))
        samples, pending = inflight.popleft()
        rollouts = pending.result()
        t_rollout = time.perf_counter()
        check_staleness(rollouts, pipe.version, ahead)
        spans = [parse_completion(r.completion_ids, table, cfg.loss.span_convention) for r in rollouts]
        plan = plan_batch(processor, {s.id: s for s in samples}, rollouts, spans, cfg)
        t_plan = time.perf_counter()
        mark(step, "teachers")
        targets, teacher_s = pipe.score(plan)
        t_score = time.perf_counter()
        mark(step, "learner")
        ranks = pipe.train(plan, targets, keep=ahead)
        t_train = time.perf_counter()
        mark(step, "push")
        # async + object store: the learner does not wait for the rollout workers to finish sampling and load
        push, _ = pipe.push_weights(wait=not (ahead and not pipe.pusher.streams))
        stages = {"rollout_wait": t_rollout - t0, "plan": t_plan - t_rollout, "teachers": t_score - t_plan,
                  "learner": t_train - t_score, "push": time.perf_counter() - t_train}  # fmt: skip
        seconds = time.perf_counter() - t0
        record = step_record(step, samples, rollouts, spans, plan, ranks, push, stages, teacher_s, seconds)
        record.update(pipe.pool_metrics())
        record.update({f"data/skipped/{kind}": n for kind, n in sorted(prompts.bad_counts.items())})
        record.update({"data/epoch": prompts.epoch, "data/position": prompts.position,  # where the stream is
                       "data/samples": samples_digest(samples)})  # fmt: skip
        if held_out and ((step + 1) % cfg.eval.every_steps == 0 or step + 1 == cfg.run.steps):
            eval_seed = cfg.run.seed * 1_000_003 + 500_000_000 + step  # apart from every training seed
            try:
                record.update(during_training(held_out, pipe.generate_with, processor.tokenizer, cfg, eval_seed))
            except RayActorError as err:  # a rollout worker died: restore it for training, skip this evaluation
                log.warning("held-out evaluation at step %d skipped: %s", step, type(err).__name__)
                pipe.pusher.recover(pipe.version)
        on_step(record)
        bar.set_postfix(
            loss=f"{record['loss']:.4g}", valid=f"{record['valid_rate']:.2f}", v=record["version"], refresh=False
        )
        stop = preemption is not None and preemption.requested
        if checkpoints is not None and (stop or step + 1 == cfg.run.steps or checkpoints.due(step + 1)):
            mark(step, "checkpoint")
            state = DriverState(step + 1, pipe.version, prompts.state_dict(),
                                [(s, p.result()) for s, p in inflight])  # fmt: skip
            checkpoints.save(state, functools.partial(save_learner, pipe))
        if stop:
            raise Preempted(f"stopped after step {step} on a preemption notice; the checkpoint is saved")
    pipe.pusher.settle(pipe.version)  # the last push is confirmed by every rollout worker


def save_learner(pipe: Pipeline, path: Path) -> None:
    """The learner's part of a checkpoint, written once every rollout worker has confirmed the weights it names."""
    pipe.learner.call_all("save_state", str(path))
    pipe.pusher.settle(pipe.version)


def export(pipe: Pipeline, path: Path) -> Path:
    """The student as a Hugging Face folder (LoRA merged), written by learner rank 0."""
    return Path(pipe.learner.call_all("export", str(path))[0])


def critical_nodes(pipe: Pipeline) -> set[str]:
    """Ray nodes whose loss ends the run: the learner ranks' and the driver's (rollout and teacher actors are
    restarted elsewhere)."""
    return {*pipe.learner.call_all(node_id), node_id()}


def node_id(_worker=None) -> str:
    """The Ray node this process runs on (`_worker`: run in an actor)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def samples_digest(samples) -> int:
    """The step's sample ids as one number (48 bits of BLAKE2b): two runs trained the same prompts iff equal."""
    ids = "\n".join(s.id for s in samples).encode()
    return int.from_bytes(hashlib.blake2b(ids, digest_size=6).digest(), "big")


def stage_file(path: Path) -> Callable[[int, str], None]:
    """A `mark` that keeps "<step> <stage>" in `path`, replaced atomically at each stage."""

    def mark(step: int, stage: str) -> None:
        part = path.with_suffix(".part")
        part.write_text(f"{step} {stage}\n")
        os.replace(part, path)

    return mark


def check_staleness(rollouts, learner_version: int, bound: int) -> None:
    """Every rollout of the step was sampled at most `bound` versions before the learner's current one."""
    for r in rollouts:
        if not 0 <= learner_version - r.version <= bound:
            raise RuntimeError(
                f"rollout of {r.sample_id} has version {r.version}, learner is at {learner_version}: "
                f"lag beyond run.max_staleness={bound}"
            )
