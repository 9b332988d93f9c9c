"""Bytes that cross actors: per supervised token in each teacher payload mode, against full-vocabulary logits;
and per step into each learner rank.

The pickled size of what a teacher ships for the same scored rows of real rollouts (sampled by HF generate from
the tiny model with the real 151,665-token Qwen2.5 vocabulary), and of each rank's `TrainBatch` for a batch of
half valid, half broken rollouts (all three teachers at work), with and without the teachers' own rows.

    python bench/payload.py --prompts 4 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

from common import REPO, table


def payload_bytes(cache: Path, prompts: int, max_new_tokens: int) -> None:
    """Bytes per scored token of each payload for rows of real student rollouts, vs full fp32 logits."""
    from vigos_ray.config import load_config
    from vigos_ray.models import load_model, load_processor, sampling_token_ids
    from vigos_ray.objective import plan_batch
    from vigos_ray.preflight import prompt_stream
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
        pcfg = load_config(overrides=[*base, f"scoring.payload={payload}",
                                      *(["loss.divergence=sampled_rkl"] if payload == "sampled" else [])])  # fmt: skip
        targets = pool_targets(model, rows, pcfg, "reference", vocab, processor.tokenizer.pad_token_id)
        size = len(pickle.dumps(targets))
        out.append([f"{payload}" + (f" (k={pcfg.scoring.topk})" if payload == "topk" else ""),
                    f"{size / tokens:,.0f}", f"1/{full / size:,.0f}"])  # fmt: skip
    d, v = model.config.text_config.hidden_size, vocab
    table(f"Payload bytes per supervised token ({tokens} tokens, vocab {v:,}, hidden size {d}; "
          f"at Qwen2.5-VL-3B's d=2048 in bf16 `hidden` is 4,096 B vs 606,660 B, 1/148)",
          ["payload", "bytes/token", "vs full logits"], out)  # fmt: skip


def learner_bytes(cache: Path, prompts: int, ranks: int = 2) -> None:
    """Bytes each learner rank receives for one step (its pickled TrainBatch), against the same batch carrying the
    teachers' rows too (their contexts and pixels, which the learner never reads: what `select` sent before)."""
    from common import synthetic_rollouts

    from vigos_ray.batching import split_batch
    from vigos_ray.config import load_config
    from vigos_ray.models import load_model, load_processor
    from vigos_ray.objective import plan_batch
    from vigos_ray.preflight import prompt_stream
    from vigos_ray.scoring import pool_targets
    from vigos_ray.spans import TokenTable, parse_completion
    from vigos_ray.tiny import ensure_tiny_model

    path = ensure_tiny_model(cache, "qwen_vocab")
    cfg = load_config(overrides=[f"model.path={path}", f"run.cache_dir={cache}", "data.limit=64"])
    processor = load_processor(path, cfg.model.min_pixels, cfg.model.max_pixels)
    model, vocab, pad = load_model(path), len(processor.tokenizer), processor.tokenizer.pad_token_id
    samples = prompt_stream(cfg, processor).next_batch(prompts)
    rollouts = synthetic_rollouts(samples, processor, cfg)
    table_ = TokenTable.for_tokenizer(processor.tokenizer)
    spans = [parse_completion(r.completion_ids, table_) for r in rollouts]
    plan = plan_batch(processor, {s.id: s for s in samples}, rollouts, spans, cfg)
    targets = {seg.name: pool_targets(model, plan.teacher_rows[seg.name], cfg, seg.teacher, vocab, pad)
               for seg in plan.segments if plan.teacher_rows.get(seg.name)}  # fmt: skip
    out = []
    for rank, batch in enumerate(split_batch(plan, targets, ranks, cfg.learner.micro_token_budget)):
        now = len(pickle.dumps(batch))
        mine = {i for micro in batch.micro for i in micro.rollouts}
        rows = [row for name, rs in plan.teacher_rows.items() for row, i in zip(rs, plan.row_rollout[name],
                                                                                 strict=True) if i in mine]  # fmt: skip
        before = now + len(pickle.dumps(rows))
        out.append([rank, len(mine), f"{before / 2**20:.2f}", f"{now / 2**20:.2f}", f"{now / before:.2f}"])
    table(f"Bytes a learner rank receives per step ({prompts} rollouts, {ranks} ranks, max_pixels "
          f"{cfg.model.max_pixels:,}, `{cfg.scoring.payload}` payloads)",
          ["rank", "rollouts", "with teacher rows (MB)", "now (MB)", "ratio"], out)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--cache", default=str(REPO / ".cache" / "vigos"))
    args = parser.parse_args()
    payload_bytes(Path(args.cache), args.prompts, args.max_new_tokens)
    learner_bytes(Path(args.cache), args.prompts)


if __name__ == "__main__":
    main()
