"""What a run reads and checks before any actor starts: the student folder (built and warm-started once for the
tiny default), every teacher checkpoint against its tokenizer, the data files, and the stream of prompts."""

from __future__ import annotations

from vigos_ray.config import Config
from vigos_ray.data import PromptStream, read_files, record_files
from vigos_ray.easyvqa import embedded_file
from vigos_ray.evaluation import eval_files
from vigos_ray.models import check_teacher_checkpoints, load_processor
from vigos_ray.prompts import encode, student_text
from vigos_ray.sft import initial_model


def prompt_stream(cfg: Config, processor, split: str = "train") -> PromptStream:
    if cfg.data.source != "files":
        files = [str(embedded_file(cfg, "train" if split == "train" else "test"))]
    else:
        key = "data.train_files" if split == "train" else "data.eval_files"
        files = record_files(cfg.data.train_files if split == "train" else cfg.data.eval_files, key, split)
    prompt_tokens = lambda s: len(encode(processor, student_text(processor, s.problem, cfg.prompts), s.image).input_ids)  # noqa: E731
    return PromptStream(
        read_files(files, cfg.data.limit), seed=cfg.run.seed, shuffle=cfg.data.shuffle,
        on_bad_record=cfg.data.on_bad_record, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels,
        max_prompt_tokens=cfg.data.max_prompt_tokens, prompt_tokens=prompt_tokens,
    )  # fmt: skip


def held_out_data(cfg: Config) -> list[str]:
    """What evaluation reads: `easyvqa` (the embedded test split), the shortcut variant's test file, or
    data.eval_files."""
    if cfg.data.source == "easyvqa_shortcut":
        return [str(embedded_file(cfg, "test"))]
    return ["easyvqa"] if cfg.data.source == "easyvqa" else cfg.data.eval_files


def preflight(cfg: Config):
    """The checks that need no cluster: the student folder (built and warm-started once, for the tiny default),
    every teacher checkpoint against its tokenizer, and the data files. Returns (model folder, processor); raises
    naming the key to change."""
    model_path = initial_model(cfg)
    processor = load_processor(model_path, cfg.model.min_pixels, cfg.model.max_pixels)
    check_teacher_checkpoints(cfg, processor.tokenizer)
    if cfg.data.source == "files":  # the data files (a hub dataset: its snapshot) are found before any actor
        record_files(cfg.data.train_files, "data.train_files", "train")
        if cfg.eval.every_steps:
            eval_files(cfg, cfg.data.eval_files)
    return model_path, processor
