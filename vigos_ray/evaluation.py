"""Evaluation: benchmark records -> n sampled responses per item -> Pass@k, Avg@k, format and grounding numbers.

Records come from two adapters: `easyvqa` (the embedded easy-VQA test split) and `jsonl`, MathVista/MMMU-style
JSONL or Parquet (`question` or `problem`, `answer`, `image` or `image_b64`, optional `choices` list and
`prior_conflict` flag). Multiple-choice options are appended to the question as "(A) ..." lines. Sampling goes
through the same vLLM engine code as training rollouts (workers/rollout.py), with the evaluation's decoding.

Numbers, per SPEC §9: Avg@k is the mean correctness of k samples per item; Pass@k the unbiased estimator
1 - C(n-c, k) / C(n, k) over n >= k samples with c correct. A response with no answer to extract is unparseable:
counted apart and graded wrong. The grounding probe samples every item again with the image of the next item
that shows another picture: image sensitivity = accuracy with the true image - accuracy with the mismatched one.
Where records carry `prior_conflict`, accuracy is also split into conflicting (ViLP's Score) and consistent items;
where they also carry `prior_answer` (the answer a text prior suggests), the share of samples on conflicting items
that give that answer is reported as `follows_prior`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vigos_ray.config import Config
from vigos_ray.data import DataError, Sample, decode_record, other_image_index, read_files
from vigos_ray.grading import extract_answer, grade
from vigos_ray.spans import TokenTable, parse_completion
from vigos_ray.types import Decoding, Rollout

log = logging.getLogger(__name__)

# Benchmarks whose answers are graded by an LLM judge: we do not call a judge service, so we say so and stop.
JUDGED = {
    "mmvet": "MM-Vet grades free-form answers with a GPT-4 judge",
    "llava-bench": "LLaVA-Bench grades answers with a GPT-4 judge",
    "mathverse-judged": "MathVerse's judged setting asks a GPT-4 judge to extract and grade answers",
}


class JudgeRequired(ValueError):
    """The benchmark needs an LLM judge that this evaluation does not call."""


@dataclass(frozen=True)
class EvalItem:
    sample: Sample
    choices: tuple[str, ...] | None = None
    prior_conflict: bool | None = None
    prior_answer: str | None = None  # the answer a text prior suggests (shortcut-prone data): who follows it


def check_benchmark(name: str) -> None:
    if name.lower() in JUDGED:
        raise JudgeRequired(
            f"benchmark '{name}' needs an LLM judge ({JUDGED[name.lower()]}); this evaluation is rule-based only. "
            "Grade its responses with the benchmark's own judge, or pick a rule-graded benchmark."
        )


def with_choices(question: str, choices: Sequence[str]) -> str:
    lines = [f"({letter}) {c}" for letter, c in zip(string.ascii_uppercase, choices, strict=False)]
    return question.rstrip() + "\nChoices:\n" + "\n".join(lines)


def eval_files(cfg: Config, data: Sequence[str], key: str = "data.eval_files") -> list[Path]:
    """`["easyvqa"]`: the embedded easy-VQA test split (written once into the cache); else the record files of the
    given entries (files, snapshot folders or hub dataset ids, `test` split unless one is named)."""
    from vigos_ray.data import record_files
    from vigos_ray.easyvqa import write_easyvqa_jsonl

    if list(data) == ["easyvqa"]:
        return [write_easyvqa_jsonl(Path(cfg.run.cache_dir) / "data", "test")]
    return record_files(list(data), key, "test")


def read_items(paths: Sequence[str | Path], cfg: Config, limit: int = 0) -> list[EvalItem]:
    """Evaluation items from record files; bad records are skipped and counted (as in training)."""
    records = read_files([str(p) for p in paths], limit)
    extras = {}
    for rec in records:
        f = rec.fields
        if "problem" not in f and "question" in f:
            f["problem"] = f["question"]
        choices = f.get("choices")
        if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)):
            f["__error__"] = "'choices' must be a list of strings"
            continue
        if choices and isinstance(f.get("problem"), str):
            f["problem"] = with_choices(f["problem"], choices)
        prior_answer = f.get("prior_answer")
        extras[str(f.get("id"))] = (tuple(choices) if choices else None, f.get("prior_conflict"),
                                    None if prior_answer is None else str(prior_answer))  # fmt: skip
    items, bad = [], Counter()
    for rec in records:
        try:
            sample = decode_record(rec, cfg.model.min_pixels, cfg.model.max_pixels)
        except DataError as err:
            bad[getattr(err, "kind", "malformed")] += 1
            log.warning("skipping %s", err)
            continue
        choices, conflict, prior_answer = extras[sample.id]
        items.append(EvalItem(sample, choices, None if conflict is None else bool(conflict), prior_answer))
    if not items:
        raise DataError(f"no usable evaluation records in {[str(p) for p in paths]} ({dict(bad)})")
    return items


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per item, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


@dataclass
class ItemResult:
    id: str
    answer: str
    responses: list[str]
    extracted: list[str | None]
    correct: list[bool]
    valid_format: list[bool]


def grade_item(item: EvalItem, rollouts: Sequence[Rollout], table: TokenTable, convention: str) -> ItemResult:
    texts = [r.text for r in rollouts]
    extracted = [extract_answer(t) for t in texts]
    return ItemResult(
        id=item.sample.id,
        answer=item.sample.answer,
        responses=texts,
        extracted=extracted,
        correct=[grade(x, item.sample.answer, item.choices) for x in extracted],
        valid_format=[parse_completion(r.completion_ids, table, convention).valid for r in rollouts],
    )


def summarize(results: Sequence[ItemResult], k: int) -> dict[str, float]:
    n = len(results[0].correct)
    flat = [c for r in results for c in r.correct]
    return {
        f"pass@{k}": sum(pass_at_k(n, sum(r.correct), k) for r in results) / len(results),
        f"avg@{k}": sum(sum(r.correct[:k]) / k for r in results) / len(results),
        "accuracy": sum(flat) / len(flat),
        "unparseable": sum(x is None for r in results for x in r.extracted) / len(flat),
        "valid_format": sum(v for r in results for v in r.valid_format) / len(flat),
    }


def mismatched(items: Sequence[EvalItem]) -> list[EvalItem]:
    """Each item with the image of the next item showing another picture (data.other_image_index): the
    grounding probe's counterfactual."""
    other = other_image_index([it.sample.image for it in items])
    return [
        dataclasses.replace(it, sample=dataclasses.replace(it.sample, image=items[j].sample.image))
        for it, j in zip(items, other, strict=True)
    ]


