"""Tiny model folders load like real checkpoints in transformers and in vLLM (inside a Ray actor), and agree."""

import json

import pytest
import torch
from PIL import Image

from vigos_ray.config import load_config
from vigos_ray.data import PromptStream, read_records
from vigos_ray.easyvqa import write_easyvqa_jsonl
from vigos_ray.models import (
    ModelFolderError,
    banned_token_ids,
    check_model_folder,
    completion_logprobs,
    load_model,
    load_processor,
    resolve_model_path,
)
from vigos_ray.prompts import encode, student_text
from vigos_ray.tiny import QWEN_SPECIAL_TOKENS

pytestmark = pytest.mark.integration
KINDS = ["fast", "qwen_vocab"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    path = write_easyvqa_jsonl(tmp_path_factory.mktemp("data"), "test")
    return PromptStream(read_records(path)[:64], seed=0).next_batch(4)


@pytest.fixture(scope="module")
def folders(tiny_fast, tiny_qwen_vocab):
    return {"fast": tiny_fast, "qwen_vocab": tiny_qwen_vocab}


def test_qwen_vocab_tokenizer_reproduces_real_qwen_ids(tiny_qwen_vocab):
    tok = load_processor(tiny_qwen_vocab, 3136, 200704).tokenizer
    assert len(tok) == 151_665
    assert tok.encode("Hello world") == [9707, 1879]  # ids of the released Qwen2.5 tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS] == list(range(151_643, 151_665))
    text = "<description>A red circle.</description><think>It is red.</think>\\boxed{red}"
    assert tok.decode(tok.encode(text)) == text
    config = json.loads((tiny_qwen_vocab / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["image_token_id"] == 151_655
    assert config["text_config"]["vocab_size"] > 151_665  # head rows beyond the tokenizer, like the real model


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_folder_loads_in_transformers_and_generates_from_an_image(folders, samples, kind):
    model = load_model(folders[kind])
    processor = load_processor(folders[kind], 3136, 200704)
    ctx = encode(processor, student_text(processor, samples[0].problem, load_config().prompts), samples[0].image)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ctx.input_ids.count(image_pad) == int(ctx.image_grid_thw.prod()) // 4 > 0
    ids = torch.tensor([ctx.input_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=ctx.pixel_values,
                         image_grid_thw=ctx.image_grid_thw, do_sample=False, max_new_tokens=6)  # fmt: skip
    assert out.shape[1] > ids.shape[1]
    # the image reaches the model: a different image changes the next-token distribution
    other = encode(processor, ctx.text, Image.new("RGB", (64, 64), (0, 0, 255)))
    first = completion_logprobs(model, ctx, [out[0, ids.shape[1]].item()])
    assert not torch.allclose(first, completion_logprobs(model, other, [out[0, ids.shape[1]].item()]))


def test_image_only_processor_matches_the_full_processor(tiny_fast, samples):
    full = load_processor(tiny_fast, 3136, 200704)
    image_only = load_processor(tiny_fast, 3136, 200704, image_only=True)
    assert type(image_only).__name__ == "ImageOnlyProcessor"
    assert type(full).__name__ == "Qwen2_5_VLProcessor"  # the torchvision hook lets the stock processor load
    prompts = load_config().prompts
    for s in samples:
        a = encode(full, student_text(full, s.problem, prompts), s.image)
        b = encode(image_only, student_text(image_only, s.problem, prompts), s.image)
        assert a.text == b.text and a.input_ids == b.input_ids
        assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.image_grid_thw, b.image_grid_thw)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "absent", "is not a directory"),
        (lambda p: p, "has no config.json"),
        (lambda p: (p / "config.json").write_text('{"model_type": "llama"}') and p, "holds a 'llama' model"),
    ],
)
def test_bad_model_folder_is_reported_with_the_key(tmp_path, make, message):
    with pytest.raises(ModelFolderError, match=f"model.path=.*{message}"):
        check_model_folder(make(tmp_path))


