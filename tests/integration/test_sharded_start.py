"""The learner's sharded start-up (parameters on meta, each rank reading its own rows from the safetensors) gives
exactly what the full load gives: every parameter, LoRA adapter and buffer, and the log-probs of a probe, at 1 rank
(this process) and 2 ranks (Ray tasks sharing one gloo group), with and without LoRA."""

from __future__ import annotations

import pytest

from vigos_ray.config import load_config
from vigos_ray.weight_sync import free_port

pytestmark = pytest.mark.integration
PROBE = list(range(20, 70))
LORA = ["learner.lora.enabled=true", "learner.lora.r=4", "learner.lora.alpha=8", "learner.lora.dropout=0.0"]


def build_both(model_path: str, rank: int, world: int, host: str, port: int) -> list[tuple]:
    """On one rank of `world`: for no LoRA and LoRA, a full-load and a sharded learner in one gloo group; per
    build: checksums of the whole student (rank 0), probe log-probs, its local shards, the teachers' head checksums."""
    from workers.learner import STUDENT_HEAD, LearnerWorker, head_checksums, state_checksums, token_logprobs
    from workers.sharded_start import local

    out = []
    for extra in ([], LORA):
        for load in ("full", "sharded"):
            overrides = [f"model.path={model_path}", f"learner.workers={world}", f"learner.load={load}", *extra]
            cfg = load_config(overrides=[*overrides, "learner.gradient_checkpointing=true"])
            learner = LearnerWorker(cfg, model_path, worker_index=rank)
            learner.join(host, port, world)
            # FSDP holds what trains; one rank keeps the frozen weights out of it (nothing to shard, only to copy)
            managed = {n for n, p in learner.module.named_parameters() if hasattr(p, "to_local")}
            trained = {n for n, p in learner.module.named_parameters() if p.requires_grad}
            assert managed == (trained if world == 1 else {n for n, _ in learner.module.named_parameters()})
            shards = {n: local(p).clone() for n, p in learner.module.named_parameters()}
            out.append((state_checksums(learner), token_logprobs(learner, PROBE), shards, head_checksums(learner)))
            if extra:  # LoRA leaves the head untrained: the teachers' head is the student's own, read in place
                assert all(h is STUDENT_HEAD for h in learner.heads.values())
            else:  # the head trains: one frozen copy for the three segments, this rank holding its rows of it
                (head,) = {id(h): h for h in learner.heads.values()}.values()
                assert head.rows.shape[0] == -(-640 // world) and head.full is None
            if extra and load == "sharded":
                learner.shutdown()  # the group goes with the last build
    return out


def assert_same(builds: list[tuple]) -> None:
    """Full and sharded builds (no LoRA, then LoRA) are bit-identical."""
    import torch

    for full, sharded in (builds[0:2], builds[2:4]):
        assert full[0] == sharded[0] and len(full[0]) > 50  # every parameter and buffer, by checksum
        assert full[1] == sharded[1]  # probe log-probs, exactly
        assert full[3] == sharded[3] and len(set(full[3].values())) == 1  # the teachers' head
        assert full[2].keys() == sharded[2].keys()
        assert all(torch.equal(full[2][n], sharded[2][n]) for n in full[2])  # each rank's own shard
    lora = builds[3][0]
    assert any(".lora_A." in n for n in lora) and any("inv_freq" in n for n in lora)
    assert builds[0][1] == builds[2][1]  # LoRA starts as the identity (B = 0)
    assert builds[0][3] == builds[2][3]  # the head read in place is the head a copy holds


def test_one_rank_sharded_start_up_equals_the_full_load(tiny_fast):
    builds = build_both(str(tiny_fast), 0, 1, "127.0.0.1", free_port("127.0.0.1"))
    assert_same(builds)


def test_a_checkpoint_of_a_sharded_start_up_resumes_a_full_load_exactly(tiny_fast, tmp_path):
    """DCP state written by a learner that started sharded (its weights then changed) is read by one that loaded in
    full, and the two hold the same state."""
    import torch

    from workers.learner import LearnerWorker, state_checksums, token_logprobs
    from workers.sharded_start import local

    port = free_port("127.0.0.1")
    learners = {}
    for load in ("sharded", "full"):
        cfg = load_config(overrides=[f"model.path={tiny_fast}", "learner.workers=1", f"learner.load={load}", *LORA])
        learners[load] = LearnerWorker(cfg, tiny_fast)
        learners[load].join("127.0.0.1", port, 1)
    try:
        with torch.no_grad():  # stand-in for training: every adapter and a base weight move
            for name, p in learners["sharded"].module.named_parameters():
                if p.requires_grad or name.endswith("embed_tokens.weight"):
                    local(p).add_(0.01 * torch.randn_like(local(p)))
        learners["sharded"].save_state(str(tmp_path))
        assert state_checksums(learners["full"]) != state_checksums(learners["sharded"])
        learners["full"].load_state(str(tmp_path))
        assert state_checksums(learners["full"]) == state_checksums(learners["sharded"])
        assert token_logprobs(learners["full"], PROBE) == token_logprobs(learners["sharded"], PROBE)
    finally:
        learners["full"].shutdown()


@pytest.mark.e2e  # ~16 s; the default suite's pipeline (test_pipeline.py) starts 2 sharded ranks too
def test_two_ranks_sharded_start_up_equals_the_full_load_on_every_rank(ray_cluster, tiny_fast):
    import ray

    task = ray.remote(num_cpus=1, max_calls=1)(build_both)  # a fresh process: no group left behind
    port = free_port("127.0.0.1")
    ranks = ray.get([task.remote(str(tiny_fast), r, 2, "127.0.0.1", port) for r in range(2)], timeout=600)
    for builds in ranks:
        assert_same([(b[0] if b[0] is not None else ranks[0][i][0], *b[1:]) for i, b in enumerate(builds)])
    assert ranks[0][3][2].keys() == ranks[1][3][2].keys()
    embed = next(n for n in ranks[0][3][2] if "embed_tokens" in n)
    assert ranks[0][3][2][embed].shape[0] + ranks[1][3][2][embed].shape[0] == 640  # rows split across the ranks


def load_and_checksum(model_path: str, checkpoint: str, rank: int, world: int, host: str, port: int):
    """On one rank of `world`: a LoRA learner that loads `checkpoint`; rank 0 returns the whole state's checksums."""
    from workers.learner import LearnerWorker, state_checksums

    cfg = load_config(overrides=[f"model.path={model_path}", f"learner.workers={world}", *LORA])
    learner = LearnerWorker(cfg, model_path, worker_index=rank)
    learner.join(host, port, world)
    try:
        learner.load_state(checkpoint)
        return state_checksums(learner)
    finally:
        learner.shutdown()


@pytest.mark.e2e  # ~20 s
def test_a_checkpoint_written_at_one_rank_resumes_at_two(ray_cluster, tiny_fast, tmp_path):
    """One rank keeps its frozen weights out of FSDP (plain tensors in its checkpoint); two ranks shard them: DCP
    reads the one into the other, every tensor equal."""
    import torch

    from workers.learner import LearnerWorker, state_checksums
    from workers.sharded_start import local

    cfg = load_config(overrides=[f"model.path={tiny_fast}", "learner.workers=1", *LORA])
    one = LearnerWorker(cfg, tiny_fast)
    one.join("127.0.0.1", free_port("127.0.0.1"), 1)
    try:
        with torch.no_grad():  # stand-in for training: every adapter and a frozen base weight move
            for name, p in one.module.named_parameters():
                if p.requires_grad or name.endswith("embed_tokens.weight"):
                    local(p).add_(0.01 * torch.randn_like(local(p)))
        one.save_state(str(tmp_path))
        written = state_checksums(one)
    finally:
        one.shutdown()
    task = ray_cluster.remote(num_cpus=1, max_calls=1)(load_and_checksum)
    port = free_port("127.0.0.1")
    ranks = ray_cluster.get([task.remote(str(tiny_fast), str(tmp_path), r, 2, "127.0.0.1", port) for r in range(2)],
                            timeout=600)  # fmt: skip
    assert ranks[0] == written and len(written) > 50
