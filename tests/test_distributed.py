"""Multi-process FGIT: 2 CPU processes on gloo, launched by torchrun, under DDP and
torch FSDP2, must match 1 process on the same global batch.

Axolotl 0.19's own multi-process path cannot start on a CPU-only machine (it maps each
rank to ``device_map={"": LOCAL_RANK}``, a CUDA index, and FSDP builds a CUDA device
mesh), so this drives the same engines directly; ``benchmarks/gpu_fsdp_check.sh`` runs
the Axolotl FSDP2 path on GPUs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SAMPLE, run_cli

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "pairs"
    run_cli("run", "-i", SAMPLE, "-o", out, "--teacher", "mutate", "--similarity", "levenshtein")
    return out


def launch(tmp_path, smollm2_dir, pairs, wrap: str, nproc: int, detach: bool, lora: bool) -> dict:
    out = tmp_path / f"{wrap}-{nproc}-{detach}-{lora}.pt"
    args = ["--model", str(smollm2_dir), "--data", str(pairs), "--wrap", wrap, "--out", str(out)]
    args += ["--detach"] * detach + ["--lora"] * lora
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(29500 + os.getpid() % 1000),
            str(WORKER),
            *args,
        ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, smollm2_dir, pairs):
    """The single-process reference for each (detach, lora), run once for every wrapper."""
    done: dict[tuple[bool, bool], dict] = {}

    def reference(detach: bool, lora: bool) -> dict:
        if (detach, lora) not in done:
            tmp = tmp_path_factory.mktemp("one")
            done[detach, lora] = launch(tmp, smollm2_dir, pairs, "none", 1, detach, lora)
        return done[detach, lora]

    return reference


@pytest.mark.parametrize(
    "wrap,detach,lora",
    [
        ("ddp", False, False),
        ("fsdp2", False, False),
        ("fsdp2", True, False),
        ("fsdp2", False, True),
        ("fsdp1", False, False),
    ],
)
def test_two_processes_match_one_on_the_same_global_batch(
    tmp_path, smollm2_dir, pairs, one_process, wrap, detach, lora
):
    one = one_process(detach, lora)
    two = launch(tmp_path, smollm2_dir, pairs, wrap, 2, detach, lora)
    assert one["grads"].keys() == two["grads"].keys() and one["grads"]
    if lora:
        assert all("lora_" in name for name in one["grads"])  # only adapters train
    assert abs(one["loss"].item() - two["loss"].item()) < 1e-5, (one["loss"], two["loss"])
    for name, grad in one["grads"].items():
        assert grad.abs().sum() > 0
        assert torch.allclose(grad, two["grads"][name], rtol=1e-4, atol=1e-6), name
    calls = two["forward_calls"]
    assert len(set(calls)) == 1 and calls[0] == (2 if detach else 1)  # same forwards on every rank
