"""Weight push by transport and bucket size: GB/s against a raw broadcast of the same bytes in the same run, and
the receiver's peak extra host memory against the size of the weights.

A sender actor (learner rank 0's part: cast, pack into buckets, checksum, send each bucket and its digest) and
receiver actors (an engine worker's part: receive, verify each bucket, load it into the model's tensors) on a local
Ray cluster, with synthetic weights shaped like a model's (large matrices, small vectors) in bf16. The receivers'
"model" is allocated before the push, so what the push adds to a receiver's resident memory is its buffers: the
streamed receive holds at most two buckets, never a second copy of the model. `raw` broadcasts one flat buffer
of the same size over a group of the same kind (gloo on CPU, NCCL on GPUs) with no packing, checksum or loading:
the bandwidth the wire allows. Transports that need GPUs (nccl, ipc) are listed as not run on a machine without.
Not included: the learner's all-gather of FSDP shards and vLLM's layer-wise reload (bench/step.py has the push
inside a whole step).

    python bench/weight_push.py --mb 512 --receivers 1 --buckets 32 128 512
"""

from __future__ import annotations

import argparse
import threading
import time

from common import REPO, table


def model_like_specs(total_mb: int):
    """Tensor specs summing to about `total_mb`: per block, 4 square matrices and 2 small vectors, in bf16."""
    from vigos_ray.weight_sync import TensorSpec

    d = 1024
    specs, size, i = [], 0, 0
    while size < total_mb * 2**20:
        for name, shape in (("q", (d, d)), ("k", (d, d)), ("v", (d, d)), ("o", (d, d)), ("n1", (d,)), ("n2", (d,))):
            specs.append(TensorSpec(f"layers.{i}.{name}", shape, "bfloat16"))
            size += 2 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        i += 1
    return specs


class PeakRss:
    """Resident memory of this process sampled every 2 ms while the block runs: the peak above the start."""

    def __enter__(self):
        import psutil

        self.process, self.start, self.peak, self.done = psutil.Process(), 0, 0, threading.Event()
        self.start = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.002):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.extra = max(self.peak, self.process.memory_info().rss) - self.start


class Member:
    """One member of a push group: rank 0 sends, the others receive into a model's tensors."""

    def __init__(self, rank: int, world: int, specs):
        import torch

        from vigos_ray.weight_sync import DTYPES

        self.rank, self.world, self.specs, self.end, self.raw_group = rank, world, specs, None, None
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if rank > 0:  # the engine's weights, allocated before any push
            self.model = {s.name: torch.empty(s.shape, dtype=DTYPES[s.dtype], device=device) for s in specs}

    def address(self):
        from vigos_ray.weight_sync import free_port

        return "127.0.0.1", free_port("127.0.0.1")

    def join(self, transport: str, host: str, port: int) -> None:
        from vigos_ray.transports import Endpoint, open_transport

        if self.end is not None:
            self.end.close()
        self.end = open_transport(Endpoint(transport, host, port, self.world, 300.0), self.rank)

    def raw(self, nbytes: int) -> float:
        import torch

        device = self.end.device
        fill = torch.ones if self.rank == 0 else torch.empty
        buffer = fill(nbytes, dtype=torch.uint8, device=device)
        t0 = time.perf_counter()
        if self.rank == 0:
            self.end.send(buffer)()
        else:
            self.end.recv(nbytes)()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def push(self, bucket_bytes: int, handles=None):
        """Rank 0: (seconds, checksum, handles); a receiver: (seconds, checksum, (peak extra host bytes, peak extra
        GPU bytes))."""
        import torch

        from vigos_ray import weight_sync

        t0 = time.perf_counter()
        if self.rank == 0:
            device = self.end.device
            weights = ((s.name, torch.ones(s.shape, dtype=torch.float32, device=device)) for s in self.specs)
            digests, _ = weight_sync.send(weights, self.specs, bucket_bytes, self.end)  # cast to bf16 on the way
            return time.perf_counter() - t0, digests.hexdigest(), self.end.handles()

        def load(named):
            for name, tensor in named:
                self.model[name].copy_(tensor)

        self.end.expect(handles or [])
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with PeakRss() as rss:
            digests, _ = weight_sync.receive(self.specs, bucket_bytes, self.end, load)
        gpu_extra = torch.cuda.max_memory_allocated() - base if on_gpu else 0
        return time.perf_counter() - t0, digests.hexdigest(), (rss.extra, gpu_extra)


