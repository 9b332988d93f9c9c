"""Parse a completion's token ids into the ViGOS segments and decide its validity (SPEC §4).

The completion is mapped to its exact bytes token by token (byte-level BPE decodes each token to bytes with no
context), tags are searched in those bytes, and byte positions are mapped back to token indices. A segment never holds a
token that carries the start of the tag closing it (`.</` before `description>`); a token that carries the end
of `<think>` and the first reasoning bytes (`>The`) opens the reasoning, and `Spans.think_overlap` counts its tag
bytes, so the reasoning teacher's prefill can leave them out.

Searching bytes instead of matching the tag's token ids is deliberate: a tag can be tokenized differently in
different places (`</description>` after a space or a newline), and id matching then finds a *later* occurrence
than the first one the format defines. The byte search finds the first textual occurrence whatever the merges.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from vigos_ray.tiny import VISION_SPECIAL_TOKENS
from vigos_ray.types import Spans

DESCRIPTION_CLOSE = b"</description>"
THINK_OPEN = b"<think>"
THINK_CLOSE = b"</think>"
BOX_OPEN = b"\\boxed{"
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
SpanConvention = Literal["code", "paper"]


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level alphabet: the printable stand-in character of each byte, inverted."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


@dataclass
class TokenTable:
    """Per-tokenizer facts the parser needs, computed once: ids to bytes, EOS ids, ids that may never appear."""

    tokenizer: object
    eos_ids: frozenset[int]
    forbidden_ids: frozenset[int]  # vision special tokens
    vocab_size: int  # ids >= this are padded head rows, never real tokens
    pad_id: int | None

    def __post_init__(self) -> None:
        self._bytes: dict[int, bytes] = {}
        self._added = {tok.content for tok in self.tokenizer.added_tokens_decoder.values()}

    @classmethod
    def for_tokenizer(cls, tokenizer) -> TokenTable:
        def ids(tokens):
            found = (tokenizer.convert_tokens_to_ids(t) for t in tokens)
            return frozenset(i for i in found if i is not None and i != tokenizer.unk_token_id)

        eos = set(ids(EOS_TOKENS))
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        return cls(tokenizer, frozenset(eos), ids(VISION_SPECIAL_TOKENS), len(tokenizer), tokenizer.pad_token_id)

    def token_bytes(self, token_id: int) -> bytes:
        if token_id not in self._bytes:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            decoder = _byte_decoder()
            if piece in self._added:
                data = piece.encode()
            elif all(ch in decoder for ch in piece):
                data = bytes(decoder[ch] for ch in piece)
            else:  # not a byte-level vocabulary (e.g. SentencePiece): the token's own decoded text
                data = self.tokenizer.decode([token_id]).encode()
            self._bytes[token_id] = data
        return self._bytes[token_id]


class _ByteView:
    """The completion as one byte string plus the byte offset where each token starts."""

    def __init__(self, table: TokenTable, ids: list[int]):
        pieces = [table.token_bytes(i) for i in ids]
        self.starts: list[int] = []
        pos = 0
        for piece in pieces:
            self.starts.append(pos)
            pos += len(piece)
        self.data = b"".join(pieces)
        self.ends = self.starts[1:] + [pos]

    def first_token_ending_after(self, byte: int) -> int:
        """Index of the token holding `byte` (the first token whose end lies beyond it)."""
        return bisect.bisect_right(self.ends, byte)

    def content_tokens(self, lo: int, hi: int) -> list[int]:
        """Tokens holding content of bytes [lo, hi) and nothing at or beyond `hi` (a token may start before `lo`)."""
        return [t for t in range(self.first_token_ending_after(lo), len(self.starts)) if self.ends[t] <= hi]


def _closing_brace(data: bytes, start: int) -> int:
    """Byte index of the `}` that balances the `{` just before `start`, or -1 if the braces never close."""
    depth = 1
    for i in range(start, len(data)):
        c = data[i]
        if c == ord("{"):
            depth += 1
        elif c == ord("}"):
            depth -= 1
            if depth == 0:
                return i
    return -1


def parse_completion(completion_ids: list[int], tokenizer, convention: SpanConvention = "code") -> Spans:
    """Segments of one completion (positions index `completion_ids`); see the module docstring and SPEC §4.

    `tokenizer` is a Hugging Face tokenizer or, to parse many completions, its `TokenTable` built once.
    """
    table = tokenizer if isinstance(tokenizer, TokenTable) else TokenTable.for_tokenizer(tokenizer)
    ids = list(completion_ids)
    end = next((t + 1 for t, i in enumerate(ids) if i in table.eos_ids), len(ids))  # up to and incl. first EOS
    every_token = tuple(range(end))

    def invalid(reason: str) -> Spans:
        return Spans(valid=False, reason=reason, length=end, reference=every_token)

    bad = next((i for i in ids[:end] if i in table.forbidden_ids or i >= table.vocab_size), None)
    if bad is not None:
        kind = "vision special token" if bad in table.forbidden_ids else "id beyond the tokenizer"
        return invalid(f"{kind} {bad} in the completion")
    view = _ByteView(table, ids[:end])
    data = view.data

    dc = data.find(DESCRIPTION_CLOSE)
    if dc < 0:
        return invalid("no </description>")
    to = data.find(THINK_OPEN, dc + len(DESCRIPTION_CLOSE))
    if to < 0:
        return invalid("no <think> after </description>")
    tc = data.find(THINK_CLOSE, to + len(THINK_OPEN))
    if tc < 0:
        return invalid("no </think> after <think>")
    bx = data.find(BOX_OPEN, tc + len(THINK_CLOSE))
    if bx < 0:
        return invalid("no \\boxed{ after </think>")
    content_start = bx + len(BOX_OPEN)
    close = _closing_brace(data, content_start)
    if close < 0:
        return invalid("\\boxed{ is never closed (cut off or unbalanced braces)")

    skip = {t for t in range(end) if ids[t] in table.eos_ids or ids[t] == table.pad_id}  # never supervised text
    description_end = view.first_token_ending_after(dc)
    description = tuple(t for t in range(description_end) if t not in skip)
    # A token that carries the end of `<think>` and the first reasoning bytes (">The") belongs to the reasoning.
    think_start = view.first_token_ending_after(to + len(THINK_OPEN))
    think_overlap = max(0, to + len(THINK_OPEN) - view.starts[think_start]) if think_start < end else 0
    answer_end = view.first_token_ending_after(close) + 1
    # Validity is format only and the same under both conventions: SPEC §4 counts tokens in [to.end, bx.end).
    reasoning = tuple(t for t in range(think_start, answer_end) if t not in skip)
    if not description:
        return invalid("empty description")
    if not reasoning:
        return invalid("empty reasoning")
    if convention == "paper":  # the reasoning text and the answer inside the box, no delimiters
        reasoning = tuple(view.content_tokens(to + len(THINK_OPEN), tc) + view.content_tokens(content_start, close))
    return Spans(
        valid=True,
        reason="",
        length=end,
        description=description,
        reasoning=reasoning,
        description_end=description_end,
        think_start=think_start,
        think_overlap=think_overlap,
        answer_end=answer_end,
        answer=data[content_start:close].decode("utf-8", errors="replace"),
    )
