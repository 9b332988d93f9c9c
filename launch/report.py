"""Plot training curves: `python launch/report.py RUN_DIR [RUN_DIR ...] [--out DIR]`.

One run: `RUN_DIR/plots/curves.png` with the loss and KL per segment, batch accuracy and valid-rollout rate,
held-out evaluation accuracy (when the run evaluated), and where the step time went. Several runs: also
`comparison.png` in `--out` (default: the first run's plots/), every panel with one line per run.
"""

from __future__ import annotations

import argparse
import json
import sys
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (runs/<run.name>)")
    parser.add_argument("--out", type=Path, help="folder for comparison.png (default: the first run's plots/)")
    args = parser.parse_args(argv)
    try:
        runs = {str(run): read_run(run) for run in args.runs}
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    unique = len({run.name for run in args.runs}) == len(args.runs)  # label runs by name unless names repeat
    names = {str(run): run.name if unique else str(run) for run in args.runs}
    for run in args.runs:
        print(plot_run(runs[str(run)], names[str(run)], run / "plots" / "curves.png"))
    if len(runs) > 1:
        out = (args.out or args.runs[0] / "plots") / "comparison.png"
        print(plot_comparison({names[k]: v for k, v in runs.items()}, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
