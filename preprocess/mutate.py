"""``--teacher mutate``: an offline, deterministic teacher that injects realistic faults.

Python code gets one AST-located fault per variant, written back at its exact source
position so everything else stays byte-identical (a near miss, not a reformat):
flipped/weakened comparisons, off-by-one constants and ``range`` bounds, swapped
arithmetic or boolean operators, negated conditions, swapped arguments, a wrong return
value, a dropped statement or guard, a wrong index or slice. Other languages get a
token-level fallback (operators and integer literals). Every variant parses when the
original does and differs semantically (its AST changes).
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from fgit_preprocess.diff import code_view, is_cosmetic, may_be_python, python_fingerprint

COMPARE_SWAPS = {
    "<": "<=",
    "<=": "<",
    ">": ">=",
    ">=": ">",
    "==": "!=",
    "!=": "==",
    "in": "not in",
    "not in": "in",
    "is": "is not",
    "is not": "is",
}
ARITH_SWAPS = {"+": "-", "-": "+", "*": "+", "/": "//", "//": "/", "%": "//", "**": "*"}
BOOL_SWAPS = {"and": "or", "or": "and"}
_COMPARE_RE = re.compile(r"<=|>=|==|!=|<|>|\bnot\s+in\b|\bis\s+not\b|\bin\b|\bis\b")
_ARITH_RE = re.compile(r"\*\*|//|[-+*/%]")
_BOOL_RE = re.compile(r"\band\b|\bor\b")
_TOKEN_RE = re.compile(
    r"<=|>=|==|!=|&&|\|\||(?<![<>=!-])[<>](?![=<>])|(?<![+\-=])[+\-](?![+\-=>])|\b\d+\b"
)
_TOKEN_SWAPS = {
    **{k: v for k, v in COMPARE_SWAPS.items() if not k.isalpha() and " " not in k},
    "&&": "||",
    "||": "&&",
    "+": "-",
    "-": "+",
}


@dataclass(frozen=True)
class Mutation:
    """Replace bytes ``[start, end)`` of the UTF-8 source with ``text``."""

    kind: str
    start: int
    end: int
    text: str

    def apply(self, source: bytes) -> bytes:
        return source[: self.start] + self.text.encode() + source[self.end :]


class _Sites:
    """Byte offsets of AST nodes in a source (AST columns are UTF-8 byte offsets)."""

    def __init__(self, source: bytes):
        self.src = source
        self.line_at = [0]
        for line in source.splitlines(keepends=True):
            self.line_at.append(self.line_at[-1] + len(line))

    def start(self, node: ast.AST) -> int:
        return self.line_at[node.lineno - 1] + node.col_offset

    def end(self, node: ast.AST) -> int:
        return self.line_at[node.end_lineno - 1] + node.end_col_offset

    def text(self, node: ast.AST) -> str:
        return self.src[self.start(node) : self.end(node)].decode()

    def op_between(
        self, left: ast.AST, right: ast.AST, pattern: re.Pattern, swaps: dict[str, str], kind: str
    ) -> Iterator[Mutation]:
        lo, hi = self.end(left), self.start(right)
        gap = self.src[lo:hi].decode()
        match = pattern.search(gap)
        if match:
            op = " ".join(match.group().split())
            if op in swaps:
                yield Mutation(
                    kind,
                    lo + len(gap[: match.start()].encode()),
                    lo + len(gap[: match.end()].encode()),
                    swaps[op],
                )


_SIMPLE = (ast.Name, ast.Attribute, ast.Call, ast.Subscript, ast.Constant)


def _plus_minus(sites: _Sites, node: ast.AST, kind: str) -> Iterator[Mutation]:
    text = sites.text(node) if isinstance(node, _SIMPLE) else f"({sites.text(node)})"
    for delta in (" + 1", " - 1"):
        yield Mutation(kind, sites.start(node), sites.end(node), text + delta)


def _is_guard(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.If)
        and not stmt.orelse
        and isinstance(stmt.body[-1], (ast.Return, ast.Raise, ast.Continue, ast.Break))
    )


def python_mutations(source: bytes, tree: ast.AST) -> list[Mutation]:
    """Every single-site fault this module knows for a parsed Python source."""
    sites = _Sites(source)
    out: list[Mutation] = []
    local_names: dict[ast.AST, set[str]] = {}
    for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        local_names[fn] = {a.arg for a in fn.args.args} | {
            t.id
            for n in ast.walk(fn)
            if isinstance(n, (ast.Assign, ast.AugAssign, ast.For))
            for t in ast.walk(getattr(n, "target", None) or n.targets[0])
            if isinstance(t, ast.Name)
        }
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for left, right in zip([node.left, *node.comparators], node.comparators):
                out += sites.op_between(left, right, _COMPARE_RE, COMPARE_SWAPS, "comparison")
        elif isinstance(node, ast.BinOp):
            out += sites.op_between(node.left, node.right, _ARITH_RE, ARITH_SWAPS, "arithmetic")
        elif isinstance(node, ast.AugAssign):
            out += sites.op_between(node.target, node.value, _ARITH_RE, ARITH_SWAPS, "arithmetic")
        elif isinstance(node, ast.BoolOp):
            for left, right in zip(node.values, node.values[1:]):
                out += sites.op_between(left, right, _BOOL_RE, BOOL_SWAPS, "boolean")
        elif (
            isinstance(node, ast.Constant)
            and type(node.value) is int
            and sites.text(node).isdigit()
        ):
            for value in {node.value + 1, max(node.value - 1, 0)} - {node.value}:
                out.append(Mutation("off-by-one", sites.start(node), sites.end(node), str(value)))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "range"
        ):
            stop = node.args[1] if len(node.args) >= 2 else (node.args[0] if node.args else None)
            if (
                stop is not None
                and not isinstance(stop, ast.Constant)
                and not (isinstance(stop, ast.BinOp) and isinstance(stop.right, ast.Constant))
            ):
                out += _plus_minus(sites, stop, "range-bound")
        if (
            isinstance(node, ast.Call)
            and len(node.args) >= 2
            and not any(isinstance(a, ast.Starred) for a in node.args[:2])
        ):
            a, b = node.args[:2]
            between = sites.src[sites.end(a) : sites.start(b)].decode()
            out.append(
                Mutation(
                    "swapped-arguments",
                    sites.start(a),
                    sites.end(b),
                    sites.text(b) + between + sites.text(a),
                )
            )
        if isinstance(node, (ast.If, ast.While)):
            test = node.test
            if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
                out.append(
                    Mutation(
                        "negated-condition",
                        sites.start(test),
                        sites.end(test),
                        sites.text(test.operand),
                    )
                )
            else:
                text = (
                    sites.text(test)
                    if isinstance(test, (*_SIMPLE, ast.Compare))
                    else f"({sites.text(test)})"
                )
                out.append(
                    Mutation("negated-condition", sites.start(test), sites.end(test), f"not {text}")
                )
        if isinstance(node, ast.Subscript):
            sl = node.slice
            if isinstance(sl, (ast.Name, ast.Attribute)):
                out += _plus_minus(sites, sl, "wrong-index")
            elif isinstance(sl, ast.Slice) and sl.step is None:
                for bound in (sl.lower, sl.upper):
                    if isinstance(bound, (ast.Name, ast.Attribute)):
                        out += _plus_minus(sites, bound, "wrong-slice")
                if sl.lower is not None and sl.upper is None:
                    out.append(
                        Mutation("wrong-slice", sites.end(sl.lower), sites.end(node) - 1, ":-1")
                    )
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names = local_names.get(node, set())
            for ret in (
                n for n in ast.walk(node) if isinstance(n, ast.Return) and n.value is not None
            ):
                if isinstance(ret.value, ast.Name):
                    for other in sorted(names - {ret.value.id}):
                        out.append(
                            Mutation(
                                "wrong-return", sites.start(ret.value), sites.end(ret.value), other
                            )
                        )
                elif isinstance(ret.value, ast.Constant) and isinstance(ret.value.value, bool):
                    out.append(
                        Mutation(
                            "wrong-return",
                            sites.start(ret.value),
                            sites.end(ret.value),
                            str(not ret.value.value),
                        )
                    )
        for body in (getattr(node, "body", None), getattr(node, "orelse", None)):
            if not isinstance(body, list) or len(body) < 2:
                continue
            for stmt in body:
                droppable = (
                    isinstance(stmt, (ast.Assign, ast.AugAssign, ast.Continue, ast.Break))
                    or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call))
                    or _is_guard(stmt)
                )
                first = sites.line_at[stmt.lineno - 1]
                if droppable and not sites.src[first : sites.start(stmt)].strip():
                    last = sites.line_at[stmt.end_lineno]
                    if not sites.src[sites.end(stmt) : last].strip():
                        out.append(Mutation("dropped-statement", first, last, ""))
    return out


def token_mutations(source: bytes) -> list[Mutation]:
    """Fallback for code that is not Python: swap an operator or nudge an integer."""
    text = source.decode()
    out = []
    for m in _TOKEN_RE.finditer(text):
        tok = m.group()
        start, end = len(text[: m.start()].encode()), len(text[: m.end()].encode())
        if tok.isdigit():
            out += [
                Mutation("off-by-one", start, end, str(v))
                for v in {int(tok) + 1, max(int(tok) - 1, 0)} - {int(tok)}
            ]
        elif tok in _TOKEN_SWAPS:
            out.append(Mutation("operator", start, end, _TOKEN_SWAPS[tok]))
    return out


def mutate_code(code: str, k: int, seed: int = 0, language: str = "") -> list[str]:
    """Up to ``k`` distinct faulty versions of ``code``, deterministic for ``seed``."""
    source = code.encode()
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        tree = None
    python = tree is not None and may_be_python(language)
    candidates = python_mutations(source, tree) if python else token_mutations(source)
    random.Random(f"{seed}:{code}").shuffle(candidates)
    out: list[str] = []
    for mutation in candidates:
        try:
            variant = mutation.apply(source).decode()
        except UnicodeDecodeError:
            continue
        if variant == code or variant in out:
            continue
        if python and python_fingerprint(variant) is None:  # it must still parse
            continue
        if is_cosmetic(code, variant, "python" if python else language):
            continue
        out.append(variant)
        if len(out) == k:
            break
    return out


def mutate_response(response: str, k: int, seed: int = 0) -> list[str]:
    """The response with its (first) code block replaced by each faulty variant."""
    view = code_view(response)
    _, start, length = view.pieces[0]
    code = response[start : start + length]
    return [
        response[:start] + v + response[start + length :]
        for v in mutate_code(code, k, seed, view.language)
    ]
