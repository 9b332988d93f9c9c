"""Per-step metrics: one flat JSON record per step, appended to `metrics.jsonl` in the run directory.

Names follow the pipeline's stages and segments: `loss/<segment>`, `kl/<segment>`, `clipped/<segment>`,
`tokens/<segment>`, `time/<stage>` (seconds), `tok_per_s/<stage>`, `push/*`, `lag/<k>` (rollouts sampled k
versions before the weights they trained).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from statistics import fmean


class MetricsFile:
    """Appends records; on resume (`from_step` > 0) first drops records of steps that will run again."""

    def __init__(self, path: Path, from_step: int = 0):
        self.path = path
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < from_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._f = path.open("a")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()  # a crash loses at most the step in progress

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> MetricsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge_segments(ranks: list[dict]) -> dict[str, dict[str, float]]:
    """Per segment over all ranks: the pooled loss (mean of rank shares), token-weighted KL and clip fraction."""
    out = {}
    for name in ranks[0]["segments"]:
        per = [r["segments"][name] for r in ranks]
        tokens = sum(s["tokens"] for s in per)
        out[name] = {
            "loss": fmean(s["loss"] for s in per),
            "kl": sum(s["divergence"] for s in per) / max(tokens, 1),
            "clipped": sum(s["clipped"] for s in per) / max(tokens, 1),
            "tokens": tokens,
        }
    return out


def step_record(step, samples, rollouts, spans, plan, ranks, push, stages, teacher_s, seconds) -> dict:
    answers = {s.id: s.answer.strip().lower() for s in samples}
    valid = [sp for sp in spans if sp.valid]
    correct = [
        sp.valid and (sp.answer or "").strip().lower() == answers[r.sample_id]
        for r, sp in zip(rollouts, spans, strict=True)
    ]
    completion_tokens = sum(len(r.completion_ids) for r in rollouts)
    teacher_tokens = {name: sum(len(row.input_ids) for row in rows) for name, rows in plan.teacher_rows.items()}
    learner_tokens = sum(len(row.input_ids) for row in plan.student_rows)
    lags = Counter(ranks[0]["version"] - 1 - r.version for r in rollouts)
    record = {
        "step": step,
        "version": ranks[0]["version"],
        "loss": fmean(r["loss"] for r in ranks),
        "grad_norm": ranks[0]["grad_norm"],
        "lr": ranks[0]["lr"],
        "rollouts": len(rollouts),
        "valid_rate": len(valid) / len(rollouts),
        "accuracy": sum(correct) / len(rollouts),
        "len/completion": completion_tokens / len(rollouts),
        "len/description": fmean(len(sp.description) for sp in valid) if valid else 0.0,
        "len/reasoning": fmean(len(sp.reasoning) for sp in valid) if valid else 0.0,
        "time/step": seconds,
        "push/seconds": push.seconds,
        "push/bytes": push.bytes,
        "push/gbps": push.gbps,
        "tok_per_s/learner": learner_tokens / max(stages["learner"], 1e-9),
    }
    for name, s in merge_segments(ranks).items():
        record.update({f"loss/{name}": s["loss"], f"kl/{name}": s["kl"], f"clipped/{name}": s["clipped"],
                       f"tokens/{name}": s["tokens"]})  # fmt: skip
    record.update({f"time/{k}": v for k, v in stages.items()})
    for name, sec in teacher_s.items():
        record[f"time/teacher/{name}"] = sec
        record[f"tok_per_s/teacher/{name}"] = teacher_tokens.get(name, 0) / max(sec, 1e-9)
    record.update({f"lag/{k}": n for k, n in sorted(lags.items())})
    return record
