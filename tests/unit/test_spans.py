"""Span parsing on real tokenizer output: the SPEC §4 edge cases, checked against the decoded text of each span."""

from __future__ import annotations

import pytest

from vigos_ray.spans import TokenTable, parse_completion

GOOD = "A red circle on white.</description><think>It is round and red.</think>\\boxed{red}<|im_end|>"


@pytest.fixture(scope="module", params=["fast", "qwen_vocab"])
def tok(request):
    from transformers import AutoTokenizer

    path = request.getfixturevalue("tiny_fast" if request.param == "fast" else "tiny_qwen_vocab")
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def table(tok):
    return TokenTable.for_tokenizer(tok)


def ids_of(tok, *pieces: str) -> list[int]:
    """Token ids of the pieces, each tokenized on its own (how a tag can end up split differently in sampling)."""
    return [i for p in pieces for i in tok(p, add_special_tokens=False).input_ids]


def text(tok, ids, positions) -> str:
    return tok.decode([ids[t] for t in positions])


def test_well_formed_completion_splits_into_description_and_reasoning(tok, table):
    ids = ids_of(tok, GOOD)
    spans = parse_completion(ids, table)
    assert spans.valid and spans.reason == ""
    assert spans.length == len(ids)
    # A token that straddles a tag boundary (".</" in the small BPE) belongs to neither segment.
    assert text(tok, ids, spans.description) in ("A red circle on white.", "A red circle on white")
    assert text(tok, ids, spans.reasoning).endswith("</think>\\boxed{red}")
    assert "It is round and red" in text(tok, ids, spans.reasoning)
    assert "<" not in text(tok, ids, spans.reasoning).split("</think>")[0]
    assert spans.reference == () and spans.answer == "red"
    assert spans.description == tuple(range(len(spans.description)))  # contiguous from the first token
    assert text(tok, ids, range(spans.description_end, spans.think_start)).count("think") == 1


def test_paper_convention_excludes_delimiters_from_reasoning(tok, table):
    ids = ids_of(tok, GOOD)
    spans = parse_completion(ids, table, convention="paper")
    reasoning = text(tok, ids, spans.reasoning)
    assert reasoning in ("It is round and red.red", "It is round and redred")
    assert "think" not in reasoning and "boxed" not in reasoning
    code = parse_completion(ids, table, convention="code")
    assert set(spans.reasoning) < set(code.reasoning)


@pytest.mark.parametrize(
    "completion,reason",
    [
        ("A circle.<think>It is red.</think>\\boxed{red}<|im_end|>", "no </description>"),
        ("A circle.</description>It is red.</think>\\boxed{red}<|im_end|>", "no <think>"),
        ("A circle.</description><think>It is red. \\boxed{red}<|im_end|>", "no </think>"),
        ("A circle.</description><think>It is red.</think> red<|im_end|>", "no \\boxed{"),
        ("A circle.</description><think>It is red.</think>\\boxed{red<|im_end|>", "never closed"),
        ("A circle.</description><think>It is red.</think>\\boxed{{red}<|im_end|>", "never closed"),
        ("</description><think>It is red.</think>\\boxed{red}<|im_end|>", "empty description"),
        ("A circle.<|im_end|></description><think>It is red.</think>\\boxed{red}", "no </description>"),
    ],
)
def test_broken_format_is_invalid_and_every_token_goes_to_the_reference_teacher(tok, table, completion, reason):
    ids = ids_of(tok, completion)
    spans = parse_completion(ids, table)
    assert not spans.valid and reason in spans.reason
    eos = next((t for t, i in enumerate(ids) if i in table.eos_ids), None)
    assert spans.reference == tuple(range(len(ids) if eos is None else eos + 1))  # up to and including the EOS
    assert spans.description == () and spans.reasoning == ()


def test_empty_think_and_box_is_valid_format_with_nothing_to_supervise_in_the_paper_convention(tok, table):
    ids = ids_of(tok, "A circle.</description><think></think>\\boxed{}<|im_end|>")
    code, paper = parse_completion(ids, table, "code"), parse_completion(ids, table, "paper")
    assert code.valid and paper.valid and code.answer == ""
    assert text(tok, ids, code.reasoning).endswith("think>\\boxed{}") and paper.reasoning == ()


