"""Figures of training runs: per-run curves and the comparison of several runs (launch/report.py, the study)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

SEGMENT_COLOURS = {
    "perception": "tab:green",
    "description": "tab:green",
    "reasoning": "tab:blue",
    "reference": "tab:red",
}
METHOD_COLOURS = {"vigos": "tab:green", "opsd": "tab:orange", "none": "tab:gray"}


def read_run(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl; pass a run directory (runs/<run.name>)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path} is empty: the run has not finished a step yet")
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    picked = [(r["step"] + 1, r[key]) for r in records if key in r]
    return [s for s, _ in picked], [v for _, v in picked]


def keys(records: list[dict], prefix: str) -> list[str]:
    return sorted({k for r in records for k in r if k.startswith(prefix) and k.count("/") == prefix.count("/")})


def plot_run(records: list[dict], title: str, out: Path) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    ax.plot(*series(records, "loss"), color="black", label="total")
    for key in keys(records, "loss/"):
        name = key.split("/", 1)[1]
        ax.plot(*series(records, key), color=SEGMENT_COLOURS.get(name), label=name, alpha=0.8)
    ax.set(title="loss", xlabel="step")
    ax.legend()
    ax = axes[0][1]
    for key in keys(records, "kl/"):
        name = key.split("/", 1)[1]
        ax.plot(*series(records, key), color=SEGMENT_COLOURS.get(name), label=name)
    ax.set(title="KL per token, by segment", xlabel="step", yscale="log")
    ax.legend()
    ax = axes[1][0]
    for key, label in (("accuracy", "batch accuracy"), ("valid_rate", "valid rollouts"),
                       ("eval/accuracy", "held-out accuracy")):  # fmt: skip
        if any(key in r for r in records):
            ax.plot(*series(records, key), label=label, marker="o" if key.startswith("eval/") else None)
    ax.set(title="rollouts", xlabel="step", ylim=(-0.02, 1.02))
    ax.legend()
    ax = axes[1][1]
    stages = [k for k in keys(records, "time/") if k != "time/step"]
    steps = series(records, "time/step")[0]
    ax.stackplot(steps, *[series(records, k)[1] for k in stages], labels=[k.split("/", 1)[1] for k in stages])
    ax.set(title="seconds per step, by stage", xlabel="step")
    ax.legend(loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_comparison(runs: dict[str, list[dict]], out: Path) -> Path:
    panels = [("loss", "loss"), ("accuracy", "batch accuracy"), ("valid_rate", "valid-rollout rate"),
              ("time/step", "seconds per step")]  # fmt: skip
    if any("eval/accuracy" in r for records in runs.values() for r in records):
        panels.append(("eval/accuracy", "held-out accuracy"))
    segs = sorted({k for records in runs.values() for k in keys(records, "kl/")})
    panels += [(k, f"KL, {k.split('/', 1)[1]}") for k in segs]
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels, strict=False):
        for name, records in runs.items():
            ax.plot(*series(records, key), label=name)
        ax.set(title=label, xlabel="step")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
