"""Config loading: defaults, YAML + CLI layering, and the message of every kind of error."""

from pathlib import Path

import pytest

from vigos_ray.cluster import ResourceError, check_cluster_resources
from vigos_ray.config import Config, ConfigError, load_config, save_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_defaults_are_the_paper_sampling_and_loss_settings():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k) == (1.1, 0.95, 20)
    assert (cfg.loss.clip, cfg.loss.clip_mode, cfg.loss.temperature) == (0.05, "token", 1.0)
    assert (cfg.loss.perception_weight, cfg.loss.reasoning_weight, cfg.loss.reference_weight) == (1.0, 1.0, 2.0)
    assert cfg.loss.span_convention == "code" and cfg.loss.rea_teacher_sees_description is False


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_file_loads_and_changes_something(path):
    cfg = load_config(path)
    assert cfg != Config(), f"{path.name} overrides nothing"


def test_cli_overrides_win_over_yaml(tmp_path):
    yaml = tmp_path / "x.yaml"
    yaml.write_text("rollout:\n  temperature: 0.7\n  top_k: 5\n")
    cfg = load_config(yaml, ["rollout.temperature=1.3", "teachers.reasoning.max_workers=4"])
    assert cfg.rollout.temperature == 1.3 and cfg.rollout.top_k == 5
    assert cfg.teachers["reasoning"].max_workers == 4 and cfg.teachers["perception"].max_workers == 1


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(overrides=["loss.objective=opsd", "learner.lora.enabled=true", "run.seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rollout.temprature=1.0"], "unknown config key 'rollout.temprature'.*Did you mean 'rollout.temperature'"),
        (["rollouts.workers=2"], "unknown config key 'rollouts'.*Did you mean 'rollout'"),
        (["learner.lora.rank=8"], "unknown config key 'learner.lora.rank'.*Did you mean 'learner.lora.r'"),
        (["rollout.temperature=hot"], "'rollout.temperature'.*could not be converted to Float"),
        (["loss.clip_mode=sometimes"], "'loss.clip_mode'.*expected one of \\['token', 'entry', 'none'\\]"),
        (["rollout.temperature=0"], "'rollout.temperature': must be > 0"),
        (["loss.clip=-0.1"], "'loss.clip': must be >= 0"),
        (["loss.reference_weight=-1"], "'loss.reference_weight': must be >= 0"),
        (["rollout.workers=0"], "'rollout.workers': must be >= 1"),
        (["teachers.reasoning.max_workers=0"], "'teachers.reasoning.max_workers': must be >= 1"),
        (
            ["teachers.perception.min_workers=3", "teachers.perception.max_workers=2"],
            "'teachers.perception.max_workers': must be >= teachers.perception.min_workers=3",
        ),
        (["loss.perception_weight=0", "loss.reasoning_weight=0", "loss.reference_weight=0"], "all zero"),
        (["loss.divergence=sampled_rkl"], "'scoring.payload'.*set scoring.payload=sampled"),
        (["scoring.payload=sampled"], "'loss.divergence'.*only supports loss.divergence=sampled_rkl"),
        (["teachers.payload=topk"], "'teachers.payload'.*is now 'scoring.payload'"),
        (["loss.objective=distill"], "'teachers.external.checkpoint'.*external teacher"),
        (["teachers.percepton.max_workers=2"], "'teachers.percepton': no registered objective.*teachers.perception\\?"),
        (["prompts.reasoning.template=Given {problem} and {answr}"], "\\{answr\\} is not a placeholder"),
        (["prompts.reasoning.prefill=Reasoning"], "'prompts.reasoning.prefill': must end with <think>"),
        (["data.source=files"], "'data.train_files': must list at least one file"),
        (
            ["rollout.num_gpus=1", "rollout.tensor_parallel_size=2"],
            "'rollout.num_gpus': must be >= rollout.tensor_parallel_size=2",
        ),
        (["weight_sync.transport=rdma"], "'weight_sync.transport': must be one of \\['auto', 'gloo', 'ipc', 'nccl'"),
        (["weight_sync.transport=nccl"], "'weight_sync.transport': nccl needs the learner and vLLM rollout workers on"),
        (
            ["weight_sync.transport=object_store", "rollout.tensor_parallel_size=2"],
            "'weight_sync.transport': object_store reaches Ray workers only",
        ),
        (["learner.workers=2", "learner.num_gpus=0.5"], "'learner.num_gpus': must be a whole number with learner"),
        (["prompts.student.template=Answer {answer} {problem}"], "'prompts.student.template': must not show the"),
        (["rollout.top_p=[0.9"], "override 'rollout.top_p=\\[0.9' is not valid YAML"),
        (["run.steps"], "not of the form key=value"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_the_former_name_of_the_gloo_transport_still_loads():
    assert load_config(overrides=["weight_sync.transport=collective"]).weight_sync.transport == "gloo"


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    yaml = tmp_path / "bad.yaml"
    yaml.write_text("loss:\n  clip_mod: entry\n")
    with pytest.raises(ConfigError, match=r"'loss.clip_mod' \(from .*bad.yaml\).*Did you mean 'loss.clip_mode'"):
        load_config(yaml)


def test_missing_config_file_is_reported():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/no_such_file.yaml")


CPU_NODE = {"CPU": 8.0}


def test_gpu_request_on_a_cpu_cluster_is_refused_naming_the_keys():
    cfg = load_config(overrides=["rollout.num_gpus=1", "learner.num_gpus=1", "learner.workers=2"])
    with pytest.raises(ResourceError) as err:
        check_cluster_resources(cfg, CPU_NODE, [CPU_NODE])
    text = str(err.value)
    assert "asks for 3 GPUs" in text and "has 0" in text
    assert "rollout.workers=1 x rollout.num_gpus=1" in text and "learner.workers=2 x learner.num_gpus=1" in text


def test_actor_larger_than_any_node_is_refused():
    cfg = load_config(overrides=["rollout.num_gpus=8", "rollout.tensor_parallel_size=8"])
    nodes = [{"CPU": 32.0, "GPU": 4.0}, {"CPU": 32.0, "GPU": 4.0}]
    with pytest.raises(ResourceError, match="rollout.num_gpus=8 per actor, but the largest node has 4 GPUs"):
        check_cluster_resources(cfg, {"CPU": 64.0, "GPU": 8.0}, nodes)


def test_paper_layout_fits_an_eight_gpu_node():
    cfg = load_config(CONFIGS[[p.name for p in CONFIGS].index("qwen25vl_3b.yaml")])
    node = {"CPU": 64.0, "GPU": 8.0}
    check_cluster_resources(cfg, node, [node])  # 2 rollout + 3 teachers + 3 learner ranks = 8 GPUs
    with pytest.raises(ResourceError, match="asks for 8 GPUs"):
        check_cluster_resources(cfg, {"CPU": 64.0, "GPU": 7.0}, [{"CPU": 64.0, "GPU": 7.0}])


def test_the_gpu_check_layout_fits_one_gpu():
    cfg = load_config(CONFIGS[[p.name for p in CONFIGS].index("gpu_check.yaml")])
    node = {"CPU": 16.0, "GPU": 1.0}
    check_cluster_resources(cfg, node, [node])  # 0.3 rollout + 3 x 0.1 teachers + 0.3 learner


@pytest.mark.parametrize("objective", ["vigos", "opsd", "distill"])
def test_a_run_starts_the_teacher_pools_its_objective_scores_with_and_asks_resources_for_those_only(objective):
    from vigos_ray.objective import segments

    extra = ["teachers.external.checkpoint=/models/t"] if objective == "distill" else []
    gpu = [f"teachers.{role}.num_gpus=1" for role in ("perception", "reasoning", "reference", "privileged", "external")]
    cfg = load_config(overrides=[f"loss.objective={objective}", *gpu, *extra])
    assert set(cfg.teacher_pools()) == {seg.teacher for seg in segments(cfg.loss)}
    gpus = len(cfg.teacher_pools())
    with pytest.raises(ResourceError, match=rf"asks for {gpus} GPUs"):
        check_cluster_resources(cfg, {"CPU": 64.0, "GPU": gpus - 0.5}, [{"CPU": 64.0, "GPU": 8.0}])
    check_cluster_resources(cfg, {"CPU": 64.0, "GPU": float(gpus)}, [{"CPU": 64.0, "GPU": 8.0}])


def test_cpu_threads_share_the_cores_among_the_actors_busy_at_once():
    from vigos_ray.cluster import stage_threads

    def threads(*overrides, cores=16):
        cfg = load_config(overrides=list(overrides))
        return {stage: stage_threads(cfg, stage, cores) for stage in ("rollout", "teachers", "learner")}

    # sync: one stage at a time (1 rollout worker, 3 teacher pools of 1, 2 learner ranks)
    assert threads() == {"rollout": 16, "teachers": 5, "learner": 8}
    assert threads("learner.workers=1", cores=2) == {"rollout": 2, "teachers": 1, "learner": 2}
    # async: sampling runs beside scoring (3 teachers) or training (2 ranks)
    assert threads("run.mode=async") == {"rollout": 4, "teachers": 4, "learner": 5}
    assert threads("loss.objective=opsd", "run.mode=async", cores=2) == {"rollout": 1, "teachers": 1, "learner": 1}
    assert threads("run.cpu_threads=3") == {"rollout": 3, "teachers": 3, "learner": 3}
