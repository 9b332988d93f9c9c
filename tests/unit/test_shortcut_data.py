"""The shortcut-prone variant of easy-VQA (data.source=easyvqa_shortcut): a planted wording prior, held to its
stated rate in train, broken on half of the held-out items, and the same for every arm of a study."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from vigos_ray.config import load_config
from vigos_ray.easyvqa import COLOURS, SHAPES, Prior, easyvqa_labels, shortcut_records
from vigos_ray.preflight import held_out_data
from vigos_ray.study import Arm, arm_config


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def splits():
    return shortcut_records("train", seed=0), shortcut_records("test", seed=0)


def test_the_prior_reads_the_attribute_a_question_names_and_nothing_else():
    prior = Prior.draw(0)
    assert sorted(prior.colour_of) == sorted(SHAPES) and len(set(prior.colour_of.values())) == len(SHAPES)
    assert sorted(prior.shape_of) == sorted(COLOURS)
    assert Counter(prior.shape_of.values()) == Counter({"circle": 3, "rectangle": 3, "triangle": 2})
    assert prior.suggests("what color is the circle?") == prior.colour_of["circle"]
    assert prior.suggests("what is the color of the triangle?") == prior.colour_of["triangle"]
    assert prior.suggests("what is the teal shape?") == prior.shape_of["teal"]
    for neutral in ("what color is the shape?", "what shape is in the image?", "what shape is present?"):
        assert prior.suggests(neutral) is None
    assert Prior.draw(1) != prior  # another seed plants another prior


def test_train_holds_the_stated_agreement_and_as_many_neutral_questions(splits):
    train, _ = splits
    prior = Prior.draw(0)
    suggestive = [r for r in train if prior.suggests(r["problem"]) is not None]
    agreeing = [r for r in suggestive if prior.suggests(r["problem"]) == r["answer"]]
    assert len(agreeing) / len(suggestive) == pytest.approx(0.9, abs=0.002)
    assert len(train) == 2 * len(suggestive)
    assert all(r["answer"] in COLOURS + SHAPES for r in train)  # open questions only: no yes/no
    assert all(r["prior_conflict"] == (prior.suggests(r["problem"]) != r["answer"]) for r in suggestive)
    assert set(easyvqa_labels("train")) >= {r["image"] for r in train}
    assert len({r["id"] for r in train}) == len(train)
    # in easy-VQA the wording says nothing: the same questions agree at about 1/8 (colour) and 1/3 (shape)
    agree_lower = shortcut_records("train", seed=0, agree=0.5)
    suggestive_lower = [r for r in agree_lower if "prior_conflict" in r]
    agreeing_lower = sum(not r["prior_conflict"] for r in suggestive_lower)
    assert agreeing_lower / len(suggestive_lower) == pytest.approx(0.5, abs=0.01)


def test_held_out_items_alternate_conflict_and_consistency_on_test_images_only(splits):
    train, test = splits
    prior = Prior.draw(0)
    assert [r["prior_conflict"] for r in test[:6]] == [False, True] * 3  # any prefix (eval.limit) is balanced
    assert sum(r["prior_conflict"] for r in test) * 2 == len(test) > 300
    assert all(r["prior_conflict"] == (r["prior_answer"] != r["answer"]) for r in test)
    assert all(r["prior_answer"] == prior.suggests(r["problem"]) for r in test)
    assert set(easyvqa_labels("test")) >= {r["image"] for r in test}
    assert not {r["image"] for r in test} & {r["image"] for r in train}
    assert shortcut_records("test", seed=0) == test and shortcut_records("test", seed=1) != test


def test_a_run_reads_the_variant_from_its_seed_and_every_study_arm_reads_the_studys(tmp_path):
    cfg = load_config(overrides=[f"run.cache_dir={tmp_path}", "data.source=easyvqa_shortcut", "run.seed=5"])
    (test_file,) = held_out_data(cfg)
    assert read_jsonl(test_file) == shortcut_records("test", seed=5)
    arm = arm_config(cfg, Arm("vigos", 2), tmp_path / "warm", tmp_path / "arms")
    assert arm.run.seed == 2 and arm.data.source == "files" and arm.data.eval_files == [test_file]
    (train_file,) = arm.data.train_files
    assert read_jsonl(train_file) == shortcut_records("train", seed=5)
