"""Evaluation: Pass@k / Avg@k on constructed sets with known values, the grounding probe and the prior split with a
scripted model, checkpoint export, and `launch/eval.py` and `launch/palr.py` on the tiny models, in this process."""

from __future__ import annotations

import json
import re
from itertools import combinations

import pytest
from PIL import Image

from vigos_ray.config import load_config
from vigos_ray.data import Sample
from vigos_ray.evaluation import EvalItem, JudgeRequired, check_benchmark, evaluate, pass_at_k, table
from vigos_ray.models import load_processor
from vigos_ray.sampling import make_rollout

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 5, 5), (5, 2, 1), (5, 2, 2), (10, 3, 4), (4, 1, 4), (7, 3, 3)])
def test_pass_at_k_is_the_share_of_k_subsets_holding_a_correct_sample(n, c, k):
    # counted directly: every k-subset of n samples (the first c correct), and how many hold a correct one
    subsets = list(combinations(range(n), k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(i < c for i in s) for s in subsets) / len(subsets))


def test_pass_at_k_refuses_fewer_samples_than_k():
    with pytest.raises(ValueError, match="pass@3 needs at least 3 samples"):
        pass_at_k(2, 1, 3)


def test_a_judged_benchmark_is_refused_naming_the_judge():
    with pytest.raises(JudgeRequired, match="MM-Vet grades free-form answers with a GPT-4 judge"):
        check_benchmark("MMVet")


def scripted(tokenizer, answers_by_image):
    """A model that answers `answers_by_image[image colour][sample]`: in format, boxed; the image decides."""

    def generate(samples: list[Sample], seed: int):
        out = []
        for s in samples:
            for text in answers_by_image(s):
                ids = tokenizer.encode(text) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
                out.append(make_rollout(s.id, [1], ids, [0.0] * len(ids), tokenizer, 0))
        return out

    return generate


def test_scores_probe_and_prior_split_on_a_scripted_model(tiny_fast):
    tok = load_processor(tiny_fast, 3136, 12544).tokenizer
    colours = ["red", "green", "blue", "teal"]
    items = [
        EvalItem(Sample(f"q{i}", Image.new("RGB", (28, 28), c), "What colour?", c), None, i % 2 == 0)
        for i, c in enumerate(colours)
    ]
    seen = {id(it.sample.image): c for it, c in zip(items, colours, strict=True)}

    def answers(sample):  # sample i: the colour it sees in its 1st and 2nd sample, a box only in the 1st
        colour = seen[id(sample.image)]
        first = f"A {colour} patch.</description><think>It is {colour}.</think>\\boxed{{{colour}}}"
        second = "It is hard to say." if sample.id in ("q0", "q1") else first
        return [first, second]

    cfg = load_config(overrides=[f"model.path={tiny_fast}"])
    report = evaluate(items, scripted(tok, answers), tok, cfg, samples_per_item=2, k=2)
    # true images: q0, q1 1 of 2 right; q2, q3 2 of 2 right
    assert report["pass@2"] == 1.0 and report["avg@2"] == pytest.approx(0.75) and report["accuracy"] == 0.75
    assert report["unparseable"] == pytest.approx(0.25) and report["valid_format"] == pytest.approx(0.75)
    # mismatched images: every answer names the other item's colour, so none is right
    assert report["image"] == {"true": 0.75, "mismatched": 0.0, "sensitivity": 0.75}
    assert report["prior"] == {"conflict": pytest.approx(0.75), "consistent": pytest.approx(0.75)}
    assert report["per_item"][0]["extracted"] == ["red", None]


