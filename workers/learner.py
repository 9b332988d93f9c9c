"""Learner: K ranks of one torch.distributed group (gloo on CPU, NCCL on GPU) training the student with FSDP2.

A plain class; launch code wraps it with `ray.remote`. Each rank receives a `TrainBatch` (its rollouts, cut into
micro-batches by tokens, with the teachers' targets) and runs the same `student_loss` as the single-process
`vigos_step`; gradients are averaged by FSDP's reduce-scatter, so each segment's loss is its pooled mean over all
ranks. After each step every rank joins the gather of full weights and rank 0 pushes them to the rollout workers.
"""

from __future__ import annotations

import os
import time
from collections import deque
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vigos_ray import weight_sync
from vigos_ray.batching import MicroBatch, TrainBatch
from vigos_ray.cluster import use_cpu_threads
from vigos_ray.config import Config
from vigos_ray.models import (
    add_lora,
    load_model,
    load_output_head,
    load_processor,
    next_token_logprobs,
    on_this_node,
    tensor_checksum,
    write_model_folder,
)
from vigos_ray.objective import segments, student_loss
from vigos_ray.schedule import lr_lambda
from vigos_ray.scoring import output_head
from vigos_ray.transports import Endpoint, open_transport
from vigos_ray.types import RankStep, SegmentSums
from workers.sharded_start import CheckpointRows, FrozenHead, empty_model, init_lora, materialize

GROUP_TIMEOUT = timedelta(minutes=10)
STUDENT_HEAD = object()  # a teacher head that is the student's own frozen head (LoRA): read in place, no copy


class LossModule(nn.Module):
    """The student with its loss as `forward`, so that the root FSDP unit gathers the output head for the loss."""

    def __init__(self, student: nn.Module, cfg: Config, vocab_size: int, pad_id: int, heads: dict[str, Any]):
        super().__init__()
        self.student, self.cfg, self.vocab_size, self.pad_id = student, cfg, vocab_size, pad_id
        self.teacher_heads = heads  # FrozenHead (gathered by train_step) or STUDENT_HEAD; not parameters

    def forward(self, micro: MicroBatch | torch.Tensor, global_counts: dict | None = None, world_size: int = 1):
        """(weighted loss, stats) of a micro-batch, or, given token ids [1, T], their next-token log-probs [T-1]:
        every use of the weights goes through here, so that FSDP's root hooks gather what it holds."""
        if isinstance(micro, torch.Tensor):
            return next_token_logprobs(self.student, micro)
        own = output_head(self.student)  # inside the root's forward: gathered whole
        heads = {name: own if h is STUDENT_HEAD else h.full for name, h in self.teacher_heads.items()}
        loss, stats = student_loss(self.student, micro.plan, micro.targets, self.cfg, self.vocab_size, heads,
                                   global_counts, world_size, self.pad_id)  # fmt: skip
        return loss * micro.weight, stats


