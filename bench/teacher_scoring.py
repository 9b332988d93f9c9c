"""Teacher scoring: our path vs a naive one on the same rollouts (tokens the loss needs, per second; peak memory).

Ours (vigos_ray.objective.plan_batch + vigos_ray.scoring.teacher_targets): each teacher scores only its own
segment's tokens (the perception teacher's row stops where the description ends, the reference teacher runs on
broken rollouts only), rows packed by token budget longest first, the output head applied at scored positions only
(`hidden` ships the hidden state and applies no head at all; `topk` applies it there).
Naive: every teacher on every rollout with its full context and the whole completion, fixed batches of 8 padded to
their longest row, full-vocabulary logits at every position, then log-softmax and top-k at the completion's tokens.

Tiny Qwen2.5-VL architecture with the real 151,665-token vocabulary (so the head is as wide as the real one), fp32,
easy-VQA prompts, half the rollouts in format. Each case runs in its own process.

    python bench/teacher_scoring.py --rollouts 16 --words 40
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import REPO, peak_mb, rss_mb, run_child, synthetic_rollouts, table

CONTEXTS = ("perception", "reasoning", "reference")


def setup(n: int, words: int, cache: str):
    from vigos_ray.config import load_config
    from vigos_ray.data import PromptStream, read_records
    from vigos_ray.easyvqa import write_easyvqa_jsonl
    from vigos_ray.models import load_model, load_processor
    from vigos_ray.objective import plan_batch
    from vigos_ray.spans import TokenTable, parse_completion
    from vigos_ray.tiny import ensure_tiny_model

    path = ensure_tiny_model(cache, "qwen_vocab")
    cfg = load_config(overrides=[f"model.path={path}", f"run.cache_dir={cache}", "model.max_pixels=12544"])
    processor = load_processor(path, cfg.model.min_pixels, cfg.model.max_pixels)
    records = read_records(write_easyvqa_jsonl(Path(cache) / "data", "test"))[: 4 * n]
    samples = PromptStream(records, seed=0, max_pixels=cfg.model.max_pixels).next_batch(n)
    rollouts = synthetic_rollouts(samples, processor, cfg, words=words)
    table_ = TokenTable.for_tokenizer(processor.tokenizer)
    spans = [parse_completion(r.completion_ids, table_, cfg.loss.span_convention) for r in rollouts]
    plan = plan_batch(processor, {s.id: s for s in samples}, rollouts, spans, cfg)
    model = load_model(path, "float32").eval()
    return cfg, processor, samples, rollouts, spans, plan, model


def ours(cfg, plan, model, vocab: int, payload: str) -> dict:
    from vigos_ray.scoring import teacher_targets

    rows = padded = scored = 0
    for seg in plan.segments:
        seg_rows = plan.teacher_rows.get(seg.name, [])
        if not seg_rows:
            continue
        budget = cfg.teachers[seg.teacher].token_budget
        teacher_targets(model, seg_rows, payload, vocab, budget, cfg.scoring.topk, pad_id=0)
        rows += len(seg_rows)
        padded += sum(len(r.input_ids) for r in seg_rows)
        scored += sum(len(r.scored) for r in seg_rows) if payload != "hidden" else 0
    return {"rows": rows, "tokens": padded, "logit_positions": scored}


def naive(cfg, processor, samples, rollouts, model, vocab: int, batch: int = 8) -> dict:
    import torch
    import torch.nn.functional as F

    from vigos_ray.objective import ContextCache

    contexts = ContextCache(processor, cfg)
    by_id = {s.id: s for s in samples}
    rows = []
    for r in rollouts:
        for name in CONTEXTS:  # every teacher, every rollout, full context + whole completion
            ctx = contexts.get(by_id[r.sample_id], name)
            rows.append((ctx, list(ctx.input_ids) + list(r.completion_ids), len(ctx.input_ids)))
    padded = positions = 0
    with torch.no_grad():
        for lo in range(0, len(rows), batch):
            chunk = rows[lo : lo + batch]
            width = max(len(ids) for _, ids, _ in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, (_, row, _) in enumerate(chunk):
                ids[b, : len(row)], mask[b, : len(row)] = torch.tensor(row), 1
            logits = model(input_ids=ids, attention_mask=mask,
                           pixel_values=torch.cat([c.pixel_values for c, _, _ in chunk]),
                           image_grid_thw=torch.cat([c.image_grid_thw for c, _, _ in chunk])).logits  # fmt: skip
            lp = F.log_softmax(logits[..., :vocab].float(), dim=-1)  # [B, T, V] at every position
            for b, (_, row, start) in enumerate(chunk):
                lp[b, start - 1 : len(row) - 1].topk(cfg.scoring.topk, dim=-1)
            padded += ids.numel()
            positions += ids.numel()
    return {"rows": len(rows), "tokens": padded, "logit_positions": positions}


def child(case: str, n: int, words: int, cache: str, out: str) -> None:
    import torch

    torch.manual_seed(0)
    cfg, processor, samples, rollouts, spans, plan, model = setup(n, words, cache)
    vocab = len(processor.tokenizer)
    needed = sum(len(p) for positions in plan.positions.values() for p in positions)  # tokens the loss uses
    warm = plan_warmup(plan)
    ours(cfg, warm, model, vocab, "topk")  # kernels and allocator warmed on a small plan, outside the measurement
    base = rss_mb()
    t0 = time.perf_counter()
    if case == "naive":
        stats = naive(cfg, processor, samples, rollouts, model, vocab)
    else:
        stats = ours(cfg, plan, model, vocab, case.split("-")[1])
    seconds = time.perf_counter() - t0
    stats |= {"seconds": seconds, "needed": needed, "peak_mb": peak_mb() - base}
    Path(out).write_text(json.dumps(stats))


def plan_warmup(plan):
    import dataclasses

    rows = {name: r[:1] for name, r in plan.teacher_rows.items()}
    return dataclasses.replace(plan, teacher_rows=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollouts", type=int, default=16)
    ap.add_argument("--words", type=int, default=40, help="about this many words per description and reasoning")
    ap.add_argument("--cache", default=str(REPO / ".cache" / "vigos"))
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        case, n, words, cache, out = args.child
        return child(case, int(n), int(words), cache, out)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in ("naive", "ours-topk", "ours-hidden"):
            results[case] = run_child(__file__, [case, str(args.rollouts), str(args.words), args.cache],
                                      Path(tmp) / f"{case}.json")  # fmt: skip
    base = results["naive"]
    rows = []
    for case, r in results.items():
        if "error" in r:
            rows.append([case, r["error"], "", "", "", "", "", "", ""])
            continue
        rate = r["needed"] / r["seconds"]
        rows.append([case, r["rows"], f"{r['tokens']:,}", f"{r['logit_positions']:,}", f"{r['seconds']:.2f}",
                     f"{rate:,.0f}", f"{r['peak_mb']:.0f}", f"{rate / (base['needed'] / base['seconds']):.2f}x",
                     f"{r['peak_mb'] / max(base['peak_mb'], 1):.3f}"])  # fmt: skip
    table(f"teacher scoring of {args.rollouts} rollouts (half in format), tiny Qwen2.5-VL with the 151,665-token "
          f"vocabulary, fp32, {base.get('needed', 0):,} tokens the loss needs",
          ["path", "rows", "tokens forwarded", "positions with logits", "seconds", "needed tok/s", "peak MB",
           "tok/s vs naive", "memory vs naive"], rows)  # fmt: skip


if __name__ == "__main__":
    main()
