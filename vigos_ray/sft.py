"""Supervised warm start: teach a model the answer format on easy-VQA before on-policy distillation.

A ViGOS rollout is only supervised by the perception and reasoning teachers when it is in format; a model that
never writes `<description>...</description><think>...</think>\\boxed{...}` leaves only the reference teacher. The
targets here are built from easy-VQA's own labels: every image's colour and shape are known from the answers to
its colour and shape questions, so the description states them, the reasoning connects them to the question, and
the box holds the reference answer. Rows are built for the student's context and for each teacher's (the teachers
are frozen copies of this model and must follow their own prompts). Single process, no Ray: cross-entropy on the
target tokens only.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from vigos_ray.config import Config, ConfigError, ContextConfig, to_container
from vigos_ray.console import progress
from vigos_ray.data import PromptStream, Sample, read_records
from vigos_ray.easyvqa import easyvqa_labels, write_easyvqa_jsonl
from vigos_ray.models import load_model, load_processor, resolve_model_path, write_model_folder
from vigos_ray.prompts import context_text, encode
from vigos_ray.schedule import lr_lambda
from vigos_ray.scoring import hidden_at, output_head
from vigos_ray.sight import pretrain_vision
from vigos_ray.types import ScoreRow

log = logging.getLogger(__name__)


def description_text(colour: str, shape: str) -> str:
    """The description the warm start teaches, closed by `</description>`."""
    return f"The image shows one {colour} {shape} on a light background.</description>"


def reasoning_text(sample: Sample, colour: str, shape: str) -> str:
    """The reasoning and answer the warm start teaches (what follows `<think>`)."""
    return (f"The picture holds a single {shape}, coloured {colour}. Checking the question against it, "
            f"the answer is {sample.answer}.</think>\\boxed{{{sample.answer}}}")  # fmt: skip


def target_text(sample: Sample, colour: str, shape: str) -> str:
    """The whole completion the warm start teaches (it continues the student's `<description>` prefill)."""
    return description_text(colour, shape) + "<think>" + reasoning_text(sample, colour, shape)


def completion_ids(tokenizer, text: str, end_turn: bool = True) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")] if end_turn else ids


def warm_start_target(name: str, ctx: ContextConfig, sample: Sample, colour: str, shape: str) -> tuple[str, bool]:
    """What the model should write after context `name`, and whether that ends its turn: the part of the
    completion the context's teacher is asked for (the perception teacher: the description; a context resuming at
    `<think>`: the reasoning and answer; any other: the whole completion)."""
    if name == "perception":
        return description_text(colour, shape), False
    if ctx.resumes == "think":
        return reasoning_text(sample, colour, shape), True
    return target_text(sample, colour, shape), True


CONTEXTS = ("student", "perception", "reasoning", "reference")


def sft_rows(
    processor, cfg: Config, samples: list[Sample], labels: dict[str, tuple[str, str]], contexts=CONTEXTS
) -> list[ScoreRow]:
    """Teacher-forced rows (`labels`: sample id -> colour, shape), every target token scored: per sample and
    context, the context followed by what the model should write there (`warm_start_target`), so that the frozen
    copies of the warm start act on their own prompts the way an instruction-tuned model would (trained on the
    student context alone, the tiny model's teachers scored text in contexts it had never seen: perception KL 2.5
    per token, and the distilled students' reasoning degenerated into repeated phrases)."""
    rows = []
    for s in samples:
        colour, shape = labels[s.id]
        for name in contexts:
            ctx_cfg = cfg.context(name)
            target, end_turn = warm_start_target(name, ctx_cfg, s, colour, shape)
            ctx = encode(processor, context_text(processor, ctx_cfg, s.problem, s.answer), s.image)
            ids = completion_ids(processor.tokenizer, target, end_turn)
            start = len(ctx.input_ids)
            rows.append(ScoreRow(ctx.input_ids + ids, ctx.pixel_values, ctx.image_grid_thw,
                                 tuple(range(start, start + len(ids)))))  # fmt: skip
    return rows


def completion_loss(model, rows: list[ScoreRow], vocab: int, budget: int) -> torch.Tensor:
    """Mean cross-entropy of the rows' completion tokens under `model` (differentiable)."""
    hidden = torch.cat(hidden_at(model, rows, budget))
    targets = torch.tensor([r.input_ids[j] for r in rows for j in r.scored])
    logits = hidden @ output_head(model)[:vocab].T
    return F.cross_entropy(logits.float(), targets)


Progress = Callable[[str, int, float], None]  # (stage: "vision" or "format", step, loss)


def train_sft(cfg: Config, model_path: Path, out: Path, on_step: Progress | None = None) -> Path:
    """`warm_start.vision_steps` of vision pretraining (vigos_ray/sight.py) when set, then
    `warm_start.steps` AdamW steps (cosine decay) of the format on easy-VQA train; writes a Hugging Face folder at
    `out`. The vision tower (encoder and merger) is frozen in the format stage unless `warm_start.train_vision`:
    trained along, the tiny model's tower collapsed to one output for every image."""
    w = cfg.warm_start
    torch.manual_seed(cfg.run.seed)
    report = (lambda stage: functools.partial(on_step, stage)) if on_step else (lambda stage: None)
    processor = load_processor(model_path, cfg.model.min_pixels, cfg.model.max_pixels)
    model = load_model(model_path, "float32").train()
    labels = easyvqa_labels("train")
    if w.vision_steps:
        pretrain_vision(model, processor, labels, w.vision_steps, w.vision_batch, w.vision_lr, cfg.run.seed,
                        report("vision"))  # fmt: skip
    for name, p in model.named_parameters():
        p.requires_grad_(w.train_vision or ".visual." not in f".{name}")
    train_format(cfg, model, processor, labels, report("format"))
    weights = {name: p.detach() for name, p in model.named_parameters()}
    return write_model_folder(model_path, weights, out)


def train_format(cfg: Config, model, processor, by_image: dict[str, tuple[str, str]],
                 on_step: Callable[[int, float], None] | None = None) -> None:  # fmt: skip
    """The format stage: cross-entropy on `sft_rows` of easy-VQA train (`by_image`: its `easyvqa_labels`), every
    context, `model`'s trainable parameters."""
    w = cfg.warm_start
    records = read_records(write_easyvqa_jsonl(Path(cfg.run.cache_dir) / "data", "train"))
    labels = {str(r.fields["id"]): by_image[r.fields["image"]] for r in records}
    stream = PromptStream(records, seed=cfg.run.seed, min_pixels=cfg.model.min_pixels,
                          max_pixels=cfg.model.max_pixels)  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=w.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("cosine", 0, w.steps))
    vocab = len(processor.tokenizer)
    for step in range(w.steps):
        rows = sft_rows(processor, cfg, stream.next_batch(w.batch), labels)
        loss = completion_loss(model, rows, vocab, cfg.teachers["reasoning"].token_budget)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step, float(loss.detach()))


