"""Evaluate a model on a benchmark through the vLLM engine: `python launch/eval.py --model PATH [--data ...]`.

PATH is a Hugging Face folder, a run directory (its `final/`), or a checkpoint `runs/<name>/checkpoints/step_N`
(exported once, LoRA merged, to `step_N/hf`). `--data easyvqa` (default) is the embedded easy-VQA test split;
otherwise JSONL/Parquet files in MathVista/MMMU style (see vigos_ray/evaluation.py). Decoding comes from `eval.*`
(SPEC §9 defaults); `key=value` overrides as in launch/run.py. Writes a JSON report and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from vigos_ray.console import Console, add_config_arguments, command_config, error, input_errors, progress, say  # noqa: E402
from vigos_ray.evaluation import (  # noqa: E402
    JudgeRequired,
    check_benchmark,
    eval_config,
    eval_decoding,
    eval_files,
    evaluate,
    read_items,
    report_home,
    table,
)
from workers.export import resolve_eval_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="model folder, run directory or checkpoint")
    parser.add_argument(
        "--data",
        nargs="+",
        default=["easyvqa"],
        help="'easyvqa', record files, Parquet snapshot folders or hub dataset ids (org/name@split)",
    )
    parser.add_argument("--benchmark", default="", help="benchmark name (refused if it needs an LLM judge)")
    parser.add_argument("--out", type=Path, help="JSON report (default: eval-<benchmark>.json beside the model)")
    add_config_arguments(parser, "eval.samples=8")
    args = parser.parse_args(argv)
    cfg, code = command_config(args)
    if cfg is None:
        return code
    name = args.benchmark or ("easyvqa" if args.data == ["easyvqa"] else Path(args.data[0].partition("@")[0]).stem)
    out = args.out or report_home(args.model) / f"eval-{name}.json"
    with Console(out.with_suffix(".log")):
        try:
            check_benchmark(name)
            folder, what = resolve_eval_model(args.model)
            report = run_eval(eval_config(cfg), folder, args.data, name)
        except (*input_errors(), JudgeRequired) as err:
            error(f"error: {err}")
            return 2
        report = {"model": str(args.model), "evaluated": str(folder), "model_kind": what, **report}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        say(f"\n{name}: {report['items']} items x {report['samples_per_item']} samples, model {args.model}")
        say(table(report))
        say(f"report: {out} (log: {out.with_suffix('.log')})")
    return 0


def run_eval(cfg, folder: Path, data: list[str], name: str) -> dict:
    from workers.rollout import RolloutWorker

    files = eval_files(cfg, data, "--data")
    items = read_items(files, cfg, cfg.eval.limit)
    worker = RolloutWorker(cfg, folder)
    worker.use_folder_weights()
    total = len(items) * (2 if cfg.eval.image_probe else 1)
    with progress(total=total, desc=f"eval {name}", unit="item") as bar:
        report = evaluate(items, worker.generate, worker.tokenizer, cfg, cfg.eval.samples, cfg.eval.k,
                          seed=cfg.run.seed, image_probe=cfg.eval.image_probe, progress=bar.update)  # fmt: skip
    decoding = dataclasses.asdict(eval_decoding(cfg, cfg.eval.samples))
    return {"benchmark": name, "data": [str(f) for f in files], "decoding": decoding, **report}


if __name__ == "__main__":
    sys.exit(main())
