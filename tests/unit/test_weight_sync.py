"""The weight-push format: LoRA merge against peft's own merge, delta pushes, buckets, packing, checksums; the LR
schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vigos_ray.schedule import lr_lambda
from vigos_ray.transports import Endpoint, choose, open_transport
from vigos_ray.weight_sync import (
    Digests,
    PushGroupError,
    TensorSpec,
    WeightSyncError,
    changing_specs,
    device_checksum,
    free_port,
    load_unit,
    merged_name,
    merged_weights,
    pack,
    plan_buckets,
    receive,
    send,
    state_digest,
    unpack,
)


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


def test_a_delta_push_carries_every_tensor_of_each_block_lora_trains_and_nothing_frozen():
    from peft import LoraConfig, get_peft_model

    class Model(nn.Module):  # Hugging Face's shape: embeddings, numbered blocks, a final norm, an output head
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(10, 8)
            self.layers = nn.ModuleList([Block(), Block()])
            self.norm = nn.LayerNorm(8)
            self.lm_head = nn.Linear(8, 10, bias=False)

    peft_model = get_peft_model(Model(), LoraConfig(r=2, target_modules=["q_proj"]))
    base = peft_model.get_base_model()
    pushed = dict(merged_weights(((n, p.detach()) for n, p in base.named_parameters()), 1.0))
    specs = [TensorSpec(n, tuple(t.shape), "float32") for n, t in pushed.items()]
    trained = {merged_name(n) for n, p in base.named_parameters() if p.requires_grad}
    assert trained == {"layers.0.q_proj.weight", "layers.1.q_proj.weight"}
    delta = [s.name for s in changing_specs(specs, trained)]
    # the q_proj bias, the norm and up_proj of a block travel with it: an engine may fuse them into q_proj's kernel
    assert delta == [n for n in pushed if n.startswith("layers.")] and len(delta) == 2 * 5
    assert {load_unit(n) for n in pushed} == {"embed_tokens", "layers.0", "layers.1", "norm", "lm_head"}


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


def test_checksum_sees_a_single_flipped_bit_and_the_state_digest_every_tensor_held():
    specs = [TensorSpec("a", (500,), "float32"), TensorSpec("b", (500,), "float32")]
    buffer = pack([torch.randn(500), torch.randn(500)])
    a, b = Digests(), Digests()
    a.add(buffer, specs)
    flipped = buffer.clone()
    flipped[2500] ^= 1  # a bit of tensor b
    b.add(flipped, specs)
    assert a.hexdigest() != b.hexdigest()
    assert a.by_name["a"] == b.by_name["a"] and a.by_name["b"] != b.by_name["b"]
    # a receiver that applied a delta of `b` onto a full push holds what one full push of the same bytes gives
    delta = Digests()
    delta.add(buffer[2000:], specs[1:])
    assert state_digest({**b.by_name, **delta.by_name}) == state_digest(a.by_name)
    assert state_digest(a.by_name) != state_digest(delta.by_name)  # a delta alone is not the whole state


SPECS = [TensorSpec(f"w{i}", (256, 256), "float32") for i in range(4)]  # 4 buckets of 256 KiB
GROUP_TIMEOUT_S = 120.0


def push_member(rank: int, port: int, results) -> None:
    """One member of a 3-process push: rank 0 sends, rank 1 receives, rank 2 joins the group and dies at once."""
    import os
    import time

    group = open_transport(Endpoint("gloo", "127.0.0.1", port, 3, GROUP_TIMEOUT_S), rank)
    if rank == 2:
        os._exit(1)
    t0 = time.monotonic()
    try:
        if rank == 0:
            send(((s.name, torch.ones(s.shape)) for s in SPECS), SPECS, 2**18, group)
        else:
            receive(SPECS, 2**18, group, None)
        results.put((rank, "completed", time.monotonic() - t0))
    except PushGroupError as err:
        closed = True
        try:
            group.send(torch.zeros(1, dtype=torch.uint8))
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


class Corrupting:
    """A receiving end that flips one bit of its `nth` message (a bucket damaged on the wire)."""

    def __init__(self, inner, nth: int):
        self.inner, self.nth, self.count = inner, nth, 0
        self.device, self.streams = inner.device, inner.streams

    def recv(self, nbytes):
        wait, k = self.inner.recv(nbytes), self.count
        self.count += 1

        def received():
            message = wait()
            if k == self.nth:
                message[len(message) // 2] ^= 4
            return message

        return received


def run_group(members):
    """Run each member (a function of its rank) in a thread of its own; returns their results by rank."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(members)) as pool:
        futures = [pool.submit(member, rank) for rank, member in enumerate(members)]
        return [f.exception() or f.result() for f in futures]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_streamed_push_reaches_every_receiver_bucket_by_bucket_and_a_damaged_bucket_is_never_loaded(dtype):
    """Learner rank 0 and two engine workers over gloo: each receiver gets every tensor bit-exactly, one verified
    bucket per load, never more than two buckets alive; a receiver whose third bucket is damaged loads the two
    before it and nothing after, refuses the push, and neither the sender nor the other receiver is held up."""
    torch.manual_seed(0)
    weights = {f"layers.{i}.w": torch.randn(64, 33 + i) for i in range(6)}  # odd sizes: unaligned offsets in bf16
    specs = [TensorSpec(n, tuple(t.shape), dtype) for n, t in weights.items()]
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    bucket = 2 * 64 * 40 * dt.itemsize  # two tensors per bucket
    endpoint = Endpoint("gloo", "127.0.0.1", free_port("127.0.0.1"), 3, GROUP_TIMEOUT_S)
    ends = [None] * 3
    loads = {1: [], 2: []}

    def member(rank):
        ends[rank] = end = open_transport(endpoint, rank)
        if rank == 0:
            return send(iter(weights.items()), specs, bucket, end)
        taker = Corrupting(end, nth=4 if rank == 2 else -1)  # messages: bucket, digest, bucket, digest, bucket...
        return receive(specs, bucket, taker, lambda named: loads[rank].append((taker.count, named)))

    sent, got, refused = run_group([member] * 3)
    assert isinstance(refused, WeightSyncError) and "bucket 2" in str(refused) and "not loaded" in str(refused)
    (digests, nbytes), (arrived, arrived_bytes) = sent, got
    assert arrived.by_name == digests.by_name and arrived_bytes == nbytes
    assert len(loads[1]) == len(plan_buckets(specs, bucket)) == 3  # one load per bucket
    assert all(posted <= 2 * (k + 2) for k, (posted, _) in enumerate(loads[1]))  # bucket k loads before k+2 is asked
    for name, tensor in (pair for _, named in loads[1] for pair in named):
        assert torch.equal(tensor, weights[name].to(dt))
    assert [n for _, named in loads[2] for n, _ in named] == [s.name for s in specs[:4]]  # buckets 0 and 1 only


