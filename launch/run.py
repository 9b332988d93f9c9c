"""Entry point: `python launch/run.py [--config FILE] [key=value ...]` (also under `ray job submit -- ...`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from vigos_ray.cluster import ResourceError, check_ray_resources, init_ray  # noqa: E402
from vigos_ray.config import load_config  # noqa: E402
from vigos_ray.console import add_config_arguments, input_errors, report_repeats, setup_console  # noqa: E402
from vigos_ray.preemption import EXIT_PREEMPTED, Preempted  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_config_arguments(parser, "rollout.temperature=1.1")
    args = parser.parse_args(argv)
    repeats = setup_console()
    try:
        cfg = load_config(args.config, args.overrides)
        from vigos_ray.driver import preflight, run

        preflight(cfg)  # a bad model or teacher folder is named before a cluster is started
        init_ray(cfg)
        check_ray_resources(cfg)

        run_dir = run(cfg)
    except (*input_errors(), ResourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Preempted as err:  # exit non-zero: the job's retry policy restarts it, and it resumes
        print(f"preempted: {err}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:  # actors are stopped below; metrics already written stay on disk
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        report_repeats(repeats)
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
