"""Run configuration: typed dataclasses with every default, loaded from YAML + CLI dotlist and validated.

Load order: the schema below, then `--config FILE` (YAML that only overrides), then `key=value` overrides.
After `load_config` nothing sees an omegaconf DictConfig. Every error names the key to change.
This module imports no torch, ray or vllm.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped, out of range or inconsistent; the message names the key."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


# Prompt templates are ours. `{problem}` and `{answer}` are filled per sample; the image always comes first.
STUDENT_TEMPLATE = (
    "{problem}\n\n"
    "First describe what the image shows that matters for the question inside <description> </description>. "
    "Then reason step by step inside <think> </think>. Finish with the final answer written as \\boxed{{...}}."
)
PERCEPTION_TEMPLATE = ""  # the perception teacher sees the image alone: no question, no answer
REASONING_TEMPLATE = (
    "{problem}\n\nThe correct answer is {answer}. Using the image and that answer, reason step by step "
    "inside <think> </think>, then give the final answer as \\boxed{{...}}."
)
REFERENCE_TEMPLATE = (
    "{problem}\n\nThe correct answer is {answer}. Describe the relevant content of the image inside "
    "<description> </description>, reason step by step inside <think> </think>, and finish with \\boxed{{...}}."
)


@dataclass
class ModelConfig:
    # A Hugging Face Qwen2-VL / Qwen2.5-VL / Qwen3-VL folder. Empty: build the tiny model named by `tiny`.
    path: str = ""
    # Tiny real-architecture model built offline: `fast` (small trained tokenizer) or `qwen_vocab` (real
    # Qwen2.5 vocabulary, 151,665 tokens). Used only when `path` is empty.
    tiny: Literal["fast", "qwen_vocab"] = "fast"
    # Start the tiny model from its supervised warm start (warm_start.*), trained once into the cache beside it:
    # a random model never writes the output format, so only the reference teacher would have tokens to score.
    tiny_warm_start: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Image size range handed to the processor (pixels). Qwen2.5-VL patches are 28x28 after merging.
    min_pixels: int = 56 * 56
    max_pixels: int = 448 * 448

    def __post_init__(self) -> None:
        _require(self.min_pixels >= 28 * 28, "model.min_pixels", f"must be >= {28 * 28} (got {self.min_pixels})")
        _require(
            self.max_pixels >= self.min_pixels,
            "model.max_pixels",
            f"must be >= model.min_pixels={self.min_pixels} (got {self.max_pixels})",
        )


@dataclass
class DataConfig:
    # `easyvqa`: the embedded easy-VQA set (PyPI easy-vqa). `easyvqa_shortcut`: its colour and shape questions with
    # a planted wording prior drawn from run.seed (vigos_ray/easyvqa.py; docs/study.md, "Shortcut-prone data"). `files`:
    # JSONL/Parquet files in vigos_ray/data.py format.
    source: Literal["easyvqa", "easyvqa_shortcut", "files"] = "easyvqa"
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    # Use at most this many records per split (0 = all); keeps the CPU default quick.
    limit: int = 0
    shuffle: bool = True
    # What a malformed record does: `skip` (counted and logged once per kind) or `raise`.
    on_bad_record: Literal["skip", "raise"] = "skip"
    max_prompt_tokens: int = 1024
    # easyvqa_shortcut: the share of the training questions whose wording suggests an answer that agree with it.
    prior_agree: float = 0.9

    def __post_init__(self) -> None:
        _require(self.limit >= 0, "data.limit", f"must be >= 0 (got {self.limit})")
        _require(0 < self.prior_agree < 1, "data.prior_agree", f"must be in (0, 1) (got {self.prior_agree})")
        _require(self.max_prompt_tokens > 0, "data.max_prompt_tokens", f"must be > 0 (got {self.max_prompt_tokens})")
        if self.source == "files":
            _require(bool(self.train_files), "data.train_files", "must list at least one file when data.source=files")


@dataclass
class ContextConfig:
    """What one reader of a rollout sees before the completion tokens: a user turn (the image, then `template`
    with `{problem}` and `{answer}` filled per sample) and the opening of the assistant turn."""

    template: str = ""
    prefill: str = ""  # the assistant turn starts with this text
    # Where this context picks up the student's completion: at its first token (`start`), or at the reasoning right
    # after `<think>` (`think`: the prefill ends with `<think>` and the completion before it is not shown).
    resumes: Literal["start", "think"] = "start"


def default_contexts() -> dict[str, ContextConfig]:
    return {
        "student": ContextConfig(STUDENT_TEMPLATE, "<description>"),
        "perception": ContextConfig(PERCEPTION_TEMPLATE),
        "reasoning": ContextConfig(REASONING_TEMPLATE, "<think>", resumes="think"),
        "reference": ContextConfig(REFERENCE_TEMPLATE, "<description>"),
    }


def check_contexts(contexts: dict[str, ContextConfig]) -> None:
    _require("student" in contexts, "prompts.student", "is the context the student samples in; it cannot be removed")
    student = contexts["student"].template
    _require("{problem}" in student, "prompts.student.template", "must contain the {problem} placeholder")
    _require("{answer}" not in student, "prompts.student.template", "must not show the {answer} to the student")
    _require(contexts["student"].resumes == "start", "prompts.student.resumes", "must be start")
    for name, ctx in contexts.items():
        try:
            ctx.template.format(problem="", answer="")
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(
                f"config key 'prompts.{name}.template': {{{err.args[0]}}} is not a placeholder; use {{problem}} "
                "and {answer}, and double other braces ({{ }})"
            ) from None
        if ctx.resumes == "think":
            _require(ctx.prefill.endswith("<think>"), f"prompts.{name}.prefill", "must end with <think> to resume")
    for name in ("reasoning", "reference"):  # the privileged contexts of ViGOS and OPSD
        if name in contexts:
            _require("{answer}" in contexts[name].template, f"prompts.{name}.template", "must contain {answer}")
    if "perception" in contexts:
        _require("{answer}" not in contexts["perception"].template, "prompts.perception.template",
                 "must not show the {answer}")  # fmt: skip


@dataclass
class RolloutConfig:
    backend: Literal["vllm", "hf"] = "vllm"
    workers: int = 1
    num_gpus: float = 0.0  # per worker; tensor_parallel_size GPUs are needed when > 0
    num_cpus: float = 1.0
    tensor_parallel_size: int = 1
    samples_per_prompt: int = 1
    temperature: float = 1.1
    top_p: float = 0.95  # with top_k set, on CPU applied among the top-k only (workers/top_p.py: same tokens)
    top_k: int = 20
    max_new_tokens: int = 96  # a warm-started tiny model's answer is about 70 tokens
    # vLLM KV-cache size. On CPU pass bytes (else vLLM reserves most of RAM); on GPU a memory fraction.
    kv_cache_memory_bytes: int = 256 * 2**20
    gpu_memory_utilization: float = 0.85
    enforce_eager: bool = True

    def __post_init__(self) -> None:
        _require(self.workers >= 1, "rollout.workers", f"must be >= 1 (got {self.workers})")
        _require(self.num_gpus >= 0, "rollout.num_gpus", f"must be >= 0 (got {self.num_gpus})")
        _require(self.num_cpus >= 0, "rollout.num_cpus", f"must be >= 0 (got {self.num_cpus})")
        _require(self.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", "must be >= 1")
        _require(self.samples_per_prompt >= 1, "rollout.samples_per_prompt", "must be >= 1")
        _require(self.temperature > 0, "rollout.temperature", f"must be > 0 (got {self.temperature})")
        _require(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1] (got {self.top_p})")
        _require(self.top_k == -1 or self.top_k >= 1, "rollout.top_k", f"must be -1 (off) or >= 1 (got {self.top_k})")
        _require(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        _require(self.kv_cache_memory_bytes > 0, "rollout.kv_cache_memory_bytes", "must be > 0")
        _require(0 < self.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be in (0, 1]")
        if self.tensor_parallel_size > 1 and self.num_gpus > 0:  # on CPU its engine workers share the cores
            _require(
                self.num_gpus >= self.tensor_parallel_size,
                "rollout.num_gpus",
                f"must be >= rollout.tensor_parallel_size={self.tensor_parallel_size} (got {self.num_gpus})",
            )


@dataclass
class TeacherPoolConfig:
    min_workers: int = 1
    max_workers: int = 1
    num_gpus: float = 0.0  # per worker
    num_cpus: float = 1.0
    # Frozen weights this teacher loads. Empty: the student's initial weights (self-distillation).
    checkpoint: str = ""
    # Tokens per forward pass (contexts + scored completion), the batching budget.
    token_budget: int = 8192
    # Autoscaling between max(min_workers, 1) and max_workers: a scoring call slower than `scale_up_s` adds a
    # worker; when no call was slower than half of it for `idle_s` seconds, one worker is released.
    scale_up_s: float = 30.0
    idle_s: float = 120.0

    def check(self, role: str) -> None:
        key = f"teachers.{role}"
        _require(self.scale_up_s > 0, f"{key}.scale_up_s", f"must be > 0 (got {self.scale_up_s})")
        _require(self.idle_s > 0, f"{key}.idle_s", f"must be > 0 (got {self.idle_s})")
        _require(self.min_workers >= 0, f"{key}.min_workers", f"must be >= 0 (got {self.min_workers})")
        _require(self.max_workers >= 1, f"{key}.max_workers", f"must be >= 1 (got {self.max_workers})")
        _require(
            self.max_workers >= self.min_workers,
            f"{key}.max_workers",
            f"must be >= {key}.min_workers={self.min_workers} (got {self.max_workers})",
        )
        _require(self.num_gpus >= 0, f"{key}.num_gpus", f"must be >= 0 (got {self.num_gpus})")
        _require(self.num_cpus >= 0, f"{key}.num_cpus", f"must be >= 0 (got {self.num_cpus})")
        _require(self.token_budget >= 64, f"{key}.token_budget", f"must be >= 64 (got {self.token_budget})")


def default_teachers() -> dict[str, TeacherPoolConfig]:
    """One pool per teacher role of the built-in objectives (objective.py); a new role is a new key."""
    roles = ("perception", "reasoning", "reference", "privileged", "external")
    return {role: TeacherPoolConfig() for role in roles}


@dataclass
class ScoringConfig:
    # What a teacher ships to the learner per scored token (SPEC §7).
    payload: Literal["hidden", "topk", "sampled"] = "hidden"
    topk: int = 64

    def __post_init__(self) -> None:
        _require(self.topk >= 1, "scoring.topk", f"must be >= 1 (got {self.topk})")


@dataclass
class LossConfig:
    # vigos: three teachers; opsd: the privileged full-format teacher on every token; distill: external teacher.
    # Objectives are registered in vigos_ray/objective.py (`@objective`).
    objective: str = "vigos"
    # Divergence family: SPEC defaults are forward KL for perception/reasoning and reverse KL for reference.
    divergence: Literal["kl", "jsd", "sampled_rkl"] = "kl"
    jsd_beta: float = 0.5  # TRL convention: 0 = forward KL, 1 = reverse KL
    temperature: float = 1.0  # distillation temperature
    clip_mode: Literal["token", "entry", "none"] = "token"
    clip: float = 0.05
    perception_weight: float = 1.0
    reasoning_weight: float = 1.0
    reference_weight: float = 2.0
    # `code`: T_ra includes </think> and the \boxed{...} wrapper (reference code); `paper`: delimiters excluded.
    span_convention: Literal["code", "paper"] = "code"
    # The paper's Eq. 15 gives the reasoning teacher the description too; the reference code does not.
    rea_teacher_sees_description: bool = False
    # Tokens per chunk when the output head is applied for the loss. Peak memory is about 10 x chunk x vocab
    # floats (measured: 2.9 GB for 512 tokens x 152k vocab in fp32, bench/loss_memory.py), whatever the batch.
    chunk_tokens: int = 1024

    def __post_init__(self) -> None:
        _require(self.chunk_tokens >= 1, "loss.chunk_tokens", f"must be >= 1 (got {self.chunk_tokens})")
        _require(0 <= self.jsd_beta <= 1, "loss.jsd_beta", f"must be in [0, 1] (got {self.jsd_beta})")
        _require(self.temperature > 0, "loss.temperature", f"must be > 0 (got {self.temperature})")
        _require(self.clip >= 0, "loss.clip", f"must be >= 0 (got {self.clip}); use loss.clip_mode=none to disable")
        for name in ("perception_weight", "reasoning_weight", "reference_weight"):
            value = getattr(self, name)
            _require(value >= 0, f"loss.{name}", f"must be >= 0 (got {value})")
        total = self.perception_weight + self.reasoning_weight + self.reference_weight
        _require(total > 0, "loss.perception_weight", "the three loss weights are all zero: nothing would train")


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def __post_init__(self) -> None:
        _require(self.r >= 1, "learner.lora.r", f"must be >= 1 (got {self.r})")
        _require(self.alpha > 0, "learner.lora.alpha", f"must be > 0 (got {self.alpha})")
        _require(0 <= self.dropout < 1, "learner.lora.dropout", f"must be in [0, 1) (got {self.dropout})")
        if self.enabled:
            _require(bool(self.target_modules), "learner.lora.target_modules", "must name at least one module")


@dataclass
class LearnerConfig:
    workers: int = 2  # FSDP ranks (2 on the CPU default, to run the sharded path for real)
    num_gpus: float = 0.0  # per rank
    num_cpus: float = 1.0
    prompts_per_step: int = 4
    lr: float = 1e-4  # the tiny CPU default's; the paper's 5e-6 for 3B/7B is in configs/qwen25vl_*.yaml
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["linear", "constant", "cosine"] = "linear"
    grad_clip: float = 0.1
    # Micro-batches are cut by token count, not by sample count.
    micro_token_budget: int = 8192
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    # `sharded`: each rank builds the model without memory, shards it, and reads only its own rows of each tensor
    # from the checkpoint (workers/sharded_start.py). `full`: each rank loads the whole fp32 model, then shards it.
    load: Literal["sharded", "full"] = "sharded"

    def __post_init__(self) -> None:
        _require(self.workers >= 1, "learner.workers", f"must be >= 1 (got {self.workers})")
        _require(self.num_gpus >= 0, "learner.num_gpus", f"must be >= 0 (got {self.num_gpus})")
        _require(self.num_cpus >= 0, "learner.num_cpus", f"must be >= 0 (got {self.num_cpus})")
        _require(self.prompts_per_step >= 1, "learner.prompts_per_step", "must be >= 1")
        _require(self.lr > 0, "learner.lr", f"must be > 0 (got {self.lr})")
        _require(self.weight_decay >= 0, "learner.weight_decay", "must be >= 0")
        _require(self.warmup_steps >= 0, "learner.warmup_steps", "must be >= 0")
        _require(self.grad_clip >= 0, "learner.grad_clip", f"must be >= 0 (got {self.grad_clip}); 0 disables it")
        _require(self.micro_token_budget >= 64, "learner.micro_token_budget", "must be >= 64")
        if self.num_gpus > 0 and self.workers > 1:  # one rank may share a GPU (a one-GPU machine); NCCL ranks not
            whole = f"must be a whole number with learner.workers={self.workers} (NCCL needs a GPU per rank)"
            _require(self.num_gpus == int(self.num_gpus), "learner.num_gpus", whole)


@dataclass
class WeightSyncConfig:
    # How a push travels (vigos_ray/transports/): `gloo` (CPU buffers), `nccl` (GPU to GPU), `ipc` (learner rank 0
    # and the engine on one GPU), `object_store` (Ray's object store: the push does not wait for the receivers;
    # rollout.tensor_parallel_size 1 only). `auto`: when either end is on CPU, object_store in async mode (measured
    # 1.19x per step at the real vocabulary: the learner goes on while the engine finishes sampling) and gloo
    # otherwise; on GPUs ipc or nccl by whether learner rank 0 and the engines share a GPU. `collective` is the
    # former name of gloo.
    transport: str = "auto"
    bucket_mb: int = 256  # tensors are packed into buckets of about this size
    timeout_s: float = 600.0  # a push that takes longer raises instead of hanging
    # After the first full push, send only the parts of the model that training changes (with LoRA: the adapted
    # blocks, not the embeddings or the output head). A new or restarted rollout worker still gets everything.
    delta: bool = True

    def __post_init__(self) -> None:
        from vigos_ray.transports import available

        if self.transport == "collective":
            self.transport = "gloo"
        names = sorted(available() | {"auto"})
        _require(self.transport in names, "weight_sync.transport", f"must be one of {names} (got {self.transport!r})")
        _require(self.bucket_mb >= 1, "weight_sync.bucket_mb", f"must be >= 1 (got {self.bucket_mb})")
        _require(self.timeout_s > 0, "weight_sync.timeout_s", f"must be > 0 (got {self.timeout_s})")


@dataclass
class CheckpointConfig:
    # A step ends with a checkpoint every `every_steps` steps and/or `every_minutes` minutes (0 = off); the last
    # step and a preemption notice (SIGTERM) always write one. Checkpoints live in runs/<run.name>/checkpoints.
    every_steps: int = 0
    every_minutes: float = 30.0
    keep: int = 2  # complete checkpoints kept; older ones are deleted after a newer one is published
    # `auto`: resume from this run's latest complete checkpoint if there is one; `never`; or a step_N directory.
    resume: str = "auto"
    # After SIGTERM the current step finishes and a checkpoint is written; this many seconds after the notice
    # the process exits regardless (the previous checkpoint stays intact).
    grace_s: float = 300.0

    def __post_init__(self) -> None:
        _require(self.grace_s > 0, "checkpoint.grace_s", f"must be > 0 (got {self.grace_s})")
        _require(self.every_steps >= 0, "checkpoint.every_steps", f"must be >= 0 (got {self.every_steps})")
        _require(self.every_minutes >= 0, "checkpoint.every_minutes", f"must be >= 0 (got {self.every_minutes})")
        _require(self.keep >= 1, "checkpoint.keep", f"must be >= 1 (got {self.keep})")
        _require(bool(self.resume.strip()), "checkpoint.resume", "must be auto, never or a checkpoint directory")


@dataclass
class RunConfig:
    name: str = "vigos"
    output_dir: str = "runs"
    # Where built tiny models and prepared datasets are cached between runs.
    cache_dir: str = ".cache/vigos"
    seed: int = 0
    steps: int = 20
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = 1
    # torch threads of each CPU actor (rollout, teacher, learner). 0 = auto: the node's cores shared among the actors
    # that compute at the same time (sync: one stage at a time; async: sampling beside scoring or training). Ray
    # would give each actor one thread (`OMP_NUM_THREADS=1` for `num_cpus=1`). GPU actors keep Ray's setting.
    cpu_threads: int = 0
    # Ray cluster to join; empty starts a local one on loopback (or joins the job's cluster under `ray job submit`).
    ray_address: str = ""

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "run.name", "must not be empty")
        _require("/" not in self.name, "run.name", f"must not contain '/' (got {self.name!r})")
        _require(self.steps >= 1, "run.steps", f"must be >= 1 (got {self.steps})")
        _require(self.max_staleness >= 0, "run.max_staleness", f"must be >= 0 (got {self.max_staleness})")
        _require(self.cpu_threads >= 0, "run.cpu_threads", f"must be >= 0, 0 = auto (got {self.cpu_threads})")
        if self.mode == "sync":
            _require(self.max_staleness <= 1, "run.max_staleness", "has no effect in run.mode=sync; leave it at 0 or 1")


@dataclass
class EvalConfig:
    # Decoding and sampling of launch/eval.py (SPEC §9: 5 samples, temperature 1.0, top-p 0.9, top-k 20, 4096 new
    # tokens); `k` of Pass@k / Avg@k is at most `samples`.
    samples: int = 5
    k: int = 5
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 20
    max_new_tokens: int = 4096
    limit: int = 0  # evaluate at most this many items (0 = all)
    image_probe: bool = True  # also sample with mismatched images (image sensitivity)
    # During training: evaluate `every_steps` steps (0 = never) on `during_train_items` held-out items, with
    # `during_train_samples` samples each, through the rollout workers; logged as eval/* metrics.
    every_steps: int = 0
    during_train_items: int = 16
    during_train_samples: int = 1

    def __post_init__(self) -> None:
        _require(self.samples >= 1, "eval.samples", f"must be >= 1 (got {self.samples})")
        _require(1 <= self.k <= self.samples, "eval.k", f"must be in [1, eval.samples={self.samples}] (got {self.k})")
        _require(self.temperature >= 0, "eval.temperature", f"must be >= 0 (got {self.temperature})")
        _require(0 < self.top_p <= 1, "eval.top_p", f"must be in (0, 1] (got {self.top_p})")
        _require(self.max_new_tokens >= 1, "eval.max_new_tokens", f"must be >= 1 (got {self.max_new_tokens})")
        _require(self.limit >= 0, "eval.limit", f"must be >= 0 (got {self.limit})")
        _require(self.every_steps >= 0, "eval.every_steps", f"must be >= 0 (got {self.every_steps})")


@dataclass
class MetricsConfig:
    # Where per-step metrics go, besides metrics.jsonl (always written): any of console, tensorboard, wandb, mlflow.
    sinks: list[str] = field(default_factory=lambda: ["console"])
    console_every: int = 5  # a one-line step summary on the terminal every this many steps (and the last)
    wandb_project: str = "vigos-ray"
    wandb_mode: Literal["offline", "online"] = "offline"
    mlflow_uri: str = ""  # empty: a local file store in runs/<run.name>/mlruns
    mlflow_experiment: str = "vigos-ray"

    def __post_init__(self) -> None:
        known = {"console", "tensorboard", "wandb", "mlflow"}
        for sink in self.sinks:
            _require(sink in known, "metrics.sinks", f"unknown sink {sink!r}; choose from {sorted(known)}")
        _require(self.console_every >= 1, "metrics.console_every", f"must be >= 1 (got {self.console_every})")


@dataclass
class WarmStartConfig:
    # The supervised warm start (vigos_ray/sft.py): targets built from easy-VQA's labels teach the output format in
    # the student's context and in each teacher's. Used by the tiny default (model.tiny_warm_start), launch/sft.py
    # and the study. 150 steps (about 25 s on 2 cores) leave the tiny model in format on most rollouts, not all:
    # the default run then gives every teacher, the reference teacher included, tokens to score.
    steps: int = 150
    batch: int = 8  # samples per step (each gives one row per context: student, perception, reasoning, reference)
    lr: float = 3e-3  # peak learning rate, cosine decay to 0
    # Train the vision tower too (false: it keeps the initial model's features; trained, the tiny model's tower
    # collapsed to one output for every image).
    train_vision: bool = False
    # Vision pretraining before the format warm start (vigos_ray/sight.py): the tower learns to name each
    # easy-VQA train image's colour and shape, then stays frozen while the language model learns to read it. 0: off
    # (the tower keeps its random features, which the tiny language model never learns to read).
    vision_steps: int = 0
    vision_batch: int = 64  # images per vision step
    vision_lr: float = 2e-3

    def __post_init__(self) -> None:
        _require(self.steps >= 0, "warm_start.steps", f"must be >= 0 (got {self.steps}; 0: no warm start)")
        _require(self.vision_steps >= 0, "warm_start.vision_steps", f"must be >= 0 (got {self.vision_steps})")
        _require(self.vision_batch >= 1, "warm_start.vision_batch", f"must be >= 1 (got {self.vision_batch})")
        _require(self.vision_lr > 0, "warm_start.vision_lr", f"must be > 0 (got {self.vision_lr})")
        _require(self.batch >= 1, "warm_start.batch", f"must be >= 1 (got {self.batch})")
        _require(self.lr > 0, "warm_start.lr", f"must be > 0 (got {self.lr})")


@dataclass
class StudyConfig:
    # launch/study.py (issue #8): a supervised warm start, then every method trained `run.steps` steps from it for
    # every seed, then every model evaluated (eval.*) on the same held-out items with the same sampling seeds.
    methods: list[str] = field(default_factory=lambda: ["vigos", "opsd", "none"])  # none: the warm start as is
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    palr_items: int = 32  # items whose warm-start rollouts the PALR diagnostic measures

    def __post_init__(self) -> None:
        known = ("vigos", "opsd", "none")
        _require(bool(self.methods), "study.methods", f"must name at least one of {list(known)}")
        for method in self.methods:
            _require(method in known, "study.methods", f"unknown method {method!r}; choose from {list(known)}")
        _require(len(set(self.methods)) == len(self.methods), "study.methods", "names a method twice")
        _require(bool(self.seeds), "study.seeds", "must list at least one seed")
        _require(len(set(self.seeds)) == len(self.seeds), "study.seeds", "lists a seed twice")
        _require(self.palr_items >= 0, "study.palr_items", "must be >= 0 (0: no PALR)")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # The contexts the student and the teachers read, by name (objective.py's segments name them).
    prompts: dict[str, ContextConfig] = field(default_factory=default_contexts)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # One pool of frozen teacher workers per role, by name (objective.py's segments name them).
    teachers: dict[str, TeacherPoolConfig] = field(default_factory=default_teachers)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

    def teacher_pools(self) -> dict[str, TeacherPoolConfig]:
        """The teacher pools this run starts: the roles the segments of `loss.objective` are scored by."""
        from vigos_ray.objective import segments

        return {seg.teacher: self.teachers[seg.teacher] for seg in segments(self.loss)}

    def context(self, name: str) -> ContextConfig:
        """The context `name` as this run renders it. With loss.rea_teacher_sees_description (paper Eq. 15) the
        reasoning teacher reads the whole completion, so its context opens like the student's."""
        ctx = self.prompts[name]
        if name == "reasoning" and self.loss.rea_teacher_sees_description:
            return dataclasses.replace(ctx, prefill=self.prompts["student"].prefill, resumes="start")
        return ctx

    def __post_init__(self) -> None:
        from vigos_ray.objective import OBJECTIVES, segments

        check_contexts(self.prompts)
        for role, pool in self.teachers.items():
            pool.check(role)
        for seg in segments(self.loss):
            what = f"loss.objective={self.loss.objective} scores segment {seg.name!r} with"
            _require(
                seg.teacher in self.teachers,
                f"teachers.{seg.teacher}",
                f"{what} this teacher role: configure its pool (e.g. teachers.{seg.teacher}.max_workers=1)",
            )
            _require(seg.context in self.prompts, f"prompts.{seg.context}",
                     f"{what} this context: give it a template (prompts.{seg.context}.template=...)")  # fmt: skip
        known = {seg.teacher for fn in OBJECTIVES.values() for seg in fn(self.loss)}
        for role in self.teachers:  # a pool no objective uses is most likely a misspelt role
            hint = difflib.get_close_matches(role, sorted(known), n=1)
            _require(role in known, f"teachers.{role}", f"no registered objective scores with this role; known: "
                     f"{sorted(known)}" + (f". Did you mean teachers.{hint[0]}?" if hint else ""))  # fmt: skip
        rollouts = self.learner.prompts_per_step * self.rollout.samples_per_prompt
        _require(
            rollouts >= self.learner.workers,
            "learner.prompts_per_step",
            f"gives {rollouts} rollouts per step, fewer than learner.workers={self.learner.workers} ranks to feed",
        )
        if self.eval.every_steps and self.data.source == "files":
            _require(bool(self.data.eval_files), "data.eval_files", "must list held-out files if eval.every_steps > 0")
        if self.loss.objective == "distill":
            _require(
                bool(self.teachers["external"].checkpoint),
                "teachers.external.checkpoint",
                "loss.objective=distill needs an external teacher checkpoint here",
            )
        if self.loss.divergence == "sampled_rkl":
            _require(
                self.scoring.payload == "sampled",
                "scoring.payload",
                "loss.divergence=sampled_rkl only needs log q(y_t): set scoring.payload=sampled",
            )
        if self.scoring.payload == "sampled":
            _require(
                self.loss.divergence == "sampled_rkl",
                "loss.divergence",
                "scoring.payload=sampled carries no distribution; it only supports loss.divergence=sampled_rkl",
            )
        if self.loss.clip_mode == "entry":
            _require(
                self.scoring.payload != "sampled",
                "loss.clip_mode",
                "entry-wise clipping needs teacher distributions; use clip_mode=token with sampled payloads",
            )
        transport = self.weight_sync.transport
        if transport in ("nccl", "ipc"):
            on_gpu = self.learner.num_gpus > 0 and self.rollout.num_gpus > 0 and self.rollout.backend == "vllm"
            why = "needs the learner and vLLM rollout workers on GPUs (learner.num_gpus, rollout.num_gpus > 0)"
            _require(on_gpu, "weight_sync.transport", f"{transport} {why}; use gloo or auto on CPU")
        if transport == "object_store":
            _require(
                self.rollout.tensor_parallel_size == 1,
                "weight_sync.transport",
                "object_store reaches Ray workers only, not the engine workers of rollout.tensor_parallel_size > 1: "
                "use auto, gloo or nccl",
            )


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        node = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    keys = []
    for name, value in node.items():
        key = f"{prefix}{name}"
        keys.append(key)
        if dataclasses.is_dataclass(value) or isinstance(value, dict):
            keys.extend(_all_keys(value, key + "."))
    return keys


