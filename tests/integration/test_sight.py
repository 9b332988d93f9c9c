"""A tiny model that looks at its image: vision pretraining on easy-VQA's train labels, then the format warm start
(issue #21). The slow test checks the seeing model's two targets on held-out items: the colour named from the
image alone at >= 90%, and accuracy with the true image >= 30 points above accuracy with a mismatched one."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from vigos_ray.config import load_config
from vigos_ray.easyvqa import easyvqa_labels
from vigos_ray.models import load_model, load_processor
from vigos_ray.sight import colour_named_from_image, pretrain_vision, probe_accuracy

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def subset(labels: dict, n: int, seed: int) -> dict:
    return dict(random.Random(seed).sample(sorted(labels.items()), n))


def test_vision_pretraining_teaches_the_tower_colour_from_train_images_and_touches_nothing_else(tiny_fast):
    torch.manual_seed(0)
    model = load_model(tiny_fast, "float32")
    processor = load_processor(tiny_fast, 56 * 56, 448 * 448)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = []
    classifier = pretrain_vision(model, processor, subset(easyvqa_labels("train"), 1200, 0), steps=120, batch=32,
                                 lr=2e-3, seed=0, on_step=lambda step, loss: losses.append(loss))  # fmt: skip
    accuracy = probe_accuracy(model, processor, classifier, subset(easyvqa_labels("test"), 400, 1))
    assert accuracy["colour"] >= 0.6, accuracy  # chance 1/8; 500 steps on every train image reach 94-97%
    assert sum(losses[-10:]) < 0.75 * sum(losses[:10])
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith("model.visual.") for name in changed)


@pytest.mark.slow  # the study's warm start (500 vision + 1,200 format steps, ~6 min) and a vLLM evaluation
def test_the_studys_warm_start_names_the_colour_from_the_image_and_answers_by_it(tmp_path, cache_dir):
    from vigos_ray.evaluation import eval_config, eval_files, evaluate, read_items
    from vigos_ray.preflight import held_out_data, preflight
    from vigos_ray.sft import base_config, warm_start
    from workers.rollout import RolloutWorker

    cfg = load_config(REPO / "configs" / "easyvqa_study.yaml", [f"run.cache_dir={cache_dir}"])
    base, _ = preflight(base_config(cfg))
    folder = warm_start(cfg, base, tmp_path / "warm")
    model = load_model(folder, "float32")
    processor = load_processor(folder, cfg.model.min_pixels, cfg.model.max_pixels)
    named = colour_named_from_image(model, processor, cfg, subset(easyvqa_labels("test"), 300, 0))
    assert named >= 0.90, f"colour named from the image alone on 300 test images: {named:.1%}"

    ecfg = eval_config(cfg)
    items = read_items(eval_files(cfg, held_out_data(cfg)), cfg, 160)
    worker = RolloutWorker(ecfg, folder)
    worker.use_folder_weights()
    report = evaluate(items, worker.generate, worker.tokenizer, ecfg, 4, 4, seed=0, image_probe=True)
    image = report["image"]
    assert image["sensitivity"] >= 0.30, f"true {image['true']:.1%} vs mismatched {image['mismatched']:.1%}"