def timed(fn, repeats: int) -> tuple[float, list]:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        runs.append((time.perf_counter() - t0, out))
    return min(runs, key=lambda r: r[0])  # the least disturbed run of a shared machine


def measure(name: str, specs, receivers: int, buckets_mb: list[int], repeats: int) -> list[list]:
    """Rows for one transport: its raw baseline, then one row per bucket size."""
    import ray

    from vigos_ray.transports import transport_class

    cls, world, nbytes = transport_class(name), 1 + receivers, sum(s.nbytes for s in specs)
    per_member = (1 / world if name == "ipc" else 1) if cls.device == "cuda" else 0
    members = [ray.remote(num_cpus=1, num_gpus=per_member)(Member).remote(r, world, specs) for r in range(world)]
    raw_kind = {"cpu": "gloo", "cuda": "ipc" if name == "ipc" else "nccl"}[cls.device]
    host, port = ray.get(members[0].address.remote())
    ray.get([m.join.remote(raw_kind, host, port) for m in members])
    raw_s, _ = timed(lambda: ray.get([m.raw.remote(nbytes) for m in members]), repeats)
    rows = [[f"raw broadcast ({raw_kind}, baseline)", "-", f"{raw_s:.3f}", f"{nbytes / raw_s / 1e9:.2f}", "1.00", ""]]
    host, port = ray.get(members[0].address.remote())
    ray.get([m.join.remote(name, host, port) for m in members])

    def push(bucket: int):
        if cls.streams:
            return ray.get([m.push.remote(bucket) for m in members])
        sent = ray.get(members[0].push.remote(bucket))
        return [sent, *ray.get([m.push.remote(bucket, sent[2]) for m in members[1:]])]

    for mb in buckets_mb:
        push_s, out = timed(lambda b=mb * 2**20: push(b), repeats)
        if len({checksum for _, checksum, _ in out}) != 1:
            raise RuntimeError(f"{name}: a receiver's checksum differs from the sender's")
        host_extra = max(r[2][0] for r in out[1:])
        extra = f"{host_extra / 2**20:,.0f} MB ({host_extra / nbytes:.2f}x)"
        if cls.device == "cuda":
            gpu = max(r[2][1] for r in out[1:])
            extra += f" / GPU {gpu / 2**20:,.0f} MB ({gpu / nbytes:.2f}x)"
        rows.append([name, mb, f"{push_s:.3f}", f"{nbytes / push_s / 1e9:.2f}", f"{raw_s / push_s:.2f}", extra])
    for m in members:
        ray.kill(m)
    return rows


def main() -> None:
    import ray
    import torch

    from vigos_ray.transports import available, transport_class

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=512, help="size of the weights pushed")
    ap.add_argument("--receivers", type=int, default=1)
    ap.add_argument("--buckets", type=int, nargs="+", default=[32, 128, 512], help="bucket sizes in MB")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    specs = model_like_specs(args.mb)
    nbytes = sum(s.nbytes for s in specs)
    gpus, world = torch.cuda.device_count(), 1 + args.receivers
    ray.init(num_cpus=2 + args.receivers, num_gpus=gpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})  # fmt: skip
    rows, skipped = [], []
    for name in sorted(available()):
        needed = (1 if name == "ipc" else world) if transport_class(name).device == "cuda" else 0
        if gpus < needed:
            skipped.append(f"{name} (needs {needed} GPU(s); this machine has {gpus})")
            continue
        rows += measure(name, specs, args.receivers, args.buckets, args.repeats)
    table(f"weight push of {nbytes / 1e6:,.0f} MB (bf16, {len(specs)} tensors) to {args.receivers} receiver(s), "
          f"best of {args.repeats}; 'vs raw' = raw seconds / push seconds over the same kind of group; receiver "
          "extra = peak memory the push adds to a receiver (x the weights' size)",
          ["transport", "bucket MB", "seconds", "GB/s", "vs raw", "receiver extra"], rows)  # fmt: skip
    if skipped:
        print("not run here: " + "; ".join(skipped))
    ray.shutdown()


if __name__ == "__main__":
    main()
