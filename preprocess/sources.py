"""Reading instruction datasets and writing FGIT's JSON side files (the I/O edge).

Rows are normalised to ``prompt`` (a string) or ``messages`` (chat turns before the
answer), plus ``correct`` and, for already-paired data, ``incorrect``. Every other
input column is carried through unchanged.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from axolotl_fgit.contract import DEFAULT_COLUMNS as COLS

PROMPT_CANDIDATES = ("prompt", "instruction", "question", "problem", "query")
CORRECT_CANDIDATES = ("correct", "response", "output", "solution", "completion", "answer")
MESSAGES_CANDIDATES = ("messages", "conversations", "conversation")
REPORT_FILE = "report.json"
SHARD_PARAM = "shard"  # the parameter that may differ between the shards of one job
REJECTS_SUFFIX = ".rejects.jsonl"


class InputError(ValueError):
    """A dataset that cannot be read as asked; the message says what to change."""


INPUT_LINE = "fgit_input_line"  # 1-based JSONL line (or row number) of every row, kept
# A rejected row is carried as the row plus these two columns until the rejects file.
REJECT, REJECT_DETAIL = "fgit_reject", "fgit_reject_detail"


def _jsonl_table(path: Path):
    """The file through datasets' JSON loader (Arrow, memory-mapped: fast, and cheap for
    ``--num-proc`` workers) when every line is a clean row; None sends it to the
    line-by-line reader, which rejects the bad lines one by one."""
    import datasets

    try:
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception:  # any malformed line fails the whole load; read line by line instead
        return None
    with path.open("rb") as fh:
        lines = sum(1 for _ in fh)
    if len(ds) != lines or len(ds) == 0:  # blank lines would shift the line numbers
        return None
    return ds.add_column(INPUT_LINE, list(range(1, lines + 1)))


def _jsonl_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, dict[str, Any] | None]]:
    """``(line number, row, None)`` for every JSONL line that is a row, ``(number, None,
    reject)`` for one that is not: not UTF-8, not JSON, not an object, or text that cannot
    be stored (lone surrogates). Blank lines are skipped."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
                row = json.loads(text)
                if not isinstance(row, dict):
                    raise ValueError(f"a JSON {type(row).__name__}, not an object")
                if "\\u" in text:  # an escaped lone surrogate cannot be stored as UTF-8
                    json.dumps(row, ensure_ascii=False).encode("utf-8")
            except UnicodeError as err:
                yield number, None, _bad_line(number, "bad-encoding", err, raw)
                continue
            except ValueError as err:
                yield number, None, _bad_line(number, "bad-json", err, raw)
                continue
            yield number, row, None


_TYPE_NAMES = {
    "str": "string",
    "int": "integer",
    "float": "number",
    "list": "list",
    "dict": "object",
    "bool": "boolean",
}


def _jsonl_cleaned(path: Path, clean: Path) -> list[dict[str, Any]]:
    """Write the usable rows of ``path`` to ``clean`` (each with its line number) and
    return a reject record for every other line, reading the file twice and holding no
    row: once to learn each column's usual type (Arrow needs one type per column), once to
    reject the lines that are not rows or hold another type (the reason names the column)."""
    kinds: dict[str, Counter] = {}
    for _, row, _ in _jsonl_lines(path):
        for key, value in (row or {}).items():
            if value is not None:
                kinds.setdefault(key, Counter())[type(value).__name__] += 1
    usual = {key: counts.most_common(1)[0][0] for key, counts in kinds.items()}
    bad = []
    with clean.open("w", encoding="utf-8") as out:
        for number, row, reject in _jsonl_lines(path):
            if reject is not None:
                bad.append(reject)
                continue
            odd = next(
                (k for k, v in row.items() if v is not None and type(v).__name__ != usual[k]), None
            )
            if odd is None:
                out.write(json.dumps({**row, INPUT_LINE: number}) + "\n")
                continue
            name = _TYPE_NAMES.get(usual[odd], usual[odd])
            bad.append(
                {
                    REJECT: f"bad-{odd}",
                    INPUT_LINE: number,
                    REJECT_DETAIL: f"line {number}: {odd} is "
                    f"{type(row[odd]).__name__}, not a {name} like the other rows",
                    "raw": json.dumps(row, default=str)[:300],
                }
            )
    return bad


