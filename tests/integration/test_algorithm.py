"""The algorithm core on the tiny real model: teacher contexts and targets, the step loss, PALR (no Ray)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vigos_ray.config import ConfigError, load_config
from vigos_ray.data import PromptStream, read_records
from vigos_ray.easyvqa import answer_vocabulary, write_easyvqa_jsonl
from vigos_ray.models import load_model, load_processor
from vigos_ray.objective import plan_batch, student_loss
from vigos_ray.palr import palr
from vigos_ray.prompts import context_text, encode, student_text
from vigos_ray.sampling import make_rollout
from vigos_ray.scoring import output_head, teacher_targets
from vigos_ray.spans import TokenTable, parse_completion
from vigos_ray.step import frozen_copy, score_plan, vigos_step

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def processor(tiny_fast):
    return load_processor(tiny_fast, 3136, 12544)


@pytest.fixture(scope="module")
def teacher(tiny_fast):
    return frozen_copy(load_model(tiny_fast, "float64"))


@pytest.fixture
def student(tiny_fast):
    return load_model(tiny_fast, "float64").train()


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    path = write_easyvqa_jsonl(tmp_path_factory.mktemp("data"), "test")
    return PromptStream(read_records(path)[:64], seed=0, max_pixels=12544).next_batch(4)


def config(*overrides: str):
    return load_config(overrides=["model.max_pixels=12544", "loss.chunk_tokens=16", *overrides])


def completion_text(sample, valid: bool) -> str:
    if not valid:
        return "I cannot tell from here.<|im_end|>"
    return (
        f"A {sample.answer} thing sits in the middle.</description><think>The picture settles it.</think>"
        f"\\boxed{{{sample.answer}}}<|im_end|>"
    )


def rollouts_for(samples, processor, cfg, valid=(True, False, True, False)):
    out = []
    for sample, ok in zip(samples, valid, strict=True):
        prompt = encode(processor, student_text(processor, sample.problem, cfg.prompts), sample.image).input_ids
        completion = processor.tokenizer(completion_text(sample, ok), add_special_tokens=False).input_ids
        out.append(make_rollout(sample.id, prompt, completion, [0.0] * len(completion), processor.tokenizer, 0))
    return out


def planned(samples, processor, cfg, rollouts=None):
    rollouts = rollouts or rollouts_for(samples, processor, cfg)
    table = TokenTable.for_tokenizer(processor.tokenizer)
    spans = [parse_completion(r.completion_ids, table, cfg.loss.span_convention) for r in rollouts]
    return rollouts, spans, plan_batch(processor, {s.id: s for s in samples}, rollouts, spans, cfg)


def test_each_teacher_reads_its_own_context_and_only_the_tokens_it_needs(samples, processor):
    cfg = config()
    rollouts, spans, plan = planned(samples, processor, cfg)
    tok = processor.tokenizer
    assert [sp.valid for sp in spans] == [True, False, True, False]
    assert plan.row_rollout == {"perception": [0, 2], "reasoning": [0, 2], "reference": [1, 3]}
    for i, row in zip(plan.row_rollout["perception"], plan.teacher_rows["perception"], strict=True):
        text = tok.decode(row.input_ids)
        assert samples[i].problem not in text and "answer" not in text.split("<|im_start|>assistant")[0]
        assert text.endswith("sits in the middle")  # stops where the description ends (".</" is one token here)
    for i, row in zip(plan.row_rollout["reasoning"], plan.teacher_rows["reasoning"], strict=True):
        text = tok.decode(row.input_ids)
        assert f"The correct answer is {samples[i].answer}" in text and "</description>" not in text
        assert text.split("<|im_start|>assistant\n")[1].startswith("<think>The picture")  # ">The" is one token
        assert tok.decode([row.input_ids[j] for j in row.scored]) == tok.decode(
            [rollouts[i].completion_ids[t] for t in spans[i].reasoning]
        )
    for i, row in zip(plan.row_rollout["reference"], plan.teacher_rows["reference"], strict=True):
        text = tok.decode(row.input_ids)
        assert text.split("<|im_start|>assistant\n")[1] == "<description>" + completion_text(samples[i], False)
        assert len(row.scored) == len(rollouts[i].completion_ids)


def test_reasoning_teacher_sees_the_description_under_the_paper_flag(samples, processor):
    cfg = config("loss.rea_teacher_sees_description=true")
    rollouts, spans, plan = planned(samples, processor, cfg)
    text = processor.tokenizer.decode(plan.teacher_rows["reasoning"][0].input_ids)
    assert text.split("<|im_start|>assistant\n")[1].startswith("<description>A ")
    assert "</description><think>The picture" in text


def test_opsd_and_distill_supervise_every_token_of_every_rollout(samples, processor):
    rollouts, spans, plan = planned(samples, processor, config("loss.objective=opsd"))
    assert [s.name for s in plan.segments] == ["privileged"]
    assert plan.row_rollout["privileged"] == [0, 1, 2, 3]
    assert [len(r.scored) for r in plan.teacher_rows["privileged"]] == [len(r.completion_ids) for r in rollouts]
    cfg = config("loss.objective=distill", "teachers.external.checkpoint=/some/teacher")
    rollouts, spans, plan = planned(samples, processor, cfg)
    assert plan.teacher_rows["external"][0].input_ids == plan.student_rows[0].input_ids


def full_forward_logprobs(model, row):
    """log q(y) of a row's scored tokens from one unbatched, unpadded forward with full logits (HF's own path)."""
    ids = torch.tensor([row.input_ids])
    logits = model(input_ids=ids, pixel_values=row.pixel_values, image_grid_thw=row.image_grid_thw).logits[0]
    scored = torch.tensor(row.scored)
    return logits[scored - 1].log_softmax(-1), ids[0, scored]


@pytest.mark.parametrize("payload", ["sampled", "topk", "hidden"])
def test_batched_teacher_targets_line_up_with_single_sequence_forwards(samples, processor, teacher, payload):
    _, _, plan = planned(samples, processor, config())
    rows = [row for name in ("perception", "reasoning", "reference") for row in plan.teacher_rows[name]]
    rows += plan.student_rows  # the student's own context, as the learner and the distill teacher read it
    vocab = len(processor.tokenizer)
    budget = 2 * max(len(r.input_ids) for r in rows)  # two rows per forward, padded to the longer
    targets = teacher_targets(teacher, rows, payload, vocab, budget, topk=5, pad_id=processor.tokenizer.pad_token_id)
    for row, got in zip(rows, targets, strict=True):
        with torch.no_grad():
            lp, ys = full_forward_logprobs(teacher, row)
        lp = lp[:, :vocab].log_softmax(-1)  # padded head rows excluded, as on the teacher side
        assert len(got) == len(row.scored)
        if payload == "sampled":
            torch.testing.assert_close(got.token_logprobs, lp.gather(1, ys[:, None])[:, 0], atol=1e-8, rtol=0)
        elif payload == "topk":
            top_lp, top_ids = lp.topk(5, dim=-1)
            assert torch.equal(got.topk_ids, top_ids)
            torch.testing.assert_close(got.topk_logprobs, top_lp, atol=1e-8, rtol=0)
            torch.testing.assert_close(got.tail_logprob.exp(), 1 - top_lp.exp().sum(-1), atol=1e-8, rtol=0)
        else:
            logits = got.hidden @ output_head(teacher)[:vocab].T
            torch.testing.assert_close(logits.log_softmax(-1), lp, atol=1e-8, rtol=0)


def _loss_and_grads(student, teacher, samples, processor, cfg, rollouts):
    _, _, plan = planned(samples, processor, cfg, rollouts)
    vocab = len(processor.tokenizer)
    targets = score_plan(dict.fromkeys(cfg.teacher_pools(), teacher), plan, cfg, vocab, 0)
    heads = {s.name: output_head(teacher) for s in plan.segments}
    student.zero_grad()
    loss, stats = student_loss(student, plan, targets, cfg, vocab, heads)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}, stats


def test_loss_does_not_depend_on_rollout_order_or_padding(samples, processor, teacher, student):
    rollouts = rollouts_for(samples, processor, config())
    a, grads_a, _ = _loss_and_grads(student, teacher, samples, processor, config(), rollouts)
    alone = config("learner.micro_token_budget=64", "teachers.reference.token_budget=64", "loss.chunk_tokens=3")
    b, grads_b, _ = _loss_and_grads(student, teacher, samples, processor, alone, rollouts[::-1])
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-9, rtol=1e-6, msg=name)


def test_an_objective_defined_here_needs_no_change_to_the_library(samples, processor, teacher, student):
    """Adding an objective is one registered function (here, in this test): a perception-only variant of ViGOS (its
    image-only teacher on the description, nothing else) starts only that teacher's pool, plans only its rows, and
    its loss is exactly ViGOS's perception term on the same rollouts."""
    from vigos_ray.objective import OBJECTIVES, Segment, objective

    @objective("perception_only")
    def perception_only(loss):
        return (Segment("perception", "perception", "perception", "forward", 1.0, scores="description"),)

    try:
        cfg = config("loss.objective=perception_only")
        assert list(cfg.teacher_pools()) == ["perception"]
        rollouts = rollouts_for(samples, processor, cfg)
        _, _, plan = planned(samples, processor, cfg, rollouts)
        assert list(plan.teacher_rows) == ["perception"] and plan.row_rollout == {"perception": [0, 2]}
        only, _, _ = _loss_and_grads(student, teacher, samples, processor, cfg, rollouts)
        _, _, vigos_stats = _loss_and_grads(student, teacher, samples, processor, config(), rollouts)
        assert only.item() > 0
        torch.testing.assert_close(only.item(), vigos_stats["perception"].loss, atol=1e-10, rtol=0)
    finally:
        del OBJECTIVES["perception_only"]
    with pytest.raises(ConfigError, match="'loss.objective': unknown objective 'perception_only'"):
        config("loss.objective=perception_only")