MOVED = {"teachers.payload": "scoring.payload", "teachers.topk": "scoring.topk"}  # old key -> new key


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if key in MOVED:
        return ConfigError(f"config key '{key}' (from {source}) is now '{MOVED[key]}'")
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        known = _all_keys(Config())
        hint = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if not hint:  # a misspelled leaf inside a known section: compare the leaf names of that section
            section = key.rpartition(".")[0]
            siblings = [k for k in known if k.rpartition(".")[0] == section]
            hint = difflib.get_close_matches(key, siblings, n=1, cutoff=0.3)
        suggestion = f" Did you mean '{hint[0]}'?" if hint else ""
        return ConfigError(f"unknown config key '{key}' (from {source}).{suggestion}")
    if isinstance(err, ValidationError):
        first_line = str(err).splitlines()[0]
        return ConfigError(f"config key '{key}' (from {source}): {first_line}")
    return ConfigError(f"config error at '{key}' (from {source}): {str(err).splitlines()[0]}")


def _parse(read, source: str) -> Any:
    import yaml

    try:
        return read()
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {' '.join(str(err).split())}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults <- YAML file <- `key=value` overrides, validated; returns plain dataclasses."""
    merged = OmegaConf.structured(Config)
    layers: list[tuple[str, Any]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass --config with an existing YAML file")
        layers.append((str(path), _parse(lambda: OmegaConf.load(path), str(path))))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. rollout.temperature=1.1)")
        source = f"override {item!r}"
        layers.append((source, _parse(lambda item=item: OmegaConf.from_dotlist([item]), source)))
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            raise _explain(err, source) from None
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _explain(err, "the merged config") from None
    assert isinstance(config, Config)
    return config


def to_container(config: Config) -> dict[str, Any]:
    """The config as nested plain dicts (for trackers that store a run's parameters)."""
    return dataclasses.asdict(config)


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_config(config: Config, path: str | Path) -> None:
    """Write the fully resolved config, loadable again with `load_config(path)`."""
    Path(path).write_text(to_yaml(config))
