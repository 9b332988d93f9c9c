"""PALR, the privileged answer leakage rate (SPEC §8): how much of a teacher's pull comes from the answer
rather than the image.

For each supervised token t of a valid rollout, with the method's active teacher q and the student p:
  s_t   = |log q(y_t) - log p(y_t)|                          how hard the teacher pulls
  c_A,t = [log q(y_t) - log mean_k q_wrong_k(y_t)]_+          answer credit (0 when q never sees the answer)
  c_I,t = [log q(y_t) - log q_cf(y_t)]_+                      image credit (q with another sample's image)
  PALR(G) = sum_G s*c_A / (sum_G s*(c_A + c_I) + eps), pooled over tokens of segment G, plus the per-rollout mean.
Student and teachers are the same initial weights; only their contexts differ.
"""

from __future__ import annotations

import dataclasses
import math
import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from vigos_ray.config import Config
from vigos_ray.data import Sample, other_image_index
from vigos_ray.objective import ContextCache, Segment, plan_batch, segment_positions, segments, teacher_row
from vigos_ray.scoring import teacher_targets
from vigos_ray.spans import TokenTable, parse_completion
from vigos_ray.types import Rollout


@dataclass(frozen=True)
class PalrResult:
    method: str
    pooled: dict[str, float]  # "description" (T_d), "reasoning" (T_ra), "response" (every token the method
    # supervises) -> PALR pooled over tokens
    per_rollout: dict[str, float]  # the same, averaged over rollouts that have tokens in the segment
    rollouts: int  # valid rollouts measured
    tokens: dict[str, int]


def wrong_answers(sample: Sample, pool: Sequence[str] | Mapping[str, Sequence[str]], k: int) -> list[str]:
    """Up to k answers other than the sample's, from `pool` (one list for every sample, or one per sample id),
    the same for a sample every time. Fewer than k only where the pool has fewer (a yes/no question has one)."""
    candidates = pool[sample.id] if isinstance(pool, Mapping) else pool
    others = sorted({a for a in candidates if a.strip().lower() != sample.answer.strip().lower()})
    if not others:
        raise ValueError(f"PALR needs a wrong answer for {sample.id}; its answer pool offers none")
    return random.Random(zlib.crc32(sample.id.encode())).sample(others, min(k, len(others)))


def answer_pools(items: Sequence[tuple[Sample, Sequence[str] | None]]) -> dict[str, list[str]]:
    """Wrong-answer candidates of the same kind as each sample's answer: the other options of a multiple-choice
    question (letters if the reference is a letter), else the answers of the dataset's questions that open with
    the same two words ("what colour", "is there", ...), else every other answer in the dataset."""
    by_stem: dict[str, set[str]] = {}
    stem = lambda s: " ".join(s.problem.lower().split()[:2])  # noqa: E731
    for sample, _ in items:
        by_stem.setdefault(stem(sample), set()).add(sample.answer)
    everything = sorted({sample.answer for sample, _ in items})
    pools = {}
    for sample, choices in items:
        if choices:
            letters = [chr(ord("A") + i) for i in range(len(choices))]
            pools[sample.id] = letters if sample.answer.strip().upper() in letters else list(choices)
        else:
            same_kind = sorted(by_stem[stem(sample)] - {sample.answer})
            pools[sample.id] = same_kind or everything
    return pools


class _Scorer:
    """log q(y_t) of the rollout tokens under the teacher contexts of one sample and its counterfactuals."""

    def __init__(self, model, processor, cfg: Config, answer_pool, k_wrong: int):
        self.model, self.cfg, self.pool, self.k_wrong = model, cfg, answer_pool, k_wrong
        self.contexts = ContextCache(processor, cfg)
        self.vocab, self.pad_id = len(processor.tokenizer), processor.tokenizer.pad_token_id or 0

    def logq(self, rows) -> list[torch.Tensor]:
        budget = self.cfg.teachers["reasoning"].token_budget
        targets = teacher_targets(self.model, rows, "sampled", self.vocab, budget, pad_id=self.pad_id)
        return [t.token_logprobs for t in targets]

    def terms(self, seg: Segment, sample: Sample, other: Sample, rollout: Rollout, sp, lp: torch.Tensor):
        """(s, c_A, c_I) for one rollout's tokens in one segment; `lp` is log p(y_t) at those tokens."""
        variants = [sample, dataclasses.replace(sample, id=f"{sample.id}#image-of-{other.id}", image=other.image)]
        sees_answer = "{answer}" in self.cfg.prompts[seg.context].template
        if sees_answer:
            wrong = wrong_answers(sample, self.pool, self.k_wrong)
            variants += [dataclasses.replace(sample, id=f"{sample.id}#wrong{k}", answer=a) for k, a in enumerate(wrong)]
        completion = list(rollout.completion_ids)
        lq, lq_cf, *lq_wrong = self.logq([teacher_row(self.contexts, seg, v, completion, sp) for v in variants])
        s = (lq - lp).abs()
        c_i = (lq - lq_cf).clamp(min=0)
        if not sees_answer:
            return s, torch.zeros_like(lq), c_i
        lq_w = torch.logsumexp(torch.stack(lq_wrong), dim=0) - math.log(len(lq_wrong))  # log of the mean prob
        return s, (lq - lq_w).clamp(min=0), c_i