def test_a_fourth_teacher_role_is_a_registered_objective_and_config(samples, processor, teacher, student, tmp_path):
    """A new teacher role (here `critic`: a second answer-aware teacher on the reasoning, with its own wording) is
    an objective naming it (in this test) plus its pool and its context in the run's YAML: no library file changes.
    The run starts its pool, its rows are built from its own template, and given the reasoning teacher's template
    its term equals the reasoning term exactly."""
    import yaml

    from vigos_ray.objective import OBJECTIVES, Segment, objective, vigos

    @objective("vigos_critic")
    def vigos_critic(loss):
        return (*vigos(loss), Segment("critic", "critic", "critic", "forward", 0.5, scores="reasoning"))

    def run_config(template: str):
        critic = {"template": template, "prefill": "<think>", "resumes": "think"}
        (tmp_path / "critic.yaml").write_text(yaml.safe_dump({"loss": {"objective": "vigos_critic"},
            "teachers": {"critic": {"max_workers": 2}}, "prompts": {"critic": critic}}))  # fmt: skip
        return load_config(tmp_path / "critic.yaml", ["model.max_pixels=12544", "loss.chunk_tokens=16"])

    try:
        same = run_config(config().prompts["reasoning"].template)
        assert list(same.teacher_pools()) == ["perception", "reasoning", "reference", "critic"]
        assert same.teacher_pools()["critic"].max_workers == 2
        rollouts = rollouts_for(samples, processor, same)
        _, _, plan = planned(samples, processor, same, rollouts)
        assert plan.row_rollout["critic"] == plan.row_rollout["reasoning"] == [0, 2]
        loss, _, stats = _loss_and_grads(student, teacher, samples, processor, same, rollouts)
        vigos_loss, _, _ = _loss_and_grads(student, teacher, samples, processor, config(), rollouts)
        assert stats["critic"].loss == stats["reasoning"].loss > 0
        torch.testing.assert_close(loss, vigos_loss + 0.5 * stats["reasoning"].loss, atol=1e-10, rtol=0)

        own = run_config("Check this answer, {answer}, against the image. {problem}")
        _, _, plan = planned(samples, processor, own, rollouts)
        text = processor.tokenizer.decode(plan.teacher_rows["critic"][0].input_ids)
        assert f"Check this answer, {samples[0].answer}, against the image." in text
        assert plan.teacher_rows["critic"][0].input_ids != plan.teacher_rows["reasoning"][0].input_ids
    finally:
        del OBJECTIVES["vigos_critic"]
    with pytest.raises(ConfigError, match="'teachers.critic': no registered objective scores with this role"):
        config("teachers.critic.max_workers=2")  # once no objective names the role, its pool is a mistake


