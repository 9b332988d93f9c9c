"""Datasets by Hugging Face id or snapshot folder, in the layout the hub serves them: Parquet shards written by
the `datasets` library (the `images` list column of Vision-SR1-47K, the single `image` column of MMStar), read
offline from a hub cache built here, never by a download."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vigos_ray.config import load_config
from vigos_ray.data import DataError, PromptStream, read_files, record_files
from vigos_ray.easyvqa import write_easyvqa_jsonl

COMMIT = "c" * 40


def easyvqa_rows(cache_dir, n: int, offset: int = 0) -> list[dict]:
    path = write_easyvqa_jsonl(cache_dir / "data", "test")
    with path.open() as f:
        records = [json.loads(line) for _, line in zip(range(offset + n), f, strict=False)][offset:]
    return [{"image": Image.open(r["image"]).convert("RGB"), "problem": r["problem"], "answer": r["answer"]}
            for r in records]  # fmt: skip


def write_split(folder, split: str, rows: list[dict], column: str, rows_per_group: int = 3) -> None:
    """One shard `data/<split>-00000-of-00001.parquet` as `datasets` writes it, images embedded as bytes."""
    from datasets import Dataset, Features, Image, List, Value

    image = List(Image()) if column == "images" else Image()
    text = "problem" if column == "images" else "question"
    features = Features({column: image, text: Value("string"), "answer": Value("string")})
    data = {column: [[r["image"]] if column == "images" else r["image"] for r in rows],
            text: [f"<image>{r['problem']}" for r in rows], "answer": [r["answer"] for r in rows]}  # fmt: skip
    (folder / "data").mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(data, features=features).to_parquet(
        folder / "data" / f"{split}-00000-of-00001.parquet", batch_size=rows_per_group
    )


@pytest.fixture(scope="module")
def rows(cache_dir):
    return {"train": easyvqa_rows(cache_dir, 8), "test": easyvqa_rows(cache_dir, 4, offset=8)}


@pytest.fixture
def hub(tmp_path, rows, monkeypatch):
    """A hub cache with `vigos/sr1-mini` (train and test splits, `images` lists) and `vigos/star-mini` (one test
    split, a single `image` column, `question`), with the hub unreachable."""
    from huggingface_hub import constants

    for name, splits, column in (("sr1-mini", ("train", "test"), "images"), ("star-mini", ("test",), "image")):
        repo = tmp_path / "hub" / f"datasets--vigos--{name}"
        for split in splits:
            write_split(repo / "snapshots" / COMMIT, split, rows[split], column)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def shard(hub, name: str, split: str):
    return hub / f"datasets--vigos--{name}" / "snapshots" / COMMIT / "data" / f"{split}-00000-of-00001.parquet"


def test_a_dataset_id_resolves_to_the_split_the_key_reads_or_the_one_it_names(hub):
    assert record_files(["vigos/sr1-mini"], "data.train_files", "train") == [shard(hub, "sr1-mini", "train")]
    assert record_files(["vigos/sr1-mini@test"], "data.train_files", "train") == [shard(hub, "sr1-mini", "test")]
    assert record_files(["vigos/sr1-mini"], "data.eval_files", "test") == [shard(hub, "sr1-mini", "test")]
    pinned = record_files([f"vigos/sr1-mini@train#{COMMIT}"], "data.train_files", "train")
    assert pinned == [shard(hub, "sr1-mini", "train")]
    folder = hub / "datasets--vigos--sr1-mini" / "snapshots" / COMMIT  # a snapshot copied anywhere reads the same
    assert record_files([f"{folder}@test"], "data.train_files", "train") == [shard(hub, "sr1-mini", "test")]
    assert record_files([str(folder)], "data.train_files", "train") == [shard(hub, "sr1-mini", "train")]


def test_rows_decode_to_the_images_and_texts_written(hub, rows):
    import pyarrow.parquet as pq

    files = record_files(["vigos/sr1-mini@train"], "data.train_files", "train")
    assert pq.ParquetFile(files[0]).num_row_groups == 3  # images are read per row group, lazily: cross them all
    samples = PromptStream(read_files(files), shuffle=False, min_pixels=64 * 64).next_batch(8)
    assert [s.id for s in samples] == [f"train-00000-of-00001:{i}" for i in range(1, 9)]
    for sample, row in zip(samples, rows["train"], strict=True):
        assert sample.image.tobytes() == row["image"].tobytes()
        assert sample.problem == row["problem"] and sample.answer == row["answer"]  # `<image>` dropped


def test_the_training_stream_reads_a_dataset_id_as_the_driver_builds_it(hub, tiny_fast, rows):
    from vigos_ray.models import load_processor
    from vigos_ray.preflight import prompt_stream

    cfg = load_config(overrides=[f"model.path={tiny_fast}", "data.source=files", "data.train_files=[vigos/sr1-mini]",
                                 "data.shuffle=false", "model.min_pixels=4096"])  # fmt: skip
    processor = load_processor(tiny_fast, cfg.model.min_pixels, cfg.model.max_pixels)
    samples = prompt_stream(cfg, processor).next_batch(9)  # crosses into the second epoch
    assert [s.answer for s in samples] == [r["answer"] for r in rows["train"]] + [rows["train"][0]["answer"]]


def test_a_single_image_column_and_question_read_for_evaluation(hub, rows):
    from vigos_ray.evaluation import eval_files, read_items

    cfg = load_config(overrides=["model.min_pixels=4096"])
    items = read_items(eval_files(cfg, ["vigos/star-mini"], "--data"), cfg)
    assert [i.sample.problem for i in items] == [r["problem"] for r in rows["test"]]
    assert all(i.sample.image.tobytes() == r["image"].tobytes() for i, r in zip(items, rows["test"], strict=True))


def test_records_with_several_or_no_images_are_bad_records(tmp_path, rows):
    from datasets import Dataset, Features, Image, List, Value

    features = Features({"images": List(Image()), "problem": Value("string"), "answer": Value("string")})
    two = [rows["train"][0]["image"], rows["train"][1]["image"]]
    data = {"images": [two, [], [rows["train"][2]["image"]]], "problem": ["a?", "b?", "c?"], "answer": ["x"] * 3}
    Dataset.from_dict(data, features=features).to_parquet(tmp_path / "train.parquet")
    stream = PromptStream(read_files([str(tmp_path / "train.parquet")]), shuffle=False)
    assert [s.problem for s in stream.next_batch(1)] == ["c?"]
    assert stream.bad_counts == {"malformed": 2}
    raising = PromptStream(read_files([str(tmp_path / "train.parquet")]), shuffle=False, on_bad_record="raise")
    with pytest.raises(DataError, match=r"train.parquet:row 1 .*2 images; a record takes one image"):
        raising.next_batch(1)


@pytest.mark.parametrize(
    "entry, message",
    [
        ("vigos/absent", "data.train_files=vigos/absent is not a data file or folder, nor a Hugging Face dataset "
                         "id found in the hub cache"),
        ("vigos/star-mini@train", "data.train_files: vigos/star-mini@train has no 'train' split (its shards name "
                                  "test); pick one as vigos/star-mini@<split>"),
        ("data/vision_sr1_47k.jsonl", "data.train_files: data/vision_sr1_47k.jsonl does not exist; give a JSONL"),
    ],
)  # fmt: skip
def test_an_entry_that_does_not_resolve_names_the_key_and_what_to_do(hub, entry, message):
    with pytest.raises(DataError) as err:
        record_files([entry], "data.train_files", "train")
    assert str(err.value).startswith(message)
    if entry == "vigos/absent":
        assert str(hub) in str(err.value) and "`hf download vigos/absent --repo-type dataset`" in str(err.value)


def test_the_run_command_refuses_an_unresolvable_dataset_before_starting_anything(hub, tmp_path, tiny_fast, capfd):
    import ray

    from launch.run import main

    joined = ray.is_initialized()
    code = main([f"run.output_dir={tmp_path}/runs", f"model.path={tiny_fast}", "data.source=files",
                 "data.train_files=[vigos/absent@train]"])  # fmt: skip
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert "error: data.train_files=vigos/absent@train is not a data file or folder" in err.splitlines()[-1]
    assert ray.is_initialized() == joined  # refused before a cluster (or an actor) started


def test_print_config_shows_what_models_and_data_resolve_to_without_downloading(hub, capfd):
    from launch.run import main

    assert main(["--print-config", "data.source=files", "data.train_files=[vigos/sr1-mini@train]",
                 "model.path=vigos/not-cached"]) == 0  # fmt: skip
    out = capfd.readouterr().out
    assert f"#   data.train_files: vigos/sr1-mini@train -> {shard(hub, 'sr1-mini', 'train')}" in out
    assert "#   model.path: vigos/not-cached -> not found here: model.path=vigos/not-cached is not a folder" in out
    assert "`hf download vigos/not-cached`" in out
