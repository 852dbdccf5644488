"""Bad FGIT configs are rejected by Axolotl's own config loader with a message that
names the key and the fix."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import ROOT


@pytest.fixture(autouse=True)
def fresh_plugins():
    from axolotl.integrations.base import PluginManager

    yield
    if PluginManager._instance is not None:
        PluginManager._instance.plugins.clear()


@pytest.fixture
def pairs(tmp_path):
    row = {
        "prompt": "p",
        "correct": "x = 1\n",
        "incorrect": "x = 2\n",
        "correct_line_spans": [[0, 6]],
        "correct_edit_spans": [[4, 5]],
        "incorrect_line_spans": [[0, 6]],
        "incorrect_edit_spans": [[4, 5]],
    }
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return path


def load(tmp_path, tiny_dir, pairs, **changes):
    from axolotl.cli.config import load_cfg

    cfg = yaml.safe_load((ROOT / "examples" / "yaml" / "smollm2-135m-cpu.yml").read_text())
    cfg.update(
        base_model=str(tiny_dir),
        datasets=[{"path": str(pairs), "type": "axolotl_fgit.strategy"}],
        dataset_prepared_path=str(tmp_path / "prep"),
        output_dir=str(tmp_path / "out"),
    )
    for key, value in changes.items():
        if key == "fgit" and isinstance(value, dict):
            cfg["fgit"] = {**cfg["fgit"], **value}
        else:
            cfg[key] = value
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return load_cfg(str(path))


def test_valid_config_loads_with_defaults(tmp_path, tiny_dir, pairs):
    cfg = load(tmp_path, tiny_dir, pairs, fgit={"weighting": "static"})
    assert cfg.fgit["alpha"] == 2.0 and cfg.fgit["weighting"] == "static"
    assert cfg.fgit["granularity"] == "hybrid" and cfg.fgit["detach_weights"] is False
    assert cfg.fgit["share_prefix"] == "auto"
    flex = load(
        tmp_path, tiny_dir, pairs, fgit={"share_prefix": True}, attn_implementation="flex_attention"
    )
    assert flex.fgit["share_prefix"] is True  # FlexAttention takes the tree as a BlockMask


@pytest.mark.parametrize(
    "changes,expect",
    [
        ({"fgit": {"alpha": 0.5}}, "fgit.alpha must be a finite number >= 1"),
        ({"fgit": {"alpha": float("nan")}}, "fgit.alpha must be a finite number >= 1"),
        ({"fgit": {"alpha": float("inf")}}, "fgit.alpha must be a finite number >= 1"),
        ({"fgit": {"alpha": True}}, "fgit.alpha must be a number, not the boolean true"),
        ({"fgit": {"eps": False}}, "fgit.eps must be a number, not the boolean false"),
        ({"fgit": "on"}, "fgit: must be a mapping of FGIT settings"),
        ({"torch_compile": True}, "set torch_compile: false"),
        ({"fgit": {"max_truncated_fraction": 2}}, "max_truncated_fraction"),
        ({"fgit": {"weighting": "bogus"}}, "dynamic"),
        ({"fgit": {"granularity": "word"}}, "hybrid"),
        ({"fgit": {"share_prefix": "sometimes"}}, "share_prefix"),
        (
            {"fgit": {"share_prefix": True}, "attn_implementation": "flash_attention_2"},
            "fgit.share_prefix: true needs a tree attention mask, which attention backend "
            "flash_attention_2 cannot take; use attn_implementation: sdpa",
        ),
        (
            {"fgit": {"share_prefix": True}, "attn_implementation": "xformers"},
            "backend xformers cannot take",
        ),
        ({"fgit": {"alphaa": 2}}, "alphaa"),
        ({"context_parallel_size": 2}, "context_parallel_size: 1"),
        (
            {"plugins": ["axolotl_fgit.FGITPlugin", "axolotl.integrations.kd.KDPlugin"]},
            "also claim the trainer",
        ),
        ({"rl": "dpo"}, "remove rl"),
        ({"deepspeed": {"zero_optimization": {"stage": 3}}}, "use ZeRO-2 or FSDP"),
    ],
)
def test_bad_configs_are_rejected_with_the_fix(tmp_path, tiny_dir, pairs, changes, expect):
    with pytest.raises(ValueError) as err:
        load(tmp_path, tiny_dir, pairs, **changes)
    assert expect in str(err.value), str(err.value)[-2000:]


def test_dataset_without_span_columns_is_rejected(tmp_path, tiny_dir):
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    with pytest.raises(ValueError) as err:
        load(tmp_path, tiny_dir, path)
    message = str(err.value)
    assert "lacks FGIT columns" in message and "correct_line_spans" in message
    assert "fgit-preprocess" in message


def test_other_dataset_types_are_rejected(tmp_path, tiny_dir, pairs):
    with pytest.raises(ValueError) as err:
        load(tmp_path, tiny_dir, pairs, datasets=[{"path": str(pairs), "type": "alpaca"}])
    assert "type: axolotl_fgit.strategy" in str(err.value)


@pytest.mark.parametrize(
    "name",
    [
        "qwen2.5-coder-7b-lora.yml",
        "deepseek-coder-6.7b-full.yml",
        "smollm2-135m-cpu.yml",
        "deepseek-coder-6.7b-fsdp2-full.yml",
        "qwen2.5-coder-7b-fsdp2-lora.yml",
    ],
)
def test_example_configs_have_valid_fgit_blocks(name):
    from axolotl_fgit.args import FGITArgs

    cfg = yaml.safe_load((ROOT / "examples" / "yaml" / name).read_text())
    args = FGITArgs(**{k: v for k, v in cfg.items() if k in ("fgit", "datasets", "plugins")})
    assert args.fgit is not None and cfg["plugins"] == ["axolotl_fgit.FGITPlugin"]
    assert all(d["type"] == "axolotl_fgit.strategy" for d in cfg["datasets"])


def test_test_datasets_types_are_checked(tmp_path, tiny_dir, pairs):
    with pytest.raises(ValueError, match="test_datasets: type \\['alpaca'\\]"):
        load(tmp_path, tiny_dir, pairs, test_datasets=[{"path": str(pairs), "type": "alpaca"}])


def test_dataset_of_another_format_version_is_refused(tmp_path, tiny_dir):
    from axolotl_fgit.contract import PARAMS_FILE

    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / PARAMS_FILE).write_text(json.dumps({"format_version": 0}))
    with pytest.raises(ValueError, match="format version 0.*rerun fgit-preprocess"):
        load(tmp_path, tiny_dir, folder)


def test_fgit_block_without_the_plugin_stops_at_dataset_loading(tmp_path, tiny_dir, pairs):
    """Axolotl drops the fgit: block of an unregistered plugin; the strategy then refuses
    instead of letting plain SFT train under an FGIT config."""
    from axolotl.common.datasets import load_datasets

    cfg = load(tmp_path, tiny_dir, pairs, plugins=[])
    assert not cfg.get("fgit")
    with pytest.raises(ValueError, match="needs the FGIT plugin"):
        load_datasets(cfg=cfg)
