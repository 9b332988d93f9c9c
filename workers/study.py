"""The study's runs (vigos_ray/study.py plans them and reads their results): each arm trained by the driver, then
every arm evaluated through one rollout worker in this process."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vigos_ray.config import Config
from vigos_ray.evaluation import eval_config, eval_files, evaluate, read_items
from vigos_ray.palr import measure_rollouts
from vigos_ray.preflight import held_out_data
from vigos_ray.study import arm_config, arms, final_folder, untrained_arms
from workers.driver import run
from workers.rollout import RolloutWorker

log = logging.getLogger(__name__)


def train_arms(cfg: Config, warm: Path, root: Path) -> dict[str, Path]:
    """Train every arm that is not finished yet (needs Ray initialized); returns arm name -> model folder."""
    for arm in untrained_arms(cfg, root):
        log.info("training arm %s (%d steps)", arm.name, cfg.run.steps)
        run(arm_config(cfg, arm, warm, root / "arms"))
    return {a.name: warm if a.method == "none" else final_folder(root, a) for a in arms(cfg)}


def evaluate_arms(cfg: Config, folders: dict[str, Path], warm: Path, root: Path, progress=None) -> dict[str, dict]:
    """Every arm on the same held-out items (easy-VQA test, or `data.eval_files`) through one vLLM engine, arm
    seed = sampling seed; reports are cached in eval/<arm>.json. Also measures PALR on the warm start's rollouts
    (palr.json)."""
    ecfg = eval_config(cfg)
    items = read_items(eval_files(cfg, held_out_data(cfg)), cfg, cfg.eval.limit)
    (root / "eval").mkdir(parents=True, exist_ok=True)
    worker = None
    reports = {}
    for arm in arms(cfg):
        path = root / "eval" / f"{arm.name}.json"
        if path.is_file():
            reports[arm.name] = json.loads(path.read_text())
            continue
        worker = worker or RolloutWorker(ecfg, warm)
        worker.use_weights_from(folders[arm.name])
        report = evaluate(items, worker.generate, worker.tokenizer, ecfg, cfg.eval.samples, cfg.eval.k,
                          seed=arm.seed, image_probe=True, progress=progress)  # fmt: skip
        report = {"arm": arm.name, "model": str(folders[arm.name]), **report}
        path.write_text(json.dumps(report, indent=1))
        reports[arm.name] = report
    palr_path = root / "palr.json"
    if cfg.study.palr_items and not palr_path.is_file():
        worker = worker or RolloutWorker(ecfg, warm)
        worker.use_weights_from(warm)
        measured = items[: cfg.study.palr_items]
        rollouts = worker.generate([it.sample for it in measured], seed=cfg.run.seed)
        palr_path.write_text(json.dumps(measure_rollouts(cfg, warm, measured, rollouts), indent=1))
    return reports
