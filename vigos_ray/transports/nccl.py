"""`nccl`: broadcasts of GPU buffers between learner rank 0's GPU and the engine workers' GPUs, never through host
memory. Every member needs a GPU of its own: NCCL refuses two members on one device (use `ipc` there)."""

from __future__ import annotations

import torch

from vigos_ray.transports import ProcessGroupTransport


class Nccl(ProcessGroupTransport):
    device = "cuda"

    def make_group(self, store, rank, world_size, timeout):
        if not torch.cuda.is_available():
            raise RuntimeError("weight_sync.transport=nccl needs a GPU on every member; use gloo on CPU")
        options = torch.distributed.ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = torch.distributed.ProcessGroupNCCL(store, rank, world_size, options)
        # NCCL creates its communicator lazily at the first collective, on the current device; eager init here
        # makes a missing member fail the group's formation, not the first push.
        group.eager_connect_single_device(torch.device("cuda", torch.cuda.current_device()))
        return group


TRANSPORT = Nccl
