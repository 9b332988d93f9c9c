"""Record reading, per-record validation, the resumable shuffled stream, and the easy-VQA adapter."""

import base64
import io
import json

import pytest
from PIL import Image

from vigos_ray.data import DataError, PromptStream, fit_pixels, read_files, read_records
from vigos_ray.easyvqa import write_easyvqa_jsonl


def _png_bytes(size=(64, 64), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def good_file(tmp_path):
    (tmp_path / "img").mkdir()
    records = []
    for i in range(10):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png_bytes(color=(i * 20, 0, 0)))
        records.append({"id": f"r{i}", "image": f"img/{i}.png", "problem": f"question {i}?", "answer": f"a{i}"})
    return _write(tmp_path / "good.jsonl", records)


def _ids(stream, n):
    return [s.id for s in stream.next_batch(n)]


def test_shuffle_is_deterministic_per_seed_and_differs_across_epochs(good_file):
    records = read_records(good_file)
    a, b = PromptStream(records, seed=3), PromptStream(records, seed=3)
    first_a, first_b = _ids(a, 10), _ids(b, 10)
    assert first_a == first_b and sorted(first_a) == [f"r{i}" for i in range(10)]
    assert _ids(PromptStream(records, seed=4), 10) != first_a
    second_epoch = _ids(a, 10)
    assert sorted(second_epoch) == sorted(first_a) and second_epoch != first_a and a.epoch == 1


