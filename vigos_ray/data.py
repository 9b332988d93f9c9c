"""Prompt records: the on-disk format, validation of each record, and a resumable shuffled stream.

Record format, one per JSONL line (or Parquet row), all strings:
    id        unique within the dataset
    image     path to an image file, absolute or relative to the record file's folder   } exactly one
    image_b64 base64 of the encoded image bytes (PNG/JPEG; raw bytes in a Parquet column) } of these
    problem   the question shown to the student (non-empty)
    answer    the reference answer (non-empty; only teachers see it)
    solution  optional worked solution
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import random
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
    records = []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            if isinstance(row.get("image_b64"), bytes):  # Parquet keeps raw bytes
                row["image_b64"] = base64.b64encode(row["image_b64"]).decode()
            records.append(RawRecord(f"{path}:row {i}", row, path.parent))
        return records
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
            records.append(RawRecord(f"{path}:{i}", fields, path.parent))
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
        raise bad("malformed", "missing 'id' (a non-empty string)")
    if not isinstance(f.get("problem"), str) or not f["problem"].strip():
        raise bad("empty_problem", "'problem' is missing or empty")
    answer = f.get("answer")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise bad("missing_answer", "'answer' is missing or empty; teachers need the reference answer")
    has_path, has_bytes = bool(f.get("image")), bool(f.get("image_b64"))
    if has_path == has_bytes:
        raise bad("malformed", "give exactly one of 'image' (a path) or 'image_b64'")
    if has_path:
        image_path = Path(f["image"])
        image_path = image_path if image_path.is_absolute() else rec.base_dir / image_path
        if not image_path.is_file():
            raise bad("missing_image", f"image file {image_path} does not exist")
        source: Any = image_path
    else:
        try:
            source = io.BytesIO(base64.b64decode(f["image_b64"], validate=True))
        except (ValueError, TypeError):
            raise bad("undecodable_image", "'image_b64' is not valid base64") from None
    try:
        with Image.open(source) as im:
            image = im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise bad("undecodable_image", f"image cannot be decoded ({type(err).__name__}: {err})") from None
    image = fit_pixels(image, min_pixels, max_pixels)
    solution = f.get("solution")
    return Sample(str(rid), image, f["problem"].strip(), str(answer).strip(), solution)


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
