"""Loading Qwen-VL checkpoints (real or tiny) and their processors, with clear errors for bad folders.

One loading path for every model: a Hugging Face folder. `model_folder` takes a folder or a hub id (resolved
through huggingface_hub's cache); `resolve_model_path` builds the tiny model into the cache when `model.path` is
empty. Where torchvision's video processor cannot load, an image-only processor with the same outputs for images
stands in.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vigos_ray.config import ModelConfig
from vigos_ray.hub import MODEL_ID, HubError, snapshot
from vigos_ray.tiny import VISION_SPECIAL_TOKENS, ensure_tiny_model

log = logging.getLogger(__name__)
SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


class ModelFolderError(ValueError):
    """`model.path` (or a teacher checkpoint) is not a loadable Qwen-VL folder."""


def resolve_model_path(cfg: ModelConfig, cache_dir: str | Path, seed: int = 0) -> Path:
    if not cfg.path:
        return ensure_tiny_model(cache_dir, kind=cfg.tiny, seed=seed)
    return model_folder(cfg.path, "model.path")


def model_folder(value: str | Path, key: str, download: bool = True) -> Path:
    """`value` as a checked model folder: a folder as given, else a Hugging Face hub id (`org/name`, pinned with
    `org/name@revision`) resolved through huggingface_hub's cache (`HF_HOME` / `HF_HUB_CACHE`), downloaded there
    once per node when online and `download`; with `HF_HUB_OFFLINE=1` only the cache is read. Raises
    ModelFolderError naming `key`."""
    path = Path(value).expanduser()
    hub_id = MODEL_ID.match(str(value))
    if path.exists() or not hub_id:
        check_model_folder(path, key=key)
        return path
    try:
        path = snapshot(hub_id["repo"], hub_id["revision"], "model", key, str(value), download=download)
    except HubError as err:
        raise ModelFolderError(str(err)) from None
    check_model_folder(path, key=key)
    return path


def on_this_node(model_path: str | Path, cfg) -> Path:
    """The student's folder on the node an actor runs on: `model_path` as the driver resolved it where this node
    has it; where it does not (another node, its own hub cache) and `model.path` is a hub id, the id resolved
    through this node's cache (downloaded once when online)."""
    path = Path(model_path)
    if path.exists() or not cfg.model.path or not MODEL_ID.match(cfg.model.path):
        return path
    return model_folder(cfg.model.path, "model.path")


def check_model_folder(path: Path, key: str = "model.path") -> dict[str, Any]:
    """Fail early, naming the key, if `path` is not a Qwen-VL checkpoint folder; returns its config dict."""
    if not path.is_dir():
        raise ModelFolderError(f"{key}={path} is not a directory; point {key} at a Hugging Face model folder")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelFolderError(f"{key}={path} has no config.json; is it a Hugging Face model folder?")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelFolderError(
            f"{key}={path} holds a '{model_type}' model; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelFolderError(f"{key}={path} has no weight files (*.safetensors)")
    return config


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """The full image-text model from a folder, in eval mode."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=getattr(torch, dtype))
    return model.to(device).eval()


@dataclass
class ImageOnlyProcessor:
    """Processor for image+text prompts that needs no video processor (hence no torchvision).

    Gives the same `input_ids`, `pixel_values` and `image_grid_thw` for images as the model's own processor: each
    image placeholder in the text is expanded to one pad per merged patch of that image.
    """

    tokenizer: Any
    image_processor: Any
    chat_template: str | None = None
    image_token: str = "<|image_pad|>"

    def apply_chat_template(self, messages, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)

    def __call__(self, text, images=None, return_tensors="pt", padding=False, **kwargs):
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        data: dict[str, Any] = {}
        if images is not None:
            vision = self.image_processor(images=images, return_tensors=return_tensors)
            data.update(vision)
            merge = self.image_processor.merge_size**2
            counts = iter(int(g.prod()) // merge for g in vision["image_grid_thw"])
            expanded = []
            for t in texts:
                pieces = t.split(self.image_token)
                out = pieces[0]
                for piece in pieces[1:]:
                    out += self.image_token * next(counts) + piece
                expanded.append(out)
            texts = expanded
        data.update(self.tokenizer(texts, return_tensors=return_tensors, padding=padding, **kwargs))
        return BatchFeature(data=data)


def add_lora(model, lora):
    """`model` wrapped by PEFT with the adapters `lora` (a LoraConfig of ours) names; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules)
    return get_peft_model(model, config)


