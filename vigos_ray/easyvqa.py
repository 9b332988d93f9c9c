"""The embedded default dataset: easy-VQA (PyPI `easy-vqa`, MIT licence), written in our record format.

4,000 train / 1,000 test 64x64 images of one coloured shape, about 48k questions whose answers are a shape,
a colour, or yes/no. The JSONL records point at the package's own PNG files; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

Split = Literal["train", "test"]


def write_easyvqa_jsonl(out_dir: str | Path, split: Split) -> Path:
    """Write `easyvqa-<split>.jsonl` into `out_dir` (once; reused after) and return its path."""
    import easy_vqa

    out = Path(out_dir) / f"easyvqa-{split}.jsonl"
    if out.is_file():
        return out
    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        image_paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_test_questions()
        image_paths = easy_vqa.get_test_image_paths()
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