def test_empty_model_path_builds_the_tiny_model_once(tmp_path):
    cfg = load_config().model
    first = resolve_model_path(cfg, tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path(cfg, tmp_path) == first and (first / "model.safetensors").stat().st_mtime_ns == stamp


def initial_push(folder, bucket_bytes=2**16):
    """A version-0 push of `folder`'s own weights through the object store, as learner rank 0 sends it:
    (specs, handles, checksum). Rollout workers refuse to sample before a push."""
    from vigos_ray.transports import open_transport
    from vigos_ray.weight_sync import TensorSpec, send

    named = list(load_model(folder).named_parameters())
    specs = [TensorSpec(n, tuple(p.shape), "float32") for n, p in named]
    sender = open_transport(object_store(), 0)
    digests, _ = send(iter(named), specs, bucket_bytes, sender)
    return specs, sender.handles(), digests.hexdigest()


def object_store():
    from vigos_ray.transports import Endpoint

    return Endpoint("object_store", "127.0.0.1", 0, 2)


# The real 151,936-row vocabulary in a vLLM engine costs ~60 s of engine start here (its tokenizer): `slow`.
@pytest.fixture(scope="module", params=["fast", pytest.param("qwen_vocab", marks=pytest.mark.slow)])
def vllm_worker(request, ray_cluster, folders):
    """A real RolloutWorker (vLLM CPU engine) in a Ray actor, as the pipeline runs it."""
    from workers.rollout import RolloutWorker

    cfg = load_config(overrides=["rollout.max_new_tokens=24", "rollout.samples_per_prompt=2"])
    actor = ray_cluster.remote(num_cpus=1)(RolloutWorker).remote(cfg, str(folders[request.param]))
    specs, handles, checksum = initial_push(folders[request.param])
    ray_cluster.get(actor.open_sync_group.remote(object_store()))
    receipt = ray_cluster.get(actor.receive_weights.remote(0, specs, 2**16, handles))
    assert receipt.checksum == checksum and receipt.version == 0
    yield request.param, actor
    ray_cluster.kill(actor)


def test_vllm_rollouts_match_transformers_logprobs_and_avoid_banned_ids(vllm_worker, folders, samples):
    import ray

    kind, actor = vllm_worker
    rollouts = ray.get(actor.generate.remote(samples, seed=5), timeout=300)
    assert [r.sample_id for r in rollouts] == [s.id for s in samples for _ in range(2)]
    model = load_model(folders[kind])
    processor = load_processor(folders[kind], 3136, 200704)
    banned = set(banned_token_ids(processor.tokenizer))
    prompts = load_config().prompts
    worst = 0.0
    for r, s in zip(rollouts, [s for s in samples for _ in range(2)], strict=True):
        ctx = encode(processor, student_text(processor, s.problem, prompts), s.image)
        assert r.prompt_ids == ctx.input_ids and r.version == 0
        assert r.completion_ids and all(t < len(processor.tokenizer) and t not in banned for t in r.completion_ids)
        hf = completion_logprobs(model, ctx, r.completion_ids)
        worst = max(worst, (hf - torch.tensor(r.logprobs)).abs().max().item())
    # fp32 on both sides. Text-only prompts agree to 5e-7; with an image the two vision paths (vLLM's image
    # preprocessing and vision tower vs transformers') were measured to differ by up to ~2e-4 in log-prob.
    assert worst < 1e-3, f"vLLM sampled log-probs differ from teacher-forced transformers by {worst:.2e}"


def test_an_engine_loads_another_folders_weights_and_scores_exactly_like_it(vllm_worker, folders, tmp_path):
    """`use_weights_from`: one engine evaluates several models (the study's arms) without restarting."""
    import ray

    from vigos_ray.models import next_token_logprobs, write_model_folder

    kind, actor = vllm_worker
    original = load_model(folders[kind])
    torch.manual_seed(0)
    weights = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in original.named_parameters()}
    other = write_model_folder(folders[kind], weights, tmp_path / "other")
    tok = load_processor(other, 3136, 200704).tokenizer
    ids = tok.encode("what colour is the triangle? the answer is blue")
    expect = next_token_logprobs(load_model(other), torch.tensor([ids]))
    try:
        ray.get(actor.use_weights_from.remote(str(other)), timeout=120)
        got = torch.tensor(ray.get(actor.token_logprobs.remote(ids), timeout=120))
    finally:  # the module's other tests sample from the original weights
        ray.get(actor.use_weights_from.remote(str(folders[kind])), timeout=120)
    before = next_token_logprobs(original, torch.tensor([ids]))
    assert (got - expect).abs().max() < 1e-4  # text only: both sides agree to ~5e-7
    assert (before - expect).abs().max() > 0.01  # the check can tell the two models apart
    restored = torch.tensor(ray.get(actor.token_logprobs.remote(ids), timeout=120))
    assert (restored - before).abs().max() < 1e-4


def test_vllm_sampling_is_reproducible_by_seed(vllm_worker, samples):
    import ray

    _, actor = vllm_worker
    a, b, c = ray.get([actor.generate.remote(samples[:2], seed=s) for s in (11, 11, 12)], timeout=300)
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    assert [r.completion_ids for r in a] != [r.completion_ids for r in c]
    # a sample's completions do not depend on its batch slot (so neither on how samples are split across workers)
    alone = ray.get(actor.generate.remote(samples[1:2], seed=11), timeout=300)
    assert [r.completion_ids for r in alone] == [r.completion_ids for r in a[2:]]