def settings(cfg: Config, base_model: Path) -> dict:
    """Everything a warm start's weights depend on: a folder trained with other settings is not reused."""
    prompts = {name: to_container(ctx) for name, ctx in cfg.prompts.items()}
    return {"base_model": str(base_model), "seed": cfg.run.seed, **to_container(cfg.warm_start), "prompts": prompts,
            "rea_teacher_sees_description": cfg.loss.rea_teacher_sees_description,
            "pixels": [cfg.model.min_pixels, cfg.model.max_pixels]}  # fmt: skip


def warm_start(cfg: Config, base_model: Path, out: Path) -> Path:
    """The warm start of `base_model` at `out`, trained once (process-safe): a folder whose recorded settings match
    is reused. With `warm_start.steps=0` the base model itself is the start (a model that already answers in
    format). `out/warm_start.json` records the settings and each stage's first and last losses."""
    if cfg.warm_start.steps == 0:
        return base_model
    if cfg.data.source not in ("easyvqa", "easyvqa_shortcut"):
        raise ConfigError(
            "warm_start.steps > 0 trains on targets built from easy-VQA's labels, but data.source is "
            f"{cfg.data.source!r}; set warm_start.steps=0 to start from model.path as it is"
        )
    wanted = settings(cfg, base_model)
    marker = out / "warm_start.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process building the same folder waits for the first
        if marker.is_file() and json.loads(marker.read_text())["settings"] == wanted:
            log.debug("warm start already trained: %s", out)
            return out
        w = cfg.warm_start
        vision = f"{w.vision_steps} vision steps, then " if w.vision_steps else ""
        log.info("warm start: %s%d supervised steps on easy-VQA train, once, into %s", vision, w.steps, out)
        losses: dict[str, list[float]] = {"vision": [], "format": []}
        totals, bars = {"vision": w.vision_steps, "format": w.steps}, {}

        def record(stage: str, step: int, loss: float) -> None:
            losses[stage].append(loss)
            if stage not in bars:  # one bar per stage, opened when the stage starts (its rate is its own)
                for done in bars.values():
                    done.close()
                bars[stage] = progress(total=totals[stage], desc=f"warm start ({stage})", unit="step")
            bars[stage].update(1)
            bars[stage].set_postfix(loss=f"{loss:.3f}", refresh=False)

        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:  # written aside and renamed: a killed build never looks finished
            train_sft(cfg, base_model, tmp, record)
            curves = {f"{stage}_loss_{end}": part for stage, curve in losses.items() if curve
                      for end, part in (("first", curve[:10]), ("last", curve[-10:]))}  # fmt: skip
            (tmp / "warm_start.json").write_text(json.dumps({"settings": wanted, **curves}))
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            for bar in bars.values():
                bar.close()
    return out


def initial_model(cfg: Config) -> Path:
    """The folder the student (and the self-distillation teachers) start from: `model.path`, or the tiny model
    built into `run.cache_dir` and, with `model.tiny_warm_start`, its warm start cached beside it (a random tiny
    model never writes the format, so only the reference teacher would have tokens to score)."""
    base = resolve_model_path(cfg.model, cfg.run.cache_dir, seed=cfg.run.seed).resolve()
    if cfg.model.path or not cfg.model.tiny_warm_start:
        return base
    key = hashlib.sha256(json.dumps(settings(cfg, base), sort_keys=True).encode()).hexdigest()[:8]
    return warm_start(cfg, base, base.parent / f"{base.name}-warm-{key}")


def base_config(cfg: Config) -> Config:
    """`cfg` with the tiny model's warm start off: the model a warm start is trained from."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tiny_warm_start=False))
