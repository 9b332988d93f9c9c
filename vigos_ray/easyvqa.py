"""The embedded default dataset: easy-VQA (PyPI `easy-vqa`, MIT licence), written in our record format.

4,000 train / 1,000 test 64x64 images of one coloured shape, about 48k questions whose answers are a shape,
a colour, or yes/no. The JSONL records point at the package's own PNG files; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vigos_ray.config import Config

Split = Literal["train", "test"]


def _questions(split: Split) -> tuple[list[str], list[str], list[int], dict[int, str]]:
    """easy-VQA's questions, answers and image ids of one split, and its image paths by id."""
    import easy_vqa

    if split == "train":
        return (*easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths())
    return (*easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths())


def write_easyvqa_jsonl(out_dir: str | Path, split: Split) -> Path:
    """Write `easyvqa-<split>.jsonl` into `out_dir` (once; reused after) and return its path."""
    out = Path(out_dir) / f"easyvqa-{split}.jsonl"
    if out.is_file():
        return out
    questions, answers, image_ids, image_paths = _questions(split)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w") as f:
        for i, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids, strict=True)):
            record = {
                "id": f"easyvqa-{split}-{i}",
                "image": image_paths[image_id],
                "problem": question,
                "answer": answer,
            }
            f.write(json.dumps(record) + "\n")
    tmp.replace(out)
    return out


def answer_vocabulary() -> list[str]:
    import easy_vqa

    return list(easy_vqa.get_answers())


# --- Shortcut-prone variant -------------------------------------------------------------------------------------
# easy-VQA's open questions often name one attribute of the shape and ask for the other ("what color is the
# circle?", "what is the teal shape?"). In easy-VQA the two are independent, so the wording says nothing about the
# answer. The shortcut variant plants a prior: each shape gets a colour it "usually" has and each colour a shape,
# drawn from a seed, and the training split keeps these questions mostly where the answer agrees with that prior,
# so a model can score well on them from the wording alone. The held-out split asks the same kinds of question
# about test images, half of them where the prior is wrong (`prior_conflict`; `prior_answer` is what the wording
# suggests): only a model that reads the image answers those, and a model that took the shortcut gives the
# prior's answer there. Yes/no questions are left out of both splits (their answer is half guessable from nothing).
COLOURS = ("red", "green", "blue", "black", "gray", "yellow", "teal", "brown")
SHAPES = ("circle", "rectangle", "triangle")


@dataclass(frozen=True)
class Prior:
    """The planted prior: the colour each shape is said to have, the shape each colour is said to have."""

    colour_of: dict[str, str]
    shape_of: dict[str, str]

    @classmethod
    def draw(cls, seed: int) -> Prior:
        rng = random.Random(seed)
        colour_of = dict(zip(SHAPES, rng.sample(COLOURS, len(SHAPES)), strict=True))
        return cls(colour_of, {c: SHAPES[i % len(SHAPES)] for i, c in enumerate(rng.sample(COLOURS, len(COLOURS)))})

    def suggests(self, question: str) -> str | None:
        """The answer the question's wording suggests, or None where it names nothing to go by."""
        words = set(re.findall(r"[a-z]+", question.lower()))
        if words & {"color", "colour"}:
            named = words & set(SHAPES)
            return self.colour_of[named.pop()] if named else None
        if "shape" in words and words & set(COLOURS):
            return self.shape_of[(words & set(COLOURS)).pop()]
        return None


def easyvqa_labels(split: Split = "train") -> dict[str, tuple[str, str]]:
    """Image path -> (colour, shape), read off the answers to each image's colour and shape questions."""
    _, answers, ids, paths = _questions(split)
    colour: dict[int, str] = {}
    shape: dict[int, str] = {}
    for answer, image in zip(answers, ids, strict=True):
        if answer in COLOURS:
            colour[image] = answer
        elif answer in SHAPES:
            shape[image] = answer
    # an image whose questions are all yes/no keeps a vaguer description
    return {path: (colour.get(i, "coloured"), shape.get(i, "shape")) for i, path in paths.items()}


def _open_questions(split: Split) -> list[tuple[str, str, str]]:
    """(question, answer, image path) of every question whose answer is a colour or a shape."""
    questions, answers, image_ids, paths = _questions(split)
    return [(q, a, paths[i]) for q, a, i in zip(questions, answers, image_ids, strict=True) if a in COLOURS + SHAPES]


def shortcut_records(split: Split, seed: int, agree: float = 0.9) -> list[dict]:
    """The records of one split of the shortcut variant (deterministic in `seed`).

    train: of the questions whose wording suggests an answer, all that agree with the prior and just enough of
    the others that a fraction `agree` of them agree; beside them, as many open questions that suggest nothing.
    test: only questions whose wording suggests an answer, as many prior-conflict as prior-consistent items,
    alternating (so any prefix is balanced)."""
    prior, rng = Prior.draw(seed), random.Random(seed + 1)
    neutral, consistent, conflict = [], [], []
    for i, (question, answer, image) in enumerate(_open_questions(split)):
        record = {"id": f"easyvqa-shortcut-{split}-{i}", "image": image, "problem": question, "answer": answer}
        suggested = prior.suggests(question)
        if suggested is None:
            neutral.append(record)
            continue
        record["prior_conflict"], record["prior_answer"] = suggested != answer, suggested
        (conflict if record["prior_conflict"] else consistent).append(record)
    rng.shuffle(consistent)
    rng.shuffle(conflict)
    if split == "train":
        suggestive = consistent + conflict[: round(len(consistent) * (1 - agree) / agree)]
        rng.shuffle(neutral)
        records = suggestive + neutral[: len(suggestive)]
        rng.shuffle(records)
        return records
    pairs = min(len(consistent), len(conflict))
    return [r for pair in zip(consistent[:pairs], conflict[:pairs], strict=True) for r in pair]


def write_shortcut_jsonl(out_dir: str | Path, split: Split, seed: int, agree: float = 0.9) -> Path:
    """Write `easyvqa-shortcut-s<seed>-a<agree>-<split>.jsonl` into `out_dir` and return its path. The records are
    built again each time (about a second) and the file rewritten only when they differ, so a file written by an
    older version of this code is never read."""
    out = Path(out_dir) / f"easyvqa-shortcut-s{seed}-a{agree:g}-{split}.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in shortcut_records(split, seed, agree))
    if out.is_file() and out.read_text() == text:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # concurrent writers write the same text
    tmp.write_text(text)
    tmp.replace(out)
    return out


def embedded_file(cfg: Config, split: Split) -> Path:
    """The record file of the embedded data source `data.source` (`easyvqa`, or `easyvqa_shortcut` drawn from
    `run.seed`), written into `run.cache_dir`."""
    data = Path(cfg.run.cache_dir) / "data"
    if cfg.data.source == "easyvqa":
        return write_easyvqa_jsonl(data, split)
    return write_shortcut_jsonl(data, split, cfg.run.seed, cfg.data.prior_agree)
