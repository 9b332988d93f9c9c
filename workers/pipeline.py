"""The Ray actors of a run and one verb per pipeline stage; the driver's loop calls these and nothing else of Ray.

Groups: rollout workers (vLLM), one teacher pool per role, and the learner's FSDP ranks. Set-up forms the
learner's process group, the weight-push group (learner rank 0 + every rollout worker), checks that each teacher's
output head is the one the learner will apply to its `hidden` payloads, and pushes the initial weights, so that
no rollout worker ever samples from weights the learner did not send.
"""

from __future__ import annotations

import dataclasses
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
from vigos_ray.transports import Endpoint, choose, transport_class, visible_gpus
from vigos_ray.types import Decoding, RankStep
from vigos_ray.weight_sync import PushGroupError, PushReceipt, PushReport, WeightSyncError
from workers.group import Pending, WorkerGroup, wait_all
from workers.learner import LearnerWorker
from workers.pool import TeacherPool
from workers.rollout import FullPushNeeded, RolloutWorker, StaleWeightsError
from workers.teacher import TeacherWorker

log = logging.getLogger(__name__)
# A call (a batch to sample, a push, a scoring call) whose rollout or teacher actor died is retried this many times
# before the run fails. The actors themselves are restarted however often they die over a run (a long run meets
# many preemptions of the same worker); a crash loop shows as a call that keeps failing.
RESTARTS = 3
FOREVER = -1  # Ray's max_restarts for "always"