def test_hidden_and_full_support_topk_payloads_give_the_same_loss(samples, processor, teacher, student):
    rollouts = rollouts_for(samples, processor, config())
    vocab = len(processor.tokenizer)
    hidden, _, _ = _loss_and_grads(student, teacher, samples, processor, config(), rollouts)
    topk, _, _ = _loss_and_grads(
        student, teacher, samples, processor, config("scoring.payload=topk", f"scoring.topk={vocab}"), rollouts
    )
    torch.testing.assert_close(hidden, topk, atol=1e-10, rtol=0)
    top8, _, _ = _loss_and_grads(student, teacher, samples, processor, config("scoring.payload=topk"), rollouts)
    assert not torch.allclose(hidden, top8)


def independent_vigos_loss(student, teacher, processor, samples, rollouts, cfg) -> float:
    """ViGOS written out from SPEC §4-§6 with full-logit forwards and per-rollout loops, sharing only the parser."""
    tok, lc = processor.tokenizer, cfg.loss
    vocab = len(tok)
    sums = {"perception": 0.0, "reasoning": 0.0, "reference": 0.0}
    counts = dict.fromkeys(sums, 0)
    for sample, r in zip(samples, rollouts, strict=True):
        sp = parse_completion(r.completion_ids, tok)
        texts = {
            name: context_text(processor, cfg.prompts[name], sample.problem, sample.answer)
            for name in ("perception", "reasoning", "reference")
        }
        comp = list(r.completion_ids)

        def logprobs(model, text, tokens, first, n, image=sample.image):
            ctx = encode(processor, text, image)
            ids = torch.tensor([ctx.input_ids + tokens])
            out = model(input_ids=ids, pixel_values=ctx.pixel_values, image_grid_thw=ctx.image_grid_thw).logits[0]
            start = len(ctx.input_ids) + first - 1
            return out[start : start + n, :vocab].double().log_softmax(-1)

        with torch.no_grad():
            p_all = logprobs(student, student_text(processor, sample.problem, cfg.prompts), comp, 0, len(comp))
        if sp.valid:
            reasoning = texts["reasoning"][: len(texts["reasoning"]) - sp.think_overlap]  # "<think" + ">The..."
            jobs = [("perception", texts["perception"], comp[: sp.description_end], sp.description, 0, "fwd"),
                    ("reasoning", reasoning, comp[sp.think_start : sp.answer_end], sp.reasoning, sp.think_start,
                     "fwd")]  # fmt: skip
        else:
            jobs = [("reference", texts["reference"], comp, sp.reference, 0, "rev")]
        for name, text, tokens, positions, offset, direction in jobs:
            with torch.no_grad():
                q = logprobs(teacher, text, tokens, 0, len(tokens))
            for t in positions:
                lp, lq = p_all[t], q[t - offset]
                kl = (lq.exp() * (lq - lp)).sum() if direction == "fwd" else (lp.exp() * (lp - lq)).sum()
                sums[name] += torch.clamp(kl, max=lc.clip)
                counts[name] += 1
    weights = {"perception": lc.perception_weight, "reasoning": lc.reasoning_weight, "reference": lc.reference_weight}
    return float(sum(weights[n] * sums[n] / max(counts[n], 1) for n in sums))