def test_on_prior_conflict_items_the_report_counts_the_answers_that_follow_the_prior(tiny_fast):
    tok = load_processor(tiny_fast, 3136, 12544).tokenizer
    # "what color is the circle?": the prior says teal, the image shows red (conflict); a consistent item beside it
    items = [EvalItem(Sample("c", Image.new("RGB", (28, 28), "red"), "what color is the circle?", "red"),
                      prior_conflict=True, prior_answer="teal"),
             EvalItem(Sample("k", Image.new("RGB", (28, 28), "teal"), "what color is the circle?", "teal"),
                      prior_conflict=False, prior_answer="teal")]  # fmt: skip

    def answers(sample):  # the wording's answer, then the truth, whatever the image
        return [f"A shape.</description><think>So.</think>\\boxed{{{a}}}" for a in ("teal", sample.answer)]

    cfg = load_config(overrides=[f"model.path={tiny_fast}"])
    report = evaluate(items, scripted(tok, answers), tok, cfg, samples_per_item=2, k=2, image_probe=False)
    assert report["prior"] == {"conflict": 0.5, "consistent": 1.0, "follows_prior": 0.5}
    assert "answers the prior, prior-conflict items   50.00%" in table(report)


@pytest.mark.e2e  # the default warm start
def test_eval_command_on_the_warm_start_reports_what_its_responses_show(tmp_path, tiny_warm, capfd):
    """`launch/eval.py` on the default student (sampling with the HF backend: the vLLM engine's sampling is
    checked against transformers in test_models.py): every number in the report recounted from its own responses
    with an independent grader (easy-VQA answers are single words) and subset counting for Pass@k."""
    from launch.eval import main as eval_main

    out = tmp_path / "report.json"
    code = eval_main(["--model", str(tiny_warm), "--out", str(out), f"run.cache_dir={tmp_path}", "eval.limit=6",
                      "eval.samples=3", "eval.k=2", "eval.max_new_tokens=96", "model.max_pixels=12544",
                      "rollout.backend=hf"])  # fmt: skip
    stdout, stderr = capfd.readouterr()
    assert code == 0, stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["items"] == 6 and report["samples_per_item"] == 3 and report["k"] == 2
    assert report["decoding"] == {
        "temperature": 1.0,
        "top_p": 0.9,
        "top_k": 20,
        "max_new_tokens": 96,
        "samples_per_prompt": 3,
    }

    def right(text: str, answer: str) -> bool:
        boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
        return bool(boxed) and boxed[-1].strip().lower() == answer.lower()

    def in_format(text: str) -> bool:
        whole = r"(?s)[^<]*</description>\s*<think>.*</think>\s*\\boxed\{[^{}]*\}\s*(<\|im_end\|>)?"
        return re.fullmatch(whole, text) is not None

    items = report["per_item"]
    correct = [[right(t, it["answer"]) for t in it["responses"]] for it in items]
    flat = [c for row in correct for c in row]
    subsets = list(combinations(range(3), 2))
    pass2 = sum(sum(any(row[i] for i in s) for s in subsets) / len(subsets) for row in correct) / len(items)
    assert [it["correct"] for it in items] == correct
    assert report["accuracy"] == pytest.approx(sum(flat) / len(flat))
    assert report["avg@2"] == pytest.approx(sum(sum(row[:2]) / 2 for row in correct) / len(items))
    assert report["pass@2"] == pytest.approx(pass2)
    texts = [t for it in items for t in it["responses"]]
    assert report["valid_format"] == pytest.approx(sum(map(in_format, texts)) / len(texts))
    assert report["valid_format"] > 0.5  # the warm start writes the format
    assert report["unparseable"] == pytest.approx(sum("\\boxed{" not in t for t in texts) / len(texts))
    assert report["image"]["sensitivity"] == pytest.approx(report["image"]["true"] - report["image"]["mismatched"])
    assert report["image"]["true"] == pytest.approx(report["accuracy"])
    assert f"{100 * report['pass@2']:6.2f}%" in stdout and "image sensitivity" in stdout
    assert stderr.count("\n") < 10 and "Warning" not in stderr  # the console: our lines and a bar


