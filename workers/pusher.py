"""The weight pusher: learner rank 0 -> every engine worker of every rollout worker, versioned and verified.

It owns the push group (which transport, formed over which members), what a push carries (every tensor, or a
delta of the units training changes, after a full push of the same lineage) and the receipts of a push that did
not wait for them. A rollout worker that dies before or during a push breaks it for every member: the pusher
waits for Ray's restart, re-forms the group and pushes every tensor again, so no worker samples from weights the
learner did not send.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import ray
from ray.exceptions import RayActorError

from vigos_ray.config import Config
from vigos_ray.transports import Endpoint, choose, transport_class, visible_gpus
from vigos_ray.weight_sync import PushGroupError, PushReceipt, PushReport, WeightSyncError, free_address
from workers.group import WorkerGroup
from workers.rollout import FullPushNeeded

log = logging.getLogger(__name__)
# A call (a batch to sample, a push, a scoring call) whose rollout or teacher actor died is retried this many times
# before the run fails. The actors themselves are restarted however often they die over a run (a long run meets
# many preemptions of the same worker); a crash loop shows as a call that keeps failing.
RESTARTS = 3


class WeightPusher:
    def __init__(self, cfg: Config, learner: WorkerGroup, rollout: WorkerGroup):
        self.cfg, self.learner, self.rollout = cfg, learner, rollout
        ws = cfg.weight_sync
        self.transport = self._choose_transport() if ws.transport == "auto" else ws.transport
        log.info("weight push: %s", self.transport)
        self.form_group()
        first = learner.actors[0]
        self.specs = ray.get(first.weight_specs.remote(), timeout=ws.timeout_s)
        self.delta_specs = ray.get(first.weight_specs.remote(changing_only=True), timeout=ws.timeout_s)
        self._full_next = True  # the next push sends every tensor (the first; after a rollout worker restarted)
        self._unconfirmed = None  # (receipts in flight, report) of a push made with wait=False

    @property
    def streams(self) -> bool:
        """Whether rollout workers take a push while it is sent (else after: the push need not wait for them)."""
        return transport_class(self.transport).streams

    def form_group(self, transport: str | None = None) -> None:
        """(Re-)form the push group: learner rank 0 (rank 0, hosting its store) and every engine worker of every
        rollout worker; both ends join at once (each waits in the rendezvous for the other). `transport`: switch
        to another one. The next push sends every tensor."""
        ws, r = self.cfg.weight_sync, self.cfg.rollout
        self.transport = transport or self.transport
        host, port = ray.get(self.learner.actors[0].__ray_call__.remote(free_address), timeout=ws.timeout_s)
        engine_workers = r.tensor_parallel_size if r.backend == "vllm" else 1
        endpoint = Endpoint(self.transport, host, port, 1 + len(self.rollout.actors) * engine_workers, ws.timeout_s)
        pending = [self.learner.call_all_async("open_sync_group", endpoint),
                   self.rollout.call_all_async("open_sync_group", endpoint)]  # fmt: skip
        for p in pending:
            p.result()
        self._full_next = True

    def _choose_transport(self) -> str:
        """`auto`: from the GPUs learner rank 0 and each rollout worker hold, and whether the run samples ahead."""
        timeout = self.cfg.weight_sync.timeout_s
        learner = ray.get(self.learner.actors[0].__ray_call__.remote(visible_gpus), timeout=timeout)
        engines = ray.get([a.__ray_call__.remote(visible_gpus) for a in self.rollout.actors], timeout=timeout)
        ahead = self.cfg.run.mode == "async" and self.cfg.rollout.tensor_parallel_size == 1
        return choose(learner, engines, ahead)

    def push(self, version: int, wait: bool = True, full: bool = False) -> tuple[PushReport, list[PushReceipt]]:
        """The learner's weights of `version` (the current one, or one it keeps) -> every rollout worker, verified;
        returns the report (seconds: from the call to the last worker's weights loaded) and each worker's receipt.
        `full`: every tensor, even where a delta would do (the learner's state was just restored).

        `wait=False` (async mode, a transport that does not stream: object_store): return once the learner has put
        the weights in the object store; each rollout worker loads them when its sampling call in flight ends (a
        worker runs its calls in the order they were made, so its next batch uses the new weights). The receipts
        are checked by `settle()`, at the latest before the next push; the report's seconds are then the learner's
        part."""
        self.settle(version)
        self._full_next |= full
        for attempt in range(RESTARTS + 1):
            try:
                return self._push_once(wait, version)
            except (RayActorError, PushGroupError, FullPushNeeded) as err:
                if attempt == RESTARTS or self._learner_lost(err):
                    raise
                log.warning("weight push %d failed (%s); re-forming the push group and pushing every tensor",
                            version, str(err).strip().splitlines()[-1])  # fmt: skip
                self.rollout.wait_restarted()
                self.form_group()
        raise AssertionError("unreachable")

    def settle(self, current: int) -> list[PushReceipt]:
        """Wait for the rollout workers' receipts of a push made with `wait=False`, and check them. A worker that
        died before it confirmed is restarted and sent the weights of `current` again, as after any rollout
        failure."""
        if self._unconfirmed is None:
            return []
        (pending, report), self._unconfirmed = self._unconfirmed, None
        try:
            receipts = pending.result()
        except RayActorError as err:
            log.warning("a rollout worker died before confirming weight push %d (%s)", report.version,
                        type(err).__name__)  # fmt: skip
            self.recover(current)
            return []
        self._check_receipts(report, receipts)
        return receipts

    def _learner_lost(self, err: Exception) -> bool:
        """A learner rank died: the run cannot go on (no push group to re-form); the driver's restart resumes."""
        dead = getattr(err, "actor_id", None)
        return dead is not None and dead in {a._actor_id.hex() for a in self.learner.actors}

    def recover(self, version: int) -> None:
        """After a rollout worker died: wait for Ray's restart, re-form the push group (its old member is gone),
        and push every worker the weights of `version` (the current one, or one the learner keeps), so the
        restarted one is no longer stale."""
        self._unconfirmed = None  # superseded: the push below reaches every worker and is checked
        self.rollout.wait_restarted()
        self.form_group()
        self.push(version)

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
            report = sent.result()[0].report
            receipts = got.result()
        else:  # the receivers fetch what the sender left (object_store)
            out = sent.result()[0]
            report = out.report
            got = self.rollout.call_all_async("receive_weights", version, specs, bucket, handles=out.handles, full=full)
            if not wait:
                self._unconfirmed, self._full_next = (got, report), False
                return dataclasses.replace(report, seconds=time.perf_counter() - t0), []
            receipts = got.result()
        self._check_receipts(report, receipts)
        self._full_next = False
        return dataclasses.replace(report, seconds=time.perf_counter() - t0), receipts
