"""Prompt records: where they come from, validation of each record, and a resumable shuffled stream.

`data.train_files` / `data.eval_files` entries (see `record_files`): a JSONL or Parquet file, a folder of Parquet
shards (a dataset snapshot, `folder@split` to pick a split), or a Hugging Face dataset id `org/name[@split]`.

Record fields, one per JSONL line or Parquet row:
    id        unique within the dataset (optional: `<file stem>:<row>` if absent)
    image     path to an image file, absolute or relative to the record file's folder   } exactly one
    image_b64 base64 of the encoded image bytes (PNG/JPEG; raw bytes in a Parquet column) } of these
    problem   the question shown to the student (non-empty; `question` is read as well)
    answer    the reference answer (non-empty; only teachers see it)
    solution  optional worked solution
Hugging Face datasets' columns are read as they are written: `images` (a list holding one image) or `image`,
each a `{bytes, path}` struct of the `datasets.Image` feature, and `<image>` placeholders in the problem are
dropped (the prompt template places the image). Parquet images stay on disk until their record is decoded.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

BadKind = Literal[
    "malformed", "missing_image", "undecodable_image", "empty_problem", "missing_answer", "prompt_too_long"
]


class DataError(ValueError):
    """A record is unusable; the message names the file, the record and the fix."""


@dataclass(frozen=True)
class Sample:
    """One prompt ready for the pipeline: a decoded, size-fitted RGB image and its texts."""

    id: str
    image: Image.Image
    problem: str
    answer: str
    solution: str | None = None


def other_image_index(images: list[Image.Image]) -> list[int]:
    """For each i, the first j after i (cyclically) whose image differs in pixels from image i: the counterfactual
    image of the grounding probe and of PALR. SPEC §8 names sample (i+1) mod N, but datasets such as easy-VQA list
    several questions about one picture in a row, where i+1 is often the same picture (the probe then measures
    nothing). (i+1) mod N where every image is the same."""
    keys = [(im.size, im.mode, hash(im.tobytes())) for im in images]
    n = len(images)
    out = []
    for i in range(n):
        j = next((k % n for k in range(i + 1, i + n) if keys[k % n] != keys[i]), (i + 1) % n)
        out.append(j)
    return out


@dataclass(frozen=True)
class RawRecord:
    source: str  # "file:line" for messages
    fields: dict[str, Any]
    base_dir: Path


@dataclass(frozen=True)
class ParquetCell:
    """One record's image cell in a Parquet file, read when the record is decoded (a 47K-image dataset is not
    held in memory). Reads a row group at a time; the last one read is kept, so reading in order is one read per
    row group."""

    path: Path
    column: str
    row_group: int
    index: int

    def read(self) -> Any:
        return _row_group(self.path, self.column, self.row_group)[self.index].as_py()


_last_group: dict[tuple[Path, str, int], Any] = {}


def _row_group(path: Path, column: str, group: int):
    key = (path, column, group)
    if key not in _last_group:
        import pyarrow.parquet as pq

        _last_group.clear()
        _last_group[key] = pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0)
    return _last_group[key]


def fit_pixels(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """Scale `image` (aspect kept) so that width*height lies in [min_pixels, max_pixels] and both sides >= 28."""
    w, h = image.size
    scale = 1.0
    if w * h < min_pixels:
        scale = math.sqrt(min_pixels / (w * h))
    elif w * h > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
    scale = max(scale, 28 / w, 28 / h)
    if scale == 1.0:
        return image
    new = (max(28, math.ceil(w * scale)), max(28, math.ceil(h * scale)))
    if new[0] * new[1] > max_pixels and scale < 1:
        new = (max(28, int(w * scale)), max(28, int(h * scale)))
    return image.resize(new, Image.Resampling.BICUBIC)


def read_records(path: str | Path) -> list[RawRecord]:
    """All records of one JSONL or Parquet file, unvalidated (a malformed line becomes a `malformed` record)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check data.train_files / data.eval_files")
    if path.suffix == ".parquet":
        return _read_parquet(path)
    records = []
    with path.open() as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as err:
                fields = {"__error__": f"not valid JSON ({err.msg} at column {err.colno})"}
            if not isinstance(fields, dict):
                fields = {"__error__": "a record must be a JSON object"}
            fields.setdefault("id", f"{path.stem}:{i}")
            records.append(RawRecord(f"{path}:{i}", fields, path.parent))
    return records


IMAGE_COLUMNS = ("images", "image", "image_b64")


