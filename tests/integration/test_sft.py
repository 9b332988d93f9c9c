"""The supervised warm start: targets built from easy-VQA's labels, the loss falls, and the exported model puts
more probability on the format than the model it started from."""

from __future__ import annotations

import json

import pytest
import torch

from vigos_ray.config import load_config
from vigos_ray.easyvqa import easyvqa_labels
from vigos_ray.models import load_model, load_processor
from vigos_ray.sft import CONTEXTS, completion_loss, sft_rows, target_text

pytestmark = pytest.mark.integration


def test_labels_come_from_each_images_colour_and_shape_answers():
    import easy_vqa

    labels = easyvqa_labels("train")
    paths = easy_vqa.get_train_image_paths()
    assert labels[paths[0]] == ("blue", "rectangle")  # image 0: "what is the blue shape?" -> rectangle
    assert len(labels) == len(paths) and all(colour and shape for colour, shape in labels.values())


@pytest.mark.e2e  # builds the default warm start (~30 s), as `make run` does first
def test_the_default_warm_start_lowers_the_loss_and_prefers_the_format_on_held_out_items(tiny_warm, tiny_fast,
                                                                                          cache_dir):  # fmt: skip
    """The default student (`model.tiny_warm_start`): the tiny model's warm start, trained once into the cache."""
    from vigos_ray.data import PromptStream, read_records
    from vigos_ray.easyvqa import write_easyvqa_jsonl
    from vigos_ray.sft import initial_model

    cfg = load_config(overrides=[f"run.cache_dir={cache_dir}", "model.max_pixels=12544"])
    record = json.loads((tiny_warm / "warm_start.json").read_text())
    losses_first, losses_last = record["format_loss_first"], record["format_loss_last"]
    assert sum(losses_last) / len(losses_last) < 0.5 * sum(losses_first) / len(losses_first)
    assert record["settings"]["steps"] == cfg.warm_start.steps and tiny_warm.name.startswith(tiny_fast.name)
    assert initial_model(load_config(overrides=[f"run.cache_dir={cache_dir}"])) == tiny_warm  # built once, reused
    other = load_config(overrides=[f"run.cache_dir={cache_dir}", "warm_start.lr=1e-3", "warm_start.steps=1"])
    assert initial_model(other) != tiny_warm  # other settings never reuse that folder
    folder = tiny_warm

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


def test_each_context_is_taught_what_its_teacher_is_asked_to_score(tiny_fast, cache_dir):
    from vigos_ray.data import PromptStream, read_records
    from vigos_ray.easyvqa import write_easyvqa_jsonl
    from vigos_ray.prompts import context_text

    cfg = load_config(overrides=[f"run.cache_dir={cache_dir}"])
    processor = load_processor(tiny_fast, cfg.model.min_pixels, cfg.model.max_pixels)
    tok = processor.tokenizer
    records = read_records(write_easyvqa_jsonl(cache_dir / "data", "train"))[:4]
    sample = PromptStream(records, seed=0).next_batch(1)[0]
    labels = {sample.id: ("red", "circle")}
    rows = dict(zip(CONTEXTS, sft_rows(processor, cfg, [sample], labels), strict=True))
    contexts = {name: context_text(processor, cfg.prompts[name], sample.problem, sample.answer) for name in CONTEXTS}

    def split(row):  # (context text, target text) of a row: every token after the context is scored
        start = row.scored[0]
        assert list(row.scored) == list(range(start, len(row.input_ids)))
        return tok.decode(row.input_ids[:start]), tok.decode(row.input_ids[start:])

    for name, row in rows.items():
        context, target = split(row)
        assert context.endswith(contexts[name].split("<|vision_end|>")[-1]), name
    assert split(rows["perception"])[1] == "The image shows one red circle on a light background.</description>"
    assert split(rows["reasoning"])[1].startswith("The picture holds a single circle")
    assert split(rows["reasoning"])[1].endswith(f"\\boxed{{{sample.answer}}}<|im_end|>")
    assert split(rows["student"])[1] == split(rows["reference"])[1]  # both write the whole completion