def test_nested_braces_and_nested_boxes_close_at_the_balancing_brace(tok, table):
    ids = ids_of(tok, "Two halves.</description><think>Half.</think>\\boxed{\\frac{1}{2}}<|im_end|>")
    spans = parse_completion(ids, table)
    assert spans.valid and spans.answer == "\\frac{1}{2}"
    assert text(tok, ids, spans.reasoning).endswith("\\boxed{\\frac{1}{2}}")
    nested = parse_completion(ids_of(tok, "Dots.</description><think>So.</think>\\boxed{\\boxed{3}}"), table)
    assert nested.valid and nested.answer == "\\boxed{3}"


def test_text_after_the_box_is_valid_but_unsupervised(tok, table):
    ids = ids_of(tok, "A square.</description><think>Four sides.</think>\\boxed{square} Done, it is blue.<|im_end|>")
    spans = parse_completion(ids, table)
    assert spans.valid and spans.answer == "square"
    assert text(tok, ids, spans.reasoning).endswith("\\boxed{square}")
    assert "Done" in text(tok, ids, range(spans.answer_end, len(ids)))
    assert max(spans.reasoning) < spans.answer_end <= len(ids)


def test_truncation_before_the_box_is_invalid_and_after_it_is_valid(tok, table):
    full = ids_of(tok, GOOD)
    cut_in_reasoning = full[: len(ids_of(tok, "A red circle on white.</description><think>It is"))]
    assert not parse_completion(cut_in_reasoning, table).valid
    no_eos = full[:-1]  # stopped by the length limit right after the box
    spans = parse_completion(no_eos, table)
    assert spans.valid and spans.length == len(no_eos)


def test_tags_split_across_unusual_tokens_are_found(tok, table):
    ids = ids_of(
        tok, "A blue", " triangle.</desc", "ription><th", "ink>Three", " corners.</", "think>\\box", "ed{triangle}"
    )
    spans = parse_completion(ids, table)
    assert spans.valid and spans.answer == "triangle"
    assert text(tok, ids, spans.description).startswith("A blue triangle")
    assert "desc" not in text(tok, ids, spans.description)


def test_the_first_tag_counts_even_when_a_later_one_has_the_canonical_token_ids(tok, table):
    # The first </description> is tokenized in pieces, a second one normally: id matching would pick the second.
    ids = ids_of(tok, "A gray circle.", "</", "descr", "iption>", "<think>Round.</description></think>\\boxed{circle}")
    spans = parse_completion(ids, table)
    assert spans.valid
    assert text(tok, ids, spans.description) == "A gray circle."
    assert "Round" in text(tok, ids, spans.reasoning)


def test_vision_tokens_and_padded_head_rows_make_a_rollout_invalid(tok, table):
    ids = ids_of(tok, GOOD)
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    spans = parse_completion(ids[:3] + [image_pad] + ids[3:], table)
    assert not spans.valid and "vision special token" in spans.reason
    spans = parse_completion(ids[:3] + [len(tok) + 5] + ids[3:], table)
    assert not spans.valid and "beyond the tokenizer" in spans.reason
    # After the first EOS nothing counts, not even a vision token.
    assert parse_completion(ids + [image_pad], table).valid


def test_parsing_with_the_tokenizer_or_its_table_agrees(tok, table):
    ids = ids_of(tok, GOOD)
    assert parse_completion(ids, tok) == parse_completion(ids, table)


def test_byte_view_reassembles_the_decoded_text_exactly(tok, table):
    from vigos_ray.spans import _ByteView

    sample = "Ünïcode ✓ 中文 and emoji 🙂.</description><think>ok</think>\\boxed{x}<|im_end|>"
    ids = ids_of(tok, sample)
    assert _ByteView(table, ids).data.decode() == tok.decode(ids) == sample
