"""The FGIT strategy labels the correct half exactly as Axolotl's ``type: chat_template``
would, with the same dataset options, and counts what it truncates."""

from __future__ import annotations

import pytest
import torch
from axolotl.prompt_strategies.chat_template import load as chat_template_load
from axolotl.utils.dict import DictDefault

from axolotl_fgit.args import FGITConfig
from axolotl_fgit.collator import FGITDataCollator
from axolotl_fgit.contract import IGNORE_INDEX, TRUNCATED_COLUMN, Side
from axolotl_fgit.strategy import load as fgit_load
from axolotl_fgit.strategy import pair_strategy
from axolotl_fgit.trainer import batch_loss
from conftest import pair_row

SYSTEM = {"role": "system", "content": "You write careful Python."}
PROBLEMS = [
    (
        "Write add.",
        "```python\ndef add(a, b):\n    return a + b\n```\n",
        "```python\ndef add(a, b):\n    return a - b\n```\n",
    ),
    (
        "Clamp x to [lo, hi].",
        "def clamp(x, lo, hi):\n    return max(lo, min(x, hi))\n",
        "def clamp(x, lo, hi):\n    return max(lo, min(x, lo))\n",
    ),
    (
        "Sum a list.",
        "Here it is:\n\n```python\ndef total(xs):\n    s = 0\n    for x in xs:\n"
        "        s += x\n    return s\n```\n",
        "Here it is:\n\n```python\ndef total(xs):\n"
        "    s = 0\n    for x in xs[1:]:\n        s += x\n    return s\n```\n",
    ),
]


def fgit_row(prompt_turns: list[dict], correct: str, incorrect: str) -> dict:
    return pair_row(correct, incorrect, messages=prompt_turns)


def config(**top) -> DictDefault:
    return DictDefault(
        {"sequence_len": 2048, "train_on_inputs": False, "fgit": FGITConfig().model_dump(), **top}
    )


def both(tokenizer, rows, ds_cfg: dict, **top):
    """(FGIT samples, chat_template samples) for the same rows and options."""
    cfg = config(**top)
    ours = fgit_load(tokenizer, cfg, ds_cfg={**ds_cfg, "type": "axolotl_fgit.strategy"})
    theirs = chat_template_load(tokenizer, cfg, ds_cfg={**ds_cfg, "type": "chat_template"})
    fgit = [ours.tokenize_prompt(r) for r in rows]
    sft = [
        theirs.tokenize_prompt(
            {"messages": [*r["messages"], {"role": "assistant", "content": r["correct"]}]}
        )
        for r in rows
    ]
    return fgit, sft


@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("train_on_eos", ["turn", "last", "all"])
def test_correct_half_is_labelled_exactly_as_chat_template(tokenizer, system, train_on_eos):
    rows = [
        fgit_row([SYSTEM] * system + [{"role": "user", "content": p}], c, a) for p, c, a in PROBLEMS
    ]
    fgit, sft = both(tokenizer, rows, {"train_on_eos": train_on_eos})
    for ours, theirs in zip(fgit, sft):
        n = ours["fgit_side"].count(Side.CORRECT)
        assert ours["input_ids"][:n] == theirs["input_ids"]
        assert ours["labels"][:n] == theirs["labels"]
        assert set(ours["labels"][n:]) == {IGNORE_INDEX}  # the incorrect half is not trained
        trained = [t for t in theirs["labels"] if t != IGNORE_INDEX]
        assert len(trained) == sum(t != IGNORE_INDEX for t in ours["labels"]) > 0


def test_first_step_sft_loss_equals_chat_template_loss(tokenizer, tiny_model):
    rows = [fgit_row([{"role": "user", "content": p}], c, a) for p, c, a in PROBLEMS]
    fgit, sft = both(tokenizer, rows, {})
    from axolotl.utils.collators import DataCollatorForSeq2Seq

    batch = DataCollatorForSeq2Seq(tokenizer, return_tensors="pt")(sft)
    n_items = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    with torch.no_grad():
        want = tiny_model(**batch, num_items_in_batch=n_items).loss
        ours = batch_loss(
            tiny_model,
            FGITDataCollator(tokenizer, return_tensors="pt")(fgit),
            FGITConfig(weighting="sft"),
            n_items,
        )
    assert abs(ours.loss.item() - want.item()) < 1e-5, (ours.loss.item(), want.item())


def test_dataset_options_carry_over(tokenizer):
    """field_messages, message_property_mappings and roles_to_train work as for chat_template;
    a chat_template row that still ends in its answer needs no other change."""
    options = {
        "field_messages": "conversations",
        "message_property_mappings": {"role": "from", "content": "value"},
        "roles_to_train": ["assistant"],
        "train_on_eos": "turn",
    }
    p, c, a = PROBLEMS[0]
    base = fgit_row([], c, a)
    del base["messages"]
    row = {**base, "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": c}]}
    cfg = config()
    ours = fgit_load(tokenizer, cfg, ds_cfg=options).tokenize_prompt(row)
    theirs = chat_template_load(tokenizer, cfg, ds_cfg=options).tokenize_prompt(
        {"conversations": row["conversations"]}
    )
    n = ours["fgit_side"].count(Side.CORRECT)
    assert ours["input_ids"][:n] == theirs["input_ids"] and ours["labels"][:n] == theirs["labels"]
    assert sum(ours["fgit_edit"][:n]) > 0 and sum(ours["fgit_edit"][n:]) > 0


