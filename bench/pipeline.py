"""The whole pipeline against a single-process implementation of the same algorithm, on equal work, at the real
vocabulary: seconds and tokens/s per stage, and the peak memory of each actor kind.

The model keeps the real shape where it matters for cost (`common.wide_model`: Qwen2.5-VL architecture, the real
151,665-token vocabulary with an untied 151,808-row head, width 256, 4 text layers, fp32), LoRA r64/alpha128,
one rollout per prompt; random weights, so every rollout runs to the token limit with its format broken and the
reference teacher scores every token. Ours runs `workers.driver.train` (what `launch/run.py` runs) on a local Ray
cluster; the baseline is `vigos_step` in one process (HF `generate`, the teacher in-process, the same loss) with
AdamW, run in a child process first so that its peak memory is its own. Each shape's first step warms up and is
not counted; the table gives the median of the rest.

    python bench/pipeline.py --shapes 2x128 4x256 --steps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from statistics import median

from common import REPO, peak_mb, plain_student, run_child, table, wide_model

BASE_STAGES = ["sampling", "teachers", "learner"]  # the single process's stages, in our stages' names
STAGES = ["rollout_wait", "plan", "teachers", "learner", "push"]


def overrides(path: Path, cache: Path, prompts: int, tokens: int, learners: int, mode: str) -> list[str]:
    return [f"model.path={path}", f"run.cache_dir={cache}", "data.limit=64", f"learner.workers={learners}",
            f"learner.prompts_per_step={prompts}", f"rollout.max_new_tokens={tokens}", "learner.lora.enabled=true",
            "learner.schedule=constant", "metrics.sinks=[]", f"run.mode={mode}"]  # fmt: skip


def single_process(path: Path, cache: Path, prompts: int, tokens: int, steps: int) -> dict:
    """Median seconds per stage of `vigos_step` + AdamW, and this process's peak RSS in MB."""
    import torch

    from vigos_ray.config import load_config
    from vigos_ray.models import load_model, load_processor
    from vigos_ray.preflight import prompt_stream
    from vigos_ray.step import frozen_copy, vigos_step

    cfg = load_config(overrides=overrides(path, cache, prompts, tokens, 1, "sync"))
    processor = load_processor(path, cfg.model.min_pixels, cfg.model.max_pixels)
    teacher = frozen_copy(load_model(path, "float32", "cpu"))
    student, trainable, optimizer = plain_student(path, cfg)
    stream = prompt_stream(cfg, processor)
    records = []
    for step in range(steps + 1):
        times: dict[str, float] = {}
        optimizer.zero_grad(set_to_none=True)
        result = vigos_step(student, dict.fromkeys(cfg.teacher_pools(), teacher), processor,
                            stream.next_batch(prompts), cfg, seed=step, times=times)  # fmt: skip
        times["tokens"] = sum(len(u) for u in result.plan.union)  # supervised tokens
        t0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.learner.grad_clip)
        optimizer.step()
        times["learner"] = times.pop("student") + time.perf_counter() - t0
        times["teachers"] += times.pop("plan")
        records.append(times)
    out = {k: median(r[k] for r in records[1:]) for k in BASE_STAGES}
    out["step"] = sum(out.values())
    out["tokens"] = median(r["tokens"] for r in records[1:])
    out["peak_mb"] = {"single process": peak_mb()}
    return out


def actor_peak_mb(actor) -> float:
    """Run inside an actor (`__ray_call__`): its process's peak RSS in MB."""
    return peak_mb()


