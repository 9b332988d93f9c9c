"""`ipc`: CUDA IPC between processes on one GPU (learner rank 0 and a colocated engine), where NCCL refuses two
members on one device. The sender exports each message's memory as an IPC handle under a key of the group's TCP
store; each receiver opens the handle, copies the message into memory of its own, and acknowledges it under a key
of its own. The sender's wait returns once every receiver has acknowledged, so it may then free or reuse the
memory. Handles name the GPU by its UUID: a receiver on another GPU is refused with a message saying so."""

from __future__ import annotations

import pickle
from datetime import timedelta

import torch

from vigos_ray.transports import PushGroupError, Transport


def _gpu_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


class CudaIpc(Transport):
    device = "cuda"

    def __init__(self, endpoint, rank):
        super().__init__(endpoint, rank)
        if not torch.cuda.is_available():
            raise RuntimeError("weight_sync.transport=ipc needs a GPU shared by the learner and the engine")
        timeout = timedelta(seconds=endpoint.timeout_s)
        self._store = torch.distributed.TCPStore(endpoint.host, endpoint.port, endpoint.world_size, rank == 0, timeout)
        self._sent = self._received = 0

    def send(self, message: torch.Tensor):
        from torch.multiprocessing.reductions import reduce_tensor

        key = f"m{self._sent}"
        self._sent += 1
        torch.cuda.current_stream(message.device).synchronize()  # the bytes are written before anyone reads them
        _, args = reduce_tensor(message)
        self._store.set(key, pickle.dumps((_gpu_uuid(message.device.index), args)))
        acks = [f"{key}/ack{rank}" for rank in range(1, self.endpoint.world_size)]
        held = [message]  # its memory must outlive every receiver's copy: released once all have acknowledged

        def wait() -> None:
            try:
                self._store.wait(acks)
            except RuntimeError as err:  # a receiver died or hung past the store's timeout
                raise PushGroupError(f"the weight-push group broke: {str(err).splitlines()[0]}") from None
            held.clear()
            self._store.delete_key(key)
            for ack in acks:
                self._store.delete_key(ack)

        return wait

    def recv(self, nbytes: int):
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        key = f"m{self._received}"
        self._received += 1

        def received() -> torch.Tensor:
            try:
                uuid, args = pickle.loads(self._store.get(key))
            except RuntimeError as err:
                raise PushGroupError(f"the weight-push group broke: {str(err).splitlines()[0]}") from None
            device = torch.cuda.current_device()
            if uuid != _gpu_uuid(device):
                raise RuntimeError(
                    f"weight_sync.transport=ipc: the sender's GPU {uuid} is not this engine worker's GPU "
                    f"{_gpu_uuid(device)}; use nccl between GPUs"
                )
            args = list(args)
            args[6] = device  # the sender's device index means nothing in this process
            shared = rebuild_cuda_tensor(*args)
            if shared.numel() != nbytes:
                raise RuntimeError(f"ipc: expected a message of {nbytes} bytes, got {shared.numel()}")
            own = shared.clone()
            torch.cuda.current_stream().synchronize()  # the copy is done before the sender may reuse its memory
            del shared
            self._store.set(f"{key}/ack{self.rank}", b"1")
            return own

        return received

    def close(self) -> None:
        self._store = None


TRANSPORT = CudaIpc
