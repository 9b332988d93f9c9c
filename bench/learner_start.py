"""Learner start-up memory: the full load (every rank loads the whole fp32 model, then `fully_shard` cuts it)
against the sharded start-up (parameters on meta, each rank reads only its rows from the safetensors), at 1, 2
and 3 ranks, on the mid-size model (the real 151,808-row vocabulary, width 1024, 0.37 B parameters, 1.5 GB in
fp32: vigos_ray/tiny.py MID, built offline into the cache on first use).

Every rank is a fresh spawned process in one gloo group; its peak is ru_maxrss once `LearnerWorker.join` returns
(model, teacher heads and optimizer built), reported for the rank with the largest peak, in total and above what
the process held before `join` (imports and tokenizer). The ratio column compares with the full load at the same
rank count. `--lora` adds LoRA r64 (the teachers' head is then the student's own: no copy).

    python bench/learner_start.py [--ranks 1 2 3] [--lora]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

from common import REPO, peak_mb, rss_mb, table


def rank_main(path: str, overrides: list[str], rank: int, world: int, port: int, results) -> None:
    from vigos_ray.config import load_config
    from workers.learner import LearnerWorker

    cfg = load_config(overrides=[f"model.path={path}", f"learner.workers={world}", "learner.num_cpus=1", *overrides])
    learner = LearnerWorker(cfg, path, worker_index=rank)
    before = rss_mb()
    t0 = time.perf_counter()
    learner.join("127.0.0.1", port, world)
    seconds = time.perf_counter() - t0
    results.put({"rank": rank, "before_mb": before, "peak_mb": peak_mb(), "join_s": seconds})
    learner.shutdown()


def measure(path: str, overrides: list[str], world: int) -> dict:
    from vigos_ray.weight_sync import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=rank_main, args=(path, overrides, r, world, port, results)) for r in range(world)]
    for p in procs:
        p.start()
    ranks = [results.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    worst = max(ranks, key=lambda r: r["peak_mb"])
    return {**worst, "join_s": max(r["join_s"] for r in ranks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--lora", action="store_true", help="LoRA r64/alpha128 on the default target modules")
    args = ap.parse_args()
    from vigos_ray.tiny import ensure_mid_model

    path = str(ensure_mid_model(REPO / ".cache" / "vigos"))
    lora = ["learner.lora.enabled=true", "learner.lora.r=64", "learner.lora.alpha=128"] if args.lora else []
    rows = []
    for world in args.ranks:
        full = measure(path, ["learner.load=full", *lora], world)
        for load, m in (("full", full), ("sharded", None)):
            m = m or measure(path, [f"learner.load={load}", *lora], world)
            above, full_above = m["peak_mb"] - m["before_mb"], full["peak_mb"] - full["before_mb"]
            rows.append([world, load, f"{m['peak_mb']:.0f}", f"{m['before_mb']:.0f}", f"{above:.0f}",
                         f"{m['peak_mb'] / full['peak_mb']:.2f}x", f"{above / full_above:.2f}x",
                         f"{m['join_s']:.1f}"])  # fmt: skip
    table(
        f"Learner start-up, mid-size model (0.37 B, fp32){', LoRA r64' if args.lora else ''}: the largest rank's peak",
        ["ranks", "load", "peak RSS MB", "before join MB", "join's own MB", "peak vs full", "own vs full", "join s"],
        rows,
    )


if __name__ == "__main__":
    main()
