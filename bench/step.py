"""A pipeline step on this machine: seconds per stage, sync vs async, with 1 and 2 rollout workers, and how much of
a step is driver and Ray overhead rather than work.

Stages run through the real actors (vLLM rollout workers, three teacher pools, 2 FSDP learner ranks) on a local
Ray cluster with the tiny model, through `workers.driver.train`. Each mode runs twice, interleaved; the first
pass warms up. Overhead = the driver's own work (`plan`: parsing spans and building teacher rows) + moving the
step's real payloads through Ray (rollouts back, targets out and back, learner batches out: each echoed through a
no-op actor) + one round trip per remote call the step makes; as a share of the step's seconds.

    python bench/step.py --steps 4 --prompts 4
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from statistics import fmean

from common import REPO, table

STAGES = ["rollout_wait", "plan", "teachers", "learner", "push"]  # seconds per step (the push: on the critical path)


class Echo:
    def back(self, x):
        return x


def capture(pipe) -> dict:
    """Wrap the pipeline's stage verbs so the bench sees the objects a step moves."""
    seen: dict = {}
    score, train_ = pipe.score, pipe.train

    def score_and_keep(plan):
        targets, seconds = score(plan)
        seen["rows"], seen["targets"] = plan.teacher_rows, targets
        return targets, seconds

    def train_and_keep(plan, targets, keep: int = 0):
        from vigos_ray.batching import split_batch

        seen["batches"] = split_batch(plan, targets, len(pipe.learner.actors), pipe.cfg.learner.micro_token_budget)
        return train_(plan, targets, keep=keep)

    pipe.score, pipe.train = score_and_keep, train_and_keep
    return seen


def ray_overhead(seen: dict, rollouts: list, calls: int, repeats: int = 5) -> float:
    """Seconds to move one step's payloads through Ray and make its calls, measured with a no-op actor."""
    import ray

    echo = ray.remote(num_cpus=0)(Echo).remote()
    ray.get(echo.back.remote(None))

    def best(fn) -> float:
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return min(out)

    moves = best(lambda: ray.get([echo.back.remote(rollouts), echo.back.remote(seen["rows"]),
                                  echo.back.remote(seen["targets"]), echo.back.remote(seen["batches"])]))  # fmt: skip
    rtt = best(lambda: ray.get(echo.back.remote(None)))
    ray.kill(echo)
    return moves + calls * rtt


def run_modes(cache: Path, workers: int, steps: int, prompts: int, max_new_tokens: int) -> list[list]:
    from vigos_ray.config import load_config
    from vigos_ray.models import load_processor
    from vigos_ray.preflight import prompt_stream
    from vigos_ray.tiny import ensure_tiny_model
    from workers.driver import train
    from workers.pipeline import Pipeline

    path = ensure_tiny_model(cache, "fast")
    cfg = load_config(overrides=[
        f"model.path={path}", f"run.cache_dir={cache}", "data.limit=256", f"learner.prompts_per_step={prompts}",
        f"rollout.max_new_tokens={max_new_tokens}", f"run.steps={steps}", "learner.schedule=constant",
        f"rollout.workers={workers}", "metrics.sinks=[]",
    ])  # fmt: skip
    processor = load_processor(path, cfg.model.min_pixels, cfg.model.max_pixels)
    pipe = Pipeline(cfg, path)
    seen = capture(pipe)
    results = {}
    modes = [("sync", "gloo"), ("async", "gloo"), ("async", "object_store")]
    try:
        for mode, transport in modes + modes:  # each twice, interleaved; the first round warms up
            run_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, mode=mode, max_staleness=1))
            if pipe.pusher.transport != transport:  # the push group re-formed on this transport
                pipe.pusher.form_group(transport)
            records: list[dict] = []
            t0 = time.perf_counter()
            train(run_cfg, pipe, processor, prompt_stream(run_cfg, processor), records.append)
            results[(mode, transport)] = (steps / (time.perf_counter() - t0), records)
        samples = prompt_stream(cfg, processor).next_batch(prompts)
        rollouts = pipe.generate_async(samples, seed=0).result()
        # calls per step: a generate per rollout worker, a score per teacher worker, a train_step per rank, a push
        # per rank and a receive per rollout worker
        calls = 2 * workers + sum(len(p.actors) for p in pipe.teachers.values()) + 2 * len(pipe.learner.actors)
        overhead = ray_overhead(seen, rollouts, calls)
    finally:
        pipe.shutdown()
    rows = []
    for (mode, transport), (rate, records) in results.items():
        mean = {s: fmean(r[f"time/{s}"] for r in records) for s in STAGES}
        step = fmean(r["time/step"] for r in records)
        share = (mean["plan"] + overhead) / step
        rows.append([workers, mode, transport, *(f"{mean[s]:.3f}" for s in STAGES), f"{step:.3f}", f"{rate:.2f}",
                     f"{rate / results[modes[0]][0]:.2f}x", f"{100 * share:.1f}%"])  # fmt: skip
    return rows


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="rollout workers")
    parser.add_argument("--cache", default=str(REPO / ".cache" / "vigos"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=10, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONPATH": str(REPO)}})  # fmt: skip
    rows = []
    try:
        for workers in args.workers:
            rows += run_modes(Path(args.cache), workers, args.steps, args.prompts, args.max_new_tokens)
    finally:
        ray.shutdown()
    table(f"pipeline step, tiny model ({args.prompts} prompts, <= {args.max_new_tokens} new tokens, 3 teacher "
          f"pools, 2 FSDP learner ranks, {os.cpu_count()} cores): seconds per stage, mean of {args.steps} steps; "
          "'vs sync' at the same rollout workers; overhead = driver work + Ray data movement and calls / step",
          ["rollout workers", "mode", "push", *STAGES, "step", "steps/s", "vs sync", "overhead"], rows)  # fmt: skip


if __name__ == "__main__":
    main()
