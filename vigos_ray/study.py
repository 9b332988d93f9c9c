"""The CPU reproduction study: warm start -> ViGOS vs OPSD vs no training -> one evaluation of every arm.

Order of work, all under one output folder (`<run.output_dir>/<run.name>`):
  warm_start/            the supervised warm start (vigos_ray/sft.py) every arm starts from
  arms/<method>-s<seed>/ one training run per trained method and seed (launch/run.py's run directory layout)
  eval/<arm>.json        every arm evaluated on the same held-out items with the same sampling seed per seed
  palr.json              the PALR diagnostic of both methods' teachers on the warm start's own rollouts
  results.json / results.md / comparison.png
Arms are equal in budget: the same steps, prompts per step, optimizer and seeds; only `loss.objective` differs.
A study that stops part-way resumes where it stopped: a finished warm start, trained arm or evaluation is reused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from collections.abc import Callable
from pathlib import Path

from vigos_ray.config import Config, ConfigError, load_config, save_config, to_container
from vigos_ray.easyvqa import embedded_file
from vigos_ray.metrics import flatten

log = logging.getLogger(__name__)

# The evaluation numbers the study compares, in table order (label -> how to read it off an evaluation report;
# None where a report has no such number, e.g. the prior split on data without `prior_conflict`).
COMPARED: dict[str, Callable[[dict], float | None]] = {
    "Avg@k": lambda r: r[f"avg@{r['k']}"],
    "Pass@k": lambda r: r[f"pass@{r['k']}"],
    "accuracy": lambda r: r["accuracy"],
    "valid format": lambda r: r["valid_format"],
    "unparseable": lambda r: r["unparseable"],
    "acc., mismatched image": lambda r: r["image"]["mismatched"],
    "image sensitivity": lambda r: r["image"]["sensitivity"],
    "prior-conflict": lambda r: r.get("prior", {}).get("conflict"),
    "prior-consistent": lambda r: r.get("prior", {}).get("consistent"),
    "answers the prior": lambda r: r.get("prior", {}).get("follows_prior"),  # on prior-conflict items
}


@dataclasses.dataclass(frozen=True)
class Arm:
    method: str  # vigos | opsd | none
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-s{self.seed}"


def arms(cfg: Config) -> list[Arm]:
    return [Arm(m, s) for s in cfg.study.seeds for m in cfg.study.methods]


def arm_config(cfg: Config, arm: Arm, warm_start: Path, arms_dir: Path) -> Config:
    """The training config of one arm: the study's config with its seed, objective, start model and run folder.
    Shortcut data is drawn once, from the study's own `run.seed`, and given to every arm as files."""
    data = cfg.data
    if data.source == "easyvqa_shortcut":
        train, test = (str(embedded_file(cfg, split)) for split in ("train", "test"))
        data = dataclasses.replace(data, source="files", train_files=[train], eval_files=[test])
    return dataclasses.replace(
        cfg,
        data=data,
        run=dataclasses.replace(cfg.run, name=arm.name, output_dir=str(arms_dir), seed=arm.seed),
        model=dataclasses.replace(cfg.model, path=str(warm_start)),
        loss=dataclasses.replace(cfg.loss, objective=arm.method),
    )


def claim_folder(cfg: Config, root: Path) -> None:
    """A study folder holds one study: running it again with the same settings resumes it; other settings would
    mix results of two configs, so they are refused naming the keys that differ."""
    saved = root / "config.yaml"
    if not saved.is_file():
        root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, saved)
        return
    before, now = flatten(to_container(load_config(saved))), flatten(to_container(cfg))
    differ = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if differ:
        shown = ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in differ[:4])
        raise ConfigError(
            f"{root} holds a study with other settings: {shown}{' ...' if len(differ) > 4 else ''}. "
            f"Give this one another run.name, or delete {root} to start over"
        )


def final_folder(root: Path, arm: Arm) -> Path:
    return root / "arms" / arm.name / "final"


def untrained_arms(cfg: Config, root: Path) -> list[Arm]:
    """Arms with a method to train whose run has not exported its final model yet."""
    return [a for a in arms(cfg) if a.method != "none" and not (final_folder(root, a) / "config.json").is_file()]


