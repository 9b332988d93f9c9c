"""The ViGOS loop on Ray: prompts -> rollouts -> spans -> teacher targets -> train step -> weight push -> log.

Today the loop runs its first stage for real (student rollouts from vLLM rollout actors on real easy-VQA
prompts) and stops there, saying so; teachers, learner and weight push arrive with the pipeline issue (#4).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from vigos_ray.config import Config, save_config
from vigos_ray.data import PromptStream, read_files
from vigos_ray.easyvqa import write_easyvqa_jsonl
from vigos_ray.models import load_processor, resolve_model_path
from vigos_ray.prompts import encode, student_text

log = logging.getLogger(__name__)


def prompt_stream(cfg: Config, model_path: Path, split: str = "train") -> PromptStream:
    cache = Path(cfg.run.cache_dir)
    if cfg.data.source == "easyvqa":
        files = [str(write_easyvqa_jsonl(cache / "data", "train" if split == "train" else "test"))]
    else:
        files = cfg.data.train_files if split == "train" else cfg.data.eval_files
    processor = load_processor(model_path, cfg.model.min_pixels, cfg.model.max_pixels)
    prompt_tokens = lambda s: len(encode(processor, student_text(processor, s.problem, cfg.prompts), s.image).input_ids)  # noqa: E731
    return PromptStream(
        read_files(files, cfg.data.limit), seed=cfg.run.seed, shuffle=cfg.data.shuffle,
        on_bad_record=cfg.data.on_bad_record, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels,
        max_prompt_tokens=cfg.data.max_prompt_tokens, prompt_tokens=prompt_tokens,
    )  # fmt: skip


def run(cfg: Config) -> Path:
    """Run the job described by `cfg`; returns the run directory."""
    from workers.group import WorkerGroup
    from workers.rollout import RolloutWorker

    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    model_path = resolve_model_path(cfg.model, cfg.run.cache_dir, seed=cfg.run.seed).resolve()
    prompts = prompt_stream(cfg, model_path)

    t0 = time.perf_counter()
    rollout = WorkerGroup(RolloutWorker, cfg.rollout.workers, cfg.rollout.num_cpus, cfg.rollout.num_gpus,
                          args=(cfg, str(model_path)), name="rollout")  # fmt: skip
    started = time.perf_counter() - t0

    samples = prompts.next_batch(cfg.learner.prompts_per_step)
    t0 = time.perf_counter()
    rollouts = rollout.scatter("generate", samples, seed=cfg.run.seed)
    elapsed = time.perf_counter() - t0
    with (run_dir / "rollouts-step0.jsonl").open("w") as f:
        for r in rollouts:
            f.write(json.dumps(asdict(r)) + "\n")
    tokens = sum(len(r.completion_ids) for r in rollouts)
    log.info("rollout workers up in %.1f s; %d rollouts, %d tokens in %.2f s (%.1f tok/s)",
             started, len(rollouts), tokens, elapsed, tokens / max(elapsed, 1e-9))  # fmt: skip
    for r in rollouts[:2]:
        log.info("sample %s (v%d, %s): %r", r.sample_id, r.version, r.finish_reason, r.text[:160])
    log.warning(
        "stopping after the rollout stage: teacher scoring, the learner and weight push are not built yet "
        "(issue #4); no training happened. Rollouts written to %s",
        run_dir / "rollouts-step0.jsonl",
    )
    rollout.shutdown()
    return run_dir
