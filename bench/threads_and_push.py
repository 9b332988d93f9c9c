"""Two settings of a training step at the real vocabulary: torch threads per actor (`run.cpu_threads`: 1, as Ray
leaves a `num_cpus=1` actor, against auto) and delta weight pushes (`weight_sync.delta`: after the first push
only the blocks LoRA trains travel), at 1 and 2 learner ranks, sync and async.

The model keeps the real shape where it matters for cost: Qwen2.5-VL architecture, the 151,665-token Qwen
vocabulary (151,808 head rows, untied), width 256, 4 text layers, fp32, LoRA r64/alpha128; random weights, so
every rollout runs to the token limit and only the reference teacher scores. Threads are set when the actors
start, so each (learner ranks, threads, mode) gets its own pipeline; delta off vs on share one. The first step of
each pipeline warms up and is not counted.

    python bench/threads_and_push.py --steps 2 --prompts 2 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from statistics import fmean

from common import REPO, table, wide_model

STAGES = ["rollout_wait", "teachers", "learner", "push"]


def measure(path: Path, cache: Path, learners: int, threads: int, mode: str, args) -> dict[bool, list[dict]]:
    """Step records of one pipeline: {delta: records}; sync runs with delta off and on, async with delta on."""
    from vigos_ray.config import load_config
    from vigos_ray.models import load_processor
    from vigos_ray.preflight import prompt_stream
    from workers.driver import train
    from workers.pipeline import Pipeline

    cfg = load_config(overrides=[
        f"model.path={path}", f"run.cache_dir={cache}", "data.limit=64", f"learner.workers={learners}",
        f"learner.prompts_per_step={args.prompts}", f"rollout.max_new_tokens={args.max_new_tokens}",
        "learner.lora.enabled=true", f"run.cpu_threads={threads}", f"run.mode={mode}", "learner.schedule=constant",
        "metrics.sinks=[]",
    ])  # fmt: skip
    processor = load_processor(path, cfg.model.min_pixels, cfg.model.max_pixels)
    pipe = Pipeline(cfg, path)
    out: dict[bool, list[dict]] = {}
    try:
        warm = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, steps=1))
        train(warm, pipe, processor, prompt_stream(warm, processor), lambda record: None)
        for delta in (False, True) if mode == "sync" else (True,):
            run_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, steps=args.steps),
                                          weight_sync=dataclasses.replace(cfg.weight_sync, delta=delta))  # fmt: skip
            pipe.cfg = run_cfg  # the push reads `weight_sync.delta` from the pipeline's config
            out[delta] = []
            train(run_cfg, pipe, processor, prompt_stream(run_cfg, processor), out[delta].append)
    finally:
        pipe.shutdown()
    return out


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--learners", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="run.cpu_threads; 0 = auto")
    parser.add_argument("--cache", default=str(REPO / ".cache" / "vigos"))
    args = parser.parse_args()
    cache = Path(args.cache)
    path = wide_model(cache)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=10, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONPATH": str(REPO)}})  # fmt: skip
    results: dict[tuple, list[dict]] = {}
    try:
        for learners in args.learners:
            for mode in ("sync", "async"):
                for threads in args.threads:
                    for delta, records in measure(path, cache, learners, threads, mode, args).items():
                        results[(learners, mode, delta, threads)] = records
    finally:
        ray.shutdown()

    rows = []
    for (learners, mode, delta, threads), records in results.items():
        mean = {s: fmean(r[f"time/{s}"] for r in records) for s in STAGES}
        step = fmean(r["time/step"] for r in records)
        one_thread = fmean(r["time/step"] for r in results[(learners, mode, delta, args.threads[0])])
        full = results.get((learners, mode, False, threads))
        push_ratio = f"{fmean(r['time/push'] for r in full) / mean['push']:.2f}x" if full and delta else "-"
        rows.append([learners, mode, "auto" if threads == 0 else threads, "on" if delta else "off",
                     *(f"{mean[s]:.2f}" for s in STAGES), f"{step:.2f}", f"{records[-1]['push/bytes'] / 1e6:.1f}",
                     f"{one_thread / step:.2f}x", push_ratio])  # fmt: skip
    table(f"step at the real vocabulary (width 256, 4 layers, LoRA r64; {args.prompts} prompts x <= "
          f"{args.max_new_tokens} new tokens, 3 teacher pools, {os.cpu_count()} cores): seconds per stage, mean of "
          f"{args.steps} steps after a warm-up step; 'vs 1 thread' = step time at run.cpu_threads={args.threads[0]} "
          "/ this row's; 'push vs full' = full push seconds / delta push seconds",
          ["learner ranks", "mode", "threads", "delta push", *STAGES, "step", "push MB", "vs 1 thread",
           "push vs full"], rows)  # fmt: skip


if __name__ == "__main__":
    main()
