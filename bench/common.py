"""What every benchmark shares: a markdown table printer, peak memory of a child process, and realistic rollouts.

Each benchmark prints one table with a ratio column against a baseline measured in the same run. Peak memory is
measured in a fresh child process per case (ru_maxrss above the RSS after its inputs are built), so that one
case's allocator caching cannot hide another's peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def table(title: str, header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) + " |")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: str, args: list[str], out: Path) -> dict:
    """Run `script --child ARGS OUT` in a fresh process; returns the JSON it wrote to OUT, or {"error": ...}."""
    done = subprocess.run([sys.executable, script, "--child", *args, str(out)], capture_output=True, text=True,
                          env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))  # fmt: skip
    if done.returncode != 0:
        why = "killed (out of memory?)" if done.returncode == -9 else done.stderr.strip().splitlines()[-1:]
        return {"error": str(why)}
    return json.loads(out.read_text())


def wide_model(cache: Path) -> Path:
    """The benchmarks' realistic model: Qwen2.5-VL architecture with the real 151,665-token vocabulary (151,808
    untied head rows), width 256, 4 text layers, fp32 (330 MB), random weights; built once into `cache`."""
    from vigos_ray.tiny import ensure_tiny_model

    return ensure_tiny_model(cache, "qwen_vocab", seed=0, hidden=256, layers=4, name="tiny-wide")


def plain_student(path: Path, cfg):
    """The single-process baselines' student: the fp32 model as `learner.*` sets it up (gradient checkpointing,
    LoRA), in train mode, and AdamW over what it trains."""
    import torch

    from vigos_ray.models import add_lora, load_model

    student = load_model(path, "float32", "cpu")
    if cfg.learner.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.learner.lora.enabled:
        student = add_lora(student, cfg.learner.lora).get_base_model()
    student.train()
    trainable = [p for p in student.parameters() if p.requires_grad]
    return student, trainable, torch.optim.AdamW(trainable, lr=cfg.learner.lr)


def synthetic_rollouts(samples, processor, cfg, valid_fraction: float = 0.5, words: int = 30, seed: int = 0):
    """Rollouts of the shapes training meets: `valid_fraction` in format (a description and reasoning of about
    `words` words each, a boxed answer), the rest broken (random allowed tokens, as long as a valid one)."""
    import random

    from vigos_ray.models import sampling_token_ids
    from vigos_ray.prompts import encode, student_text
    from vigos_ray.sampling import make_rollout

    rng = random.Random(seed)
    tok = processor.tokenizer
    allowed = sampling_token_ids(tok)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    vocabulary = [
        "the",
        "a",
        "shape",
        "colour",
        "image",
        "shows",
        "left",
        "right",
        "large",
        "small",
        "red",
        "blue",
        "green",
        "circle",
        "square",
        "triangle",
    ]
    rollouts = []
    for i, s in enumerate(samples):
        prompt = encode(processor, student_text(processor, s.problem, cfg.prompts), s.image).input_ids
        sentence = lambda: " ".join(rng.choice(vocabulary) for _ in range(words))  # noqa: E731
        text = f"{sentence()}.</description><think>{sentence()}.</think>\\boxed{{{s.answer}}}"
        ids = tok.encode(text, add_special_tokens=False) + [end]
        if i >= round(valid_fraction * len(samples)):
            ids = [rng.choice(allowed) for _ in range(len(ids))]
        rollouts.append(make_rollout(s.id, prompt, ids, [0.0] * len(ids), tok, 0))
    return rollouts
