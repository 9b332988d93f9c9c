"""Models by Hugging Face id: resolved offline from a hub cache built here in the layout huggingface_hub reads
(models--org--name/refs/<revision> -> snapshots/<commit>/), never by a download."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vigos_ray.config import load_config
from vigos_ray.models import ModelFolderError, check_teacher_checkpoints, load_processor, model_folder

COMMITS = {"main": "a" * 40, "v1": "b" * 40}


@pytest.fixture
def hub(tmp_path, tiny_fast, monkeypatch) -> Path:
    """A hub cache holding `vigos/tiny` at two revisions (both the tiny model), with the hub unreachable."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--vigos--tiny"
    for revision, commit in COMMITS.items():
        shutil.copytree(tiny_fast, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def test_a_hub_id_resolves_to_its_snapshot_and_a_revision_pins_it(hub):
    assert model_folder("vigos/tiny", "model.path") == hub / "snapshots" / COMMITS["main"]
    assert model_folder("vigos/tiny@v1", "model.path") == hub / "snapshots" / COMMITS["v1"]
    cfg = load_config(overrides=["model.path=vigos/tiny@v1"])
    from vigos_ray.sft import initial_model

    assert initial_model(cfg) == (hub / "snapshots" / COMMITS["v1"]).resolve()


def test_a_folder_wins_over_an_id_of_the_same_spelling(hub, tmp_path, monkeypatch, tiny_fast):
    shutil.copytree(tiny_fast, tmp_path / "vigos" / "tiny")
    monkeypatch.chdir(tmp_path)
    assert model_folder("vigos/tiny", "model.path") == Path("vigos/tiny")


@pytest.mark.parametrize("value", ["vigos/absent", "vigos/tiny@v2"])
def test_an_id_that_does_not_resolve_names_the_key_and_what_to_do(hub, value):
    with pytest.raises(ModelFolderError) as err:
        model_folder(value, "teachers.perception.checkpoint")
    message = str(err.value)
    assert message.startswith(f"teachers.perception.checkpoint={value} is not a folder, nor a Hugging Face")
    assert str(hub.parent) in message and "hf download vigos/" in message and "point teachers" in message


def test_teacher_checkpoints_by_id_are_checked_before_any_actor_and_a_teacher_actor_loads_one(hub, tiny_fast):
    from workers.teacher import TeacherWorker

    cfg = load_config(overrides=[f"model.path={tiny_fast}", "teachers.perception.checkpoint=vigos/tiny@v1"])
    student = load_processor(tiny_fast, cfg.model.min_pixels, cfg.model.max_pixels).tokenizer
    check_teacher_checkpoints(cfg, student)  # resolves and compares vocabularies: no error
    teacher = TeacherWorker(cfg, tiny_fast, "perception")  # resolves again where it runs (its node)
    assert teacher.vocab_size == len(student)
    missing = load_config(overrides=[f"model.path={tiny_fast}", "teachers.perception.checkpoint=vigos/none"])
    with pytest.raises(ModelFolderError, match="teachers.perception.checkpoint=vigos/none"):
        check_teacher_checkpoints(missing, student)


def test_an_actor_whose_node_lacks_the_drivers_snapshot_resolves_the_student_id_on_its_own(hub, tmp_path):
    from vigos_ray.models import on_this_node
    from workers.teacher import TeacherWorker

    cfg = load_config(overrides=["model.path=vigos/tiny@v1"])
    drivers = tmp_path / "driver-node" / "hub" / "models--vigos--tiny" / "snapshots" / COMMITS["v1"]  # not here
    here = hub / "snapshots" / COMMITS["v1"]
    assert on_this_node(drivers, cfg) == here and on_this_node(here, cfg) == here
    folder_cfg = load_config(overrides=[f"model.path={tmp_path}/a-folder"])  # a folder is never re-resolved
    assert on_this_node(drivers, folder_cfg) == drivers
    teacher = TeacherWorker(cfg, drivers, "reasoning")  # loads this node's snapshot
    assert teacher.vocab_size == len(load_processor(here, 3136, 12544).tokenizer)
