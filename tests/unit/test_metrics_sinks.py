"""Each metrics sink writes what its own reader reads back: TensorBoard's event reader, MLflow's client, the W&B
run file, the console line; and a resumed run continues the same JSONL and MLflow run."""

from __future__ import annotations

import json
import logging
import struct

import pytest

from vigos_ray.config import load_config
from vigos_ray.metrics import Metrics


def record(step: int) -> dict:
    return {"step": step, "version": step + 1, "loss": 1.0 / (step + 1), "kl/description": 0.1 * step,
            "kl/reasoning": 0.2, "valid_rate": 0.5, "accuracy": 0.25, "time/step": 1.5, "time/learner": 0.5,
            "time/teacher/description": 0.1, "lag/0": 4}  # fmt: skip


def read_wandb_history(path) -> list[dict]:
    """History rows of an offline W&B run file: W&B's 7-byte header, then LevelDB-log records of protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


@pytest.fixture
def cfg():
    return load_config(overrides=["run.name=sinks", "run.steps=3", "metrics.sinks=[console,tensorboard,wandb,mlflow]"])


def test_every_sink_writes_what_its_reader_reads_back(tmp_path, cfg, caplog, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    with caplog.at_level(logging.INFO), Metrics(cfg, tmp_path) as metrics:
        for step in range(3):
            metrics.write(record(step))

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("loss")] == [(0, 1.0), (1, 0.5), (2, 0.333333)]
    assert [e.value for e in events.Scalars("lag/0")] == [4.0] * 3

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    run_id = (tmp_path / "mlflow_run_id").read_text()
    history = client.get_metric_history(run_id, "kl/description")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    run = client.get_run(run_id)
    assert run.data.params["loss.objective"] == cfg.loss.objective and run.info.status == "FINISHED"

    (wandb_file,) = tmp_path.glob("wandb/offline-run-*/run-sinks.wandb")
    rows = read_wandb_history(wandb_file)
    assert [(r["_step"], r["loss"]) for r in rows] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert lines[-1].startswith("step 3/3 loss 0.3333 | kl desc 0.2 reas 0.2 | valid 0.50 acc 0.25 | 1.50 s")


def test_a_resumed_run_rewrites_its_steps_and_logs_into_the_same_mlflow_run(tmp_path):
    cfg = load_config(overrides=["run.name=again", "run.steps=3", "metrics.sinks=[mlflow]"])
    with Metrics(cfg, tmp_path) as metrics:
        for step in range(3):
            metrics.write(record(step))
    run_id = (tmp_path / "mlflow_run_id").read_text()
    with Metrics(cfg, tmp_path, from_step=1) as metrics:  # resumed from the checkpoint after step 0
        for step in (1, 2):
            metrics.write(record(step))
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    assert (tmp_path / "mlflow_run_id").read_text() == run_id
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [0, 1, 1, 2, 2]  # both writes kept


def test_an_unknown_sink_is_refused_naming_the_choices():
    from vigos_ray.config import ConfigError

    with pytest.raises(ConfigError, match=r"metrics.sinks.*unknown sink 'tb'"):
        load_config(overrides=["metrics.sinks=[tb]"])
