"""The learner's train step against a single-process forward + backward of the same tokens, at the real vocabulary.

Both sides get the same batch (the same rollouts, the same teacher targets, computed once) and run the same
`student_loss`: a single process on the plain model (what `vigos_step` does after scoring), and one
`LearnerWorker` rank built in this process (FSDP2 over a one-rank gloo group, LossModule, micro-batches, clip,
AdamW), so what differs is exactly what the learner adds. Rollouts are `--tokens` random allowed ids, as the
random model writes them (format broken: the reference teacher scores every token), or with `--valid` a share in
format. `--profile` prints the torch profiler's top entries for one step of each side.

    python bench/learner_step.py --rollouts 2 --tokens 128
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from statistics import median

from common import REPO, plain_student, synthetic_rollouts, table, wide_model


def batch_inputs(path: Path, cfg, rollouts_n: int, tokens: int, valid: float):
    """(processor, plan, targets): `rollouts_n` rollouts of `tokens` tokens, scored once by a frozen teacher."""
    import random

    import torch

    from vigos_ray.models import load_model, load_processor, sampling_token_ids
    from vigos_ray.objective import plan_batch
    from vigos_ray.preflight import prompt_stream
    from vigos_ray.prompts import encode, student_text
    from vigos_ray.sampling import make_rollout
    from vigos_ray.spans import TokenTable, parse_completion
    from vigos_ray.step import score_plan

    processor = load_processor(path, cfg.model.min_pixels, cfg.model.max_pixels)
    tok = processor.tokenizer
    samples = prompt_stream(cfg, processor).next_batch(rollouts_n)
    rng = random.Random(0)
    allowed = sampling_token_ids(tok)
    n_valid = round(valid * rollouts_n)
    rollouts = synthetic_rollouts(samples[:n_valid], processor, cfg, valid_fraction=1.0, words=tokens // 3)
    for s in samples[n_valid:]:
        prompt = encode(processor, student_text(processor, s.problem, cfg.prompts), s.image).input_ids
        ids = [rng.choice(allowed) for _ in range(tokens)]
        rollouts.append(make_rollout(s.id, prompt, ids, [0.0] * tokens, tok, 0))
    table_ = TokenTable.for_tokenizer(tok)
    spans = [parse_completion(r.completion_ids, table_, cfg.loss.span_convention) for r in rollouts]
    plan = plan_batch(processor, {s.id: s for s in samples}, rollouts, spans, cfg)
    teacher = load_model(path, "float32", "cpu").eval().requires_grad_(False)
    with torch.no_grad():
        targets = score_plan(dict.fromkeys(cfg.teacher_pools(), teacher), plan, cfg, len(tok), tok.pad_token_id or 0)
    return processor, plan, targets, teacher


def single_process(path: Path, cfg, processor, plan, targets, teacher):
    """A step function of the plain model (forward + loss, backward, clip + AdamW) and its seconds per phase."""
    import torch

    from vigos_ray.objective import student_loss
    from vigos_ray.scoring import output_head

    student, trainable, optimizer = plain_student(path, cfg)
    heads = {seg.name: output_head(teacher) for seg in plan.segments}
    vocab, pad = len(processor.tokenizer), processor.tokenizer.pad_token_id or 0
    times: dict[str, list[float]] = {"forward + loss": [], "backward": [], "clip + optimizer": [], "step": []}

    def step():
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = student_loss(student, plan, targets, cfg, vocab, heads, pad_id=pad)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.learner.grad_clip)
        optimizer.step()
        t3 = time.perf_counter()
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
            times[k].append(v)

    return step, times


def learner(path: Path, cfg, plan, targets, in_actor: bool = False):
    """A step function of one LearnerWorker rank (`train_step`, timed by its own clock), its seconds, its batch.
    `in_actor`: the rank is a Ray actor, created as the pipeline creates it (so what differs from the in-process
    rank is the actor's process: Ray's environment, niceness, memory)."""
    from vigos_ray.batching import split_batch
    from vigos_ray.weight_sync import free_address
    from workers.learner import LearnerWorker

    batch = split_batch(plan, targets, 1, cfg.learner.micro_token_budget)[0]
    times: list[float] = []
    host, port = free_address()
    if not in_actor:
        worker = LearnerWorker(cfg, path)
        worker.join(host, port, 1)
        return (lambda: times.append(worker.train_step(batch).seconds)), times, batch
    import ray

    from vigos_ray.cluster import init_ray

    init_ray(cfg)
    actor = ray.remote(num_cpus=cfg.learner.num_cpus)(LearnerWorker).remote(cfg, path)
    ray.get(actor.join.remote(host, port, 1))
    return (lambda: times.append(ray.get(actor.train_step.remote(batch)).seconds)), times, batch


def profiled(step, name: str) -> None:
    """One call of `step` under the torch profiler; prints its top operators."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"\n{name}: top operators by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--valid", type=float, default=0.0, help="share of rollouts in format")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--actor", action="store_true", help="the learner rank in a Ray actor, as in the pipeline")
    parser.add_argument("--cache", default=str(REPO / ".cache" / "vigos"))
    parser.add_argument("overrides", nargs="*", help="config key=value")
    args = parser.parse_args()
    from vigos_ray.config import load_config

    cache = Path(args.cache)
    path = wide_model(cache)
    cfg = load_config(overrides=[f"model.path={path}", f"run.cache_dir={cache}", "data.limit=64",
                                 f"learner.lora.enabled={str(args.lora).lower()}", "learner.workers=1",
                                 "run.cpu_threads=0", *args.overrides])  # fmt: skip
    torch.set_num_threads(max(1, torch.get_num_threads()))
    processor, plan, targets, teacher = batch_inputs(path, cfg, args.rollouts, args.tokens, args.valid)
    single_step, single_times = single_process(path, cfg, processor, plan, targets, teacher)
    learner_step, learner_times, batch = learner(path, cfg, plan, targets, args.actor)
    for _ in range(args.steps + 1):  # interleaved, so that a slow spell of the machine hits both; 1st: warm-up
        single_step()
        learner_step()
    if args.profile:
        profiled(single_step, "single process")
        profiled(learner_step, "learner rank")
    base = {k: median(v[1 : args.steps + 1]) for k, v in single_times.items()}
    ours = {"step": median(learner_times[1 : args.steps + 1]), "micro-batches": len(batch.micro)}
    tokens = sum(len(u) for u in plan.union)
    where = ", Ray actor" if args.actor else ""
    rows = [["single process", *(f"{base[k]:.2f}" for k in ("forward + loss", "backward", "clip + optimizer")),
             f"{base['step']:.2f}", f"{tokens / base['step']:.0f}", "-", "1.00x"],
            [f"learner rank (FSDP2, 1 rank{where})", "-", "-", "-", f"{ours['step']:.2f}",
             f"{tokens / ours['step']:.0f}", ours["micro-batches"], f"{base['step'] / ours['step']:.2f}x"]]  # fmt: skip
    table(f"train step, {args.rollouts} rollouts x {args.tokens} tokens ({tokens} supervised; LoRA "
          f"{'on' if args.lora else 'off'}; {torch.get_num_threads()} threads; median of {args.steps}, the two "
          "interleaved, after a warm-up)",
          ["path", "forward + loss s", "backward s", "clip + optimizer s", "step s", "tokens/s", "micro-batches",
           "speed vs single"], rows)  # fmt: skip


if __name__ == "__main__":
    main()
