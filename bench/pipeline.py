"""The pipeline on this machine: per-stage time of a step, sync vs async steps per second, and the bytes per
supervised token that cross actors in each teacher payload mode (vs shipping full logits).

Stages and steps run through the real actors (vLLM rollout worker, teacher pools, FSDP learner ranks) on a local
Ray cluster with the tiny model. Payload bytes are the pickled size of what each teacher would ship for the same
scored rows, measured on the tiny model with the real Qwen2.5 vocabulary (151,665 tokens).

    python bench/pipeline.py --steps 4 --prompts 4
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import sys
import time
from pathlib import Path
from statistics import fmean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def table(title: str, header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) + " |")


def payload_bytes(cache: Path, prompts: int, max_new_tokens: int) -> None:
    """Bytes per scored token of each payload for rows of real student rollouts, vs full fp32 logits."""
    from vigos_ray.config import load_config
    from vigos_ray.driver import prompt_stream
    from vigos_ray.models import load_model, load_processor, sampling_token_ids
    from vigos_ray.objective import plan_batch
    from vigos_ray.sampling import banned_rows, hf_rollouts
    from vigos_ray.scoring import pool_targets
    from vigos_ray.spans import TokenTable, parse_completion
    from vigos_ray.tiny import ensure_tiny_model

    path = ensure_tiny_model(cache, "qwen_vocab")
    base = [f"model.path={path}", f"run.cache_dir={cache}", "data.limit=64", "model.max_pixels=12544",
            f"rollout.max_new_tokens={max_new_tokens}"]  # fmt: skip
    cfg = load_config(overrides=base)
    processor = load_processor(path, cfg.model.min_pixels, cfg.model.max_pixels)
    model = load_model(path)
    samples = prompt_stream(cfg, processor).next_batch(prompts)
    banned = banned_rows(model, sampling_token_ids(processor.tokenizer))
    rollouts = hf_rollouts(model, processor, samples, cfg, 0, banned)
    tokens_table = TokenTable.for_tokenizer(processor.tokenizer)
    spans = [parse_completion(r.completion_ids, tokens_table) for r in rollouts]
    # The tiny model's random weights give invalid rollouts: score every completion token with the reference
    # teacher, the segment an untrained model actually produces.
    plan = plan_batch(processor, {s.id: s for s in samples}, rollouts, spans, cfg)
    rows = plan.teacher_rows["reference"]
    tokens = sum(len(r.scored) for r in rows)
    vocab = len(processor.tokenizer)
    full = tokens * vocab * 4
    out = [["full logits (fp32, not shipped)", f"{full / tokens:,.0f}", "1.0"]]
    for payload in ("hidden", "topk", "sampled"):
        pcfg = load_config(overrides=[*base, f"teachers.payload={payload}",
                                      *(["loss.divergence=sampled_rkl"] if payload == "sampled" else [])])  # fmt: skip
        targets = pool_targets(model, rows, pcfg, "reference", vocab, processor.tokenizer.pad_token_id)
        size = len(pickle.dumps(targets))
        out.append([f"{payload}" + (f" (k={pcfg.teachers.topk})" if payload == "topk" else ""),
                    f"{size / tokens:,.0f}", f"1/{full / size:,.0f}"])  # fmt: skip
    d, v = model.config.text_config.hidden_size, vocab
    table(f"Payload bytes per supervised token ({tokens} tokens, vocab {v:,}, hidden size {d}; "
          f"at Qwen2.5-VL-3B's d=2048 in bf16 `hidden` is 4,096 B vs 606,660 B, 1/148)",
          ["payload", "bytes/token", "vs full logits"], out)  # fmt: skip


def pipeline_steps(cache: Path, steps: int, prompts: int, max_new_tokens: int) -> None:
    import ray

    from vigos_ray.config import load_config
    from vigos_ray.driver import prompt_stream, train
    from vigos_ray.models import load_processor
    from vigos_ray.pipeline import Pipeline
    from vigos_ray.tiny import ensure_tiny_model

    path = ensure_tiny_model(cache, "fast")
    cfg = load_config(overrides=[
        f"model.path={path}", f"run.cache_dir={cache}", "data.limit=256", f"learner.prompts_per_step={prompts}",
        f"rollout.max_new_tokens={max_new_tokens}", f"run.steps={steps}", "learner.schedule=constant",
    ])  # fmt: skip
    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}})  # fmt: skip
    processor = load_processor(path, cfg.model.min_pixels, cfg.model.max_pixels)
    pipe = Pipeline(cfg, path)
    results = {}
    try:
        for mode in ("sync", "async", "sync", "async"):  # each twice, interleaved; the first pair warms up
            run_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, mode=mode, max_staleness=1))
            records: list[dict] = []
            t0 = time.perf_counter()
            train(run_cfg, pipe, processor, prompt_stream(run_cfg, processor), records.append)
            results[mode] = (steps / (time.perf_counter() - t0), records)
    finally:
        pipe.shutdown()
        ray.shutdown()
    stages = ["rollout_wait", "plan", "teachers", "learner", "push"]
    rows = []
    for mode, (rate, records) in results.items():
        mean = {s: fmean(r[f"time/{s}"] for r in records) for s in stages}
        step = fmean(r["time/step"] for r in records)
        rows.append([mode, *(f"{mean[s]:.3f}" for s in stages), f"{step:.3f}", f"{rate:.2f}",
                     f"{rate / results['sync'][0]:.2f}x"])  # fmt: skip
    table(f"Pipeline step on the tiny model ({prompts} prompts, <= {max_new_tokens} new tokens, 1 vLLM rollout "
          f"worker, 3 teacher pools, 2 FSDP learner ranks, {os.cpu_count()} cores); seconds per stage, mean of "
          f"{steps} steps", ["mode", *stages, "step", "steps/s", "vs sync"], rows)  # fmt: skip
    push = fmean(r["push/seconds"] for r in results["sync"][1])
    nbytes = results["sync"][1][0]["push/bytes"]
    print(f"\nweight push ({cfg.weight_sync.transport}): {nbytes / 1e6:.2f} MB in {push * 1e3:.1f} ms per step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--cache", default=".cache/vigos")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cache = Path(args.cache)
    payload_bytes(cache, args.prompts, args.max_new_tokens)
    pipeline_steps(cache, args.steps, args.prompts, args.max_new_tokens)


if __name__ == "__main__":
    main()
