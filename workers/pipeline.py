"""The Ray actors of a run and one verb per pipeline stage; the driver's loop calls these and nothing else of Ray.

Groups: rollout workers (vLLM), one teacher pool per role, and the learner's FSDP ranks. Set-up forms the
learner's process group, the weight-push group (learner rank 0 + every rollout worker), checks that each teacher's
output head is the one the learner will apply to its `hidden` payloads, and pushes the initial weights, so that
no rollout worker ever samples from weights the learner did not send.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from vigos_ray.batching import split_batch
from vigos_ray.config import Config
from vigos_ray.data import Sample
from vigos_ray.objective import BatchPlan, segments
from vigos_ray.types import Decoding, RankStep
from vigos_ray.weight_sync import PushReceipt, PushReport
from workers.group import Pending, WorkerGroup, wait_all
from workers.learner import LearnerWorker, head_checksums, rendezvous
from workers.pool import TeacherPool
from workers.pusher import RESTARTS, WeightPusher
from workers.rollout import RolloutWorker, StaleWeightsError
from workers.teacher import TeacherWorker

log = logging.getLogger(__name__)
FOREVER = -1  # Ray's max_restarts for "always"


class Pipeline:
    """The actors of a run and one verb per stage of the loop. Its parts, each with a few verbs of its own:
    `rollout` (the rollout workers, a WorkerGroup), `teachers` (one autoscaled pool per role), `learner` (the FSDP
    ranks, a WorkerGroup) and `pusher` (the weight-push group and what each push carries, workers/pusher.py)."""

    def __init__(self, cfg: Config, model_path: Path, log_dir: Path | None = None):
        """`log_dir`: each actor's output goes to `<log_dir>/<actor>.log` (None: through Ray to this process)."""
        self.cfg, self.version = cfg, 0
        t0 = time.perf_counter()
        r, lc, timeout = cfg.rollout, cfg.learner, cfg.weight_sync.timeout_s
        args = (cfg, str(model_path))
        # Every actor starts at once (the vLLM engine alone takes ~12 s on CPU), then we wait for all of them.
        # Teachers are stateless: Ray restarts a dead one and resubmits its calls; each role's pool autoscales.
        # A restarted rollout worker is stale, so its calls are not resubmitted blindly: RolloutRequest pushes
        # it the weights first.
        self.rollout = WorkerGroup(RolloutWorker, n=r.workers, num_cpus=r.num_cpus, num_gpus=r.num_gpus, args=args,
                                   name="rollout", timeout_s=timeout, wait=False, max_restarts=FOREVER,
                                   log_dir=log_dir)  # fmt: skip
        self.teachers = {
            role: TeacherPool(TeacherWorker, pool, (*args, role), f"teacher-{role}", timeout, RESTARTS, log_dir)
            for role, pool in cfg.teacher_pools().items()
        }
        self.learner = WorkerGroup(LearnerWorker, n=lc.workers, num_cpus=lc.num_cpus, num_gpus=lc.num_gpus, args=args,
                                   name="learner", timeout_s=timeout, wait=False, log_dir=log_dir)  # fmt: skip
        for group in (self.rollout, *self.teachers.values(), self.learner):
            group.ready().result()
        host, port = ray.get(self.learner.actors[0].__ray_call__.remote(rendezvous, lc.workers), timeout=timeout)
        self.learner.call_all("join", host, port, lc.workers)
        self._check_teacher_heads()
        self.pusher = WeightPusher(cfg, self.learner, self.rollout)
        self.startup_s = time.perf_counter() - t0
        self.push_weights()  # version 0: the initial weights, sent like every later version

    def _check_teacher_heads(self) -> None:
        if self.cfg.scoring.payload != "hidden":
            return
        learner_heads = self.learner.call_all(head_checksums)[0]
        for seg in segments(self.cfg.loss):
            pool_heads = set(self.teachers[seg.teacher].call_all("head_checksum"))
            if pool_heads != {learner_heads[seg.name]}:
                raise ValueError(
                    f"teachers.{seg.teacher}: its output head differs from the head the learner applies to its "
                    "hidden payloads; use scoring.payload=topk for a teacher with another head"
                )

    # ---- stages ------------------------------------------------------------------------------------------------

    def generate_async(self, samples: Sequence[Sample], seed: int) -> RolloutRequest:
        """Rollouts for `samples`, sampled by whatever weights the workers hold when they get to it."""
        samples = list(samples)
        return RolloutRequest(
            self, samples, seed, self.version, self.rollout.scatter_async("generate", samples, seed=seed)
        )

    def generate_with(self, samples: Sequence[Sample], seed: int, decoding: Decoding) -> Pending:
        """Samples with other decoding (`rollout.*` fields replaced), e.g. held-out evaluation during training."""
        return self.rollout.scatter_async("generate", list(samples), seed=seed, decoding=decoding)

    def score(self, plan: BatchPlan) -> tuple[dict[str, list], dict[str, float]]:
        """Every segment's rows scored by its teacher pool, all pools at once; (targets, seconds per segment)."""
        pending = {
            seg.name: self.teachers[seg.teacher].scatter_async("score", rows, cost=[len(row.input_ids) for row in rows])
            for seg in plan.segments
            if (rows := plan.teacher_rows.get(seg.name))
        }
        targets, seconds = wait_all(pending)
        for seg in plan.segments:  # each pool scales on how long its own call took
            if seg.name in seconds:
                self.teachers[seg.teacher].observe(seconds[seg.name])
        return {seg.name: targets.get(seg.name, []) for seg in plan.segments}, seconds

    def pool_metrics(self) -> dict[str, int]:
        return {f"pool/{role}/{k}": v for role, pool in self.teachers.items() for k, v in pool.status().items()}

    def train(self, plan: BatchPlan, targets: dict[str, list], keep: int = 0) -> list[RankStep]:
        """One optimizer step on every learner rank; returns each rank's stats. `keep`: the learner keeps the
        trainable weights of this many versions before the new one (async mode: a batch sampled ahead under an
        older version and lost with its rollout worker is sampled again under that version)."""
        batches = split_batch(plan, targets, len(self.learner.actors), self.cfg.learner.micro_token_budget)
        results = self.learner.call_each("train_step", batches, keep=keep)
        self.version = results[0].version
        return results

    def push_weights(self, wait: bool = True, version: int | None = None) -> tuple[PushReport, list[PushReceipt]]:
        """The learner's current weights (or those of a kept `version`) -> every rollout worker, verified
        (`WeightPusher.push`: `wait=False` returns before the receivers load them, with object_store)."""
        return self.pusher.push(self.version if version is None else version, wait)

    def restore(self, path: Path) -> None:
        """Load the learner's state from a checkpoint and push those weights to every rollout worker."""
        versions = set(self.learner.call_all("load_state", str(path)))
        self.version = versions.pop()
        self.pusher.push(self.version, full=True)

    def shutdown(self) -> None:
        for group in (self.rollout, *self.teachers.values(), self.learner):
            group.shutdown()


@dataclass
class RolloutRequest:
    """Rollouts in flight. `result()` survives a rollout worker that died: the same samples are sampled again with
    the same seed, under the weights the request was issued under (`version`: in async mode the learner may have
    moved on; it keeps those weights), then the workers get the current weights back. No sample is lost or drawn
    twice, and the rollouts are those the undisturbed run samples."""

    pipe: Pipeline
    samples: list[Sample]
    seed: int
    version: int
    pending: object

    def result(self) -> list:
        resampled = False
        for attempt in range(RESTARTS + 1):
            try:
                rollouts = self.pending.result()
                break
            except (RayActorError, StaleWeightsError) as err:
                if attempt == RESTARTS:
                    raise
                log.warning("a rollout worker failed (%s); restoring the weights of version %d and sampling the "
                            "batch again", type(err).__name__, self.version)  # fmt: skip
                self.pipe.pusher.recover(self.version)
                self.pending = self.pipe.rollout.scatter_async("generate", self.samples, seed=self.seed)
                resampled = True
        if resampled and self.version != self.pipe.version:
            self.pipe.push_weights()  # the batch is sampled: the workers get the current weights back
        return rollouts
