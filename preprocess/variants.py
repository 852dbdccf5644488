"""Turn a teacher's answer into a candidate incorrect response, or a counted reason.

The candidate is the *correct* response with its code block(s) replaced by the
teacher's, so a pair differs only where the teacher changed code: the teacher's own
prose never leaks into the incorrect side.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from fgit_preprocess.diff import code_view, is_cosmetic, may_be_python

NO_CODE = "no-code-block"
REFUSAL = "refusal"
EMPTY = "empty"
IDENTICAL = "identical"
COSMETIC = "cosmetic-diff"
UNPARSABLE = "unparsable"

_REFUSAL = re.compile(
    r"\b(I can(?:no|')t|I'm sorry|I am sorry|I won't|I will not|as an AI|"
    r"cannot (?:help|assist|comply))\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Candidate:
    """A usable incorrect response and its diffed code, or ``reason`` why not."""

    response: str | None = None
    code: str | None = None
    reason: str | None = None


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def _bare_code(correct_code: str, answer: str, correct_fenced: bool) -> bool:
    """An unfenced answer is the whole variant only when the correct response is bare code
    too; a Python reference that parses needs an answer that parses (not prose)."""
    if correct_fenced:
        return False
    return not _parses(correct_code) or _parses(answer)


def candidate(correct: str, answer: str, require_parse: bool = False) -> Candidate:
    """Check one teacher answer against the correct response (FGIT issue 3 filters)."""
    if not answer or not answer.strip():
        return Candidate(reason=EMPTY)
    answer_view, correct_view = code_view(answer), code_view(correct)
    if _REFUSAL.search(answer) and not answer_view.fenced:
        return Candidate(reason=REFUSAL)
    if not answer_view.fenced and not _bare_code(correct_view.text, answer, correct_view.fenced):
        return Candidate(reason=NO_CODE)
    code = answer_view.text
    if not code.strip():
        return Candidate(reason=EMPTY)
    # Substitute the answer's blocks into the correct response, pairwise from the first.
    blocks = [answer[t : t + n] for _, t, n in answer_view.pieces]
    response, shift = correct, 0
    for (_, start, length), block in zip(correct_view.pieces, blocks):
        response = response[: start + shift] + block + response[start + shift + length :]
        shift += len(block) - length
    variant_code = code_view(response).text
    if variant_code == correct_view.text:
        return Candidate(reason=IDENTICAL)
    language = correct_view.language or answer_view.language
    if (
        require_parse
        and may_be_python(language)
        and _parses(correct_view.text)
        and not _parses(variant_code)
    ):
        return Candidate(reason=UNPARSABLE)
    if is_cosmetic(correct_view.text, variant_code, language):
        return Candidate(reason=COSMETIC)
    return Candidate(response, variant_code)
