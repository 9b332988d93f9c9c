"""The weight-push format: LoRA merge against peft's own merge, buckets, packing, checksums; the LR schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vigos_ray.weight_sync import (
    Checksum,
    PushGroupError,
    SyncGroup,
    TensorSpec,
    free_port,
    merged_weights,
    pack,
    plan_buckets,
    receive,
    send,
    unpack,
)
from workers.learner import lr_lambda


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 6, bias=True)
        self.norm = nn.LayerNorm(8)
        self.up_proj = nn.Linear(8, 16, bias=False)


def test_merged_lora_weights_equal_peft_merge_and_unload():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the adapters matter
            nn.init.normal_(p, std=0.1)
    base = peft_model.get_base_model()
    ours = dict(merged_weights(((n, p.detach()) for n, p in base.named_parameters()), lora_scaling=8 / 4))
    reference = peft_model.merge_and_unload().state_dict()
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6)


def test_buckets_keep_order_and_a_large_tensor_travels_alone():
    specs = [TensorSpec(f"w{i}", shape, "float32") for i, shape in enumerate([(4,), (4,), (100,), (2,), (3,)])]
    assert plan_buckets(specs, bucket_bytes=40) == [[0, 1], [2], [3, 4]]
    assert [i for b in plan_buckets(specs, 1) for i in b] == list(range(5))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_pack_unpack_round_trips_bit_exactly(dtype):
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    tensors = [torch.randn(3, 5).to(dt), torch.randn(7).to(dt)]
    specs = [TensorSpec("a", (3, 5), dtype), TensorSpec("b", (7,), dtype)]
    out = unpack(pack(tensors), specs)
    assert all(torch.equal(x.view(torch.int16 if x.itemsize == 2 else torch.int32),
                           y.view(torch.int16 if y.itemsize == 2 else torch.int32))
               for x, y in zip(tensors, out, strict=True))  # fmt: skip


def test_checksum_sees_a_single_flipped_bit():
    buffer = pack([torch.randn(1000)])
    a, b = Checksum(), Checksum()
    a.update(buffer)
    flipped = buffer.clone()
    flipped[500] ^= 1
    b.update(flipped)
    assert a.hexdigest() != b.hexdigest()


SPECS = [TensorSpec(f"w{i}", (256, 256), "float32") for i in range(4)]  # 4 buckets of 256 KiB
GROUP_TIMEOUT_S = 120.0


def push_member(rank: int, port: int, results) -> None:
    """One member of a 3-process push: rank 0 sends, rank 1 receives, rank 2 joins the group and dies at once."""
    import os
    import time

    group = SyncGroup("127.0.0.1", port, rank, 3, GROUP_TIMEOUT_S)
    if rank == 2:
        os._exit(1)
    t0 = time.monotonic()
    try:
        if rank == 0:
            send(((s.name, torch.ones(s.shape)) for s in SPECS), SPECS, 2**18, "collective", group)
        else:
            receive(SPECS, 2**18, "collective", group)
        results.put((rank, "completed", time.monotonic() - t0))
    except PushGroupError as err:
        closed = True
        try:
            group.broadcast(torch.zeros(1))
            closed = False
        except PushGroupError:
            pass
        results.put((rank, f"PushGroupError closed={closed}: {err}", time.monotonic() - t0))
    if rank == 0:  # the sender lives on (a learner rank does): only closing its end can release rank 1
        time.sleep(GROUP_TIMEOUT_S)


def test_a_dead_member_fails_the_push_for_sender_and_survivors_well_before_the_group_timeout():
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port("127.0.0.1")
    procs = [ctx.Process(target=push_member, args=(rank, port, results)) for rank in range(3)]
    for proc in procs:
        proc.start()
    got = {}
    try:
        for _ in range(2):
            rank, outcome, seconds = results.get(timeout=GROUP_TIMEOUT_S / 2)
            got[rank] = (outcome, seconds)
    finally:
        for proc in procs:
            proc.kill()
    for rank in (0, 1):  # the sender and the surviving receiver both fail, and neither waits out the timeout
        outcome, seconds = got[rank]
        assert outcome.startswith("PushGroupError closed=True: the weight-push group broke"), got
        assert seconds < GROUP_TIMEOUT_S / 2, got


def test_learning_rate_schedules():
    linear = lr_lambda("linear", warmup=2, total=10)
    assert [round(linear(s), 4) for s in (0, 1, 2, 6, 10)] == [0.3333, 0.6667, 1.0, 0.5, 0.0]
    cosine = lr_lambda("cosine", warmup=0, total=4)
    assert [round(cosine(s), 4) for s in range(5)] == [1.0, 0.8536, 0.5, 0.1464, 0.0]
    assert lr_lambda("constant", 0, 5)(4) == 1.0