def summarize(cfg: Config, reports: dict[str, dict]) -> dict:
    """Per method and compared number: the per-seed values, their mean and (with 2+ seeds) sample std."""
    out: dict[str, dict] = {}
    for method in cfg.study.methods:
        per_seed = [reports[Arm(method, s).name] for s in cfg.study.seeds]
        out[method] = {}
        for key, read in COMPARED.items():
            values = [read(r) for r in per_seed]
            if None in values:
                continue
            out[method][key] = {
                "values": values,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            }
    return out


def results_table(summary: dict, k: int) -> str:
    """Markdown: one row per method, mean ± std over seeds, in percent."""
    labels = [label.replace("@k", f"@{k}") for label in next(iter(summary.values()))]
    lines = ["| method | " + " | ".join(labels) + " |", "| --- |" + " ---: |" * len(labels)]
    for method, numbers in summary.items():
        cells = [f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}" for v in numbers.values()]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Student's t, 0.975 quantile, for 1..10 degrees of freedom (more seeds than 11: 10's, a little conservative).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def paired_differences(summary: dict) -> dict[str, dict[str, dict]]:
    """Per pair of methods (each trained method against `none`, and vigos against opsd) and compared number: the
    per-seed differences (arms of one seed share the evaluation's sampling seeds, so seeds pair), their mean and
    std, and `beyond_spread`: a paired t-test at 5% (two-sided) rejects "no difference", i.e. |mean| exceeds
    t(0.975, seeds - 1) x std / sqrt(seeds) (with 3 seeds: 2.48 std)."""
    methods = list(summary)
    pairs = [(m, "none") for m in methods if m != "none" and "none" in methods]
    if {"vigos", "opsd"} <= set(methods):
        pairs.append(("vigos", "opsd"))
    out: dict[str, dict[str, dict]] = {}
    for a, b in pairs:
        out[f"{a} - {b}"] = {}
        for key in summary[a]:
            diffs = [x - y for x, y in zip(summary[a][key]["values"], summary[b][key]["values"], strict=True)]
            mean = statistics.fmean(diffs)
            std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            n = len(diffs)
            beyond = n > 1 and abs(mean) > 1e-9 and abs(mean) > T_975[min(n - 1, len(T_975)) - 1] * std / n**0.5
            out[f"{a} - {b}"][key] = {"values": diffs, "mean": mean, "std": std, "beyond_spread": beyond}
    return out


def differences_table(differences: dict, k: int) -> str:
    """Markdown: paired differences in points, mean ± std over seeds; * where a paired t-test finds a difference."""
    if not differences:
        return ""
    labels = [label.replace("@k", f"@{k}") for label in next(iter(differences.values()))]
    lines = ["| paired difference (points) | " + " | ".join(labels) + " |", "| --- |" + " ---: |" * len(labels)]
    for pair, numbers in differences.items():
        cells = [f"{100 * v['mean']:+.1f} ± {100 * v['std']:.1f}{' *' if v['beyond_spread'] else ''}"
                 for v in numbers.values()]  # fmt: skip
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    lines.append("\n\\* beyond the seed spread: a paired t-test over seeds at 5% (two-sided) finds a difference.")
    return "\n".join(lines)


def palr_rows(palr: dict) -> str:
    """Markdown: PALR per segment and method (pooled over tokens)."""
    lines = ["| teacher signal of | T_d | T_ra | response |", "| --- | ---: | ---: | ---: |"]
    for method in ("vigos", "opsd"):
        v = palr[method]["pooled"]
        lines.append(f"| {method} | {100 * v['description']:.2f}% | {100 * v['reasoning']:.2f}% "
                     f"| {100 * v['response']:.2f}% |")  # fmt: skip
    return "\n".join(lines)