def test_top_p_among_top_k_samples_what_vllms_own_top_p_samples(vllm_worker, samples):
    """On CPU the rollout worker hands vLLM top_p=1 and applies top-p among the top-k itself (workers/top_p.py):
    in the same engine, with the same seeds, the sampled tokens equal those of vLLM's own top-p."""
    import ray

    def sample_three_ways(worker, samples):
        from vllm import SamplingParams

        from workers.top_p import KEY

        r, proc = worker.cfg.rollout, worker.processor
        prompts = [{"prompt": encode(proc, student_text(proc, s.problem, worker.cfg.prompts), s.image).text,
                    "multi_modal_data": {"image": s.image}} for s in samples]  # fmt: skip

        def run(**top_p) -> list[list[int]]:
            params = [SamplingParams(temperature=r.temperature, top_k=r.top_k, max_tokens=48, seed=7 + i, **top_p)
                      for i in range(len(samples))]  # fmt: skip
            return [list(o.outputs[0].token_ids) for o in worker._engine.generate(prompts, params, use_tqdm=False)]

        return run(top_p=r.top_p), run(top_p=1.0, extra_args={KEY: (r.top_k, r.top_p)}), run(top_p=1.0)

    vllms, ours, without = ray.get(vllm_worker[1].__ray_call__.remote(sample_three_ways, samples[:4]), timeout=300)
    assert ours == vllms
    assert without != vllms  # top-p changes what is sampled here: the comparison can fail


def test_hf_backend_gives_the_same_interface_and_consistent_logprobs(ray_cluster, tiny_fast, samples):
    from workers.rollout import RolloutWorker

    cfg = load_config(overrides=["rollout.backend=hf", "rollout.max_new_tokens=12"])
    worker = RolloutWorker(cfg, tiny_fast)
    specs, handles, _ = initial_push(tiny_fast)
    worker.open_sync_group(object_store())
    worker.receive_weights(0, specs, 2**16, handles)
    rollouts = worker.generate(samples[:2], seed=0)
    model, processor = worker._hf_model, worker.processor
    banned = set(banned_token_ids(processor.tokenizer))
    for r, s in zip(rollouts, samples[:2], strict=True):
        assert r.finish_reason in ("stop", "length") and not banned & set(r.completion_ids)
        ctx = encode(processor, student_text(processor, s.problem, cfg.prompts), s.image)
        hf = completion_logprobs(model, ctx, r.completion_ids)
        assert torch.allclose(hf, torch.tensor(r.logprobs), atol=1e-4)


def test_prompt_length_limit_uses_the_real_student_context(tmp_path):
    from vigos_ray.data import DataError
    from vigos_ray.preflight import prompt_stream

    cfg = load_config(overrides=[f"run.cache_dir={tmp_path}", "data.max_prompt_tokens=60", "data.on_bad_record=raise"])
    processor = load_processor(resolve_model_path(cfg.model, cfg.run.cache_dir), 3136, cfg.model.max_pixels)
    stream = prompt_stream(cfg, processor)
    # 16 image pads for a 64x64 image plus the chat turn and our instruction: about 75 tokens with `fast`
    with pytest.raises(DataError, match=r"the student prompt has \d+ tokens, over data.max_prompt_tokens=60"):
        stream.next_batch(1)


def test_a_push_whose_bytes_differ_from_the_senders_is_refused_and_leaves_the_worker_stale(
    ray_cluster, tiny_fast, samples
):
    from vigos_ray.weight_sync import WeightSyncError
    from workers.rollout import RolloutWorker, StaleWeightsError

    worker = RolloutWorker(load_config(overrides=["rollout.backend=hf", "rollout.max_new_tokens=4"]), tiny_fast)
    specs, handles, _ = initial_push(tiny_fast)
    worker.open_sync_group(object_store())
    worker.receive_weights(0, specs, 2**16, handles)
    before = {n: p.clone() for n, p in worker._hf_model.state_dict().items()}
    bad = ray_cluster.get(handles[0]).clone()  # messages: bucket 0, its digest, bucket 1, ...
    bad[0] ^= 1  # one flipped bit in the first bucket
    with pytest.raises(WeightSyncError, match="bucket 0 .* not loaded"):
        worker.receive_weights(1, specs, 2**16, [ray_cluster.put(bad), *handles[1:]])
    assert all(torch.equal(before[n], p) for n, p in worker._hf_model.state_dict().items())  # nothing loaded
    with pytest.raises(StaleWeightsError):
        worker.generate(samples[:1], seed=0)


def test_a_teacher_checkpoint_with_another_vocabulary_is_refused_naming_the_key(tiny_fast, tiny_qwen_vocab):
    from vigos_ray.models import check_teacher_checkpoints

    student = load_processor(tiny_fast, 3136, 12544).tokenizer
    cfg = load_config(overrides=[f"model.path={tiny_fast}", f"teachers.reasoning.checkpoint={tiny_qwen_vocab}"])
    message = r"teachers.reasoning.checkpoint=.*151,665-token vocabulary .*\(532 tokens"
    with pytest.raises(ModelFolderError, match=message):
        check_teacher_checkpoints(cfg, student)
    same = load_config(overrides=[f"model.path={tiny_fast}", f"teachers.perception.checkpoint={tiny_fast}"])
    check_teacher_checkpoints(same, student)  # the student's own folder is fine
