"""Decode-step time of vLLM's CPU engine at the real vocabulary, by how top-p is applied.

The #16 model (Qwen2.5-VL architecture, width 256, 4 layers, the 151,808-row untied head, fp32), one engine in this
process, 4 text prompts decoding exactly `--steps` tokens each with the rollout worker's settings (temperature 1.1,
top-k 20, top-p 0.95, log-probs, the ban list as `allowed_token_ids`); each case timed on its second identical
call. Baseline: vLLM's own top-p (a sort of the whole vocabulary per step on CPU); ours: top-p among the top-k
survivors (workers/top_p.py), as the rollout worker samples on CPU.

    python bench/sampling.py --steps 128
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from common import REPO, table, wide_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--cache", default=str(REPO / ".cache" / "vigos"))
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from vigos_ray.models import load_processor, sampling_token_ids
    from workers.top_p import KEY, TopPAmongTopK

    path = wide_model(Path(args.cache))
    allowed = sampling_token_ids(load_processor(path, 3136, 12544).tokenizer)
    llm = LLM(model=str(path), dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
              kv_cache_memory_bytes=256 * 2**20, limit_mm_per_prompt={"image": 0, "video": 0},
              logits_processors=[TopPAmongTopK])  # fmt: skip
    prompts = [{"prompt_token_ids": list(range(100 + 10 * i, 140 + 10 * i))} for i in range(4)]
    common = dict(temperature=1.1, top_k=20, logprobs=0, allowed_token_ids=allowed, max_tokens=args.steps,
                  min_tokens=args.steps)  # fmt: skip
    cases = {
        "vLLM's top-p (full sort), baseline": dict(top_p=0.95),
        "top-p among the top-k (ours)": dict(top_p=1.0, extra_args={KEY: (20, 0.95)}),
        "no top-p (floor)": dict(top_p=1.0),
    }
    rows, base = [], None
    for name, extra in cases.items():
        params = [SamplingParams(seed=i, **common, **extra) for i in range(len(prompts))]
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        ms = 1000 * (time.perf_counter() - t0) / args.steps
        base = base or ms
        rows.append([name, f"{ms:.1f}", f"{base / ms:.2f}x"])
    table(f"vLLM CPU decode step, {len(prompts)} sequences x {args.steps} tokens, vocabulary 151,808 (fp32)",
          ["top-p", "ms / decode step", "speed-up"], rows)  # fmt: skip


if __name__ == "__main__":
    main()
