"""Error-sensitive segments between an incorrect response (pre-change) and a correct one.

Everything here is pure and tokenizer-independent: results are half-open
``[start, end)`` character spans into the *full* response texts, so one preprocessed
dataset serves any student model. Token vectors are derived later
(``axolotl_fgit.contract.project``).
"""

from __future__ import annotations

import ast
import difflib
import functools
import re
from dataclasses import dataclass, field
from typing import Literal

import Levenshtein

from axolotl_fgit.contract import Span

DiffScope = Literal["code", "response"]

NO_DIFF = "no-diff"
COSMETIC_DIFF = "cosmetic-diff"
TOO_LONG = "too-long"
MAX_RESPONSE_CHARS = 1_000_000  # per response: a longer one is rejected, not diffed

# A fenced block: opening fence (``` or ~~~, 3+), optional info string, body, closing fence;
# lines may end in \r\n (Windows text).
_FENCE = re.compile(
    r"^(?P<indent>[ \t]{0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)\n(?P<body>.*?)"
    r"^(?P=indent)(?P=fence)[ \t]*\r?$",
    re.MULTILINE | re.DOTALL,
)
PYTHON_TAGS = frozenset({"python", "py", "python3", "py3"})
# The fast path cuts each changed line at its first line-comment marker, and gives up
# on a changed line inside a block comment or docstring. A marker inside a string only
# makes it give up more often (the slow, parsing path then decides), never wrongly.
_LINE_COMMENT = re.compile(r"(#|//|--).*")
_BLOCK_COMMENTS = re.compile(r'/\*.*?\*/|""".*?"""|\'\'\'.*?\'\'\'|<!--.*?-->', re.DOTALL)
_C_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.DOTALL)
_HASH_COMMENTS = re.compile(r"#[^\n]*")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class CodeView:
    """The part of a response that is diffed, with a map back to response offsets.

    ``pieces`` are ``(view_start, text_start, length)`` triples, sorted and disjoint.
    """

    text: str
    pieces: tuple[tuple[int, int, int], ...]
    language: str = ""
    fenced: bool = False

    def to_response(self, spans: list[Span]) -> list[Span]:
        """Map spans over ``text`` back to spans over the full response (split at gaps)."""
        out: list[Span] = []
        for start, end in spans:
            for v0, t0, n in self.pieces:
                lo, hi = max(start, v0), min(end, v0 + n)
                if lo < hi:
                    out.append((t0 + lo - v0, t0 + hi - v0))
        return merge_spans(out)


def code_view(response: str, scope: DiffScope = "code") -> CodeView:
    """The text FGIT diffs: fenced code blocks (joined) for ``code``, else the whole text.

    Falls back to the whole response when it has no fence, so plain-code datasets work.
    """
    if scope == "code":
        blocks = list(_FENCE.finditer(response))
        if blocks:
            parts, pieces, pos = [], [], 0
            for m in blocks:
                body = m.group("body")
                pieces.append((pos, m.start("body"), len(body)))
                parts.append(body)
                pos += len(body)
            info = blocks[0].group("info").strip().split()
            return CodeView("".join(parts), tuple(pieces), info[0].lower() if info else "", True)
    return CodeView(response, ((0, 0, len(response)),))


def merge_spans(spans: list[Span]) -> list[Span]:
    """Sort spans and merge the ones that touch or overlap; drop empty spans."""
    merged: list[list[int]] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _line_starts(lines: list[str]) -> list[int]:
    starts, pos = [0], 0
    for line in lines:
        pos += len(line)
        starts.append(pos)
    return starts


# Above this many lines (each side, after the common head and tail are cut), difflib's
# worst case (quadratic in repeated lines) is replaced by a bit-parallel edit alignment.
DIFFLIB_MAX_LINES = 2000


def _line_id(n: int) -> str:
    """A distinct character per distinct line (surrogate code points skipped)."""
    return chr(n + 0x100 if n + 0x100 < 0xD800 else n + 0x900)