def ours(path: Path, cache: Path, prompts: int, tokens: int, steps: int, learners: int, mode: str,
         extra: list[str] = ()) -> dict:  # fmt: skip
    """Median seconds per stage of the pipeline's steps, and the largest peak RSS of each actor kind."""
    from vigos_ray.config import load_config
    from vigos_ray.models import load_processor
    from vigos_ray.preflight import prompt_stream
    from workers.driver import train
    from workers.pipeline import Pipeline

    cfg = load_config(overrides=[*overrides(path, cache, prompts, tokens, learners, mode), *extra])
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, steps=steps + 1))
    processor = load_processor(path, cfg.model.min_pixels, cfg.model.max_pixels)
    pipe = Pipeline(cfg, path)
    records: list[dict] = []
    try:
        train(cfg, pipe, processor, prompt_stream(cfg, processor), records.append)
        peaks = {"rollout worker": max(pipe.rollout.call_all(actor_peak_mb)),
                 "teacher": max(p for pool in pipe.teachers.values() for p in pool.call_all(actor_peak_mb)),
                 "learner rank": max(pipe.learner.call_all(actor_peak_mb))}  # fmt: skip
    finally:
        pipe.shutdown()
    out = {k: median(r[f"time/{k}"] for r in records[1:]) for k in STAGES}
    out["step"] = median(r["time/step"] for r in records[1:])
    out["learner_rank"] = median(r["time/learner/rank"] for r in records[1:])
    out["tokens"] = median(sum(v for k, v in r.items() if k.startswith("tokens/")) for r in records[1:])
    out["peak_mb"] = peaks
    return out


def child(args) -> None:
    prompts, tokens = args.child_shape
    result = single_process(Path(args.model), Path(args.cache), prompts, tokens, args.steps)
    Path(args.out).write_text(json.dumps(result))


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["2x128", "4x256"], help="prompts x max new tokens")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["sync", "async"])
    parser.add_argument("--learners", type=int, default=1, help="learner ranks (FSDP)")
    parser.add_argument("--cache", default=str(REPO / ".cache" / "vigos"))
    parser.add_argument("overrides", nargs="*", help="config key=value for our pipeline (e.g. rollout.workers=2)")
    if "--child" in sys.argv:  # the single-process baseline, in a fresh process
        i = sys.argv.index("--child")
        shape, model, steps, cache, out = sys.argv[i + 1 : i + 6]
        args = argparse.Namespace(child_shape=tuple(int(x) for x in shape.split("x")), model=model,
                                  steps=int(steps), cache=cache, out=out)  # fmt: skip
        child(args)
        return
    args = parser.parse_args()
    cache = Path(args.cache)
    path = wide_model(cache)
    results: dict[tuple[str, str], dict] = {}
    for shape in args.shapes:
        out = cache / f"bench-pipeline-{shape}.json"
        results[(shape, "single process")] = run_child(__file__, [shape, str(path), str(args.steps), str(cache)], out)
        print(f"{shape} single process: {results[(shape, 'single process')]}", flush=True)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=10, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONPATH": str(REPO)}})  # fmt: skip
    try:
        for shape in args.shapes:
            prompts, tokens = (int(x) for x in shape.split("x"))
            for mode in args.modes:
                results[(shape, mode)] = ours(path, cache, prompts, tokens, args.steps, args.learners, mode,
                                              args.overrides)  # fmt: skip
                print(f"{shape} {mode}: {results[(shape, mode)]}", flush=True)
    finally:
        ray.shutdown()

    rows = []
    for (shape, system), r in results.items():
        if "error" in r:
            rows.append([shape, system, *["-"] * 10, r["error"]])
            continue
        prompts, tokens = (int(x) for x in shape.split("x"))
        work = prompts * tokens  # completion tokens per step (every rollout runs to the limit)
        base = results[(shape, "single process")]
        sampling = r["sampling"] if system == "single process" else r["rollout_wait"]
        teachers = r["teachers"] + r.get("plan", 0.0)
        peaks = ", ".join(f"{k} {v:,.0f}" for k, v in r["peak_mb"].items())
        rows.append([shape, system, f"{r['tokens']:.0f}", f"{sampling:.2f}", f"{work / sampling:.0f}",
                     f"{teachers:.2f}", f"{r['learner']:.2f}", f"{work / r['learner']:.0f}",
                     f"{r.get('push', 0.0):.2f}", f"{r['step']:.2f}", f"{base['step'] / r['step']:.2f}x",
                     peaks])  # fmt: skip
    table(f"pipeline step vs a single process on equal work (realistic model, LoRA r64, {args.learners} learner "
          f"rank(s), {os.cpu_count()} cores; median of {args.steps} steps after a warm-up; sampling = the wait for "
          "rollouts in ours; teachers includes planning; tokens/s = completion tokens per stage second)",
          ["batch", "system", "supervised tokens", "sampling s", "sampling tok/s", "teachers s", "learner s",
           "learner tok/s", "push s", "step s", "speed vs single", "peak RSS MB"], rows)  # fmt: skip


if __name__ == "__main__":
    main()