def _bad_line(number: int, reason: str, err: Exception, raw: bytes) -> dict[str, Any]:
    return {
        REJECT: reason,
        REJECT_DETAIL: f"line {number}: {err}",
        INPUT_LINE: number,
        "raw": raw[:300].decode("utf-8", "replace"),
    }


def load_rows(path: str, split: str = "train"):
    """Load JSONL/JSON/Parquet/Arrow (file or ``save_to_disk`` dir) or a Hub dataset.

    Returns ``(dataset, bad_lines)``: every row carries ``fgit_input_line`` (its JSONL line
    or row number), and ``bad_lines`` are reject records for JSONL lines that are not rows.
    """
    import datasets

    p = Path(path)
    bad: list[dict[str, Any]] = []
    if p.is_dir():
        if (p / "state.json").exists() or (p / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise InputError(f"{path} has splits {list(ds)}; pick one with --split")
                ds = ds[split]
        elif not any(p.iterdir()):
            raise InputError(
                f"{path} is an empty directory; pass a JSONL, JSON, Parquet or "
                "Arrow file, or a datasets.save_to_disk directory"
            )
        else:
            ds = _guarded(lambda: datasets.load_dataset(str(p), split=split), path)
    elif p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            fast = _jsonl_table(p)
            if fast is not None:
                return fast, bad
            with tempfile.TemporaryDirectory() as tmp:
                clean = Path(tmp) / "rows.jsonl"
                bad = _jsonl_cleaned(p, clean)
                if clean.stat().st_size == 0:
                    raise InputError(
                        f"{path} has no readable rows ({len(bad)} bad lines)"
                        + (f"; first: {bad[0][REJECT_DETAIL]}" if bad else "")
                    )
                ds = _guarded(
                    lambda: datasets.load_dataset("json", data_files=str(clean), split="train"),
                    path,
                )
            return ds, bad
        loaders = {".json": "json", ".parquet": "parquet"}
        if suffix in loaders:
            ds = _guarded(
                lambda: datasets.load_dataset(loaders[suffix], data_files=str(p), split="train"),
                path,
            )
        elif suffix == ".arrow":
            ds = _guarded(lambda: datasets.Dataset.from_file(str(p)), path)
        else:
            raise InputError(
                f"{path}: unknown file type {suffix!r}; use .jsonl, .json, "
                ".parquet, .arrow or a save_to_disk directory"
            )
    elif path.startswith((".", "/")) or path.count("/") > 1:
        raise InputError(f"{path}: no such file or directory")
    else:
        ds = _guarded(
            lambda: datasets.load_dataset(path, split=split),
            path,
            "is not a local file and could not be loaded from the Hugging Face Hub",
        )
    if len(ds) == 0:
        raise InputError(f"{path} has no rows")
    if INPUT_LINE not in ds.column_names:
        ds = ds.add_column(INPUT_LINE, list(range(1, len(ds) + 1)))
    return ds, bad


def _guarded(load, path: str, what: str = "cannot be read"):
    """Run a datasets loader; its many error types become one InputError that says why."""
    try:
        return load()
    except InputError:
        raise
    except Exception as exc:  # datasets/pyarrow/the Hub raise many types; say what was tried
        raise InputError(f"{path} {what} ({type(exc).__name__}: {str(exc)[:500]})") from exc


@dataclass(frozen=True)
class Fields:
    """Which input columns hold the prompt, the correct and the incorrect response."""

    prompt: str | None  # a plain-text prompt column, or None for chat rows
    messages: str | None  # a chat column (list of {role, content}), or None
    correct: str | None  # None: the last assistant turn of ``messages``
    incorrect: str | None = None
    input: str | None = None  # optional Alpaca-style "input" appended to the prompt

    def consumed(self) -> set[str]:
        """The input columns these fields read (every other column is carried through)."""
        return {
            c for c in (self.prompt, self.messages, self.correct, self.incorrect, self.input) if c
        }


def _pick(
    columns: Iterable[str],
    given: str | None,
    candidates: tuple[str, ...],
    flag: str,
    what: str,
    required: bool,
) -> str | None:
    cols = list(columns)
    if given is not None:
        if given not in cols:
            raise InputError(
                f"{flag} {given!r} is not a column; available columns: {', '.join(cols)}"
            )
        return given
    found = next((c for c in candidates if c in cols), None)
    if found is None and required:
        raise InputError(
            f"no {what} column found (looked for {', '.join(candidates)}); "
            f"pass {flag}. Available columns: {', '.join(cols)}"
        )
    return found


def resolve_fields(
    columns: Iterable[str],
    prompt: str | None = None,
    correct: str | None = None,
    incorrect: str | None = None,
    messages: str | None = None,
    paired: bool = False,
) -> Fields:
    """Name the columns to use, auto-detecting common names; errors list what exists."""
    cols = list(columns)
    chat = messages is not None or (
        prompt is None
        and not any(c in cols for c in PROMPT_CANDIDATES)
        and any(c in cols for c in MESSAGES_CANDIDATES)
    )
    msg = (
        _pick(cols, messages, MESSAGES_CANDIDATES, "--messages-field", "chat", True)
        if chat
        else None
    )
    prompt_col = (
        None if chat else _pick(cols, prompt, PROMPT_CANDIDATES, "--prompt-field", "prompt", True)
    )
    correct_col = _pick(
        cols, correct, CORRECT_CANDIDATES, "--correct-field", "correct-response", msg is None
    )
    incorrect_col = _pick(
        cols,
        incorrect,
        ("incorrect", "rejected"),
        "--incorrect-field",
        "incorrect-response",
        paired,
    )
    input_col = "input" if prompt_col and "input" in cols and prompt_col != "input" else None
    return Fields(prompt_col, msg, correct_col, incorrect_col, input_col)


class RowError(ValueError):
    """A row that cannot be used; ``reason`` is the counted rejection reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _content(turn: Any) -> str:
    if isinstance(turn, Mapping):
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if isinstance(role, str) and isinstance(content, str):
            return content
    raise RowError("bad-messages", f"chat turn {turn!r} lacks string role/content")


def _turns(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RowError("bad-messages", "messages is not a non-empty list of turns")
    out = []
    for turn in messages:
        content = _content(turn)
        role = turn.get("role", turn.get("from"))
        out.append(
            {"role": {"human": "user", "gpt": "assistant"}.get(role, role), "content": content}
        )
    return out


def _string(row: Mapping[str, Any], column: str, reason: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise RowError(reason, f"{column} is {type(value).__name__}, not a string")
    if not value.strip():
        raise RowError(reason, f"{column} is empty")
    return value


def normalise_row(row: Mapping[str, Any], fields: Fields) -> dict[str, Any]:
    """``{prompt|messages, correct[, incorrect]}`` from one input row, or ``RowError``."""
    out: dict[str, Any] = {}
    if fields.messages is not None:
        turns = _turns(row.get(fields.messages))
        if fields.correct is None:
            if turns[-1]["role"] != "assistant":
                raise RowError(
                    "bad-messages",
                    "last chat turn is not the assistant's answer and no --correct-field was given",
                )
            turns, out[COLS.correct] = turns[:-1], turns[-1]["content"]
        elif turns[-1]["role"] == "assistant":
            raise RowError(
                "bad-messages",
                "chat ends with an assistant turn although "
                f"{fields.correct!r} holds the answer; drop that turn",
            )
        if not turns:
            raise RowError("bad-messages", "no prompt turns before the answer")
        out[COLS.messages] = turns
    else:
        prompt = _string(row, fields.prompt, "bad-prompt")
        extra = row.get(fields.input) if fields.input else None
        out[COLS.prompt] = (
            f"{prompt}\n\n{extra}" if isinstance(extra, str) and extra.strip() else prompt
        )
    if fields.correct is not None:
        out[COLS.correct] = _string(row, fields.correct, "bad-correct")
    elif not out[COLS.correct].strip():
        raise RowError("bad-correct", "the assistant answer is empty")
    if fields.incorrect is not None:
        out[COLS.incorrect] = _string(row, fields.incorrect, "bad-incorrect")
    return out


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically, so a crash never leaves a half-written report."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def rejects_path(output: Path) -> Path:
    """Rejected rows live next to the output directory: ``<output>.rejects.jsonl``."""
    return output.with_name(output.name + REJECTS_SUFFIX)