class LearnerWorker:
    def __init__(self, cfg: Config, model_path: str | Path, worker_index: int = 0):
        model_path = on_this_node(model_path, cfg)  # a hub id's snapshot on this node
        self.cfg, self.model_path, self.rank = cfg, str(model_path), worker_index
        self.threads = use_cpu_threads(cfg, "learner", cfg.learner.num_gpus > 0)
        self.version = 0
        self.kept: deque = deque(maxlen=0)  # (version, trainable tensors) of recent versions (`train_step`'s keep)
        self.store = None  # rank 0: the FSDP group's TCP store (`rendezvous`)
        self.transport = None  # rank 0: its end of the weight-push group
        self.sent: dict[str, str] = {}  # digest of every tensor the rollout workers should hold (rank 0 only)
        self.device = torch.device("cuda" if cfg.learner.num_gpus > 0 else "cpu")
        tokenizer = load_processor(model_path, cfg.model.min_pixels, cfg.model.max_pixels).tokenizer
        self.vocab_size, self.pad_id = len(tokenizer), tokenizer.pad_token_id or 0

    def join(self, host: str, port: int, world_size: int) -> None:
        """Form the FSDP group, load and shard the student, build the optimizer (every rank at once)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(0)  # Ray exposes this rank's GPU as device 0
        if host == "127.0.0.1":  # a local cluster: keep gloo on loopback too
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        if not dist.is_initialized():  # (a process may build a second learner in the same group: tests)
            if self.store is None:  # rank 0 hosts the store when `rendezvous` bound it, else whoever is rank 0 here
                self.store = dist.TCPStore(
                    host, port, world_size, is_master=self.rank == 0, timeout=GROUP_TIMEOUT, wait_for_workers=False
                )
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", store=self.store,
                                    rank=self.rank, world_size=world_size, timeout=GROUP_TIMEOUT)  # fmt: skip
        self.world_size = world_size
        sharded = self.cfg.learner.load == "sharded"
        # sharded: parameters on meta, memory comes after fully_shard (each rank reads its own rows); full: fp32
        model = empty_model(self.model_path) if sharded else load_model(self.model_path, "float32", str(self.device))
        if self.cfg.learner.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.lora_scaling = 0.0
        if self.cfg.learner.lora.enabled:
            lc = self.cfg.learner.lora
            model, self.lora_scaling = add_lora(model, lc), lc.alpha / lc.r
        self.student = model.get_base_model() if self.cfg.learner.lora.enabled else model
        self.heads = self._teacher_heads(copy_loaded=not sharded)
        self.module = self._shard(LossModule(self.student, self.cfg, self.vocab_size, self.pad_id, self.heads))
        if sharded:
            materialize(self.module, self.student, self.model_path, self.device)
        if self.cfg.learner.lora.enabled:
            init_lora(self.student, self.cfg.run.seed)
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        lc = self.cfg.learner
        self.optimizer = torch.optim.AdamW(trainable, lr=lc.lr, weight_decay=lc.weight_decay, betas=(0.9, 0.999))
        schedule = lr_lambda(lc.schedule, lc.warmup_steps, self.cfg.run.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.trainable = trainable

    def _teacher_heads(self, copy_loaded: bool) -> dict[str, Any]:
        """Per segment, the frozen output head of the pool that scores it, which `hidden` payloads need here (other
        payloads carry the distribution: none). The initial head is the student's own where training never
        changes it (LoRA without the head): read in place, nothing held. Otherwise a `FrozenHead` in
        `model.dtype` (the precision the teachers apply it in), sharded by rows across the ranks and gathered only
        during a train step: read from the checkpoint, or with `copy_loaded` from the student loaded in full."""
        if self.cfg.scoring.payload != "hidden":
            return {}
        by_path: dict[str, Any] = {}  # segments scored by one checkpoint share its head
        heads = {}
        for seg in segments(self.cfg.loss):
            checkpoint = self.cfg.teachers[seg.teacher].checkpoint or ""
            if checkpoint not in by_path:
                by_path[checkpoint] = self._frozen_head(checkpoint, f"teachers.{seg.teacher}.checkpoint", copy_loaded)
            heads[seg.name] = by_path[checkpoint]
        return heads

    def _frozen_head(self, checkpoint: str, key: str, copy_loaded: bool) -> Any:
        """The head of teacher `checkpoint` ("": the initial student) as `_teacher_heads` describes."""
        dtype = weight_sync.DTYPES[self.cfg.model.dtype]
        head = output_head(self.student)
        if checkpoint:
            return FrozenHead.from_tensor(load_output_head(checkpoint, key).to(self.device), dtype)
        if not head.requires_grad:
            return STUDENT_HEAD
        if copy_loaded:
            return FrozenHead.from_tensor(head.detach(), dtype)
        name = next(n for n, p in self.student.named_parameters() if p is head)
        rows = CheckpointRows(self.model_path, self.student)
        return FrozenHead.from_checkpoint(rows, name, head.shape, dtype, self.device)

    def _gathered_heads(self) -> ExitStack:
        """Every sharded frozen head gathered whole until the returned context exits (a collective)."""
        stack = ExitStack()
        for head in {id(h): h for h in self.heads.values() if isinstance(h, FrozenHead)}.values():
            stack.enter_context(head.gathered())
        return stack

    def _shard(self, module: LossModule) -> LossModule:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtype = weight_sync.DTYPES[self.cfg.model.dtype]
        # The model casts its own inputs, as it does for the teachers and the engine: FSDP's cast of every unit's
        # floating inputs would also round the rotary cos/sin the model passes each layer in fp32 (bf16 loss 3e-4 off).
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        # One rank holds every parameter whole anyway: gathering it again for the backward would only copy.
        reshard = self.world_size > 1
        # One rank shards nothing, yet FSDP would copy every frozen weight into its gather buffer on every step (a
        # whole model's copy per step: the rank ran at 0.84x of a single process per token at 151k vocabulary with
        # LoRA, 0.94x without the copy); there they stay out of FSDP, held once in `model.dtype`, the precision
        # FSDP's policy would compute with. Trained weights stay FSDP's (fp32 master, cast for compute). Several
        # ranks shard the frozen weights too: that is what saves their memory.
        frozen = {p for p in module.parameters() if not p.requires_grad} if self.world_size == 1 else set()
        for param in frozen:
            param.data = param.data.to(dtype)
        inner = module.student.model
        for block in [*inner.visual.blocks, *inner.language_model.layers]:  # one FSDP unit per transformer block
            fully_shard(block, mp_policy=policy, reshard_after_forward=reshard, ignored_params=frozen)
        # the root: embeddings, final norm, vision merger, output head
        fully_shard(module, mp_policy=policy, reshard_after_forward=reshard, ignored_params=frozen)
        return module

    def train_step(self, batch: TrainBatch, keep: int = 0) -> RankStep:
        """Forward/backward every micro-batch, clip, step; returns this rank's loss and per-segment stats. `keep`:
        keep this rank's shard of the trainable weights of the `keep` versions before the new one, for
        `push_weights(version=...)` (async mode: LoRA's adapters, or one trainable shard per version in full
        fine-tuning)."""
        t0 = time.perf_counter()
        if self.kept.maxlen != keep:
            self.kept = deque(self.kept, maxlen=keep)
        if keep:
            self.kept.append((self.version, [p.detach().clone() for p in self.trainable]))
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, sums = 0.0, {}  # segment -> [loss, divergence sum, clipped tokens, tokens]
        with self._gathered_heads():
            for micro in batch.micro:
                if self.device.type != "cpu":
                    micro.targets = {k: [t.to(self.device) for t in v] for k, v in micro.targets.items()}
                loss, stats = self.module(micro, batch.global_counts, batch.world_size)
                loss.backward()
                loss_sum += float(loss.detach())
                for name, s in stats.items():
                    acc = sums.setdefault(name, [0.0, 0.0, 0.0, 0])
                    if micro.weight != 0.0:
                        for k, x in enumerate((s.loss, s.divergence * s.tokens, s.clipped * s.tokens, s.tokens)):
                            acc[k] += x
        clip = self.cfg.learner.grad_clip if self.cfg.learner.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.version += 1
        segments = {name: SegmentSums(*acc) for name, acc in sums.items()}
        return RankStep(self.rank, loss_sum, segments, float(grad_norm), lr, self.version, len(batch.micro),
                        time.perf_counter() - t0)  # fmt: skip

    # ---- state -----------------------------------------------------------------------------------------------

    def save_state(self, path: str) -> None:
        """Sharded model + optimizer into `path/learner` (every rank writes its shard), scheduler and version
        into `path/learner_meta.pt` (rank 0). A collective."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(Path(path) / "learner"))
        if self.rank == 0:
            meta = {"scheduler": self.scheduler.state_dict(), "version": self.version, "world_size": self.world_size}
            torch.save(meta, Path(path) / "learner_meta.pt")
        dist.barrier()

    def load_state(self, path: str) -> int:
        """Restore what `save_state` wrote (any rank count: DCP reshards); returns the policy version."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(Path(path) / "learner"))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        meta = torch.load(Path(path) / "learner_meta.pt", weights_only=True)
        self.scheduler.load_state_dict(meta["scheduler"])
        self.version = meta["version"]
        self.kept.clear()  # versions of the run before the restore
        return self.version

    # ---- weights ---------------------------------------------------------------------------------------------

    def _push_groups(self) -> list[tuple[Any, list[str]]]:
        """The student's parameter names grouped by the FSDP unit that shards them, each unit once, in order of its
        first parameter: the order of every push and of its announced specs."""
        from torch.distributed.fsdp import FSDPModule

        modules = self.student.named_modules()
        units = [(f"{prefix}.", m) for prefix, m in modules if prefix and isinstance(m, FSDPModule)]
        groups: dict[int, tuple[Any, list[str]]] = {}
        for name, _ in self.student.named_parameters():
            unit = next((m for prefix, m in units if name.startswith(prefix)), self.module)  # else the root's
            groups.setdefault(id(unit), (unit, []))[1].append(name)
        return list(groups.values())

    def _full_weights(self, copy: bool, names: set[str] | None = None):
        """(name, full tensor) in Hugging Face names, LoRA merged, in push order; a collective: every rank must
        iterate it. One all-gather per FSDP unit (its `unshard`), not one per parameter; with `names`, only those
        tensors, and units holding none of them are not gathered at all. With `copy=False` a tensor is valid only
        until the next one is asked for (the unit's gathered memory is freed after it)."""

        def gathered():
            for unit, params in self._push_groups():
                if names is not None and not any(weight_sync.merged_name(p) in names for p in params):
                    continue
                unit.unshard()
                try:
                    for name in params:
                        t = self.student.get_parameter(name).detach()
                        yield name, (t.clone() if copy else t)
                finally:
                    unit.reshard()

        merged = weight_sync.merged_weights(gathered(), self.lora_scaling)
        return merged if names is None else ((n, t) for n, t in merged if n in names)

    def _weights_on_rank0(self, copy: bool = False, names: set[str] | None = None):
        """`_full_weights()` on rank 0; other ranks take part in every all-gather, keep nothing, and get None."""
        weights = self._full_weights(copy, names)
        if self.rank == 0:
            return weights
        for _ in weights:
            pass
        return None

    def weight_specs(self, changing_only: bool = False) -> list[weight_sync.TensorSpec]:
        """Names, shapes and dtype of a push, in push order (no communication): every tensor, or with
        `changing_only` a delta push's, the load units holding a tensor this learner trains."""
        shapes = ((n, tuple(self.student.get_parameter(n).shape)) for _, names in self._push_groups() for n in names)
        meta = weight_sync.merged_weights(((n, torch.empty(s, device="meta")) for n, s in shapes), 1.0)
        specs = [weight_sync.TensorSpec(n, tuple(t.shape), self.cfg.model.dtype) for n, t in meta]
        if not changing_only:
            return specs
        trained = (weight_sync.merged_name(n) for n, p in self.student.named_parameters() if p.requires_grad)
        return weight_sync.changing_specs(specs, trained)

    def open_sync_group(self, endpoint: Endpoint) -> None:
        """Rank 0 joins the weight-push group as its sender (rank 0, the store host); other ranks have nothing to
        do. A group of an earlier formation is left first."""
        if self.rank == 0:
            if self.transport is not None:
                self.transport.close()
            self.transport = open_transport(endpoint, 0)

    @contextmanager
    def _weights_of(self, version: int):
        """The trainable weights of a kept `version` in place for the block, the current ones restored after it."""
        if version == self.version:
            yield
            return
        kept = dict(self.kept)
        if version not in kept:
            raise ValueError(f"weights of version {version} are not kept (kept: {sorted(kept)}, "
                             f"current: {self.version})")  # fmt: skip
        current = [p.detach().clone() for p in self.trainable]
        with torch.no_grad():
            for p, old in zip(self.trainable, kept[version], strict=True):
                p.copy_(old)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, now in zip(self.trainable, current, strict=True):
                    p.copy_(now)

    def push_weights(self, specs: list[weight_sync.TensorSpec], bucket_bytes: int, full: bool = True,
                     version: int | None = None) -> weight_sync.Sent | None:  # fmt: skip
        """Every rank gathers the tensors in `specs`; rank 0 sends them through the push group. `full`: `specs` is
        every tensor (the receivers start a new lineage), else a delta on top of the last full push. `version`: a
        kept version's weights instead of the current ones. Rank 0 returns what it sent (`weight_sync.Sent`), the
        other ranks None."""
        version = self.version if version is None else version
        with self._weights_of(version):
            return self._push(specs, bucket_bytes, full, version)

    def _push(self, specs: list[weight_sync.TensorSpec], bucket_bytes: int, full: bool, version: int):
        t0 = time.perf_counter()
        weights = self._weights_on_rank0(names=None if full else {spec.name for spec in specs})
        if weights is None:
            return None
        try:
            digests, nbytes = weight_sync.send(weights, specs, bucket_bytes, self.transport)
        except weight_sync.PushGroupError:
            for _ in weights:  # the other ranks are still gathering: finish every all-gather with them, then fail
                pass
            raise
        except Exception:  # e.g. a learner rank died in a gather: receivers waiting in this push fail now, not at
            self.transport.close()  # the group's timeout (a group is re-formed before the next push anyway)
            raise
        self.sent = digests.by_name if full else {**self.sent, **digests.by_name}
        report = weight_sync.PushReport(version, nbytes, time.perf_counter() - t0, digests.hexdigest(),
                                        self.transport.endpoint.transport, weight_sync.state_digest(self.sent),
                                        full)  # fmt: skip
        return weight_sync.Sent(report, self.transport.handles())

    def export(self, path: str) -> str | None:
        """Write a Hugging Face folder (config, tokenizer, safetensors; LoRA merged) that transformers and vLLM
        load. A collective; rank 0 writes, into a temporary folder renamed into place when complete."""
        weights = self._weights_on_rank0(copy=True)
        if weights is None:
            return None
        return str(write_model_folder(self.model_path, dict(weights), Path(path)))

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def rendezvous(learner: LearnerWorker, world_size: int) -> tuple[str, int]:
    """On learner rank 0 (`__ray_call__`): bind the FSDP group's TCP store to a port the OS picks, and return its
    address for every rank's `join`. Choosing a free port and binding it later races with other processes on
    the node (seen: EADDRINUSE on a busy machine); binding port 0 does not."""
    host = weight_sync.node_ip()
    learner.store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=GROUP_TIMEOUT,
                                  wait_for_workers=False)  # fmt: skip
    return host, learner.store.port


