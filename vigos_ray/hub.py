"""Hugging Face hub ids for models and datasets, resolved through huggingface_hub's cache.

A model is `org/name` or `org/name@revision`; a dataset is `org/name`, `org/name@split` (the spelling of
EasyR1 and verl configs) or `org/name@split#revision`. The cache is `HF_HUB_CACHE` (default `$HF_HOME/hub`):
a missing snapshot is downloaded there when online; with `HF_HUB_OFFLINE=1` only the cache is read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

MODEL_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<revision>[\w./-]+))?$")
DATASET_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(@(?P<split>[\w.-]+))?(#(?P<revision>[\w./-]+))?$")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")  # a value ending so names a file, never an id


class HubError(ValueError):
    """A hub id that is not in the cache and could not be downloaded; the message names the key and the fix."""


def snapshot(
    repo: str, revision: str | None, kind: Literal["model", "dataset"], key: str, value: str, patterns=None,
    download: bool = True,
) -> Path:  # fmt: skip
    """The local snapshot folder of hub repo `repo` at `revision` (default branch if None), downloaded once when
    online and `download` (only files matching `patterns`, if given). Raises HubError naming `key`=`value` and the
    download command."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(snapshot_download(repo, repo_type=kind, revision=revision, allow_patterns=patterns,
                                      local_files_only=not download))  # fmt: skip
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        reason = reason if download else "not downloaded"
        command = f"hf download {repo}" + (" --repo-type dataset" if kind == "dataset" else "")
        command += f" --revision {revision}" if revision else ""
        where = "a folder" if kind == "model" else "a data file or folder"
        raise HubError(
            f"{key}={value} is not {where}, nor a Hugging Face {kind} id found in the hub cache "
            f"{constants.HF_HUB_CACHE} ({reason}); download it first (`{command}`, with HF_HOME on every node that "
            f"reads it) or point {key} at {where}"
        ) from None


def resolved_inputs(cfg) -> list[str]:
    """What the models and data of `cfg` resolve to on this node, one line each, from what is already here
    (nothing is downloaded): the lines `--print-config` adds as YAML comments."""
    from vigos_ray.data import DataError, record_files
    from vigos_ray.models import ModelFolderError, model_folder

    def model(key: str, value: str, default: str) -> str:
        if not value:
            return f"{key}: {default}"
        try:
            return f"{key}: {value} -> {model_folder(value, key, download=False)}"
        except ModelFolderError as err:
            return f"{key}: {value} -> not found here: {err}"

    lines = [model("model.path", cfg.model.path, f"the tiny {cfg.model.tiny} model, built in run.cache_dir")]
    for role, pool in cfg.teacher_pools().items():
        lines.append(model(f"teachers.{role}.checkpoint", pool.checkpoint, "the initial student"))
    if cfg.data.source == "easyvqa":
        return [*lines, "data: the embedded easy-VQA set (train and test splits)"]
    if cfg.data.source == "easyvqa_shortcut":
        return [
            *lines,
            f"data: easy-VQA's colour and shape questions with a wording prior drawn from run.seed="
            f"{cfg.run.seed}, {cfg.data.prior_agree:.0%} agreeing in train (written into run.cache_dir)",
        ]
    for key, entries, split in (("data.train_files", cfg.data.train_files, "train"),
                                ("data.eval_files", cfg.data.eval_files, "test")):  # fmt: skip
        for entry in entries:
            try:
                files = record_files([entry], key, split, download=False)
                lines.append(f"{key}: {entry} -> {', '.join(map(str, files))}")
            except DataError as err:
                lines.append(f"{key}: {entry} -> not found here: {err}")
    return lines
