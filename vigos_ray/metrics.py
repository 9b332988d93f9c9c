"""Per-step metrics: one flat record per step, always appended to `metrics.jsonl` in the run directory, and fanned
out to the sinks named in `metrics.sinks`: a one-line console summary, TensorBoard, W&B (offline by default) and
MLflow (a local file store by default).

Names follow the pipeline's stages and segments: `loss/<segment>`, `kl/<segment>`, `clipped/<segment>`,
`tokens/<segment>`, `time/<stage>` (seconds), `tok_per_s/<stage>`, `push/*`, `lag/<k>` (rollouts sampled k
versions before the weights they trained), `pool/<role>/*`, `data/skipped/<kind>`, `eval/*`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from statistics import fmean

from vigos_ray.config import Config, MetricsConfig, to_container
from vigos_ray.grading import grade
from vigos_ray.types import RankStep

log = logging.getLogger(__name__)


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


def scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def console_line(record: dict, steps: int) -> str:
    """One short line a person can read: loss and KL per segment, rollout quality, where the time went."""
    segs = sorted(k.split("/", 1)[1] for k in record if k.startswith("kl/"))
    kl = " ".join(f"{name[:4]} {record[f'kl/{name}']:.3g}" for name in segs)
    stages = " ".join(f"{k.split('/', 1)[1]} {v:.2f}" for k, v in record.items()
                      if k.startswith("time/") and k.count("/") == 1 and k != "time/step")  # fmt: skip
    line = (f"step {record['step'] + 1}/{steps} loss {record['loss']:.4g} | kl {kl} | valid {record['valid_rate']:.2f} "
            f"acc {record['accuracy']:.2f} | {record['time/step']:.2f} s ({stages})")  # fmt: skip
    if "eval/accuracy" in record:
        line += f" | eval acc {record['eval/accuracy']:.3f}"
    return line


class ConsoleSink:
    def __init__(self, cfg: MetricsConfig, steps: int):
        self.every, self.steps = cfg.console_every, steps

    def write(self, record: dict) -> None:
        if (record["step"] + 1) % self.every == 0 or record["step"] + 1 == self.steps:
            log.info(console_line(record, self.steps))

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Scalars under runs/<name>/tensorboard, one event file per process run (`tensorboard --logdir runs`)."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run whose id is the run's name, so a resumed run continues it; offline unless metrics.wandb_mode."""

    def __init__(self, cfg: Config, run_dir: Path):
        import wandb

        m = cfg.metrics
        self.run = wandb.init(project=m.wandb_project, name=cfg.run.name, id=cfg.run.name, resume="allow",
                              dir=str(run_dir), mode=m.wandb_mode, config=to_container(cfg))  # fmt: skip

    def write(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    """An MLflow run (a file store in runs/<name>/mlruns unless metrics.mlflow_uri names a server or database); its
    id is kept in the run directory so that a resumed run logs into the same MLflow run."""

    def __init__(self, cfg: Config, run_dir: Path):
        import mlflow

        m = cfg.metrics
        if not m.mlflow_uri:  # MLflow 3 keeps its file store for local use only behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.MlflowClient(tracking_uri=m.mlflow_uri or (run_dir / "mlruns").resolve().as_uri())
        id_file = run_dir / "mlflow_run_id"
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
        else:
            exp = self.client.get_experiment_by_name(m.mlflow_experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(m.mlflow_experiment)
            self.run_id = self.client.create_run(exp_id, run_name=cfg.run.name).info.run_id
            id_file.write_text(self.run_id)
            flat = flatten(to_container(cfg))
            for key, value in flat.items():
                self.client.log_param(self.run_id, key, str(value)[:500])

    def write(self, record: dict) -> None:
        from mlflow.entities import Metric

        t = int(1000 * time.time())
        metrics = [Metric(k, v, t, record["step"]) for k, v in scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


class Metrics:
    """Every step's record to metrics.jsonl and to each configured sink."""

    def __init__(self, cfg: Config, run_dir: Path, from_step: int = 0):
        self.sinks: list = [MetricsFile(run_dir / "metrics.jsonl", from_step)]
        self.path = self.sinks[0].path
        makers = {
            "console": lambda: ConsoleSink(cfg.metrics, cfg.run.steps),
            "tensorboard": lambda: TensorBoardSink(run_dir),
            "wandb": lambda: WandbSink(cfg, run_dir),
            "mlflow": lambda: MlflowSink(cfg, run_dir),
        }
        self.sinks += [makers[name]() for name in cfg.metrics.sinks]

    def write(self, record: dict) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge_segments(ranks: list[RankStep]) -> dict[str, dict[str, float]]:
    """Per segment over all ranks: the pooled loss (mean of rank shares), token-weighted KL and clip fraction."""
    out = {}
    for name in ranks[0].segments:
        per = [r.segments[name] for r in ranks]
        tokens = sum(s.tokens for s in per)
        out[name] = {
            "loss": fmean(s.loss for s in per),
            "kl": sum(s.divergence_sum for s in per) / max(tokens, 1),
            "clipped": sum(s.clipped_tokens for s in per) / max(tokens, 1),
            "tokens": tokens,
        }
    return out


def step_record(step, samples, rollouts, spans, plan, ranks, push, stages, teacher_s, seconds) -> dict:
    answers = {s.id: s.answer for s in samples}
    valid = [sp for sp in spans if sp.valid]
    correct = [sp.valid and grade(sp.answer, answers[r.sample_id]) for r, sp in zip(rollouts, spans, strict=True)]
    completion_tokens = sum(len(r.completion_ids) for r in rollouts)
    teacher_tokens = {name: sum(len(row.input_ids) for row in rows) for name, rows in plan.teacher_rows.items()}
    learner_tokens = sum(len(row.input_ids) for row in plan.student_rows)
    lags = Counter(ranks[0].version - 1 - r.version for r in rollouts)
    record = {
        "step": step,
        "version": ranks[0].version,
        "loss": fmean(r.loss for r in ranks),
        "grad_norm": ranks[0].grad_norm,
        "lr": ranks[0].lr,
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
        "push/full": int(push.full),  # 0: a delta push (only the parts training changes)
        "tok_per_s/learner": learner_tokens / max(stages["learner"], 1e-9),
        "time/learner/rank": max(r.seconds for r in ranks),  # the slowest rank's own train_step, in the stage
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


def window_means(records: list[dict]) -> dict[str, float | None]:
    """Valid rate and accuracy (per rollout) and each segment's KL (per supervised token) over `records`."""
    rollouts = sum(r["rollouts"] for r in records)
    out: dict[str, float | None] = {
        "valid rollouts": sum(r["valid_rate"] * r["rollouts"] for r in records) / rollouts,
        "batch accuracy": sum(r["accuracy"] * r["rollouts"] for r in records) / rollouts,
    }
    for seg in sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith("kl/")}):
        tokens = sum(r.get(f"tokens/{seg}", 0) for r in records)
        kl = sum(r.get(f"kl/{seg}", 0.0) * r.get(f"tokens/{seg}", 0) for r in records)
        out[f"KL {seg} (tokens)"] = (kl / tokens, tokens) if tokens else None
    return out


def run_summary(run_dir: Path, records: list[dict], plot: Path | None) -> str:
    """What a person reads at the end of a run: the first and last steps side by side, and where things are."""
    n = max(1, min(5, len(records) // 2))
    first, last = window_means(records[:n]), window_means(records[-n:])

    def cell(value) -> str:
        if value is None:
            return "no tokens"
        if isinstance(value, tuple):
            return f"{value[0]:.4f} ({value[1]})"
        return f"{value:.2f}"

    width = max(len(k) for k in first | last)
    lines = [f"trained {len(records)} steps; first {n} vs last {n} steps:",
             f"  {'':{width}}  {f'first {n}':>18}  {f'last {n}':>18}"]  # fmt: skip
    for key in dict.fromkeys([*first, *last]):
        lines.append(f"  {key:{width}}  {cell(first.get(key)):>18}  {cell(last.get(key)):>18}")
    where = {"model": run_dir / "final", "metrics": run_dir / "metrics.jsonl", "checkpoints": run_dir / "checkpoints",
             "plot": plot, "logs": run_dir / "logs"}  # fmt: skip
    lines += [f"{name + ':':13}{path}" for name, path in where.items() if path is not None]
    lines.append(f"{'evaluate:':13}python launch/eval.py --model {run_dir}")
    return "\n".join(lines)
