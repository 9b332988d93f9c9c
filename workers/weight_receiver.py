"""The rollout engine's end of a weight push: a vLLM weight-transfer engine (backend `vigos`) that runs in every
engine worker, so an engine with tensor parallelism (workers in processes of their own) is updated too.

The rollout worker drives vLLM's lifecycle (`init_weight_transfer_engine`, then per push `start_weight_update`,
`update_weights`, `finish_weight_update`); vLLM calls it on each engine worker, and each worker joins the push
group under its own rank and takes every bucket (`weight_sync.receive`: verified bucket by bucket, then handed to
the model's loader, which keeps this tensor-parallel rank's part).

Loading goes through vLLM's layer-wise reload: a layer is rebuilt once all of its tensors have arrived, and a
layer that receives none stays as it is (delta pushes); a layer that receives only some is rebuilt from those
alone, so a delta push carries whole load units (`weight_sync.load_unit`). A push that fails mid-way (a refused
bucket, a broken group) still finishes the reload: nothing of a refused bucket is loaded, but a layer cut by the
failure holds only part of its new tensors, so the rollout worker stays stale (refuses to sample) until a full
push lands. A failure is returned as data (`Failure`), not raised inside the engine.

vLLM creates the engine by its backend name in the process of each engine worker: `register` runs in the rollout
worker before its engine starts and, through the `vllm.general_plugins` entry point (setup.cfg), in every engine
worker process vLLM spawns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from vigos_ray.transports import Endpoint, PushGroupError, open_transport
from vigos_ray.weight_sync import TensorSpec, WeightSyncError, receive

BACKEND = "vigos"


@dataclass
class ReceiverInit(WeightTransferInitInfo):
    endpoint: dict  # Endpoint.as_dict()
    rank_offset: int  # this rollout worker's first rank in the group; its engine workers follow


@dataclass
class ReceiverUpdate(WeightTransferUpdateInfo):
    specs: list  # [name, shape, dtype] of every tensor, in push order
    bucket_bytes: int
    handles: list = field(default_factory=list)  # transports that do not stream (object_store)
    load: bool = True  # False: take and verify the push, load nothing (a delta the worker cannot apply)


@dataclass(frozen=True)
class Arrival:
    """What one engine worker took in its last push."""

    rank: int
    digests: dict[str, str]  # per tensor, by name
    bytes: int


@dataclass(frozen=True)
class Failure:
    """Why one engine worker's last push failed, as data rather than a raised error: an engine whose workers are
    processes of their own turns a worker's error into a RuntimeError of its own and, raising at the first
    worker's, leaves the other workers' replies queued for its next call (vLLM 0.32's multiprocessing executor).
    So the receiver always returns, the update is always finished, and the rollout worker raises the typed error
    (a refused bucket, a broken group) after reading every worker's outcome."""

    rank: int
    kind: str  # "refused" (WeightSyncError), "group" (PushGroupError) or "other"
    message: str

    @classmethod
    def of(cls, rank: int, err: Exception) -> Failure:
        kind = "group" if isinstance(err, PushGroupError) else "refused" if isinstance(err, WeightSyncError) else ""
        return cls(rank, kind or "other", f"engine worker {rank}: {type(err).__name__}: {err}")

    def error(self) -> Exception:
        return {"group": PushGroupError, "refused": WeightSyncError}.get(self.kind, RuntimeError)(self.message)


class BucketReceiver(WeightTransferEngine[ReceiverInit, ReceiverUpdate]):
    init_info_cls = ReceiverInit
    update_info_cls = ReceiverUpdate

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.transport = None
        self.rank = -1
        self.outcome: Arrival | Failure | None = None  # of the last push: what arrived, or why it failed

    def init_transfer_engine(self, init_info: ReceiverInit) -> None:
        self.shutdown()
        p = self.parallel_config
        self.rank = init_info.rank_offset + p.data_parallel_index * p.world_size + p.rank
        self.transport = open_transport(Endpoint(**init_info.endpoint), self.rank)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self.outcome = None
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict) -> None:
        # The base class synchronises an accelerator after receiving, which fails on CPU; the transports hand over
        # messages already complete.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: ReceiverUpdate) -> None:
        if self.transport is None:
            raise RuntimeError("the weight-push group was not joined: call init_weight_transfer_engine first")
        specs = [TensorSpec(name, tuple(shape), dtype) for name, shape, dtype in update_info.specs]
        self.transport.expect(update_info.handles)
        load = self.model.load_weights if update_info.load else None
        try:
            digests, nbytes = receive(specs, update_info.bucket_bytes, self.transport, load)
        except Exception as err:  # noqa: BLE001 -- reported as data (see Failure); the update is still finished
            self.outcome = Failure.of(self.rank, err)
            return
        self.outcome = Arrival(self.rank, digests.by_name, nbytes)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


def last_outcome(worker) -> Arrival | Failure | None:
    """Run in an engine worker (`LLM.collective_rpc(last_outcome)`): what its receiver took in the last push, or
    the error that ended it (typed: a refused bucket, a broken group)."""
    return worker.weight_transfer_engine.outcome


def register() -> None:
    """Make the `vigos` backend known to vLLM's factory in this process (idempotent; a vLLM general plugin)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, BucketReceiver)
