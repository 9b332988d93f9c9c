"""Peak memory and time of the hidden-payload loss: chunked full-vocabulary KL vs materialized full logits.

Each case runs forward + backward in a fresh process and reports its peak resident memory above the inputs
(ru_maxrss), so allocator caching in one case cannot hide another's peak. Values of the two paths are compared.

    python bench/loss_memory.py --tokens 1024 4096 16384 --vocab 151665 --head-rows 151936 --hidden 2048
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import peak_mb, rss_mb


def total_memory_gb() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 1e6


def run_case(path: str, tokens: int, vocab: int, head_rows: int, hidden: int, chunk: int, out: str) -> None:
    """Child process: build inputs, record RSS, run forward + backward, report the peak above the inputs."""
    import torch

    from vigos_ray.losses import DivergenceSpec, token_divergence, token_losses
    from vigos_ray.types import TeacherTargets

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    h_s = (torch.randn(tokens, hidden) * 0.5).requires_grad_(True)
    h_t = torch.randn(tokens, hidden) * 0.5
    head = torch.randn(head_rows, hidden) * 0.02
    teacher_head = head.clone()
    targets = torch.randint(0, vocab, (tokens,))
    warm = torch.randn(2, hidden, requires_grad=True)  # first-call imports and allocator set-up, not the loss's peak
    spec = DivergenceSpec("forward")
    token_losses(warm, head[:8], TeacherTargets("hidden", hidden=warm.detach()), targets[:2] % 8, spec, 8, head[:8])[
        0
    ].sum().backward()
    base = rss_mb()
    t0 = time.perf_counter()
    if path == "full":
        per_token = token_divergence(h_s @ head[:vocab].T, h_t @ teacher_head[:vocab].T, "forward")
    else:
        teacher = TeacherTargets("hidden", hidden=h_t)
        per_token, _ = token_losses(h_s, head, teacher, targets, DivergenceSpec("forward"), vocab, teacher_head, chunk)
    per_token.sum().backward()
    seconds = time.perf_counter() - t0
    peak = peak_mb()
    torch.save({"loss": per_token.detach(), "grad": h_s.grad}, out + ".pt")
    Path(out).write_text(json.dumps({"peak_mb": peak - base, "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--vocab", type=int, default=151_665)
    ap.add_argument("--head-rows", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        path, tokens, vocab, rows, hidden, chunk, out = args.child
        return run_case(path, int(tokens), int(vocab), int(rows), int(hidden), int(chunk), out)

    import torch

    print(f"hidden-payload loss, forward + backward, vocab {args.vocab:,} (head rows {args.head_rows:,}), "
          f"d={args.hidden}, fp32, chunk {args.chunk} tokens")  # fmt: skip
    header = ("tokens", 7), ("path", 8), ("peak MB", 9), ("seconds", 8), ("mem ratio", 10), ("max |dloss|", 12)
    print(" ".join(f"{name:>{width}}" for name, width in header), f"{'max |dgrad|':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in args.tokens:
            results = {}
            for path in ("full", "chunked"):
                need_gb = 9 * tokens * args.head_rows * 4 / 1e9  # ~9 logit-sized fp32 tensors: measured 21.9 GB at 4k
                if path == "full" and need_gb > 0.6 * total_memory_gb():
                    print(f"{tokens:>7} {path:>8} skipped: needs about {need_gb:.0f} GB, more than this machine has")
                    continue
                out = f"{tmp}/{path}-{tokens}.json"
                cmd = [sys.executable, __file__, "--child", path, str(tokens), str(args.vocab), str(args.head_rows),
                       str(args.hidden), str(args.chunk), out]  # fmt: skip
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    why = "killed by SIGKILL (out of memory?)" if done.returncode == -9 else done.stderr.strip()[-200:]
                    print(f"{tokens:>7} {path:>8} failed: {why}")
                    continue
                results[path] = json.loads(Path(out).read_text()) | torch.load(out + ".pt")
            if "chunked" in results and "full" not in results:
                r = results["chunked"]
                print(f"{tokens:>7} {'chunked':>8} {r['peak_mb']:>9.0f} {r['seconds']:>8.1f} {'-':>10}")
            if len(results) < 2:
                continue
            full, chunked = results["full"], results["chunked"]
            dloss = float((full["loss"] - chunked["loss"]).abs().max())
            dgrad = float((full["grad"] - chunked["grad"]).abs().max())
            for path, r in results.items():
                ratio = r["peak_mb"] / full["peak_mb"]
                print(f"{tokens:>7} {path:>8} {r['peak_mb']:>9.0f} {r['seconds']:>8.1f} {ratio:>10.3f} "
                      f"{dloss:>12.2e} {dgrad:>12.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