class Pipeline:
    def __init__(self, cfg: Config, model_path: Path, log_dir: Path | None = None):
        """`log_dir`: each actor's output goes to `<log_dir>/<actor>.log` (None: through Ray to this process)."""
        self.cfg, self.version = cfg, 0
        self._unconfirmed = None  # (receipts in flight, report) of a push made with wait=False
        self.transport: str | None = None  # weight_sync.transport, `auto` resolved at the first group formation
        t0 = time.perf_counter()
        r, lc, timeout = cfg.rollout, cfg.learner, cfg.weight_sync.timeout_s
        args = (cfg, str(model_path))
        # Every actor starts at once (the vLLM engine alone takes ~12 s on CPU), then we wait for all of them.
        # Teachers are stateless: Ray restarts a dead one and resubmits its calls; each role's pool autoscales.
        # A restarted rollout worker is stale, so its calls are not resubmitted blindly: RolloutRequest pushes
        # it the weights first.
        self.rollout = WorkerGroup(RolloutWorker, r.workers, r.num_cpus, r.num_gpus, args, "rollout", timeout, False,
                                   max_restarts=FOREVER, log_dir=log_dir)  # fmt: skip
        self.teachers = {
            role: TeacherPool(TeacherWorker, pool, (*args, role), f"teacher-{role}", timeout, RESTARTS, log_dir)
            for role, pool in cfg.teacher_pools().items()
        }
        self.learner = WorkerGroup(LearnerWorker, lc.workers, lc.num_cpus, lc.num_gpus, args, "learner", timeout,
                                   False, log_dir=log_dir)  # fmt: skip
        for group in (self.rollout, *self.teachers.values(), self.learner):
            group.ready().result()
        host, port = ray.get(self.learner.actors[0].address.remote(), timeout=timeout)
        self.learner.call_all("join", host, port, lc.workers)
        self._check_teacher_heads()
        self._open_sync_group()
        self.specs = ray.get(self.learner.actors[0].weight_specs.remote(), timeout=timeout)
        self.delta_specs = ray.get(self.learner.actors[0].weight_specs.remote(changing_only=True), timeout=timeout)
        self._full_next = True  # the next push sends every tensor (the first; after a rollout worker restarted)
        self.startup_s = time.perf_counter() - t0
        self.push_weights()  # version 0: the initial weights, sent like every later version

    def _check_teacher_heads(self) -> None:
        if self.cfg.teachers.payload != "hidden":
            return
        learner_heads = self.learner.call_all("head_checksums")[0]
        for seg in segments(self.cfg.loss):
            pool_heads = set(self.teachers[seg.teacher].call_all("head_checksum"))
            if pool_heads != {learner_heads[seg.name]}:
                raise ValueError(
                    f"teachers.{seg.teacher}: its output head differs from the head the learner applies to its "
                    "hidden payloads; use teachers.payload=topk for a teacher with another head"
                )

    def _open_sync_group(self) -> None:
        """Form the weight-push group: learner rank 0 (rank 0, hosting its store) and every engine worker of every
        rollout worker; both ends join at once (each waits in the rendezvous for the other)."""
        ws, r = self.cfg.weight_sync, self.cfg.rollout
        if self.transport is None:
            self.transport = self._choose_transport() if ws.transport == "auto" else ws.transport
            log.info("weight push: %s", self.transport)
        host, port = ray.get(self.learner.actors[0].address.remote(), timeout=ws.timeout_s)
        engine_workers = r.tensor_parallel_size if r.backend == "vllm" else 1
        endpoint = Endpoint(self.transport, host, port, 1 + len(self.rollout.actors) * engine_workers, ws.timeout_s)
        pending = [self.learner.call_all_async("open_sync_group", endpoint),
                   self.rollout.call_all_async("open_sync_group", endpoint)]  # fmt: skip
        for p in pending:
            p.result()

    def _choose_transport(self) -> str:
        """`auto`: from the GPUs learner rank 0 and each rollout worker hold (none: gloo)."""
        timeout = self.cfg.weight_sync.timeout_s
        learner = ray.get(self.learner.actors[0].__ray_call__.remote(visible_gpus), timeout=timeout)
        engines = ray.get([a.__ray_call__.remote(visible_gpus) for a in self.rollout.actors], timeout=timeout)
        return choose(learner, engines)

    # ---- stages ------------------------------------------------------------------------------------------------

    def generate_async(self, samples: Sequence[Sample], seed: int) -> RolloutRequest:
        """Rollouts for `samples`, sampled by whatever weights the workers hold when they get to it."""
        samples = list(samples)
        return RolloutRequest(self, samples, seed, self.version, self.rollout.scatter_async("generate", samples,
                                                                                             seed=seed))

    def generate_with(self, samples: Sequence[Sample], seed: int, decoding: Decoding) -> Pending:
        """Samples with other decoding (`rollout.*` fields replaced), e.g. held-out evaluation during training."""
        return self.rollout.scatter_async("generate", list(samples), seed=seed, decoding=decoding)

    def recover_rollout_workers(self, version: int | None = None) -> None:
        """After a rollout worker died: wait for Ray's restart, re-form the weight-push group (its old member is
        gone), and push every worker the current weights (or those of `version`, one the learner keeps: see
        `train`), so the restarted one is no longer stale."""
        self._unconfirmed = None  # superseded: the push below reaches every worker and is checked
        self.rollout.wait_restarted()
        self._open_sync_group()
        self._full_next = True
        self.push_weights(version=version)

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
        """Learner weights -> every rollout worker, verified; returns the report (seconds: from the call to the last
        worker's weights loaded) and each worker's receipt. A rollout worker that dies before or during the push
        breaks it for every member: wait for Ray's restart, re-form the push group and push again. `version`: an
        earlier version the learner keeps, instead of the current one.

        `wait=False` (async mode, a transport that does not stream: object_store): return once the learner has put
        the weights in the object store; each rollout worker loads them when its sampling call in flight ends (a
        worker runs its calls in the order they were made, so its next batch uses the new weights). The receipts
        are checked by `settle()`, at the latest before the next push; the report's seconds are then the learner's
        part."""
        self.settle()
        for attempt in range(RESTARTS + 1):
            try:
                return self._push_once(wait, self.version if version is None else version)
            except (RayActorError, PushGroupError, FullPushNeeded) as err:
                if attempt == RESTARTS:
                    raise
                log.warning("weight push %d failed (%s); re-forming the push group and pushing every tensor",
                            self.version, str(err).strip().splitlines()[-1])  # fmt: skip
                self.rollout.wait_restarted()
                self._open_sync_group()
                self._full_next = True
        raise AssertionError("unreachable")

    def settle(self) -> list[PushReceipt]:
        """Wait for the rollout workers' receipts of a push made with `wait=False`, and check them. A worker that
        died before it confirmed is restarted and sent the current weights again, as after any rollout failure."""
        if self._unconfirmed is None:
            return []
        (pending, report), self._unconfirmed = self._unconfirmed, None
        try:
            receipts = pending.result()
        except RayActorError as err:
            log.warning("a rollout worker died before confirming weight push %d (%s)", report.version,
                        type(err).__name__)  # fmt: skip
            self.recover_rollout_workers()
            return []
        self._check_receipts(report, receipts)
        return receipts

    def _check_receipts(self, report: PushReport, receipts: list[PushReceipt]) -> None:
        """Each worker got this push intact and now holds exactly the tensors the learner has sent it."""
        for receipt in receipts:
            if not receipt.matches(report):
                raise WeightSyncError(f"rollout worker {receipt.worker} holds {receipt}, learner sent {report}")

    def _push_once(self, wait: bool, version: int) -> tuple[PushReport, list[PushReceipt]]:
        ws = self.cfg.weight_sync
        bucket = ws.bucket_mb * 2**20
        full = self._full_next or not ws.delta
        specs = self.specs if full else self.delta_specs
        t0 = time.perf_counter()
        sent = self.learner.call_all_async("push_weights", specs, bucket, full, version)
        if self.streams:  # the receivers take the buckets as they are sent
            got = self.rollout.call_all_async("receive_weights", version, specs, bucket, full=full)
            report, _ = sent.result()[0]
            receipts = got.result()
        else:  # the receivers fetch what the sender left (object_store)
            report, handles = sent.result()[0]
            got = self.rollout.call_all_async("receive_weights", version, specs, bucket, handles=handles, full=full)
            if not wait:
                self._unconfirmed, self._full_next = (got, report), False
                return dataclasses.replace(report, seconds=time.perf_counter() - t0), []
            receipts = got.result()
        self._check_receipts(report, receipts)
        self._full_next = False
        return dataclasses.replace(report, seconds=time.perf_counter() - t0), receipts

    @property
    def streams(self) -> bool:
        """Whether rollout workers take a push while it is sent (else after: the push need not wait for them)."""
        return transport_class(self.transport).streams

    def critical_nodes(self) -> set[str]:
        """Ray nodes whose loss ends the run: the learner ranks' and the driver's (rollout and teacher actors are
        restarted elsewhere)."""
        return {*self.learner.call_all("node_id"), ray.get_runtime_context().get_node_id()}

    def save_learner(self, path: Path) -> None:
        self.learner.call_all("save_state", str(path))
        self.settle()  # a checkpoint is written only once every worker has confirmed the weights it names

    def restore_learner(self, path: Path) -> None:
        """Load the learner's state from a checkpoint and push those weights to every rollout worker."""
        versions = set(self.learner.call_all("load_state", str(path)))
        self.version = versions.pop()
        self._full_next = True
        self.push_weights()

    def export(self, path: Path) -> Path:
        """The student as a Hugging Face folder (LoRA merged), written by learner rank 0."""
        return Path(self.learner.call_all("export", str(path))[0])

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
                self.pipe.recover_rollout_workers(self.version)
                self.pending = self.pipe.rollout.scatter_async("generate", self.samples, seed=self.seed)
                resampled = True
        if resampled and self.version != self.pipe.version:
            self.pipe.push_weights()  # the batch is sampled: the workers get the current weights back
        return rollouts
