"""Plot training curves: `python launch/report.py RUN_DIR [RUN_DIR ...] [--out DIR]`.

One run: `RUN_DIR/plots/curves.png` with the loss and KL per segment, batch accuracy and valid-rollout rate,
held-out evaluation accuracy (when the run evaluated), and where the step time went. Several runs: also
`comparison.png` in `--out` (default: the first run's plots/), every panel with one line per run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from vigos_ray.plots import plot_comparison, plot_run, read_run  # noqa: E402


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
