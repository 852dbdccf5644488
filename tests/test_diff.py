"""Segment identification: unit tests and hypothesis properties."""

from __future__ import annotations

import Levenshtein
from hypothesis import given, settings
from hypothesis import strategies as st

from fgit_preprocess.diff import (
    COSMETIC_DIFF,
    NO_DIFF,
    code_view,
    edit_spans,
    is_cosmetic,
    line_spans,
    merge_spans,
    pair_spans,
)

CODE_CHARS = st.text(alphabet="ab <=+-1\n#:", max_size=60)


def _outside(text: str, spans) -> str:
    keep = [True] * len(text)
    for s, e in spans:
        for i in range(s, e):
            keep[i] = False
    return "".join(c for c, k in zip(text, keep) if k)


def test_line_and_edit_spans_hand_computed():
    incorrect = "def f(x):\n    if x <= 0:\n        return 1\n    return x\n"
    correct = "def f(x):\n    if x < 0:\n        return 1\n    return x\n"
    a_line, c_line = line_spans(incorrect, correct)
    assert [incorrect[s:e] for s, e in a_line] == ["    if x <= 0:\n"]
    assert [correct[s:e] for s, e in c_line] == ["    if x < 0:\n"]
    a_edit, c_edit = edit_spans(incorrect, correct)
    assert [incorrect[s:e] for s, e in a_edit] == ["="]  # a deletion marks the incorrect side
    assert c_edit == []  # ... and nothing in the correct text


def test_insert_and_replace_mark_the_right_side():
    a_edit, c_edit = edit_spans("return a", "return ab")
    assert a_edit == [] and c_edit == [(8, 9)]  # insert → position in correct
    a_edit, c_edit = edit_spans("x = a + b", "x = a - b")
    assert a_edit == [(6, 7)] and c_edit == [(6, 7)]  # replace → both


def test_identical_texts_are_no_diff_and_give_no_spans():
    text = "```python\nprint(1)\n```\n"
    assert line_spans(text, text) == ([], [])
    assert edit_spans(text, text) == ([], [])
    assert pair_spans(text, text).reject == NO_DIFF


def test_prose_only_change_is_no_diff_in_code_scope_but_real_in_response_scope():
    correct = "Here it is:\n```python\nx = 1\n```\n"
    incorrect = "Look:\n```python\nx = 1\n```\n"
    assert pair_spans(correct, incorrect, "code").reject == NO_DIFF
    assert pair_spans(correct, incorrect, "response").reject is None


def test_cosmetic_diffs_are_rejected():
    base = "def f(x):\n    return x + 1\n"
    for variant in (
        "def f(x):\n    return x + 1  # add one\n",
        "def f(x):\n    return x+1\n",
        'def f(x):\n    """Add one."""\n    return x + 1\n',
    ):
        assert pair_spans(base, variant).reject == COSMETIC_DIFF, variant
    c = "int f(int x) {\n  return x + 1; // inc\n}\n"
    assert pair_spans(c, "int f(int x) {\n  /* note */ return x + 1;\n}\n").reject == COSMETIC_DIFF


def test_python_indentation_change_is_real():
    correct = "for i in a:\n    s += i\nreturn s\n"
    incorrect = "for i in a:\n    s += i\n    return s\n"
    assert not is_cosmetic("def g(a):\n" + _indent(incorrect), "def g(a):\n" + _indent(correct))


def _indent(code: str) -> str:
    return "".join("    " + line for line in code.splitlines(keepends=True))


def test_docstring_interior_change_is_cosmetic_but_code_change_is_not():
    correct = 'def f():\n    """\n    Returns x.\n    """\n    return 1\n'
    assert pair_spans(correct, correct.replace("Returns x", "Returns y")).reject == COSMETIC_DIFF
    assert pair_spans(correct, correct.replace("return 1", "return 2")).reject is None


def test_fenced_code_offsets_map_back_to_the_full_response():
    correct = (
        "Intro text.\n\n```python\ndef f():\n    return 1\n```\n\nAnd a second:\n```\nx = 2\n```\n"
    )
    incorrect = (
        "Other intro.\n```python\ndef f():\n    return 0\n```\nAnd a second:\n```\nx = 3\n```\n"
    )
    spans = pair_spans(correct, incorrect)
    assert [correct[s:e] for s, e in spans.correct_edit] == ["1", "2"]
    assert [incorrect[s:e] for s, e in spans.incorrect_edit] == ["0", "3"]
    assert [correct[s:e] for s, e in spans.correct_line] == ["    return 1\n", "x = 2\n"]


def test_unfenced_response_falls_back_to_whole_text():
    view = code_view("x = 1\n")
    assert view.text == "x = 1\n" and view.pieces == ((0, 0, 6),)


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), max_size=8))
def test_merge_spans_sorted_disjoint_and_covering(raw):
    merged = merge_spans(raw)
    covered = {i for s, e in raw for i in range(s, e)}
    assert {i for s, e in merged for i in range(s, e)} == covered
    assert all(s < e for s, e in merged)
    assert all(merged[k][1] < merged[k + 1][0] for k in range(len(merged) - 1))


@settings(max_examples=300, deadline=None)
@given(CODE_CHARS, CODE_CHARS)
def test_every_char_outside_edit_spans_is_matched(a, c):
    a_edit, c_edit = edit_spans(a, c)
    assert _outside(a, a_edit) == _outside(c, c_edit)
    if a == c:
        assert a_edit == c_edit == []
    # The number of marked characters bounds the edit distance from above.
    marked = sum(e - s for s, e in a_edit) + sum(e - s for s, e in c_edit)
    assert marked >= Levenshtein.distance(a, c) >= max(map(len, (a_edit, c_edit)), default=0)


@settings(max_examples=300, deadline=None)
@given(CODE_CHARS, CODE_CHARS)
def test_spans_stay_inside_text_and_lines_are_whole(a, c):
    spans = pair_spans(c, a, "response")
    for text, group in (
        (c, (spans.correct_line, spans.correct_edit)),
        (a, (spans.incorrect_line, spans.incorrect_edit)),
    ):
        for span_list in group:
            assert all(0 <= s < e <= len(text) for s, e in span_list)
    for s, e in spans.correct_line:  # line spans start at a line start, end after "\n" or at EOF
        assert s == 0 or c[s - 1] == "\n"
        assert e == len(c) or c[e - 1] == "\n"


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet="ab\n", max_size=20),
    CODE_CHARS,
    CODE_CHARS,
    st.text(alphabet="xy \n", max_size=20),
)
def test_markdown_offsets_map_back_exactly(prose, a_code, c_code, tail):
    if "```" in prose + tail:
        return
    wrap = lambda code: f"{prose}\n```python\n{code}\n```\n{tail}"  # noqa: E731
    correct, incorrect = wrap(c_code), wrap(a_code)
    spans = pair_spans(correct, incorrect, "code")
    if spans.reject:
        return
    a_edit, c_edit = edit_spans(a_code + "\n", c_code + "\n")
    offset = len(prose) + len("\n```python\n")
    assert spans.correct_edit == [(s + offset, e + offset) for s, e in c_edit]
    assert spans.incorrect_edit == [(s + offset, e + offset) for s, e in a_edit]
