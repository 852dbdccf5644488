"""Token projection with real tokenizers of two kinds: SmolLM2 BPE and MiniLM WordPiece."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from axolotl_fgit.contract import overlap_mask, project
from fgit_preprocess.diff import merge_spans, pair_spans

CORRECT = "```python\ndef total(values):\n    return sum(values) + offset_value\n```\n"
INCORRECT = "```python\ndef total(values):\n    return sum(values) - offset_valueX\n```\n"


@pytest.fixture(params=["bpe", "wordpiece"])
def tokenizer(request, tokenizer, wordpiece_tokenizer):
    return {"bpe": tokenizer, "wordpiece": wordpiece_tokenizer}[request.param]


def _offsets(tok, text):
    return tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]


def test_every_overlapped_token_is_marked(tokenizer):
    spans = pair_spans(CORRECT, INCORRECT)
    offsets = _offsets(tokenizer, CORRECT)
    masks = project(offsets, spans.correct_line, spans.correct_edit)

    def overlaps(s: int, e: int, spans_: list) -> bool:
        return e > s and any(s < b and a < e for a, b in spans_)

    for (s, e), line, edit in zip(offsets, masks.line, masks.edit):
        assert bool(line) == overlaps(s, e, spans.correct_line)
        assert bool(edit) == overlaps(s, e, spans.correct_edit)
    assert set(np.unique(masks.hybrid)) <= {0, 1, 2} and masks.hybrid.max() == 2


def test_edit_spanning_several_tokens_marks_all_of_them(tokenizer):
    correct = "result = compute_the_checksum_of_payload(data)\n"
    incorrect = "result = x(data)\n"
    spans = pair_spans(correct, incorrect)
    ((start, end),) = [sp for sp in spans.correct_edit if sp[1] - sp[0] > 10]
    offsets = _offsets(tokenizer, correct)
    covered = [i for i, (s, e) in enumerate(offsets) if s < end and start < e and e > s]
    assert len(covered) >= 3, "the edit should span several tokens of this tokenizer"
    masks = project(offsets, spans.correct_line, spans.correct_edit)
    assert all(masks.edit[i] == 1 for i in covered)
    assert all(masks.hybrid[i] == 2 for i in covered)


def test_shift_projects_spans_inside_a_longer_sequence(tokenizer):
    prompt = "<|im_start|>user\nWrite total.<|im_end|>\n<|im_start|>assistant\n"
    spans = pair_spans(CORRECT, INCORRECT)
    alone = project(_offsets(tokenizer, CORRECT), spans.correct_line, spans.correct_edit)
    full_offsets = _offsets(tokenizer, prompt + CORRECT)
    shifted = project(full_offsets, spans.correct_line, spans.correct_edit, shift=len(prompt))
    response = [i for i, (s, e) in enumerate(full_offsets) if s >= len(prompt)]
    assert shifted.hybrid[: response[0]].sum() == 0  # no prompt token is marked
    assert shifted.hybrid[response].tolist() == alone.hybrid.tolist()


def test_special_tokens_with_empty_offsets_are_never_marked(wordpiece_tokenizer):
    enc = wordpiece_tokenizer("a b c", return_offsets_mapping=True)  # [CLS] ... [SEP]
    masks = project(enc["offset_mapping"], [(0, 5)], [(0, 5)])
    assert masks.hybrid[0] == 0 and masks.hybrid[-1] == 0 and masks.hybrid[1:-1].min() == 2


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 8)), max_size=30),
    st.lists(st.tuples(st.integers(0, 40), st.integers(1, 8)), max_size=6),
    st.lists(st.tuples(st.integers(0, 40), st.integers(1, 8)), max_size=6),
)
def test_projection_matches_brute_force(tokens, lines, edits):
    offsets = np.array([(s, s + n) for s, n in tokens], dtype=np.int64).reshape(-1, 2)
    line_spans = merge_spans([(s, s + n) for s, n in lines])
    edit_spans = merge_spans([(s, s + n) for s, n in edits])
    masks = project(offsets, line_spans, edit_spans)
    brute = lambda sp: [int(e > s and any(s < b and a < e for a, b in sp)) for s, e in offsets]  # noqa: E731
    assert masks.line.tolist() == brute(line_spans)
    assert masks.edit.tolist() == brute(edit_spans)
    assert set(masks.hybrid.tolist()) <= {0, 1, 2}
    assert all(
        (h == 2) == (ln == 1 and e == 1) for h, ln, e in zip(masks.hybrid, masks.line, masks.edit)
    )
    assert overlap_mask(offsets, []).sum() == 0
