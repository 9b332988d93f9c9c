"""Supervised warm start on easy-VQA: `python launch/sft.py [--out DIR] [key=value ...]`.

Teaches the student (`model.path`, or the random tiny model) the answer format with targets built from easy-VQA's
labels (vigos_ray/sft.py), with the `warm_start.*` settings (steps, batch, lr, train_vision), then writes a Hugging
Face folder to start ViGOS from: `launch/run.py model.path=DIR`. The tiny default already starts from this warm
start (model.tiny_warm_start); this command is for another model or other settings. On a 2-core machine the tiny
model takes about 55 s for 400 steps (four rows per sample), and is then in format on every rollout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from vigos_ray.console import Console, add_config_arguments, command_config, error, input_errors, say  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="output folder (default: <run.output_dir>/<run.name>-sft)")
    add_config_arguments(parser, "warm_start.steps=400 model.path=/models/qwen")
    args = parser.parse_args(argv)
    cfg, code = command_config(args)
    if cfg is None:
        return code
    out = args.out or Path(cfg.run.output_dir) / f"{cfg.run.name}-sft"
    with Console(out.parent / f"{out.name}.log"):
        try:
            from vigos_ray.preflight import preflight
            from vigos_ray.sft import base_config, warm_start

            model_path, _ = preflight(base_config(cfg))
            folder = warm_start(cfg, model_path, out)
        except input_errors() as err:
            error(f"error: {err}")
            return 2
        say(f"warm-started model: {folder}\nnext: python launch/run.py model.path={folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