def _changed_line_blocks(a_lines: list[str], c_lines: list[str]) -> list[tuple[int, ...]]:
    """``(i1, i2, j1, j2)`` blocks of lines that differ, ``incorrect → correct``.

    The common head and tail are cut first (a near miss differs in a few lines), so the
    alignment only sees the middle. difflib aligns it, unless it is longer than
    ``DIFFLIB_MAX_LINES``: then Levenshtein opcodes over line ids, which stay near linear
    on repeated or blank-separated lines where difflib takes minutes.
    """
    head = 0
    while head < min(len(a_lines), len(c_lines)) and a_lines[head] == c_lines[head]:
        head += 1
    tail = 0
    while (
        tail < min(len(a_lines), len(c_lines)) - head and a_lines[-1 - tail] == c_lines[-1 - tail]
    ):
        tail += 1
    a_mid, c_mid = a_lines[head : len(a_lines) - tail], c_lines[head : len(c_lines) - tail]
    if max(len(a_mid), len(c_mid)) <= DIFFLIB_MAX_LINES:
        ops = difflib.SequenceMatcher(None, a_mid, c_mid, autojunk=False).get_opcodes()
    else:
        ids: dict[str, str] = {}
        a_ids = "".join(ids.setdefault(line, _line_id(len(ids))) for line in a_mid)
        c_ids = "".join(ids.setdefault(line, _line_id(len(ids))) for line in c_mid)
        ops = Levenshtein.opcodes(a_ids, c_ids)
    return [
        (i1 + head, i2 + head, j1 + head, j2 + head)
        for tag, i1, i2, j1, j2 in ops
        if tag != "equal"
    ]


def line_spans(incorrect: str, correct: str) -> tuple[list[Span], list[Span]]:
    """Line alignment ``incorrect → correct``; lines keep their ``\\n``.

    Returns ``(incorrect_spans, correct_spans)``: the ``-`` lines of ``incorrect`` and the
    ``+`` lines of ``correct`` as character spans.
    """
    a_lines, c_lines = incorrect.splitlines(keepends=True), correct.splitlines(keepends=True)
    a_at, c_at = _line_starts(a_lines), _line_starts(c_lines)
    a_spans, c_spans = [], []
    for i1, i2, j1, j2 in _changed_line_blocks(a_lines, c_lines):
        a_spans.append((a_at[i1], a_at[i2]))
        c_spans.append((c_at[j1], c_at[j2]))
    return merge_spans(a_spans), merge_spans(c_spans)


# Above this many characters (either side) edits are aligned inside the changed line
# blocks only, which keeps long files near linear.
GLOBAL_EDIT_MAX_CHARS = 20_000


def _edit_ops(incorrect: str, correct: str, a0: int = 0, c0: int = 0):
    for tag, i1, i2, j1, j2 in Levenshtein.opcodes(incorrect, correct):
        if tag != "equal":
            yield tag, i1 + a0, i2 + a0, j1 + c0, j2 + c0


def edit_spans(incorrect: str, correct: str) -> tuple[list[Span], list[Span]]:
    """Levenshtein edit operations ``incorrect → correct`` as character spans.

    Insert marks the position in ``correct``, delete the position in ``incorrect``,
    replace marks both. Returns ``(incorrect_spans, correct_spans)``. Long texts are
    aligned block by block inside their changed lines (``GLOBAL_EDIT_MAX_CHARS``).
    """
    if max(len(incorrect), len(correct)) <= GLOBAL_EDIT_MAX_CHARS:
        ops = list(_edit_ops(incorrect, correct))
    else:
        a_lines, c_lines = incorrect.splitlines(True), correct.splitlines(True)
        a_at, c_at = _line_starts(a_lines), _line_starts(c_lines)
        ops = [
            op
            for i1, i2, j1, j2 in _changed_line_blocks(a_lines, c_lines)
            for op in _edit_ops(
                incorrect[a_at[i1] : a_at[i2]], correct[c_at[j1] : c_at[j2]], a_at[i1], c_at[j1]
            )
        ]
    a_spans, c_spans = [], []
    for tag, i1, i2, j1, j2 in ops:
        if tag in ("delete", "replace"):
            a_spans.append((i1, i2))
        if tag in ("insert", "replace"):
            c_spans.append((j1, j2))
    return merge_spans(a_spans), merge_spans(c_spans)


@dataclass(frozen=True)
class PairSpans:
    """Error-sensitive character spans of one (correct, incorrect) pair, or why it has none."""

    correct_line: list[Span] = field(default_factory=list)
    correct_edit: list[Span] = field(default_factory=list)
    incorrect_line: list[Span] = field(default_factory=list)
    incorrect_edit: list[Span] = field(default_factory=list)
    reject: str | None = None


