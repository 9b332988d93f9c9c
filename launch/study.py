"""The CPU grounding study: `python launch/study.py [--config configs/easyvqa_study.yaml] [k=v ...]`.

A tiny model taught to see (vision pretraining, then the format warm start on easy-VQA train), then ViGOS, vanilla
OPSD and no further training from it with equal budgets and the same seeds on shortcut-prone data (the question's
wording suggests the answer), then every arm evaluated on held-out items where that suggestion is wrong half of the
time (Avg@k, valid format, image sensitivity, prior-conflict and prior-consistent accuracy) and PALR per segment on
the warm start's rollouts. `--config configs/easyvqa_study_blind.yaml` runs the first study (docs/study.md).
Writes `<run.output_dir>/<run.name>/` with results.md (the tables), results.json and comparison.png; a study that
stopped part-way resumes where it stopped when run again.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from vigos_ray.cluster import check_ray_resources, init_ray  # noqa: E402
from vigos_ray.console import Console, add_config_arguments, command_config, progress, run_ray_command, say  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "easyvqa_study.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, "study.seeds=[0,1] run.steps=60")
    args = parser.parse_args(argv)
    args.config = args.config or DEFAULT_CONFIG
    cfg, code = command_config(args)
    if cfg is None:
        return code
    root = Path(cfg.run.output_dir) / cfg.run.name
    with Console(root / "logs" / "study.log"):
        say(f"logs: {root / 'logs'} (libraries, Ray and each actor; the terminal shows our lines only)")
        # finished arms and evaluations stay on disk whatever stops the study; running it again resumes
        code, _ = run_ray_command(lambda: run_study(cfg))
        if code == 0:
            say((root / "results.md").read_text())
            say(f"study folder: {root}\nplot: {root / 'comparison.png'}")
    return code


def run_study(cfg) -> Path:
    from vigos_ray import study
    from vigos_ray.preflight import preflight
    from vigos_ray.sft import base_config, warm_start
    from workers.study import evaluate_arms, train_arms

    root = Path(cfg.run.output_dir) / cfg.run.name
    base_model, _ = preflight(base_config(cfg))  # the study trains its own warm start (warm_start.*)
    study.claim_folder(cfg, root)
    seconds = {}
    t0 = time.perf_counter()
    warm = warm_start(cfg, base_model, root / "warm_start")
    seconds["warm_start"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    untrained = study.untrained_arms(cfg, root)
    if untrained:  # a cluster only when there is training left to do
        arm_cfg = study.arm_config(cfg, untrained[0], warm, root / "arms")
        init_ray(arm_cfg)
        check_ray_resources(arm_cfg)
    folders = train_arms(cfg, warm, root)
    seconds["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    per_arm = cfg.eval.limit or 0
    with progress(total=len(study.arms(cfg)) * 2 * per_arm or None, desc="evaluate", unit="item") as bar:
        reports = evaluate_arms(cfg, folders, warm, root, progress=bar.update)
    seconds["evaluate"] = time.perf_counter() - t0
    study.write_results(cfg, reports, root, seconds)
    return root


if __name__ == "__main__":
    sys.exit(main())
