"""A tiny model that sees: vision pretraining before the warm start, and the check that the result reads its image.

A real VLM starts from a pretrained vision encoder; the tiny model's tower is random, and a random tower's
features carry the colour only weakly (a linear probe reads it at 47%, chance 12.5%), too weakly for a 2-layer
language model to learn to read in a warm start. So, at tiny scale and in about a minute: the tower (patch
embedding, blocks and merger) is trained with a linear classifier on its mean merged output, to name each easy-VQA
*train* image's colour and shape (labels read off the answers to its questions; the test images are never seen).
The classifier is thrown away afterwards; the format warm start then keeps the tower frozen and teaches the
language model to read its features (vigos_ray/sft.py). Measured on the 1,000 test images after 500 steps: colour
94-97%, shape 41-49% (chance 33%: four merged tokens of a 56 x 56 image carry little of the outline). After the
study's warm start (1,200 format steps) the model names the colour from the image alone on 98.8% of test images
(`colour_named_from_image`); docs/study.md has the measurements.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from vigos_ray.config import Config
from vigos_ray.easyvqa import COLOURS, SHAPES
from vigos_ray.prompts import context_text, encode


def image_tensors(processor, labels: dict[str, tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every labelled image's patches [images, patches, features], its grid (1, 3) and its class targets
    [images, 2] (colour index, shape index; -100 where the label is unknown)."""
    paths = sorted(labels)
    batch = processor.image_processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
    grid = batch["image_grid_thw"]
    if not bool((grid == grid[0]).all()):
        raise ValueError("vision pretraining stacks images of one size; these images resize to different grids")
    patches = batch["pixel_values"].view(len(paths), -1, batch["pixel_values"].shape[-1])
    index = lambda names, name: names.index(name) if name in names else -100  # noqa: E731
    targets = torch.tensor([[index(COLOURS, labels[p][0]), index(SHAPES, labels[p][1])] for p in paths])
    return patches, grid[:1], targets


def pooled_features(visual, patches: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The tower's merged output averaged over each image's tokens: [images, d]."""
    out = visual(patches.flatten(0, 1), grid_thw=grid.repeat(len(patches), 1))
    merged = out.pooler_output if hasattr(out, "pooler_output") else out
    return merged.view(len(patches), -1, merged.shape[-1]).mean(1)


def split_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's output as (colour logits, shape logits)."""
    colour, shape = logits.split([len(COLOURS), len(SHAPES)], dim=-1)
    return colour, shape


def class_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    colour, shape = split_logits(logits)
    return F.cross_entropy(colour, targets[:, 0], ignore_index=-100) + F.cross_entropy(
        shape, targets[:, 1], ignore_index=-100
    )


def pretrain_vision(
    model, processor, labels: dict[str, tuple[str, str]], steps: int, batch: int, lr: float, seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> torch.nn.Linear:  # fmt: skip
    """Train `model`'s vision tower in place for `steps` AdamW steps of `batch` images; returns the classifier."""
    patches, grid, targets = image_tensors(processor, labels)
    visual = model.model.visual
    generator = torch.Generator().manual_seed(seed)
    classifier = torch.nn.Linear(visual.merger.mlp[-1].out_features, len(COLOURS) + len(SHAPES))
    params = [*visual.parameters(), *classifier.parameters()]
    for p in visual.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    visual.train()
    for step in range(steps):
        idx = torch.randint(0, len(patches), (batch,), generator=generator)
        loss = class_loss(classifier(pooled_features(visual, patches[idx], grid)), targets[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step, float(loss.detach()))
    return classifier


@torch.no_grad()
def probe_accuracy(model, processor, classifier, labels: dict[str, tuple[str, str]]) -> dict[str, float]:
    """The classifier's colour and shape accuracy on `labels`' images (e.g. the test split's)."""
    patches, grid, targets = image_tensors(processor, labels)
    logits = torch.cat([classifier(pooled_features(model.model.visual, patches[i : i + 256], grid))
                        for i in range(0, len(patches), 256)])  # fmt: skip
    colour, shape = split_logits(logits)
    known = targets >= 0
    return {"colour": float((colour.argmax(-1) == targets[:, 0])[known[:, 0]].float().mean()),
            "shape": float((shape.argmax(-1) == targets[:, 1])[known[:, 1]].float().mean())}  # fmt: skip


@torch.no_grad()
def colour_named_from_image(model, processor, cfg: Config, labels: dict[str, tuple[str, str]]) -> float:
    """The share of `labels`' images (path -> colour, shape) whose colour is the first colour word `model` writes
    when it describes the image alone: the perception context, greedy decoding."""
    context = context_text(processor, cfg.context("perception"), "")
    items = [(path, colour) for path, (colour, _) in labels.items() if colour in COLOURS]
    right = 0
    for path, colour in items:
        enc = encode(processor, context, Image.open(path).convert("RGB"))
        prompt = torch.tensor([enc.input_ids])
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), pixel_values=enc.pixel_values,
                             image_grid_thw=enc.image_grid_thw, max_new_tokens=24, do_sample=False)  # fmt: skip
        words = re.findall(r"[a-z]+", processor.tokenizer.decode(out[0, prompt.shape[1] :]).lower())
        right += next((w for w in words if w in COLOURS), None) == colour
    return right / len(items)