def test_train_on_inputs_is_honoured_like_chat_template(tokenizer):
    rows = [fgit_row([{"role": "user", "content": p}], c, a) for p, c, a in PROBLEMS[:1]]
    fgit, sft = both(tokenizer, rows, {}, train_on_inputs=True)
    n = fgit[0]["fgit_side"].count(Side.CORRECT)
    assert fgit[0]["labels"][:n] == sft[0]["labels"]
    plain, _ = both(tokenizer, rows, {})
    trained = sum(t != IGNORE_INDEX for t in fgit[0]["labels"])
    assert trained > sum(t != IGNORE_INDEX for t in plain[0]["labels"])  # prompt tokens too


def test_sensitive_tokens_lie_inside_the_responses(tokenizer):
    rows = [fgit_row([{"role": "user", "content": p}], c, a) for p, c, a in PROBLEMS]
    fgit, sft = both(tokenizer, rows, {})
    for ours, theirs in zip(fgit, sft):
        n = ours["fgit_side"].count(Side.CORRECT)
        marked = [ln + e for ln, e in zip(ours["fgit_line"][:n], ours["fgit_edit"][:n])]
        assert any(marked) and any(ours["fgit_line"][n:])
        # every sensitive token of the correct half is a trained (response) token
        assert all(lab != IGNORE_INDEX for m, lab in zip(marked, theirs["labels"]) if m)


def test_truncated_halves_are_flagged(tokenizer):
    p, c, a = PROBLEMS[2]
    row = fgit_row([{"role": "user", "content": p}], c, a)
    short = fgit_load(tokenizer, config(sequence_len=48), ds_cfg={}).tokenize_prompt(row)
    full = fgit_load(tokenizer, config(), ds_cfg={}).tokenize_prompt(row)
    assert short[TRUNCATED_COLUMN] == 1 and full[TRUNCATED_COLUMN] == 0
    assert len(short["input_ids"]) == 48 and short["fgit_side"].count(Side.CORRECT) == 24


def test_incorrect_half_ends_at_its_last_sensitive_token(tokenizer):
    rows = [fgit_row([{"role": "user", "content": p}], c, a) for p, c, a in PROBLEMS]
    strategy = fgit_load(tokenizer, config(), ds_cfg={})
    for row in rows:
        cut = strategy.tokenize_prompt(row)
        whole = pair_strategy(tokenizer, 2048, cut_incorrect=False).tokenize_prompt(row)
        side = cut["fgit_side"]
        marked = [i for i, s in enumerate(side) if s == Side.INCORRECT and cut["fgit_line"][i]]
        assert marked and marked[-1] == len(side) - 1  # the last stored token is sensitive
        assert len(cut["input_ids"]) < len(whole["input_ids"])
        assert cut["input_ids"] == whole["input_ids"][: len(cut["input_ids"])]
        assert cut["fgit_edit"] == whole["fgit_edit"][: len(cut["input_ids"])]
        assert cut[TRUNCATED_COLUMN] == 0
    # A pure insertion has no sensitive incorrect token: one token stands for its half.
    insertion = pair_row("x = 1\ny = 2\n", "x = 1\n", prompt="Set x and y.")
    sample = strategy.tokenize_prompt(insertion)
    assert sample["fgit_side"].count(Side.INCORRECT) == 1


def test_truncation_counts_only_what_training_loses(tokenizer):
    """Cutting the incorrect half after its last sensitive token loses nothing; cutting a
    sensitive token (or the correct half) is counted."""
    p, c, a = PROBLEMS[2]
    row = fgit_row([{"role": "user", "content": p}], c, a)
    whole = fgit_load(tokenizer, config(), ds_cfg={}).tokenize_prompt(row)
    n_c = whole["fgit_side"].count(Side.CORRECT)
    n_a = whole["fgit_side"].count(Side.INCORRECT)
    changed = whole["fgit_line"].index(1, n_c) - n_c  # first sensitive incorrect token
    for half, flagged in ((n_c, 0), (max(n_a, n_c - 1), 1), (changed, 1)):
        sample = fgit_load(tokenizer, config(sequence_len=2 * half), ds_cfg={}).tokenize_prompt(row)
        assert sample[TRUNCATED_COLUMN] == flagged, (half, n_c, n_a)


def test_strategy_refuses_to_load_without_the_plugin(tokenizer):
    cfg = config()
    del cfg["fgit"]
    with pytest.raises(ValueError, match="plugins: \\[axolotl_fgit.FGITPlugin\\]"):
        fgit_load(tokenizer, cfg, ds_cfg={})


def test_truncation_is_counted_and_refused_above_the_limit():
    import datasets

    from axolotl_fgit.trainer import check_truncation

    ds = datasets.Dataset.from_dict({TRUNCATED_COLUMN: [1, 0, 0, 0]})
    assert check_truncation(ds, "train", FGITConfig(max_truncated_fraction=0.5), 64) == 1
    with pytest.raises(ValueError, match="1 of 4 train pairs.*fgit.max_truncated_fraction"):
        check_truncation(ds, "train", FGITConfig(max_truncated_fraction=0.1), 64)
