"""A model to evaluate, from what a user points `--model` at: a Hugging Face folder as is, a run directory's
`final/`, or a training checkpoint, exported once by a one-rank learner in this process."""

from __future__ import annotations

from pathlib import Path

from vigos_ray.config import load_config
from vigos_ray.data import DataError
from vigos_ray.models import check_model_folder, resolve_model_path
from vigos_ray.weight_sync import free_port
from workers.learner import LearnerWorker


def resolve_eval_model(path: Path) -> tuple[Path, str]:
    """(Hugging Face folder, what it is): a model folder as is, a run directory's `final/`, or a checkpoint
    exported next to itself (`step_N/hf`, reused when present)."""
    if (path / "config.json").is_file():
        check_model_folder(path, key="--model")
        return path, "model folder"
    if (path / "final" / "config.json").is_file():
        return path / "final", "run directory (final/)"
    if (path / "learner").is_dir():
        out = path / "hf"
        if not (out / "config.json").is_file():
            export_checkpoint(path, out)
        return out, f"checkpoint {path.name} (exported to {out})"
    raise DataError(f"--model {path}: not a model folder, a run directory with final/, or a checkpoint step_N/")


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """A Hugging Face folder of the student in a training checkpoint (`runs/<name>/checkpoints/step_N`): a
    one-rank learner in this process loads the sharded state (any rank count) and exports it, LoRA merged."""
    run_config = checkpoint.parent.parent / "config.yaml"
    if not run_config.is_file():
        raise DataError(f"{checkpoint} is not inside a run directory with config.yaml; pass an exported folder")
    cfg = load_config(run_config, ["learner.workers=1", "learner.prompts_per_step=1", "rollout.samples_per_prompt=1"])
    base = resolve_model_path(cfg.model, cfg.run.cache_dir, seed=cfg.run.seed)
    learner = LearnerWorker(cfg, base)
    learner.join("127.0.0.1", free_port("127.0.0.1"), 1)
    try:
        learner.load_state(str(checkpoint))
        return Path(learner.export(str(out)))
    finally:
        learner.shutdown()
