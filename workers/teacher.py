"""Teacher worker: a frozen model of one role (perception, reasoning, reference) scoring rows (SPEC §5, §7).

A plain class; launch code wraps it with `ray.remote` into the role's pool. It loads `teachers.<role>.checkpoint`,
or the student's initial weights when that is empty, never receives weight updates, and ships only the
configured payload for the scored positions of each row.
"""

from __future__ import annotations

from pathlib import Path

from vigos_ray.cluster import use_cpu_threads
from vigos_ray.config import Config
from vigos_ray.models import load_model, load_processor, model_folder, on_this_node, tensor_checksum
from vigos_ray.scoring import output_head, pool_targets
from vigos_ray.types import ScoreRow, TeacherTargets


class TeacherWorker:
    def __init__(self, cfg: Config, model_path: str | Path, role: str, worker_index: int = 0):
        self.cfg, self.role, self.worker_index = cfg, role, worker_index
        self.pool = cfg.teachers[role]
        self.threads = use_cpu_threads(cfg, "teachers", self.pool.num_gpus > 0)
        checkpoint, key = self.pool.checkpoint, f"teachers.{role}.checkpoint"
        path = model_folder(checkpoint, key) if checkpoint else on_this_node(model_path, cfg)  # hub ids: this node's
        self.model = load_model(path, cfg.model.dtype, "cuda" if self.pool.num_gpus > 0 else "cpu")
        self.model.requires_grad_(False)
        tokenizer = load_processor(path, cfg.model.min_pixels, cfg.model.max_pixels).tokenizer
        self.vocab_size, self.pad_id = len(tokenizer), tokenizer.pad_token_id or 0

    def score(self, rows: list[ScoreRow]) -> list[TeacherTargets]:
        """Targets for each row's scored tokens, in row order, in `scoring.payload` (CPU tensors: they cross Ray)."""
        targets = pool_targets(self.model, rows, self.cfg, self.role, self.vocab_size, self.pad_id)
        return [t.to("cpu") for t in targets]

    def head_checksum(self) -> str:
        """SHA-256 of the output head: a `hidden` payload is only meaningful against this exact head."""
        return tensor_checksum(output_head(self.model))