def test_vigos_step_loss_equals_an_independent_computation(samples, processor, teacher, student):
    cfg = config("loss.clip=0.0002")  # about the median token KL of the tiny model: some tokens are clipped
    rollouts = rollouts_for(samples, processor, cfg)
    result = vigos_step(student, dict.fromkeys(("perception", "reasoning", "reference"), teacher), processor,
                        samples, cfg, rollouts=rollouts)  # fmt: skip
    expected = independent_vigos_loss(student, teacher, processor, samples, rollouts, cfg)
    assert result.loss == pytest.approx(expected, abs=1e-9)
    assert {n: s.tokens for n, s in result.segments.items()} == {
        n: sum(len(p) for p in result.plan.positions[n]) for n in ("perception", "reasoning", "reference")
    }
    assert 0 < result.segments["reference"].clipped < 1


def test_vigos_step_samples_scores_and_reaches_every_trainable_parameter(tiny_fast, samples, processor, teacher):
    student = load_model(tiny_fast, "float32").train()
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = config("rollout.max_new_tokens=12")
    result = vigos_step(student, dict.fromkeys(("perception", "reasoning", "reference"), teacher.float()),
                        processor, samples[:2], cfg, seed=7)  # fmt: skip
    assert len(result.rollouts) == 2 and all(1 <= len(r.completion_ids) <= 12 for r in result.rollouts)
    assert result.loss > 0
    no_grad = [n for n, p in student.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert no_grad == []
    again = vigos_step(load_model(tiny_fast, "float32").train(), dict.fromkeys(("perception", "reasoning", "reference"),
                       teacher.float()), processor, samples[:2], cfg, seed=7)  # fmt: skip
    assert [r.completion_ids for r in again.rollouts] == [r.completion_ids for r in result.rollouts]
    assert again.loss == pytest.approx(result.loss, abs=1e-6)
    teacher.double()


def test_palr_is_zero_on_the_description_for_vigos_and_positive_for_opsd(samples, processor, teacher):
    cfg = config()
    rollouts = rollouts_for(samples, processor, cfg, valid=(True, True, True, True))  # descriptions name the answer
    pool = answer_vocabulary()
    vigos = palr(teacher, processor, samples, rollouts, cfg, "vigos", pool)
    opsd = palr(teacher, processor, samples, rollouts, cfg, "opsd", pool)
    assert vigos.rollouts == opsd.rollouts == 4
    assert vigos.pooled["description"] == 0.0 and vigos.per_rollout["description"] == 0.0
    assert (
        opsd.pooled["description"] > 0
    )  # the privileged teacher's pull on the description comes partly from the answer
    assert vigos.pooled["reasoning"] > 0 and 0 < vigos.pooled["response"] < 1
    assert opsd.tokens["response"] == sum(len(r.completion_ids) for r in rollouts)
    assert vigos.tokens["response"] == vigos.tokens["description"] + vigos.tokens["reasoning"]
    again = palr(teacher, processor, samples, rollouts, dataclasses.replace(cfg), "opsd", pool)
    assert again.pooled == opsd.pooled
