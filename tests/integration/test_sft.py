"""The supervised warm start: targets built from easy-VQA's labels, the loss falls, and the exported model puts
more probability on the format than the model it started from."""

from __future__ import annotations

import pytest
import torch

from vigos_ray.config import load_config
from vigos_ray.models import load_model, load_processor
from vigos_ray.sft import completion_loss, easyvqa_labels, sft_rows, target_text, train_sft

pytestmark = pytest.mark.integration


def test_labels_come_from_each_images_colour_and_shape_answers():
    import easy_vqa

    labels = easyvqa_labels("train")
    paths = easy_vqa.get_train_image_paths()
    assert labels[paths[0]] == ("blue", "rectangle")  # image 0: "what is the blue shape?" -> rectangle
    assert len(labels) == len(paths) and all(colour and shape for colour, shape in labels.values())


def test_warm_start_lowers_the_loss_and_the_export_prefers_the_format(tmp_path, tiny_fast, cache_dir):
    from vigos_ray.data import PromptStream, read_records
    from vigos_ray.easyvqa import write_easyvqa_jsonl

    cfg = load_config(overrides=[f"model.path={tiny_fast}", f"run.cache_dir={cache_dir}", "model.max_pixels=12544"])
    losses = []
    folder = train_sft(cfg, tiny_fast, tmp_path / "sft", steps=40, batch=4, lr=3e-3,
                       on_step=lambda step, loss: losses.append(loss))  # fmt: skip
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5

    # held-out items (the test split): the exported model's loss on the format targets is far below the start's
    processor = load_processor(folder, cfg.model.min_pixels, cfg.model.max_pixels)
    records = read_records(write_easyvqa_jsonl(cache_dir / "data", "test"))[:40]
    samples = PromptStream(records, seed=1, max_pixels=12544).next_batch(4)
    by_image = easyvqa_labels("test")
    labels = {str(r.fields["id"]): by_image[r.fields["image"]] for r in records}
    rows = sft_rows(processor, cfg, samples, labels)
    vocab = len(processor.tokenizer)
    with torch.no_grad():
        before = completion_loss(load_model(tiny_fast, "float32"), rows, vocab, 4096)
        after = completion_loss(load_model(folder, "float32"), rows, vocab, 4096)
    assert after < 0.5 * before
    assert target_text(samples[0], *labels[samples[0].id]).endswith(f"\\boxed{{{samples[0].answer}}}")
