"""End to end with real generations: SmolLM2-135M-Instruct served over loopback HTTP."""

from __future__ import annotations

import ast
import json
import re
import threading
import zlib

import pytest

from conftest import SAMPLE, run_cli, teacher_args
from fgit_preprocess.sources import rejects_path
from loopback_server import LoopbackServer, Reply, completion


@pytest.fixture(scope="module")
def smollm2_responder(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    # The server answers from threads and sampling draws on torch's global generator: one
    # generation at a time, seeded by the prompt, so an answer never depends on arrival order
    # and a failure reproduces.
    generating = threading.Lock()

    def respond(body: dict, index: int) -> Reply:
        ids = tok.apply_chat_template(
            body["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        n = body.get("n", 1)
        seed = zlib.crc32(json.dumps(body["messages"], sort_keys=True).encode())
        with generating, torch.no_grad():
            torch.manual_seed(seed)
            gen = model.generate(
                **ids,
                do_sample=True,
                temperature=body.get("temperature", 1.0),
                max_new_tokens=body.get("max_tokens", 128),
                num_return_sequences=n,
                pad_token_id=tok.eos_token_id,
            )
        prompt_len = ids["input_ids"].shape[1]
        texts = [tok.decode(g[prompt_len:], skip_special_tokens=True) for g in gen]
        return Reply(
            200,
            completion(
                texts,
                model="smollm2-135m-instruct",
                prompt_tokens=prompt_len,
                completion_tokens=int(gen.shape[1] - prompt_len),
            ),
        )

    return respond


@pytest.mark.slow
def test_run_with_real_generations(tmp_path, smollm2_responder):
    rows = [json.loads(line) for line in SAMPLE.open()][:3]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    with LoopbackServer(smollm2_responder, threaded=True) as srv:
        proc = run_cli(
            *teacher_args(data, out, "openai/smollm2-135m-instruct"),
            "--api-base",
            srv.url,
            "--num-variants",
            "2",
            "--max-tokens",
            "96",
            "--temperature",
            "0.8",
            "--similarity",
            "levenshtein",
            env={"OPENAI_API_KEY": "sk-local"},
            ok=False,
        )
    assert len(srv.answered) == 3 and all(b["n"] == 2 for b in srv.answered)
    rejected = [json.loads(line) for line in rejects_path(out).open()]
    assert all(r["reason"] and r["detail"] for r in rejected)
    # A 135M teacher may write no usable variant at all: then the run is refused (exit 2),
    # nothing is published, and the error still accounts for every answer.
    if proc.returncode == 2:
        assert not out.exists() and len(rejected) == 3, proc.stderr
        assert {r["reason"] for r in rejected} == {"no-valid-variant"}
        said = re.search(r"variant rejects (\{.*?\})", proc.stderr)
        assert said, proc.stderr
        variant_rejects, valid = ast.literal_eval(said.group(1)), 0
    else:
        assert proc.returncode == 0, proc.stderr[-4000:]
        report = json.loads((out / "report.json").read_text())
        assert report["rows_in"] == 3 and report["rows_out"] + report["rejected"] == 3
        assert len(rejected) == report["rejected"]
        variant_rejects, valid = report["variant_rejects_by_reason"], report["valid_variants"]
    # Every one of the 3 x 2 answers is either a counted variant reject or a valid variant.
    assert sum(variant_rejects.values()) + valid == 6, (variant_rejects, valid)
    print(f"\nSmolLM2 teacher: exit {proc.returncode}, {valid}/6 valid; rejects {variant_rejects}")