@torch.no_grad()
def palr(
    model,
    processor,
    samples: Sequence[Sample],
    rollouts: Sequence[Rollout],
    cfg: Config,
    method: Literal["vigos", "opsd"],
    answer_pool: Sequence[str] | Mapping[str, Sequence[str]],
    k_wrong: int = 3,
    eps: float = 1e-8,
) -> PalrResult:
    """PALR of `method`'s teachers on the valid rollouts (q_cf: sample i with the image of the next sample that
    shows another picture)."""
    cfg = dataclasses.replace(
        cfg, loss=dataclasses.replace(cfg.loss, objective=method, divergence="kl", temperature=1.0)
    )
    table = TokenTable.for_tokenizer(processor.tokenizer)
    by_id = {s.id: s for s in samples}
    other = other_image_index([s.image for s in samples])
    following = {s.id: samples[j] for s, j in zip(samples, other, strict=True)}  # counterfactual images
    spans = [parse_completion(r.completion_ids, table, cfg.loss.span_convention) for r in rollouts]
    kept = [(r, sp) for r, sp in zip(rollouts, spans, strict=True) if sp.valid]
    plan = plan_batch(processor, by_id, [r for r, _ in kept], [sp for _, sp in kept], cfg)
    scorer = _Scorer(model, processor, cfg, answer_pool, k_wrong)
    log_p = scorer.logq(plan.student_rows)  # the student is the same initial model in its own context
    segs = [s for s in segments(cfg.loss) if s.name != "reference"]  # valid rollouts only: no reference teacher
    groups: dict[str, list[tuple[torch.Tensor, ...]]] = {"description": [], "reasoning": [], "response": []}
    for i, (rollout, sp) in enumerate(kept):
        sample = by_id[rollout.sample_id]
        other = following[sample.id]
        where = {t: k for k, t in enumerate(plan.union[i])}
        by_position: dict[int, torch.Tensor] = {}  # completion position -> (s, c_A, c_I) under its active teacher
        for seg in segs:
            positions = segment_positions(seg, sp)
            if positions:
                lp = log_p[i][[where[t] for t in positions]]
                stacked = torch.stack(scorer.terms(seg, sample, other, rollout, sp, lp), dim=1)
                by_position.update(zip(positions, stacked, strict=True))
        for name, positions in (("description", sp.description), ("reasoning", sp.reasoning),
                                ("response", sorted(by_position))):  # fmt: skip
            picked = torch.stack([by_position[t] for t in positions]) if positions else torch.zeros(0, 3)
            groups[name].append(tuple(picked.unbind(1)))
    return _summarize(method, groups, eps, len(kept))


def _summarize(method: str, groups, eps: float, n: int) -> PalrResult:
    def rate(s, c_a, c_i) -> float:
        return float((s * c_a).sum() / ((s * (c_a + c_i)).sum() + eps))

    pooled, per_rollout, tokens = {}, {}, {}
    for name, rows in groups.items():
        cat = [torch.cat([r[j] for r in rows]) if rows else torch.zeros(0) for j in range(3)]
        pooled[name] = rate(*cat)
        tokens[name] = int(cat[0].numel())
        per = [rate(*r) for r in rows if r[0].numel()]
        per_rollout[name] = sum(per) / len(per) if per else 0.0
    return PalrResult(method, pooled, per_rollout, n, tokens)


def measure_rollouts(cfg: Config, folder, items, rollouts: Sequence[Rollout], k_wrong: int = 3) -> dict:
    """PALR of both methods on `rollouts` of the model in `folder` over evaluation `items`: a JSON-ready report
    (pooled and per-rollout numbers, token counts). Raises DataError if no rollout is in format."""
    from vigos_ray.data import DataError
    from vigos_ray.models import load_model, load_processor

    processor = load_processor(folder, cfg.model.min_pixels, cfg.model.max_pixels)
    table = TokenTable.for_tokenizer(processor.tokenizer)
    valid = sum(parse_completion(r.completion_ids, table, cfg.loss.span_convention).valid for r in rollouts)
    report = {"items": len(items), "rollouts": len(rollouts), "valid_rollouts": valid, "k_wrong": k_wrong}
    if valid == 0:
        raise DataError(
            f"none of the {len(rollouts)} rollouts is in the expected format, so PALR has nothing to measure; "
            "use a model that answers in format (e.g. after the SFT warm start) or pass --rollouts"
        )
    model = load_model(folder, "float32").eval()
    samples = [it.sample for it in items]
    pools = answer_pools([(it.sample, it.choices) for it in items])
    for method in ("vigos", "opsd"):
        result = palr(model, processor, samples, rollouts, cfg, method, pools, k_wrong)
        report[method] = {"pooled": result.pooled, "per_rollout": result.per_rollout, "tokens": result.tokens}
    return report


def palr_table(report: dict) -> str:
    lines = [
        f"PALR over {report['valid_rollouts']} valid rollouts of {report['rollouts']} ({report['items']} items)",
        f"{'method':8} {'T_d':>8} {'T_ra':>8} {'response':>9}   (pooled over tokens; per-rollout mean below)",
    ]
    for method in ("vigos", "opsd"):
        for kind in ("pooled", "per_rollout"):
            v = report[method][kind]
            label = method if kind == "pooled" else ""
            lines.append(f"{label:8} {100 * v['description']:7.2f}% {100 * v['reasoning']:7.2f}% "
                         f"{100 * v['response']:8.2f}%")  # fmt: skip
    return "\n".join(lines)
