"""`python launch/run.py` under `ray job submit`, its config errors, `--print-config`, and the resource check. (Run
directly, as a newcomer runs it, it is exercised by tests/integration/test_recovery.py: stopped, restarted,
finished.) Errors that come before any cluster starts are checked by calling `main` in this process."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from launch.run import main as run_main
from vigos_ray.cluster import ResourceError, check_ray_resources
from vigos_ray.config import load_config

from ..conftest import REPO

pytestmark = pytest.mark.integration


def readme_cluster_commands() -> dict[str, list[str]]:
    """The head, RAY_ADDRESS, submit and logs commands of the README's cluster block, split as a shell would."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("<!-- tests/integration/test_launch.py runs") :].split("```bash\n", 1)[1].split("```")[0]
    lines = [line.split("#")[0].strip() for line in block.splitlines()]
    pick = lambda prefix: shlex.split(next(line for line in lines if line.startswith(prefix)))  # noqa: E731
    return {"head": pick("ray start --head"), "address": pick("export RAY_ADDRESS="),
            "submit": pick("ray job submit"), "logs": pick("ray job logs")}  # fmt: skip


@pytest.mark.e2e  # its own head and job driver: ~60 s
def test_the_readme_cluster_commands_run_as_written_on_a_head_on_loopback(tmp_path, tiny_fast):
    """The README's commands, run from the repository with the project's venv as the nodes' environment (its bin
    first on PATH, as `source .venv/bin/activate` leaves it): plain `python` in the job is the venv's, the code
    travels with `--working-dir .`. Changed for the test: loopback addresses, free ports, a head that ends with
    the test (`--block`, its own temp dir), and the tiny model's settings in place of the 3B config."""
    from vigos_ray.weight_sync import free_port

    commands = readme_cluster_commands()
    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=f"{venv_bin}:{os.environ['PATH']}", VIRTUAL_ENV=str(Path(venv_bin).parent),
               RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port("127.0.0.1"), free_port("127.0.0.1")
    # The session's cluster runs beside this head: every port of the head's own agents is a free one, not Ray's
    # default (a second dashboard agent on the default port dies, and the head then has no agent to run jobs).
    agent_ports = [f"--{name}={free_port('127.0.0.1')}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port")]  # fmt: skip
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    head = [arg if not arg.startswith("--port=") else f"--port={port}" for arg in commands["head"]]
    head += ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=6", f"--temp-dir={temp_dir}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats",
             *agent_ports]  # fmt: skip
    address = commands["address"][1].split("=", 1)[1].replace("<head-ip>", "127.0.0.1")
    env["RAY_ADDRESS"] = address.replace(":8265", f":{dashboard}")
    submit = commands["submit"]
    tiny = [f"run.output_dir={tmp_path}/runs", f"model.path={tiny_fast}", f"run.cache_dir={tmp_path}/cache",
            "run.steps=2", "learner.prompts_per_step=2", "rollout.max_new_tokens=12", "learner.workers=1",
            "loss.objective=opsd"]  # fmt: skip
    submit = submit[: submit.index("launch/run.py") + 1] + tiny
    assert submit[:8] == ["ray", "job", "submit", "--working-dir", ".", "--", "python", "launch/run.py"]
    server = subprocess.Popen(head, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:  # the dashboard's job server, then its job agent, come up seconds after the head
            proc = subprocess.run(submit, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
            not_up = any(m in proc.stdout + proc.stderr for m in ("Failed to connect", "No available agent"))
            if not not_up or time.monotonic() > deadline:
                break
            time.sleep(2)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "succeeded" in out, out[-3000:]
        run_dir = tmp_path / "runs" / "vigos"
        assert f"logs: {run_dir}/logs/" in out and "working directory, which Ray deletes" not in out
        assert [json.loads(r)["version"] for r in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
        assert (run_dir / "final" / "config.json").is_file()
        job_id = re.search(r"Job '(raysubmit_\w+)' submitted successfully", out)[1]
        logs = [job_id if arg == "<job-id>" else arg for arg in commands["logs"]]
        again = subprocess.run(logs, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and f"logs: {run_dir}/logs/" in again.stdout, again.stdout[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_run_py_rejects_a_bad_key_before_starting_anything(capfd):
    assert run_main(["rollout.temprature=1.0"]) == 2
    err = capfd.readouterr().err
    assert "Did you mean 'rollout.temperature'" in err and "Traceback" not in err


def test_print_config_shows_the_resolved_values_and_loads_again(tmp_path, capfd):
    config = tmp_path / "c.yaml"
    config.write_text("learner:\n  lr: 3.0e-4\n")
    assert run_main(["--config", str(config), "--print-config", "rollout.workers=3"]) == 0
    printed = capfd.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    cfg = load_config(tmp_path / "printed.yaml")
    assert cfg.learner.lr == 3e-4 and cfg.rollout.workers == 3
    assert cfg.warm_start.steps == load_config().warm_start.steps
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_help_says_how_overrides_work_and_where_every_key_is_documented():
    proc = subprocess.run([sys.executable, "launch/run.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "key=value" in text and "vigos_ray/config.py" in text and "--print-config" in text


def test_gpu_request_is_checked_against_the_live_cluster(ray_cluster):
    check_ray_resources(load_config())  # the CPU default fits
    cfg = load_config(
        overrides=[
            "teachers.reasoning.num_gpus=1",
            "teachers.reasoning.min_workers=2",
            "teachers.reasoning.max_workers=2",
        ]
    )
    with pytest.raises(ResourceError, match=r"asks for 2 GPUs \(teachers.reasoning.min_workers=2 x "):
        check_ray_resources(cfg)


BAD_MODELS = {  # case -> (overrides given tmp_path, student and other-vocabulary folders; expected message)
    "missing folder": (lambda tmp, student, other: [f"model.path={tmp}/nope"],
                       "is not a directory; point model.path at a Hugging Face model folder"),
    "other architecture": (lambda tmp, student, other: [f"model.path={tmp}/llama"],
                           "holds a 'llama' model; supported: qwen2_vl, qwen2_5_vl"),
    "teacher vocabulary": (lambda tmp, student, other: [f"model.path={student}",
                                                        f"teachers.reasoning.checkpoint={other}"],
                           "teachers.reasoning.checkpoint"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_run_py_names_a_bad_model_or_teacher_folder_before_any_actor_starts(tmp_path, tiny_fast, tiny_qwen_vocab,
                                                                            case, capfd):  # fmt: skip
    import ray

    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    overrides, message = BAD_MODELS[case]
    joined = ray.is_initialized()
    code = run_main([f"run.output_dir={tmp_path}/runs", f"run.cache_dir={tmp_path}/cache",
                     *overrides(tmp_path, tiny_fast, tiny_qwen_vocab)])  # fmt: skip
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert message in err.splitlines()[-1], err[-3000:]
    assert ray.is_initialized() == joined  # refused before a cluster (or an actor) started