def test_cursor_resume_continues_exactly_where_it_stopped(good_file):
    records = read_records(good_file)
    uninterrupted = PromptStream(records, seed=1)
    expected = _ids(uninterrupted, 4) + _ids(uninterrupted, 4) + _ids(uninterrupted, 7)  # crosses an epoch
    first = PromptStream(records, seed=1)
    got = _ids(first, 4) + _ids(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    resumed = PromptStream(records, seed=1)
    resumed.load_state_dict(state)
    assert got + _ids(resumed, 7) == expected


def test_cursor_from_another_seed_is_refused(good_file):
    records = read_records(good_file)
    stream = PromptStream(records, seed=1)
    with pytest.raises(DataError, match="run.seed=1, this run has 2"):
        PromptStream(records, seed=2).load_state_dict(stream.state_dict())


def test_unshuffled_stream_keeps_file_order(good_file):
    assert _ids(PromptStream(read_records(good_file), shuffle=False), 3) == ["r0", "r1", "r2"]


def test_images_from_bytes_and_paths_decode_to_rgb_within_the_pixel_range(tmp_path, good_file):
    grey = Image.new("L", (20, 300), 128)
    buf = io.BytesIO()
    grey.save(buf, format="PNG")
    rec = {"id": "b", "image_b64": base64.b64encode(buf.getvalue()).decode(), "problem": "p", "answer": "x"}
    path = _write(tmp_path / "bytes.jsonl", [rec])
    stream = PromptStream(read_files([str(path), str(good_file)]), shuffle=False, min_pixels=56 * 56,
                          max_pixels=128 * 128)  # fmt: skip
    for sample in stream.next_batch(11):
        w, h = sample.image.size
        assert sample.image.mode == "RGB" and 56 * 56 <= w * h <= 128 * 128 and min(w, h) >= 28


@pytest.mark.parametrize(
    "size, lo, hi", [((64, 64), 56 * 56, 448 * 448), ((8, 8), 56 * 56, 448 * 448), ((4000, 3000), 3136, 200704)]
)
def test_fit_pixels_keeps_aspect_and_range(size, lo, hi):
    out = fit_pixels(Image.new("RGB", size), lo, hi)
    w, h = out.size
    assert lo <= w * h <= hi
    assert abs(w / h - size[0] / size[1]) < 0.05


BAD = {
    "missing_image": ({"id": "m", "image": "nope.png", "problem": "p", "answer": "a"},
                      "image file .*nope.png does not exist"),
    "undecodable_image": ({"id": "u", "image_b64": base64.b64encode(b"not an image").decode(), "problem": "p",
                           "answer": "a"}, "image cannot be decoded"),
    "empty_problem": ({"id": "e", "image": "ok.png", "problem": "  ", "answer": "a"}, "'problem' is missing or empty"),
    "missing_answer": ({"id": "n", "image": "ok.png", "problem": "p"}, "'answer' is missing or empty"),
    "malformed": ('{"id": "x", "problem": ', "not valid JSON"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_bad_record_kind_is_skipped_and_counted(tmp_path, kind):
    (tmp_path / "ok.png").write_bytes(_png_bytes())
    good = {"id": "g", "image": "ok.png", "problem": "p", "answer": "a"}
    path = _write(tmp_path / "mixed.jsonl", [good, BAD[kind][0], good | {"id": "g2"}])
    stream = PromptStream(read_records(path), shuffle=False)
    assert [s.id for s in stream.next_batch(2)] == ["g", "g2"]
    assert stream.bad_counts == {kind: 1}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_bad_record_kind_raises_naming_file_line_and_fix(tmp_path, kind):
    (tmp_path / "ok.png").write_bytes(_png_bytes())
    path = _write(tmp_path / "bad.jsonl", [BAD[kind][0]])
    stream = PromptStream(read_records(path), on_bad_record="raise")
    with pytest.raises(DataError, match=BAD[kind][1]) as err:
        stream.next_batch(1)
    assert f"{path}:1" in str(err.value) and "data.on_bad_record=skip" in str(err.value)


def test_prompt_too_long_is_a_bad_record(good_file):
    stream = PromptStream(read_records(good_file), shuffle=False, max_prompt_tokens=10,
                          prompt_tokens=lambda s: 5 if s.id == "r1" else 50, on_bad_record="skip")  # fmt: skip
    assert [s.id for s in stream.next_batch(1)] == ["r1"] and stream.bad_counts == {"prompt_too_long": 1}
    assert [s.id for s in stream.next_batch(1)] == ["r1"] and stream.bad_counts == {"prompt_too_long": 10}


def test_prompt_too_long_message_names_the_limit(good_file):
    stream = PromptStream(read_records(good_file), shuffle=False, max_prompt_tokens=10,
                          prompt_tokens=lambda s: 50, on_bad_record="raise")  # fmt: skip
    with pytest.raises(DataError, match="50 tokens, over data.max_prompt_tokens=10"):
        stream.next_batch(1)


def test_a_dataset_of_only_bad_records_stops_instead_of_looping(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [BAD["missing_answer"][0]] * 3)
    with pytest.raises(DataError, match="every record in the dataset is bad"):
        PromptStream(read_records(path)).next_batch(1)


def test_missing_data_file_names_the_config_key(tmp_path):
    with pytest.raises(DataError, match="does not exist; check data.train_files"):
        read_records(tmp_path / "absent.jsonl")


def test_easyvqa_adapter_writes_real_records(tmp_path):
    train = read_records(write_easyvqa_jsonl(tmp_path, "train"))
    test = read_records(write_easyvqa_jsonl(tmp_path, "test"))
    assert len(train) > 30_000 and len(test) > 5_000
    answers = {r.fields["answer"] for r in train}
    assert {"circle", "rectangle", "triangle", "yes", "no", "red", "blue"} <= answers
    sample = PromptStream(train[:50], seed=0).next_batch(1)[0]
    assert sample.image.size == (64, 64) and sample.problem.endswith("?")


def test_parquet_records_with_raw_image_bytes_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"p{i}", "image_b64": _png_bytes(color=(0, i * 40, 0)), "problem": f"q{i}?", "answer": "green"}
            for i in range(3)]  # fmt: skip
    rows.append({"id": "bad", "image_b64": b"garbage", "problem": "q?", "answer": "x"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    stream = PromptStream(read_records(tmp_path / "d.parquet"), shuffle=False)
    samples = stream.next_batch(3)
    assert [s.id for s in samples] == ["p0", "p1", "p2"] and samples[2].image.getpixel((5, 5)) == (0, 80, 0)
    stream.next_batch(1)
    assert stream.bad_counts == {"undecodable_image": 1}


def test_counterfactual_image_is_the_next_one_showing_another_picture():
    from vigos_ray.data import other_image_index

    a, b, c = (Image.new("RGB", (8, 8), colour) for colour in ("red", "blue", "green"))
    a_again = Image.new("RGB", (8, 8), "red")  # another object, the same pixels: the same picture
    assert other_image_index([a, a_again, b, a, c]) == [2, 2, 3, 4, 0]
    assert other_image_index([a, a_again]) == [1, 0]  # nothing else to pick: the next item
