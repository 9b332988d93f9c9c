"""Entry point: `python launch/run.py [--config FILE] [key=value ...]` (also under `ray job submit -- ...`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from vigos_ray.cluster import check_ray_resources, init_ray  # noqa: E402
from vigos_ray.config import load_config  # noqa: E402
from vigos_ray.console import add_config_arguments, run_ray_command, setup_console  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_config_arguments(parser, "rollout.temperature=1.1")
    args = parser.parse_args(argv)
    code, run_dir = run_ray_command(lambda: train(args), setup_console())
    if code == 0:
        print(f"run directory: {run_dir}")
    return code


def train(args):
    cfg = load_config(args.config, args.overrides)
    from vigos_ray.driver import preflight, run

    preflight(cfg)  # a bad model or teacher folder is named before a cluster is started
    init_ray(cfg)
    check_ray_resources(cfg)
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
