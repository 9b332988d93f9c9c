"""Train with ViGOS: `python launch/run.py [--config FILE] [key=value ...]` (also under `ray job submit -- ...`).

With no arguments: the tiny Qwen2.5-VL-architecture model (warm-started once into .cache/vigos) on easy-VQA, on a
local Ray cluster, in a few minutes on a laptop's cores. The run folder is `<run.output_dir>/<run.name>` (default
runs/vigos): config.yaml, metrics.jsonl, checkpoints/, final/ (the trained model), plots/, logs/. Running the same
command again resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from vigos_ray.console import EVENTS, Console, add_config_arguments, command_config, run_ray_command, say  # noqa: E402

EPILOG = """config: defaults (vigos_ray/config.py, every key documented there) < --config FILE < key=value overrides,
e.g. `python launch/run.py --config configs/qwen25vl_3b.yaml rollout.workers=4 teachers.reasoning.max_workers=8`.
Lists take brackets: `data.train_files=[a.jsonl,b.jsonl]`. An unknown or invalid key is refused, naming it."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_config_arguments(parser, "rollout.temperature=1.1")
    args = parser.parse_args(argv)
    cfg, code = command_config(args)
    if cfg is None:
        return code
    logs = (Path(cfg.run.output_dir) / cfg.run.name / "logs").resolve()
    with Console(logs / "driver.log", events=logs / EVENTS):
        say(f"logs: {logs}/ (Ray, libraries and each actor's output; this terminal shows our lines only)")
        if "working_dir_files" in Path.cwd().parts[-2:] and not Path(cfg.run.output_dir).is_absolute():
            logging.getLogger("vigos_ray.launch").warning(
                "run.output_dir=%s is inside this job's copy of its working directory, which Ray deletes once the "
                "job's files are no longer used: set run.output_dir to an absolute path on shared storage",
                cfg.run.output_dir,
            )
        code, summary = run_ray_command(lambda: train(cfg, logs))
        if code == 0:
            say(summary)
    return code


def train(cfg, logs: Path) -> str:
    from vigos_ray.cluster import check_ray_resources, init_ray
    from vigos_ray.metrics import run_summary
    from vigos_ray.plots import plot_run, read_run
    from vigos_ray.preflight import preflight
    from workers.driver import run

    checked = preflight(cfg)  # a bad model or teacher folder is named before a cluster is started
    init_ray(cfg)
    check_ray_resources(cfg)
    run_dir = run(cfg, logs, checked)
    records = read_run(run_dir)
    return run_summary(run_dir, records, plot_run(records, cfg.run.name, run_dir / "plots" / "curves.png"))


if __name__ == "__main__":
    sys.exit(main())