# ---- probes: read-only views of a rank's model for checks, run in its actor (`WorkerGroup.call_all(fn, ...)`) ----


@torch.no_grad()
def token_logprobs(learner: LearnerWorker, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1 under the current weights (a collective: call on every rank)."""
    learner.module.eval()
    return learner.module(torch.tensor([ids], device=learner.device)).tolist()


def state_checksums(learner: LearnerWorker) -> dict[str, str] | None:
    """Checksum of every parameter (LoRA adapters unmerged) and buffer of the whole student, by its name in the
    module; a collective (each parameter is gathered), the dict on rank 0, None elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(learner.module, options=options)
    if learner.rank != 0:
        return None
    state.update({name: b for name, b in learner.module.named_buffers()})  # non-persistent ones too (inv_freq)
    return {name: tensor_checksum(t) for name, t in state.items()}


def head_checksums(learner: LearnerWorker) -> dict[str, str]:
    """Checksum of each segment's teacher head in `model.dtype`, as the teachers hold it (a collective: a head
    read in place is gathered)."""
    by_tensor = {}  # segments often share one head
    with learner._gathered_heads():
        for h in learner.heads.values():
            if id(h) not in by_tensor:
                w = output_head(learner.student).detach() if h is STUDENT_HEAD else h.full
                w = w.full_tensor() if hasattr(w, "full_tensor") else w
                by_tensor[id(h)] = tensor_checksum(w.to(weight_sync.DTYPES[learner.cfg.model.dtype]))
    return {name: by_tensor[id(h)] for name, h in learner.heads.items()}