def evaluate(
    items: Sequence[EvalItem],
    generate: Callable[[list[Sample], int], list[Rollout]],
    tokenizer,
    cfg: Config,
    samples_per_item: int,
    k: int,
    seed: int = 0,
    image_probe: bool = True,
    batch_items: int = 16,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Sample `samples_per_item` responses per item with `generate(samples, seed)` (its config's decoding), grade
    them, and return the summary, the grounding probe and every item's responses."""
    table = TokenTable.for_tokenizer(tokenizer)

    def run(batch_items_list: Sequence[EvalItem]) -> list[ItemResult]:
        out = []
        for lo in range(0, len(batch_items_list), batch_items):
            chunk = list(batch_items_list[lo : lo + batch_items])
            rollouts = generate([it.sample for it in chunk], seed + lo)
            for j, it in enumerate(chunk):
                mine = rollouts[j * samples_per_item : (j + 1) * samples_per_item]
                out.append(grade_item(it, mine, table, cfg.loss.span_convention))
            if progress is not None:
                progress(len(chunk))
        return out

    results = run(items)
    report = {"items": len(items), "samples_per_item": samples_per_item, "k": k, **summarize(results, k)}
    if image_probe:
        probe = summarize(run(mismatched(items)), k)
        report["image"] = {"true": report["accuracy"], "mismatched": probe["accuracy"],
                           "sensitivity": report["accuracy"] - probe["accuracy"]}  # fmt: skip
    flags = [it.prior_conflict for it in items]
    if any(f is not None for f in flags):
        split = {}
        for name, want in (("conflict", True), ("consistent", False)):
            picked = [r for r, f in zip(results, flags, strict=True) if f is want]
            split[name] = summarize(picked, k)["accuracy"] if picked else None
        # where the prior is wrong, how often the answer is the prior's: the shortcut itself, not any error
        followed = [grade(x, it.prior_answer, it.choices) for r, it in zip(results, items, strict=True)
                    if it.prior_conflict and it.prior_answer is not None for x in r.extracted]  # fmt: skip
        if followed:
            split["follows_prior"] = sum(followed) / len(followed)
        report["prior"] = split
    report["per_item"] = [dataclasses.asdict(r) for r in results]
    return report


def table(report: dict) -> str:
    """The printed summary: one row per number."""
    k = report["k"]
    rows = [(f"Pass@{k}", report[f"pass@{k}"]), (f"Avg@{k}", report[f"avg@{k}"]),
            ("accuracy (all samples)", report["accuracy"]), ("unparseable", report["unparseable"]),
            ("valid format", report["valid_format"])]  # fmt: skip
    if "image" in report:
        rows += [("accuracy, mismatched image", report["image"]["mismatched"]),
                 ("image sensitivity", report["image"]["sensitivity"])]  # fmt: skip
    for name, value in report.get("prior", {}).items():
        follows = name == "follows_prior"
        rows.append(("answers the prior, prior-conflict items" if follows else f"accuracy, prior-{name} items", value))
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  ------"]
    lines += [f"{name.ljust(width)}  {'n/a' if v is None else f'{100 * v:6.2f}%'}" for name, v in rows]
    return "\n".join(lines)


def report_home(path: Path) -> Path:
    """Where a command's report about `--model path` goes by default: beside a model folder, inside a run
    directory or a checkpoint (the folder that `resolve_eval_model` gives is then one level down)."""
    return path.parent if (path / "config.json").is_file() else path


def eval_decoding(cfg: Config, samples_per_item: int) -> Decoding:
    """The evaluation's decoding (`eval.*`) with `samples_per_item` responses per item."""
    e = cfg.eval
    return Decoding(e.temperature, e.top_p, e.top_k, e.max_new_tokens, samples_per_item)


def eval_config(cfg: Config) -> Config:
    """`cfg` with rollout sampling replaced by the evaluation's decoding, `eval.samples` per item (the config a
    rollout worker that evaluates is built with)."""
    return dataclasses.replace(cfg, rollout=eval_decoding(cfg, cfg.eval.samples).applied_to(cfg.rollout))


def during_training(items: Sequence[EvalItem], generate_async, tokenizer, cfg: Config, seed: int) -> dict[str, float]:
    """Held-out numbers at this step, sampled by the rollout workers' current weights with `eval.*` decoding:
    `generate_async(samples, seed, decoding)` returns a Pending. Keys are `eval/*` metric names."""
    import time

    e = cfg.eval
    decoding = eval_decoding(cfg, e.during_train_samples)
    t0 = time.perf_counter()
    report = evaluate(items, lambda samples, s: generate_async(samples, s, decoding).result(), tokenizer, cfg,
                      e.during_train_samples, e.during_train_samples, seed, image_probe=False,
                      batch_items=len(items))  # fmt: skip
    n = e.during_train_samples
    return {"eval/accuracy": report["accuracy"], f"eval/pass@{n}": report[f"pass@{n}"],
            "eval/valid_format": report["valid_format"], "eval/unparseable": report["unparseable"],
            "eval/seconds": time.perf_counter() - t0}  # fmt: skip
