"""PALR diagnostic (SPEC §8): `python launch/palr.py --model PATH [--data ...] [--rollouts FILE]`.

How much of each method's teacher pull on the student's own tokens comes from the privileged answer rather than
the image, for `vigos` and `opsd`, over the description (T_d), the reasoning and answer (T_ra) and the whole
response. Rollouts are sampled from the model (one per item, `rollout.*` decoding) or read from `--rollouts`,
JSONL lines {"id": item id, "completion": the text the student wrote after its `<description>` prefill}; only
rollouts in the expected format are measured. Wrong answers come from the dataset itself: the other options of a
multiple-choice item, else answers to questions that open with the same two words (vigos_ray.palr.answer_pools).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from vigos_ray.console import Console, add_config_arguments, command_config, error, input_errors, say  # noqa: E402
from vigos_ray.data import DataError  # noqa: E402
from vigos_ray.palr import palr_table  # noqa: E402


def read_rollouts(path: Path, items, processor, cfg) -> list:
    """Rollouts from a JSONL file of {"id", "completion"}; each completion is tokenized and ends the turn."""
    from vigos_ray.prompts import encode, student_text
    from vigos_ray.sampling import make_rollout

    by_id = {it.sample.id: it.sample for it in items}
    tok = processor.tokenizer
    rollouts = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        sample = by_id.get(str(row.get("id")))
        if sample is None or not isinstance(row.get("completion"), str):
            raise DataError(f"{path}:{n}: needs an 'id' of an evaluated item and a 'completion' string")
        prompt = encode(processor, student_text(processor, sample.problem, cfg.prompts), sample.image).input_ids
        ids = tok.encode(row["completion"], add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
        rollouts.append(make_rollout(sample.id, prompt, ids, [0.0] * len(ids), tok, 0))
    return rollouts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="model folder, run directory or checkpoint")
    parser.add_argument(
        "--data",
        nargs="+",
        default=["easyvqa"],
        help="'easyvqa', record files, Parquet snapshot folders or hub dataset ids (org/name@split)",
    )
    parser.add_argument("--rollouts", type=Path, help="JSONL of {id, completion} to measure instead of sampling")
    parser.add_argument("--k-wrong", type=int, default=3, help="wrong answers per item (SPEC §8 default: 3)")
    parser.add_argument("--out", type=Path, help="JSON report (default: palr.json beside the model)")
    add_config_arguments(parser, "eval.limit=64")
    args = parser.parse_args(argv)
    cfg, code = command_config(args)
    if cfg is None:
        return code
    from vigos_ray.evaluation import eval_files, read_items, report_home
    from workers.export import resolve_eval_model

    out = args.out or report_home(args.model) / "palr.json"
    with Console(out.with_suffix(".log")):
        try:
            folder, _ = resolve_eval_model(args.model)
            items = read_items(eval_files(cfg, args.data, "--data"), cfg, cfg.eval.limit)
            report = measure(cfg, folder, items, args.rollouts, args.k_wrong)
        except input_errors() as err:
            error(f"error: {err}")
            return 2
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": str(args.model), **report}, indent=1))
        say(palr_table(report))
        say(f"report: {out} (log: {out.with_suffix('.log')})")
    return 0


def measure(cfg, folder: Path, items, rollouts_file: Path | None, k_wrong: int) -> dict:
    from vigos_ray.models import load_processor
    from vigos_ray.palr import measure_rollouts

    if rollouts_file is not None:
        rollouts = read_rollouts(rollouts_file, items, load_processor(folder, cfg.model.min_pixels,
                                                                      cfg.model.max_pixels), cfg)  # fmt: skip
    else:
        from workers.rollout import RolloutWorker

        one = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, samples_per_prompt=1))
        worker = RolloutWorker(one, folder)
        worker.use_folder_weights()
        rollouts = worker.generate([it.sample for it in items], seed=cfg.run.seed)
    return measure_rollouts(cfg, folder, items, rollouts, k_wrong)


if __name__ == "__main__":
    sys.exit(main())