def test_a_sender_that_fails_mid_push_and_closes_its_end_releases_the_receivers_at_once():
    """Learner rank 0's gather fails mid-push (another rank died): it closes its end, and the receiver waiting for
    the next bucket fails within seconds, not at the group's timeout (while the sender's group lives, a receiver
    stays blocked: neither ProcessGroupGloo.shutdown nor abort releases it, measured)."""
    import time

    specs = [TensorSpec(f"w{i}", (64, 64), "float32") for i in range(6)]

    def gathered():
        for spec in specs[:3]:
            yield spec.name, torch.ones(spec.shape)
        raise RuntimeError("a learner rank died in its all-gather")

    endpoint = Endpoint("gloo", "127.0.0.1", free_port("127.0.0.1"), 2, GROUP_TIMEOUT_S)

    def member(rank):
        end = open_transport(endpoint, rank)
        t0 = time.monotonic()
        try:
            if rank == 0:
                send(gathered(), specs, 2 * 64 * 64 * 4, end)
            else:
                receive(specs, 2 * 64 * 64 * 4, end, None)
        except RuntimeError as err:
            if rank == 0:
                end.close()
            return type(err).__name__, time.monotonic() - t0
        return "completed", time.monotonic() - t0

    (sender, _), (receiver, seconds) = run_group([member] * 2)
    assert sender == "RuntimeError" and receiver == "PushGroupError"
    assert seconds < GROUP_TIMEOUT_S / 4, seconds


def test_the_device_checksum_sees_a_flipped_bit_two_swapped_words_and_a_different_length():
    data = torch.randint(0, 256, (4099,), dtype=torch.uint8)  # not a whole number of 8-byte words
    base = [int(x) for x in device_checksum(data)]
    flipped = data.clone()
    flipped[1234] ^= 16
    swapped = data.clone()
    swapped[0:8], swapped[8:16] = data[8:16].clone(), data[0:8].clone()
    assert [int(x) for x in device_checksum(flipped)] != base
    assert [int(x) for x in device_checksum(swapped)] != base
    assert [int(x) for x in device_checksum(data[1:])] != base  # unaligned start: a padded copy, other words
    assert [int(x) for x in device_checksum(data, words_per_chunk=7)] == base  # chunking changes nothing


def test_auto_transport_follows_where_learner_rank_0_and_the_engines_run():
    assert choose([], [["gpu-a"]]) == "gloo" and choose(["gpu-a"], [[]]) == "gloo"
    assert choose([], [[], []], ahead=True) == "object_store"  # async on CPU: the learner need not wait
    assert choose(["gpu-a"], [["gpu-a"], ["gpu-a"]]) == "ipc"
    assert choose(["gpu-a"], [["gpu-b", "gpu-c"], ["gpu-d"]]) == "nccl"
    with pytest.raises(ValueError, match="some rollout workers share learner rank 0's GPU and some do not"):
        choose(["gpu-a"], [["gpu-a"], ["gpu-b"]])


def test_learning_rate_schedules():
    linear = lr_lambda("linear", warmup=2, total=10)
    assert [round(linear(s), 4) for s in (0, 1, 2, 6, 10)] == [0.3333, 0.6667, 1.0, 0.5, 0.0]
    cosine = lr_lambda("cosine", warmup=0, total=4)
    assert [round(cosine(s), 4) for s in range(5)] == [1.0, 0.8536, 0.5, 0.1464, 0.0]
    assert lr_lambda("constant", 0, 5)(4) == 1.0