def plot(cfg: Config, summary: dict, root: Path, out: Path) -> Path:
    """Bars (mean over seeds, one dot per seed) for accuracy, valid format and image sensitivity; then, for each
    trained arm while it trained, the share of rollouts in format and the per-token KL to each teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vigos_ray.plots import METHOD_COLOURS, read_run, series

    held_out = {"easyvqa": "easy-VQA test", "easyvqa_shortcut": "shortcut test"}.get(cfg.data.source, "held-out")
    panels = [("Avg@k", f"Avg@{cfg.eval.k} ({held_out})"), ("valid format", "valid format"),
              ("image sensitivity", "image sensitivity (true - mismatched)"),
              ("prior-conflict", "accuracy where the wording misleads")]  # fmt: skip
    panels = [(key, title) for key, title in panels if key in next(iter(summary.values()))]
    count = len(panels) + 2
    cols = count if count <= 5 else (count + 1) // 2  # six panels: two rows of three
    rows = (count + cols - 1) // cols
    fig, grid = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    axes = list(grid.flat)
    methods = list(summary)
    for ax, (key, title) in zip(axes, panels, strict=False):
        for x, method in enumerate(methods):
            numbers = summary[method][key]
            colour = METHOD_COLOURS.get(method, "tab:gray")
            ax.bar(x, 100 * numbers["mean"], yerr=100 * numbers["std"], color=colour, alpha=0.6, capsize=4)
            ax.scatter([x] * len(numbers["values"]), [100 * v for v in numbers["values"]], color="black", s=10)
        ax.set_xticks(range(len(methods)), methods)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("%")
    window = 10
    runs = {arm: read_run(root / "arms" / arm.name) for arm in arms(cfg)
            if arm.method != "none" and (root / "arms" / arm.name / "metrics.jsonl").is_file()}  # fmt: skip
    for unused in axes[len(panels) : -2]:
        unused.axis("off")
    valid_ax, kl_ax = axes[-2], axes[-1]
    # the reference teacher scores only the few invalid rollouts: points, not a line
    kl_style = {"kl/perception": {"linestyle": ":"}, "kl/reference": {"linestyle": "none", "marker": "x"}}
    for arm, records in runs.items():
        colour = METHOD_COLOURS.get(arm.method)
        label = arm.method if arm.seed == cfg.study.seeds[0] else None
        steps, values = series(records, "valid_rate")
        smooth = [100 * statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
        valid_ax.plot(steps, smooth, color=colour, alpha=0.7, label=label)
        for key in (k for k in records[-1] if k.startswith("kl/")):
            name = f"{arm.method} {key.split('/')[1]}" if arm.seed == cfg.study.seeds[0] else None
            points = [(x, y) for x, y in zip(*series(records, key), strict=True) if y > 0]  # 0: no such token
            if points:
                kl_ax.plot(*zip(*points, strict=True), color=colour, alpha=0.6, label=name, **kl_style.get(key, {}))
    valid_ax.set(title=f"valid rollouts while training ({window}-step mean)", xlabel="step", ylabel="%",
                 ylim=(0, 102))  # fmt: skip
    kl_ax.set(title="KL per token to the teachers", xlabel="step", yscale="log")
    for ax in (valid_ax, kl_ax):
        ax.title.set_fontsize(10)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"{cfg.run.name}: {len(cfg.study.seeds)} seeds, {cfg.run.steps} steps per arm", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_results(cfg: Config, reports: dict[str, dict], root: Path, seconds: dict[str, float]) -> dict:
    """results.json, results.md and comparison.png. `seconds` (phase -> time) of this invocation is appended to
    timings.jsonl; results.json carries the sum over every invocation (a resumed study spans several)."""
    summary = summarize(cfg, reports)
    palr_path = root / "palr.json"
    palr = json.loads(palr_path.read_text()) if palr_path.is_file() else None
    with (root / "timings.jsonl").open("a") as f:
        f.write(json.dumps(seconds) + "\n")
    invocations = [json.loads(line) for line in (root / "timings.jsonl").read_text().splitlines()]
    total: dict[str, float] = {}
    for timing in invocations:
        for phase, value in timing.items():
            total[phase] = total.get(phase, 0.0) + value
    differences = paired_differences(summary)
    results = {"study": dataclasses.asdict(cfg.study), "steps": cfg.run.steps,
               "eval_items": next(iter(reports.values()))["items"], "summary": summary,
               "differences": differences, "palr": palr, "seconds": total, "invocations": len(invocations)}  # fmt: skip
    (root / "results.json").write_text(json.dumps(results, indent=1))
    md = [results_table(summary, cfg.eval.k)]
    if differences:
        md += ["", differences_table(differences, cfg.eval.k)]
    if palr:
        md += ["", palr_rows(palr)]
    (root / "results.md").write_text("\n".join(md) + "\n")
    plot(cfg, summary, root, root / "comparison.png")
    return results