def test_answer_pools_offer_wrong_answers_of_the_same_kind():
    from vigos_ray.palr import answer_pools, wrong_answers

    img = Image.new("RGB", (8, 8))
    s = lambda i, q, a: Sample(f"s{i}", img, q, a)  # noqa: E731
    items = [(s(0, "What color is the shape?", "red"), None), (s(1, "What color is it?", "blue"), None),
             (s(2, "What shape is this?", "circle"), None), (s(3, "Is there a circle?", "yes"), None),
             (s(4, "Is there a square?", "no"), None), (s(5, "Which animal?", "B"), ("cat", "dog", "cow")),
             (s(6, "Which animal?", "dog"), ("cat", "dog", "cow"))]  # fmt: skip
    pools = answer_pools(items)
    assert pools["s0"] == ["blue"] and pools["s3"] == ["no"]  # colours for colours, yes/no for yes/no
    assert pools["s2"] == sorted({"red", "blue", "circle", "yes", "no", "B", "dog"})  # alone in its kind: any answer
    assert pools["s5"] == ["A", "B", "C"] and pools["s6"] == ["cat", "dog", "cow"]  # letters for a letter
    assert set(wrong_answers(items[5][0], pools, 3)) == {"A", "C"}  # fewer than 3 where the options run out
    assert wrong_answers(items[2][0], pools, 3) == wrong_answers(items[2][0], pools, 3)  # the same every time
    assert "circle" not in wrong_answers(items[2][0], pools, 3)
    assert set(wrong_answers(items[6][0], pools, 3)) == {"cat", "cow"}


def test_palr_command_measures_given_rollouts_for_both_methods(tmp_path, tiny_fast, capfd):
    from launch.palr import main as palr_main
    from vigos_ray.easyvqa import write_easyvqa_jsonl

    records = [json.loads(line) for line in write_easyvqa_jsonl(tmp_path, "test").read_text().splitlines()[:4]]
    rollouts = tmp_path / "rollouts.jsonl"
    rollouts.write_text("".join(json.dumps({"id": r["id"], "completion": f"A shape.</description><think>It must be "
                                            f"{r['answer']}.</think>\\boxed{{{r['answer']}}}"}) + "\n"
                                for r in records))  # fmt: skip
    out = tmp_path / "palr.json"
    code = palr_main(["--model", str(tiny_fast), "--rollouts", str(rollouts), "--out", str(out),
                      f"run.cache_dir={tmp_path}", "eval.limit=4", "model.max_pixels=12544"])  # fmt: skip
    stdout, stderr = capfd.readouterr()
    assert code == 0, stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["valid_rollouts"] == report["rollouts"] == 4
    for method in ("vigos", "opsd"):
        assert set(report[method]["pooled"]) == {"description", "reasoning", "response"}
        assert all(0.0 <= v <= 1.0 for v in report[method]["pooled"].values())
        assert report[method]["tokens"]["description"] > 0
    assert report["vigos"]["pooled"]["description"] == 0.0  # the perception teacher never sees the answer
    assert report["opsd"]["pooled"]["reasoning"] > 0.0
    assert "T_d" in stdout and "vigos" in stdout and "opsd" in stdout


def test_mathvista_style_records_become_items_with_choices_and_bad_ones_are_skipped(tmp_path):
    from vigos_ray.evaluation import read_items

    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    rows = [{"id": 7, "question": "Which animal?", "choices": ["cat", "dog"], "answer": "B", "image": "a.png",
             "prior_conflict": True},
            {"id": "bad", "question": "Which?", "choices": 5, "answer": "B", "image": "a.png"},
            {"id": "plain", "problem": "What colour?", "answer": "red", "image": "a.png"}]  # fmt: skip
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = read_items([tmp_path / "bench.jsonl"], load_config())
    assert [it.sample.id for it in items] == ["7", "plain"]  # the record with malformed choices is skipped
    assert items[0].sample.problem == "Which animal?\nChoices:\n(A) cat\n(B) dog"
    assert items[0].choices == ("cat", "dog") and items[0].prior_conflict is True
    assert items[1].choices is None and items[1].prior_conflict is None
