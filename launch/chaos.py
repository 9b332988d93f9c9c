"""Chaos run: `python launch/chaos.py [--seed S] [--faults N] [--kinds K,...] [--config FILE] [key=value ...]`.

Trains like `launch/run.py` with the same config, while killing its processes at points drawn from `--seed`
(vigos_ray/chaos.py: rollout and teacher workers, a learner rank, the driver by SIGKILL and SIGTERM, the driver
during a checkpoint write, a rollout worker during a weight push), restarting the run whenever it dies, as a job
scheduler would. Then it trains the same config once more without faults (`<run.name>-clean`) and checks that
both ended the same: final weights bit for bit, every step's deterministic metrics (loss, per-segment KL, token
counts, versions, the data cursor and the step's sample ids), no process left behind, no checkpoint left
incomplete. Prints every fault with the step and stage it hit; exit 0 when the runs agree, 1 when they do not.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from vigos_ray.chaos import KINDS, differences, incomplete_checkpoints, plan_faults, run_with_faults  # noqa: E402
from vigos_ray.console import add_config_arguments, command_config, say  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="draws the faults' kinds and moments")
    parser.add_argument("--faults", type=int, default=5, help="how many (at most one per step)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    add_config_arguments(parser, "run.steps=10")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if unknown := [k for k in kinds if k not in KINDS]:
        parser.error(f"unknown fault kind(s) {unknown}; choose from {', '.join(KINDS)}")
    cfg, code = command_config(args, "checkpoint.resume=auto")
    if cfg is None:
        return code
    base = [*(["--config", args.config] if args.config else []), *args.overrides]
    chaos_dir, clean_dir = (Path(cfg.run.output_dir) / n for n in (cfg.run.name, f"{cfg.run.name}-clean"))
    for folder in (chaos_dir, clean_dir):  # both start from nothing
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    faults = plan_faults(args.seed, args.faults, cfg.run.steps, kinds)
    say(f"chaos: {len(faults)} faults (seed {args.seed}): " + ", ".join(f"{f.kind}@{f.after_steps}" for f in faults))
    chaos = run_with_faults([*base, "checkpoint.resume=auto"], chaos_dir, faults, chaos_dir / "chaos.log")
    for hit in chaos.injected:
        say(f"  {hit.at_s:7.1f} s  step {hit.step:3d} {hit.stage:<10}  {hit.kind:<11}  killed {hit.target}")
    for fault in chaos.not_injected:
        say(f"  not injected (the run ended first): {fault.kind}@{fault.after_steps}")
    clean = run_with_faults([*base, f"run.name={cfg.run.name}-clean"], clean_dir, [], clean_dir / "chaos.log")
    problems = differences(clean_dir, chaos_dir)
    problems += [f"left behind: {p}" for p in chaos.leftover + clean.leftover]
    problems += [f"incomplete checkpoint: {c}" for c in incomplete_checkpoints(chaos_dir / "checkpoints")]
    say(f"chaos run: {chaos.seconds:.0f} s, {chaos.restarts} restarts; clean run: {clean.seconds:.0f} s "
        f"({chaos.seconds / max(clean.seconds, 1e-9):.2f}x)")  # fmt: skip
    if problems:
        say("the chaos run does NOT match the clean run:\n  " + "\n  ".join(problems[:20]))
        return 1
    say("the chaos run matches the clean run: final weights bit-identical, every step's metrics equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
