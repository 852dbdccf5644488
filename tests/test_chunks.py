"""--chunk-rows: a run streamed in chunks writes what the whole run writes, and resumes."""

from __future__ import annotations

import json

import datasets
import pytest
from test_teacher import ENV, ok, write_rows

from conftest import ROOT, run_cli, teacher_args
from fgit_preprocess.chunks import ChunkedOutput
from fgit_preprocess.sources import rejects_path
from loopback_server import LoopbackServer

RUN = ["--teacher", "mutate", "--similarity", "levenshtein", "--num-variants", "3"]


def outputs(folder):
    """Everything a run wrote: rows, rejects (in file order) and report (less its path)."""
    report = json.loads((folder / "report.json").read_text())
    report.pop("rejects_file")
    rejects = [json.loads(line) for line in rejects_path(folder).open()]
    return datasets.load_from_disk(str(folder)).to_list(), rejects, report


def test_run_in_chunks_writes_what_the_whole_run_writes(tmp_path, messy_input):
    whole, chunked = tmp_path / "whole", tmp_path / "chunked"
    run_cli("run", "-i", messy_input, "-o", whole, *RUN)
    run_cli("run", "-i", messy_input, "-o", chunked, *RUN, "--chunk-rows", "4")
    (rows, rejects, report), want = outputs(chunked), outputs(whole)
    mean = report.pop("similarity_mean")  # a mean of chunk means: the same up to rounding
    assert mean == pytest.approx(want[2].pop("similarity_mean"), rel=1e-12)
    assert rows == want[0] and report == want[2]
    key = lambda r: r["fgit_input_line"]  # noqa: E731
    assert sorted(rejects, key=key) == sorted(want[1], key=key)
    assert report["rows_in"] == 26 and len(rows) == report["rows_out"] > 20
    assert not list(tmp_path.glob(".*chunks"))  # the work folder goes once joined
    state = json.loads((chunked / "state.json").read_text())
    assert len(state["_data_files"]) == 7  # one Arrow file per chunk, linked, not rewritten


def test_masks_in_chunks_writes_what_the_whole_run_writes(tmp_path):
    source = ROOT / "examples" / "data" / "sample_pairs.jsonl"
    whole, chunked = tmp_path / "whole", tmp_path / "chunked"
    run_cli("masks", "-i", source, "-o", whole)
    run_cli("masks", "-i", source, "-o", chunked, "--chunk-rows", "3")
    assert outputs(chunked) == outputs(whole)


def test_a_column_null_in_one_chunk_takes_the_type_of_the_others(tmp_path):
    source = ROOT / "examples" / "data" / "sample_pairs.jsonl"
    rows = [json.loads(line) for line in source.open()][:6]
    data = tmp_path / "in.jsonl"
    data.write_text(
        "".join(
            json.dumps({**r, "note": None if i < 3 else f"n{i}"}) + "\n" for i, r in enumerate(rows)
        )
    )
    run_cli("masks", "-i", data, "-o", tmp_path / "out", "--chunk-rows", "3")
    out = datasets.load_from_disk(str(tmp_path / "out"))
    assert out.features["note"] == datasets.Value("string")
    assert out["note"] == [None, None, None, "n3", "n4", "n5"]


def test_finished_chunks_are_kept_only_for_the_same_settings(tmp_path):
    out = tmp_path / "out"
    first = ChunkedOutput(out, {"seed": 0}, rows=5, chunk_rows=2)
    assert [(c.start, c.stop) for c in first.chunks] == [(0, 2), (2, 4), (4, 5)]
    first.write(first.chunks[0], datasets.Dataset.from_dict({}), [], [], {"teacher": {}})
    again = ChunkedOutput(out, {"seed": 0}, rows=5, chunk_rows=2)
    assert [c.index for c in again.pending()] == [1, 2]
    other = ChunkedOutput(out, {"seed": 1}, rows=5, chunk_rows=2)
    assert [c.index for c in other.pending()] == [0, 1, 2]  # other settings: start over
    resized = ChunkedOutput(out, {"seed": 1}, rows=5, chunk_rows=3)
    assert [c.index for c in resized.pending()] == [0, 1]


def test_a_spent_budget_keeps_finished_chunks_and_the_rerun_sends_only_the_rest(tmp_path):
    data = write_rows(tmp_path / "in.jsonl", 8)
    reference, out = tmp_path / "reference", tmp_path / "out"

    def args(folder, *extra):
        return teacher_args(
            data, folder, "openai/gpt-4o-mini", "--api-base", srv.url, "--similarity",
            "levenshtein", "--num-variants", "3", "--concurrency", "1", *extra,
        )  # fmt: skip

    with LoopbackServer(ok) as srv:
        run_cli(*args(reference), env=ENV)
    with LoopbackServer(ok) as srv:
        proc = run_cli(*args(out, "--chunk-rows", "2", "--max-cost", "0.0003"), ok=False, env=ENV)
        spent = len(srv.requests)
        assert proc.returncode == 3 and 2 <= spent < 8, proc.stderr
        assert f"{8 - spent} requests not sent" in proc.stderr
        assert "finished chunks are kept" in proc.stderr and not out.exists()
        run_cli(*args(out, "--chunk-rows", "2", "--max-cost", "1"), env=ENV)
        assert len(srv.requests) == 8  # nothing answered before was asked again
    got, want = outputs(out), outputs(reference)
    assert got[0] == want[0] and got[1] == want[1]
    assert got[2]["teacher"]["cost_usd"] == pytest.approx(want[2]["teacher"]["cost_usd"])


def _file_pages_mb() -> float:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["RssFile"].split()[0]) / 1024


def test_read_pages_of_mapped_arrow_files_are_handed_back(tmp_path):
    import pyarrow as pa
    import pyarrow.compute as pc

    from fgit_preprocess.chunks import release_mapped_arrow

    path = tmp_path / "t.arrow"
    table = pa.table({"x": ["a" * 1000] * 60_000})
    with pa.ipc.new_stream(str(path), table.schema) as writer:
        writer.write_table(table)
    del table
    column = datasets.Dataset.from_file(str(path)).data.table.column("x")
    before = _file_pages_mb()
    assert pc.sum(pc.utf8_length(column)).as_py() == 60_000_000  # reads all 60 MB
    assert _file_pages_mb() > before + 40
    release_mapped_arrow()
    assert _file_pages_mb() < before + 10
    assert pc.sum(pc.utf8_length(column)).as_py() == 60_000_000  # read back from the file