def load_processor(path: str | Path, min_pixels: int, max_pixels: int, image_only: bool = False):
    """The folder's processor with the image size range from config; image-only when video support can't load."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    if not image_only:
        try:
            return AutoProcessor.from_pretrained(str(path), size=size)
        except (ImportError, RuntimeError, TypeError, ValueError) as err:  # typically torchvision missing or broken
            log.warning("the processor of %s did not load (%s: %s); using an image-only processor",
                        path, type(err).__name__, err)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    image_processor = AutoImageProcessor.from_pretrained(str(path), size=size)
    template_file = Path(path) / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else getattr(tokenizer, "chat_template", None)
    return ImageOnlyProcessor(tokenizer=tokenizer, image_processor=image_processor, chat_template=template)


def sampling_token_ids(tokenizer) -> list[int]:
    """Ids the student may sample: the tokenizer's own ids minus vision special tokens.

    Head rows beyond the tokenizer (e.g. 151,936 rows for 151,665 tokens) and vision tokens are never sampled.
    """
    banned = set(banned_token_ids(tokenizer))
    return [i for i in range(len(tokenizer)) if i not in banned]


def banned_token_ids(tokenizer) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS]
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)


def next_token_logprobs(model, ids):
    """log p(ids[t] | ids[:t]) for t >= 1 of one text-only sequence `ids` [1, T] -> float32 [T - 1] (grad mode of
    the caller). The probe that compares a learner's, a rollout engine's and an exported model's weights."""
    logits = model(input_ids=ids).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]


def completion_logprobs(model, context, completion_ids: list[int]):
    """log p(y_t | context, y_<t) of each completion token under `model` (teacher forcing, temperature 1).

    Logits are taken only at the positions that predict completion tokens. Returns a float32 tensor [T].
    """
    import torch

    ids = torch.tensor([context.input_ids + list(completion_ids)])
    with torch.no_grad():
        out = model.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=context.pixel_values,
            image_grid_thw=context.image_grid_thw,
        )
        start = len(context.input_ids) - 1  # the last context position predicts the first completion token
        hidden = out.last_hidden_state[0, start : start + len(completion_ids)]
        logits = model.lm_head(hidden).float()
    return logits.log_softmax(-1).gather(1, torch.tensor(completion_ids)[:, None])[:, 0]


def tensor_checksum(t) -> str:
    """SHA-256 of a tensor's float32 bytes: equal heads give equal checksums on every process."""
    import torch

    return hashlib.sha256(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def load_output_head(path: str | Path, key: str):
    """The output head [V', d] of a checkpoint (a folder or a hub id), read alone from its safetensors (the tied
    embedding if tied)."""
    from safetensors import safe_open

    path = model_folder(path, key)
    config = json.loads((path / "config.json").read_text())  # checked by model_folder
    tied = config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False))
    wanted = ("model.language_model.embed_tokens.weight", "model.embed_tokens.weight") if tied else ("lm_head.weight",)
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in wanted:
                if name in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                    return f.get_tensor(name).float()
    raise ModelFolderError(f"{path} has none of {wanted} in its safetensors files; cannot read its output head")


def write_model_folder(source: str | Path, weights: dict, out: Path) -> Path:
    """A loadable Hugging Face folder at `out`: `source`'s config, tokenizer and processor files with `weights`.

    Written into `out.tmp` and renamed into place, so `out` is either complete or absent.
    """
    import shutil

    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for file in Path(source).iterdir():
        weight_file = file.name.endswith((".safetensors", ".bin")) or file.name.endswith(".index.json")
        if file.is_file() and not weight_file:
            shutil.copy2(file, tmp / file.name)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in weights.items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def check_teacher_checkpoints(cfg, student) -> None:
    """Each `teachers.<role>.checkpoint` must be a model folder whose tokenizer is `student` (the student's): the
    teachers score the student's token ids, and a different vocabulary would silently score other tokens."""
    for role, pool in cfg.teacher_pools().items():
        if not pool.checkpoint:
            continue
        key = f"teachers.{role}.checkpoint"
        path = model_folder(pool.checkpoint, key)
        teacher = load_processor(path, cfg.model.min_pixels, cfg.model.max_pixels).tokenizer
        if len(teacher) != len(student) or teacher.get_vocab() != student.get_vocab():
            raise ModelFolderError(
                f"{key}={path} has a {len(teacher):,}-token vocabulary that differs from the student's "
                f"({len(student):,} tokens, model.path); a teacher must share the student's tokenizer"
            )