def _read_parquet(path: Path) -> list[RawRecord]:
    """Every column but the image column is read now; the image cell of each row is read when it is decoded."""
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    names = file.schema_arrow.names
    image_column = next((c for c in IMAGE_COLUMNS if c in names), None)
    rows = file.read(columns=[c for c in names if c != image_column]).to_pylist()
    cells = [
        ParquetCell(path, image_column, group, index)
        for group in range(file.num_row_groups)
        for index in range(file.metadata.row_group(group).num_rows)
    ] if image_column else [None] * len(rows)  # fmt: skip
    records = []
    for i, (row, cell) in enumerate(zip(rows, cells, strict=True), start=1):
        if cell is not None:
            row["image"] = cell
        row.setdefault("id", f"{path.stem}:{i}")
        records.append(RawRecord(f"{path}:row {i}", row, path.parent))
    return records


def decode_record(rec: RawRecord, min_pixels: int, max_pixels: int) -> Sample:
    """Validate one record and decode its image; raises DataError(kind) naming the record."""
    f = rec.fields
    rid = f.get("id")
    where = f"{rec.source} (id {rid!r})"

    def bad(kind: BadKind, why: str) -> DataError:
        err = DataError(f"bad record at {where}: {why}")
        err.kind = kind  # type: ignore[attr-defined]
        return err

    if "__error__" in f:
        raise bad("malformed", f["__error__"])
    if not isinstance(rid, str | int) or str(rid) == "":
        raise bad("malformed", "'id' must be a non-empty string")
    problem = f.get("problem", f.get("question"))
    problem = problem.replace("<image>", "").strip() if isinstance(problem, str) else ""
    if not problem:
        raise bad("empty_problem", "'problem' is missing or empty")
    answer = f.get("answer")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise bad("missing_answer", "'answer' is missing or empty; teachers need the reference answer")
    source = _image_source(f, rec.base_dir, bad)
    try:
        with Image.open(source) as im:
            image = im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise bad("undecodable_image", f"image cannot be decoded ({type(err).__name__}: {err})") from None
    image = fit_pixels(image, min_pixels, max_pixels)
    return Sample(str(rid), image, problem, str(answer).strip(), f.get("solution"))


def _image_source(f: dict[str, Any], base_dir: Path, bad) -> Path | io.BytesIO:
    """The record's one image as a file path or encoded bytes: from `image` (a path, raw bytes, a `datasets.Image`
    struct or a list holding one of these) or `image_b64`."""
    image, b64 = f.get("image"), f.get("image_b64")
    if isinstance(image, ParquetCell):
        image = image.read()
    if isinstance(image, list):
        if len(image) > 1:
            raise bad("malformed", f"{len(image)} images; a record takes one image")
        image = image[0] if image else None
    if isinstance(image, dict):  # datasets.Image: {bytes, path}; bytes win, path is where it was read from
        image = image.get("bytes") or image.get("path")
    if (image is None or image == "") == (b64 is None or b64 == ""):
        raise bad("malformed", "give exactly one of 'image' (a path) or 'image_b64'")
    if isinstance(image, bytes):
        return io.BytesIO(image)
    if isinstance(b64, bytes):  # Parquet keeps raw bytes
        return io.BytesIO(b64)
    if b64:
        try:
            return io.BytesIO(base64.b64decode(b64, validate=True))
        except (ValueError, TypeError):
            raise bad("undecodable_image", "'image_b64' is not valid base64") from None
    if not isinstance(image, str):
        raise bad("malformed", f"'image' must be a path or image bytes, not {type(image).__name__}")
    path = Path(image)
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise bad("missing_image", f"image file {path} does not exist")
    return path


