"""The study's bookkeeping (arms, per-seed summaries, the table and plot) and the CPU prefill grouping it needed."""

from __future__ import annotations

import json

import pytest

from vigos_ray.config import ConfigError, load_config
from vigos_ray.study import Arm, arm_config, arms, claim_folder, results_table, summarize, write_results
from workers.rollout import prefill_groups


def report(avg: float, valid: float, mismatched: float) -> dict:
    """An evaluation report with the fields the study reads (k = 4)."""
    return {"items": 10, "k": 4, "avg@4": avg, "pass@4": min(1.0, 2 * avg), "accuracy": avg,
            "valid_format": valid, "unparseable": 1 - valid,
            "image": {"true": avg, "mismatched": mismatched, "sensitivity": avg - mismatched}}  # fmt: skip


def study_config(*overrides: str):
    return load_config(overrides=["study.methods=[vigos,opsd,none]", "study.seeds=[3,4]", *overrides])


def test_prefill_groups_cover_every_request_in_order_within_the_budget():
    lengths = [70] * 64
    groups = prefill_groups(lengths, 4096)
    assert groups[0] == (0, 58) and groups[-1] == (58, 64)  # 58 x 70 = 4060 <= 4096 < 59 x 70
    assert [i for lo, hi in groups for i in range(lo, hi)] == list(range(64))
    assert all(sum(lengths[lo:hi]) <= 4096 for lo, hi in groups)
    assert prefill_groups([5000, 10, 5000], 4096) == [(0, 1), (1, 2), (2, 3)]  # a long prompt goes alone
    assert prefill_groups(lengths, None) == [(0, 64)] and prefill_groups([], 4096) == []


def test_every_method_runs_every_seed_and_an_arm_differs_from_the_study_only_where_it_must(tmp_path):
    cfg = study_config("run.steps=7", "learner.lr=1e-4")
    assert [a.name for a in arms(cfg)] == ["vigos-s3", "opsd-s3", "none-s3", "vigos-s4", "opsd-s4", "none-s4"]
    arm = arm_config(cfg, Arm("opsd", 4), tmp_path / "warm", tmp_path / "arms")
    assert (arm.loss.objective, arm.run.seed, arm.run.name) == ("opsd", 4, "opsd-s4")
    assert arm.model.path == str(tmp_path / "warm") and arm.run.output_dir == str(tmp_path / "arms")
    # the budget is the study's for every arm
    assert (arm.run.steps, arm.learner, arm.rollout, arm.eval) == (7, cfg.learner, cfg.rollout, cfg.eval)


def test_summary_is_the_mean_and_sample_std_over_seeds_and_the_table_prints_them(tmp_path):
    cfg = study_config()
    reports = {"vigos-s3": report(0.5, 1.0, 0.4), "vigos-s4": report(0.7, 1.0, 0.4),
               "opsd-s3": report(0.4, 0.9, 0.4), "opsd-s4": report(0.4, 0.7, 0.4),
               "none-s3": report(0.3, 1.0, 0.3), "none-s4": report(0.3, 1.0, 0.3)}  # fmt: skip
    summary = summarize(cfg, reports)
    assert summary["vigos"]["Avg@k"]["values"] == [0.5, 0.7]
    assert summary["vigos"]["Avg@k"]["mean"] == pytest.approx(0.6)
    assert summary["vigos"]["Avg@k"]["std"] == pytest.approx(0.02**0.5)  # sqrt(((0.1)^2 + (0.1)^2) / 1)
    assert summary["opsd"]["valid format"]["mean"] == pytest.approx(0.8)
    assert summary["vigos"]["image sensitivity"]["mean"] == pytest.approx(0.2)
    assert summary["none"]["image sensitivity"]["std"] == 0.0
    table = results_table(summary, k=4).splitlines()
    assert table[0].startswith("| method | Avg@4 | Pass@4 |") and len(table) == 2 + 3
    assert table[2].startswith("| vigos | 60.0 ± 14.1 |")

    write_results(cfg, reports, tmp_path, {"train": 1.0, "evaluate": 2.0})
    results = write_results(cfg, reports, tmp_path, {"train": 0.5, "evaluate": 0.25})  # a resumed study
    assert results["seconds"] == {"train": 1.5, "evaluate": 2.25} and results["invocations"] == 2
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == results["summary"]
    assert (tmp_path / "results.md").read_text().startswith("| method |")
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_an_unknown_method_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"study.methods.*unknown method 'grpo'"):
        load_config(overrides=["study.methods=[vigos,grpo]"])


def test_a_study_folder_resumes_with_its_own_settings_and_refuses_others(tmp_path):
    claim_folder(study_config("run.steps=7"), tmp_path / "study")
    claim_folder(study_config("run.steps=7"), tmp_path / "study")  # the same study again: resumes
    with pytest.raises(ConfigError, match=r"other settings: run.steps \(7 -> 9\).*another run.name"):
        claim_folder(study_config("run.steps=9"), tmp_path / "study")


def test_without_warm_start_steps_the_base_model_is_the_start_and_other_data_needs_that(tmp_path):
    from vigos_ray.sft import warm_start

    base = tmp_path / "base"
    assert warm_start(study_config("warm_start.steps=0"), base, tmp_path / "warm") == base
    files = study_config("data.source=files", f"data.train_files=[{tmp_path / 'train.jsonl'}]")
    with pytest.raises(ConfigError, match=r"easy-VQA's labels.*set warm_start.steps=0"):
        warm_start(files, base, tmp_path / "warm")


def test_paired_differences_pair_arms_by_seed_and_a_paired_t_test_flags_a_gap_beyond_the_seed_spread():
    from vigos_ray.study import differences_table, paired_differences

    cfg = study_config("study.seeds=[3,4,5]")
    avg = {"vigos": (0.60, 0.52, 0.55), "opsd": (0.58, 0.42, 0.60), "none": (0.50, 0.40, 0.46)}
    reports = {f"{method}-s{seed}": report(a, 1.0, 0.2)
               for method, values in avg.items() for seed, a in zip((3, 4, 5), values, strict=True)}  # fmt: skip
    diff = paired_differences(summarize(cfg, reports))
    assert list(diff) == ["vigos - none", "opsd - none", "vigos - opsd"]
    vigos = diff["vigos - none"]["Avg@k"]  # +0.10, +0.12, +0.09: mean 0.103 > 4.303 x 0.0153 / sqrt(3) = 0.038
    assert vigos["values"] == pytest.approx([0.10, 0.12, 0.09]) and vigos["beyond_spread"]
    assert not diff["vigos - opsd"]["Avg@k"]["beyond_spread"]  # +0.02, +0.10, -0.05: mean 0.023 < 0.186
    assert not diff["vigos - none"]["valid format"]["beyond_spread"]  # no difference at all
    table = differences_table(diff, k=4).splitlines()
    assert table[2].startswith("| vigos - none | +10.3 ± 1.5 * |") and len(table) == 2 + 3 + 2