_BLOCKS = ("body", "orelse", "finalbody", "handlers", "cases")  # where statements nest


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """Drop the leading string statement of every block (a docstring, or a bare string).

    Visits statements only, never expressions (no docstring hides in one): a fraction of
    the nodes ``ast.walk`` would visit."""
    todo = [tree]
    while todo:
        node = todo.pop()
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
        for name in _BLOCKS:
            block = getattr(node, name, None)
            if isinstance(block, list):
                todo.extend(block)
    return tree


@functools.lru_cache(maxsize=256)
def python_fingerprint(code: str) -> str | None:
    """The AST of ``code`` without its docstrings, as text; None when it does not parse.

    Cached: a row's correct code is compared with each of its variants, and each variant
    is checked by the mutation teacher and again by the variant filter (uncached, this
    was three quarters of a mutate run's time)."""
    try:
        return ast.dump(_strip_docstrings(ast.parse(code)))
    except (SyntaxError, ValueError, RecursionError):
        return None


def may_be_python(language: str) -> bool:
    """Whether a fence tag says Python, or says nothing (untagged code is tried as Python)."""
    return not language or language in PYTHON_TAGS


def _normalise(code: str, language: str) -> str:
    """Code with comments and all whitespace removed (a language-agnostic best effort)."""
    if language not in PYTHON_TAGS | {"sh", "bash", "shell", "ruby", "rb", "r", "perl"}:
        code = _C_COMMENTS.sub("", code)
    if language not in {
        "c",
        "cpp",
        "c++",
        "java",
        "javascript",
        "js",
        "ts",
        "typescript",
        "go",
        "rust",
        "rs",
        "kotlin",
        "swift",
        "csharp",
        "cs",
        "php",
    }:
        code = _HASH_COMMENTS.sub("", code)
    return _WHITESPACE.sub("", code)


def _fast_real_diff(code: str, changed: list[Span], other: str, other_changed: list[Span]) -> bool:
    """Cheap proof that a diff is real: the changed lines differ outside any comment."""
    texts = []
    for text, spans in ((code, changed), (other, other_changed)):
        blocks = [m.span() for m in _BLOCK_COMMENTS.finditer(text)]
        if any(s < be and bs < e for s, e in spans for bs, be in blocks):
            return False
        lines = "".join(text[s:e] for s, e in spans)
        texts.append(_WHITESPACE.sub("", _LINE_COMMENT.sub("", lines)))
    return texts[0] != texts[1]


def is_cosmetic(incorrect: str, correct: str, language: str = "") -> bool:
    """True when two different codes differ only in whitespace, comments or docstrings.

    Python (by fence tag, or untagged code that parses) is compared by AST, so that an
    indentation change which moves a statement counts as real. Other languages are
    compared with comments and whitespace stripped.
    """
    if may_be_python(language):
        a_tree, c_tree = python_fingerprint(incorrect), python_fingerprint(correct)
        if a_tree is not None and c_tree is not None:
            return a_tree == c_tree
    return _normalise(incorrect, language) == _normalise(correct, language)


def pair_spans(correct: str, incorrect: str, scope: DiffScope = "code") -> PairSpans:
    """All four span sets of a pair over the full response texts.

    Rejects the pair (``reject`` set, spans empty) when the diffed views are identical
    (``no-diff``), differ only cosmetically (``cosmetic-diff``), or a response is longer than
    ``MAX_RESPONSE_CHARS`` (``too-long``: bounded work per row).
    """
    if max(len(incorrect), len(correct)) > MAX_RESPONSE_CHARS:
        return PairSpans(reject=TOO_LONG)
    a_view, c_view = code_view(incorrect, scope), code_view(correct, scope)
    if a_view.text == c_view.text:
        return PairSpans(reject=NO_DIFF)
    a_line, c_line = line_spans(a_view.text, c_view.text)
    a_edit, c_edit = edit_spans(a_view.text, c_view.text)
    language = c_view.language or a_view.language
    if not _fast_real_diff(a_view.text, a_line, c_view.text, c_line) and is_cosmetic(
        a_view.text, c_view.text, language
    ):
        return PairSpans(reject=COSMETIC_DIFF)
    return PairSpans(
        correct_line=c_view.to_response(c_line),
        correct_edit=c_view.to_response(c_edit),
        incorrect_line=a_view.to_response(a_line),
        incorrect_edit=a_view.to_response(a_edit),
    )