@dataclass
class PromptStream:
    """Samples in a deterministic per-epoch shuffled order, with a cursor that resumes exactly.

    `prompt_tokens(sample)` (optional) gives the encoded student-context length; records longer than
    `max_prompt_tokens` are bad (`prompt_too_long`): they would have to be cut inside the image tokens.
    """

    records: list[RawRecord]
    seed: int = 0
    shuffle: bool = True
    on_bad_record: Literal["skip", "raise"] = "skip"
    min_pixels: int = 56 * 56
    max_pixels: int = 448 * 448
    max_prompt_tokens: int = 1024
    prompt_tokens: Callable[[Sample], int] | None = None
    epoch: int = 0
    position: int = 0
    bad_counts: Counter = field(default_factory=Counter)
    _order: list[int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.records:
            raise DataError("the dataset has no records; check data.train_files (or data.limit)")

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            order = list(range(len(self.records)))
            if self.shuffle:
                random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
            self._order = order
        return self._order

    def _load(self, rec: RawRecord) -> Sample:
        sample = decode_record(rec, self.min_pixels, self.max_pixels)
        if self.prompt_tokens is not None:
            n = self.prompt_tokens(sample)
            if n > self.max_prompt_tokens:
                err = DataError(
                    f"bad record at {rec.source} (id {sample.id!r}): the student prompt has {n} tokens, over "
                    f"data.max_prompt_tokens={self.max_prompt_tokens}; raise it or lower model.max_pixels"
                )
                err.kind = "prompt_too_long"  # type: ignore[attr-defined]
                raise err
        return sample

    def next_batch(self, n: int) -> list[Sample]:
        """The next `n` good samples, crossing epoch boundaries; bad records are skipped or raise per policy."""
        batch: list[Sample] = []
        skipped_in_a_row = 0
        while len(batch) < n:
            order = self._epoch_order()
            if self.position >= len(order):
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
                continue
            rec = self.records[order[self.position]]
            self.position += 1
            try:
                batch.append(self._load(rec))
                skipped_in_a_row = 0
            except DataError as err:
                if self.on_bad_record == "raise":
                    raise DataError(f"{err} (or set data.on_bad_record=skip)") from None
                kind = getattr(err, "kind", "malformed")
                if self.bad_counts[kind] == 0:
                    log.warning("skipping %s; further '%s' records are counted, not logged", err, kind)
                self.bad_counts[kind] += 1
                skipped_in_a_row += 1
                if skipped_in_a_row >= len(self.records):
                    counts = dict(self.bad_counts)
                    raise DataError(f"every record in the dataset is bad ({counts}); fix the data files") from None
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "bad": dict(self.bad_counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise DataError(f"data cursor was saved with run.seed={state['seed']}, this run has {self.seed}")
        self.epoch, self.position, self._order = state["epoch"], state["position"], None
        self.bad_counts = Counter(state.get("bad", {}))


def read_files(paths: list[str], limit: int = 0) -> list[RawRecord]:
    records = [rec for p in paths for rec in read_records(p)]
    return records[:limit] if limit else records


def record_files(entries: list[str], key: str, split: str, download: bool = True) -> list[Path]:
    """The record files behind the entries of `key` (data.train_files, data.eval_files, `--data`), in order.

    An entry is a JSONL or Parquet file; a folder of Parquet shards (a dataset snapshot as the hub lays it out:
    `data/<split>-00000-of-00002.parquet` or `<split>/*.parquet`), read for `split` unless the entry names one
    as `folder@split`; or a Hugging Face dataset id `org/name`, `org/name@split`, `org/name@split#revision`,
    resolved through the hub cache like a model (downloaded when online and `download`). Raises DataError naming
    `key` and what to change.
    """
    from vigos_ray.hub import DATASET_ID, RECORD_SUFFIXES, HubError, snapshot

    files: list[Path] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_file():
            files.append(path)
            continue
        folder, _, named = entry.rpartition("@") if "@" in entry and not path.exists() else (entry, "", "")
        if Path(folder).expanduser().is_dir():
            files += split_files(Path(folder).expanduser(), named or split, bool(named), key, entry)
            continue
        hub_id = DATASET_ID.match(entry)
        if entry.endswith(RECORD_SUFFIXES) or not hub_id:
            raise DataError(
                f"{key}: {entry} does not exist; give a JSONL or Parquet file, a folder of Parquet shards, or a "
                "Hugging Face dataset id (org/name, org/name@split)"
            )
        try:
            root = snapshot(hub_id["repo"], hub_id["revision"], "dataset", key, entry, ["*.parquet", "*.jsonl"],
                            download)  # fmt: skip
        except HubError as err:
            raise DataError(str(err)) from None
        files += split_files(root, hub_id["split"] or split, bool(hub_id["split"]), key, entry)
    return files


def split_files(root: Path, split: str, named: bool, key: str, entry: str) -> list[Path]:
    """The Parquet (else JSONL) shards of `root` that belong to `split`: the split's name is a word of the path
    below `root` (`train-00000-of-00002.parquet`, `test/0.parquet`). A dataset whose shards name no split is one
    split: all of it, unless `split` was named explicitly."""
    shards = sorted(root.rglob("*.parquet")) or sorted(root.rglob("*.jsonl"))
    if not shards:
        raise DataError(f"{key}: {entry} ({root}) holds no Parquet or JSONL files")
    words = {p: set(re.split(r"[^a-z]+", str(p.relative_to(root).with_suffix("")).lower())) for p in shards}
    chosen = [p for p in shards if split.lower() in words[p]]
    if chosen:
        return chosen
    found = sorted({w for ws in words.values() for w in ws} & KNOWN_SPLITS)
    if not found and not named:
        return shards
    raise DataError(
        f"{key}: {entry} has no '{split}' split (its shards name {', '.join(found) or 'no split'}); "
        f"pick one as {entry.partition('@')[0]}@<split>"
    )


KNOWN_SPLITS = {"train", "test", "validation", "valid", "val", "dev", "testmini", "eval"}
