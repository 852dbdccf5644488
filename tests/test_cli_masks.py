"""`fgit-preprocess masks` / `inspect` as a user runs them: real files, real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

import datasets

from axolotl_fgit.contract import DEFAULT_COLUMNS
from conftest import SAMPLE_PAIRS, TOKENIZER_DIR, run_cli
from fgit_preprocess.sources import rejects_path

SPAN_COLUMNS = DEFAULT_COLUMNS.spans

CLI = [sys.executable, "-m", "fgit_preprocess"]


def test_help_is_fast_and_lists_commands():
    proc = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "masks" in proc.stdout and "inspect" in proc.stdout
    heavy = "('torch', 'datasets', 'transformers', 'litellm')"
    code = f"import sys, fgit_preprocess.cli; sys.exit(any(m in sys.modules for m in {heavy}))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, (
        "cli imports heavy libraries eagerly"
    )


def test_masks_on_jsonl_writes_arrow_report_and_rejects(tmp_path):
    out = tmp_path / "pairs"
    run_cli(
        "masks",
        "--input",
        SAMPLE_PAIRS,
        "--output",
        out,
        "--tokenizer",
        TOKENIZER_DIR,
        "--num-proc",
        "2",
    )
    ds = datasets.load_from_disk(str(out))
    n_in = sum(1 for _ in SAMPLE_PAIRS.open())
    report = json.loads((out / "report.json").read_text())
    assert report["rows_in"] == n_in and report["rows_out"] == len(ds) == n_in - 2
    assert report["rejects_by_reason"] == {"cosmetic-diff": 1, "no-diff": 1}
    rejects = [json.loads(line) for line in rejects_path(out).open()]
    assert sorted(r["reason"] for r in rejects) == ["cosmetic-diff", "no-diff"]
    assert all(r["correct"] and r["incorrect"] for r in rejects)  # the row itself is kept
    params = json.loads((out / "fgit_params.json").read_text())
    assert params["diff_scope"] == "code" and params["tokenizer"] == str(TOKENIZER_DIR)
    for col in (
        "prompt",
        "correct",
        "incorrect",
        *SPAN_COLUMNS,
        "correct_hybrid",
        "incorrect_hybrid",
    ):
        assert col in ds.column_names
    for row in ds:
        for side in ("correct", "incorrect"):
            text = row[side]
            for s, e in row[f"{side}_line_spans"] + row[f"{side}_edit_spans"]:
                assert 0 <= s < e <= len(text)
        assert set(row["correct_hybrid"]) <= {0, 1, 2} and max(row["correct_hybrid"]) >= 1


def test_arrow_round_trip_and_chat_rows(tmp_path):
    rows = [json.loads(line) for line in SAMPLE_PAIRS.open()][:4]
    chat = datasets.Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": r["instruction"]},
                    {"role": "assistant", "content": r["correct"]},
                ],
                "rejected": r["incorrect"],
                "source": f"row{i}",
            }
            for i, r in enumerate(rows)
        ]
    )
    src = tmp_path / "chat_arrow"
    chat.save_to_disk(str(src))
    out = tmp_path / "out"
    run_cli("masks", "-i", src, "-o", out)
    ds = datasets.load_from_disk(str(out))
    assert ds.column_names[:1] == ["messages"] and "source" in ds.column_names  # carried through
    assert [m["role"] for m in ds[0]["messages"]] == ["system", "user"]
    assert ds["correct"] == [r["correct"] for r in rows]
    again = tmp_path / "again"  # our own output is a valid input: spans come out the same
    run_cli("masks", "-i", out, "-o", again)
    ds2 = datasets.load_from_disk(str(again))
    for col in SPAN_COLUMNS:
        assert ds2[col] == ds[col]


def test_parquet_input_and_custom_fields(tmp_path):
    rows = [json.loads(line) for line in SAMPLE_PAIRS.open()]
    data = datasets.Dataset.from_list(
        [{"q": r["instruction"], "good": r["correct"], "bad": r["incorrect"]} for r in rows]
    )
    path = tmp_path / "in.parquet"
    data.to_parquet(str(path))
    out = tmp_path / "out"
    run_cli(
        "masks",
        "-i",
        path,
        "-o",
        out,
        "--prompt-field",
        "q",
        "--correct-field",
        "good",
        "--incorrect-field",
        "bad",
        "--diff-scope",
        "response",
    )
    report = json.loads((out / "report.json").read_text())
    assert report["rows_in"] == len(rows)
    assert report["rejects_by_reason"] == {
        "cosmetic-diff": 1
    }  # prose change is real in response scope


def test_missing_field_names_it_and_lists_columns(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"instruction": "x", "answer": "y"}) + "\n")
    proc = run_cli("masks", "-i", path, "-o", tmp_path / "o", ok=False)
    assert proc.returncode == 2
    assert "incorrect-response" in proc.stderr and "--incorrect-field" in proc.stderr
    assert "instruction, answer" in proc.stderr
    proc = run_cli("masks", "-i", path, "-o", tmp_path / "o", "--correct-field", "nope", ok=False)
    assert "'nope' is not a column" in proc.stderr


def test_bad_rows_are_rejected_with_reasons_not_dropped(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = [
        {"prompt": "p", "correct": "x = 1\n", "incorrect": "x = 2\n"},
        {"prompt": "p", "correct": 5, "incorrect": "x = 2\n"},
        {"prompt": "p", "correct": "x = 1\n", "incorrect": ""},
        {"prompt": None, "correct": "x = 1\n", "incorrect": "x = 2\n"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "o"
    run_cli("masks", "-i", path, "-o", out)
    report = json.loads((out / "report.json").read_text())
    assert report["rows_out"] == 1
    assert report["rejects_by_reason"] == {"bad-correct": 1, "bad-incorrect": 1, "bad-prompt": 1}
    details = [json.loads(line)["detail"] for line in rejects_path(out).open()]
    assert any("not a string" in d for d in details) and any("empty" in d for d in details)


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "o"
    run_cli("masks", "-i", SAMPLE_PAIRS, "-o", out)
    proc = run_cli("masks", "-i", SAMPLE_PAIRS, "-o", out, ok=False)
    assert "--overwrite" in proc.stderr
    run_cli("masks", "-i", SAMPLE_PAIRS, "-o", out, "--overwrite")


def test_inspect_renders_highlighted_pairs(tmp_path):
    out = tmp_path / "o"
    run_cli("masks", "-i", SAMPLE_PAIRS, "-o", out)
    page = tmp_path / "page.html"
    proc = run_cli("inspect", "-i", out, "--html", page, "--rows", "0,1")
    html = page.read_text()
    assert html.count("<h2>Row") == 2 and 'class="edit"' in html and 'class="line"' in html
    assert "no-diff" in html and "cosmetic-diff" in html and "rows 12" in proc.stdout
    assert run_cli("inspect", "-i", out, "--html", page, "--rows", "99", ok=False).returncode == 2
