"""Chat contexts: what each role sees before the completion tokens (SPEC §3, §5).

A context is rendered to text once with the model's chat template (image first), encoded once by the processor,
and from then on handled as token ids; completions are never re-tokenized from decoded text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vigos_ray.config import ContextConfig


@dataclass(frozen=True)
class EncodedContext:
    """A context as the model sees it: ids with image pads expanded, plus the vision tensors."""

    text: str
    input_ids: list[int]
    pixel_values: Any  # torch.Tensor [patches, patch_dim]
    image_grid_thw: Any  # torch.Tensor [images, 3]


def render(processor, user_text: str, prefill: str, with_image: bool = True) -> str:
    """One user turn (image first, then text), then the assistant turn opened and prefilled."""
    content: list[dict[str, str]] = [{"type": "image"}] if with_image else []
    if user_text:
        content.append({"type": "text", "text": user_text})
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill


def context_text(processor, ctx: ContextConfig, problem: str, answer: str = "") -> str:
    """One context rendered: the template filled for a sample, ending where the completion tokens take over."""
    return render(processor, ctx.template.format(problem=problem, answer=answer), ctx.prefill)


def student_text(processor, problem: str, prompts: Mapping[str, ContextConfig]) -> str:
    return context_text(processor, prompts["student"], problem)


def encode(processor, text: str, image: Image.Image | None) -> EncodedContext:
    batch = processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")
    return EncodedContext(
        text=text,
        input_ids=batch["input_ids"][0].tolist(),
        pixel_values=batch.get("pixel_values"),
        image_grid_thw=batch.get("image_grid_thw"),
    )
