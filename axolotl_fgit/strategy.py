"""Dataset ``type: axolotl_fgit.strategy``: tokenize an FGIT pair as one training sample.

A sample is the conversation ending in the correct response, followed by the same
conversation ending in the incorrect one. Each half is rendered, tokenized and labelled by
Axolotl's own ``chat_template`` strategy, with every option a ``type: chat_template`` entry
takes (``chat_template``, ``roles_to_train``, ``train_on_eos``, ``eot_tokens``,
``field_messages``, ``message_property_mappings``, system prompts): the correct half's
labels are exactly the labels plain SFT would train on, and the incorrect half is not
trained, and it ends at its last error-sensitive token (the only tokens FGIT reads from it;
nothing after them can change them). ``fgit_side`` marks the halves, so Axolotl's packing,
step counting and ``sequence_len`` see every token stored; ``fgit_line`` / ``fgit_edit`` are
the span masks projected onto the real tokens through the offset mapping.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

try:
    from axolotl_fgit.compat import require_axolotl

    require_axolotl()
    from axolotl.prompt_strategies.chat_template import (
        ChatTemplatePrompter,
        ChatTemplateStrategy,
        StrategyLoader,
    )
    from axolotl.utils.logging import get_logger
    from pydantic import BaseModel

    from axolotl_fgit.args import PLUGIN, FGITConfig, fgit_config, setting
    from axolotl_fgit.contract import (
        IGNORE_INDEX,
        TRUNCATED_COLUMN,
        Columns,
        ContractError,
        Side,
        project,
        row_spans,
    )
except ModuleNotFoundError as err:
    # Axolotl's strategy loader turns a ModuleNotFoundError into "unhandled prompt
    # tokenization strategy"; a plain ImportError reaches the user with its cause.
    raise ImportError(
        f"axolotl_fgit.strategy cannot import {err.name!r} ({err}); "
        "reinstall axolotl-fgit and its dependencies"
    ) from err

LOG = get_logger(__name__)
# Axolotl >= 0.19 renders a conversation to text itself; 0.18 gets the same call here.
RENDERS_TEXT = hasattr(ChatTemplatePrompter, "build_prompt_text")


def dataset_columns(columns: Columns, ds_cfg: Any) -> Columns:
    """The columns of one ``datasets:`` entry: its ``field_messages`` names the chat turns."""
    field = setting(ds_cfg, "field_messages")
    return replace(columns, messages=field) if field else columns


class FGITChatTemplateStrategy(ChatTemplateStrategy):
    """Axolotl's chat-template strategy, applied to both halves of a pair."""

    def __init__(self, *args: Any, columns: Columns, cut_incorrect: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.columns = columns
        self.cut_incorrect = cut_incorrect  # False keeps whole incorrect halves (benchmarks)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                "FGIT needs a fast tokenizer (offset mappings); "
                f"{type(self.tokenizer).__name__} is not one"
            )

    @property
    def supports_batched(self) -> bool:
        return False

    def _prompt_turns(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The conversation before the answer, in the dataset's own message keys."""
        c, mapping = self.columns, self.prompter.message_property_mappings
        role, content = mapping.get("role", "role"), mapping.get("content", "content")
        turns = row.get(self.prompter.field_messages)
        if turns:
            turns = list(turns)
            if turns[-1].get(content) == row[c.correct]:
                turns = turns[:-1]  # a chat_template row that still holds its answer
            return turns
        if isinstance(row.get(c.prompt), str):
            return [{role: "user", content: row[c.prompt]}]
        raise ContractError(
            f"FGIT row has neither a {c.prompt!r} string nor {self.prompter.field_messages!r} "
            f"turns; columns present: {sorted(row)}"
        )

    def _render(self, thread: list[dict[str, Any]], tools: list[dict] | None) -> str:
        """The conversation as the text Axolotl's tokenization renders (no processor)."""
        if self.prompter.processor is not None:
            raise ContractError("FGIT pairs are text only; remove processor_type from the config")
        if RENDERS_TEXT:
            return self.prompter.build_prompt_text(thread, tools=tools)
        kwargs = {
            "chat_template": self.prompter.chat_template,
            "add_generation_prompt": False,
            **self.prompter.chat_template_kwargs,
        }
        return self.tokenizer.apply_chat_template(
            thread, tokenize=False, **kwargs, **({"tools": tools} if tools else {})
        )

    def _half(self, row: dict[str, Any], turns: list[dict[str, Any]], response: str) -> dict:
        """Axolotl's tokenization of the conversation ending in ``response``, with offsets."""
        mapping = self.prompter.message_property_mappings
        answer = {
            mapping.get("role", "role"): "assistant",
            mapping.get("content", "content"): response,
        }
        conversation = {**row, self.prompter.field_messages: [*turns, answer]}
        tokenized = super()._tokenize_single_prompt(conversation)
        thread = self.get_conversation_thread(conversation)
        text = self._render(thread, self._get_tools(conversation))
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"] != tokenized["input_ids"]:
            raise ContractError(
                "FGIT cannot align character spans with this chat template: tokenizing its "
                "rendered text gives other tokens than Axolotl's tokenization. Use a chat "
                "template whose text round-trips through the tokenizer."
            )
        start = text.rfind(response)
        if start < 0:  # templates that trim the message
            stripped = response.strip()
            found = text.rfind(stripped) if stripped else -1
            if found < 0:
                raise ContractError(
                    "the chat template changes the response text, so FGIT's spans cannot be "
                    "placed on its tokens"
                )
            start = found - (len(response) - len(response.lstrip()))
        return {**tokenized, "offsets": enc["offset_mapping"], "start": start}

    def tokenize_prompt(self, prompt: dict[str, Any]) -> dict[str, list[int]]:
        c = self.columns
        if missing := c.missing(prompt):
            raise ContractError(
                f"FGIT dataset lacks columns {missing}; it has {sorted(prompt)}. "
                "Run fgit-preprocess, or map names under fgit.columns"
            )
        spans = row_spans(prompt, c)
        turns = self._prompt_turns(prompt)
        limit = self.sequence_len // 2  # each half gets half of sequence_len
        correct = self._half(prompt, turns, prompt[c.correct])
        incorrect = self._half(prompt, turns, prompt[c.incorrect])
        mask_c = project(
            correct["offsets"][:limit],
            spans[c.correct_line_spans],
            spans[c.correct_edit_spans],
            correct["start"],
        )
        mask_a = project(
            incorrect["offsets"],
            spans[c.incorrect_line_spans],
            spans[c.incorrect_edit_spans],
            incorrect["start"],
        )
        # The incorrect half is read only at its sensitive tokens: what follows the last one
        # cannot change them (causal attention), so it is never stored.
        sensitive = mask_a.hybrid.nonzero()[0]
        needed = int(sensitive[-1]) + 1 if len(sensitive) else 1  # a pure insertion: one token
        keep = min(limit, needed if self.cut_incorrect else len(incorrect["input_ids"]))
        ids_c, ids_a = correct["input_ids"][:limit], incorrect["input_ids"][:keep]
        return {
            "input_ids": ids_c + ids_a,
            "attention_mask": [1] * (len(ids_c) + len(ids_a)),
            # the correct half keeps Axolotl's SFT labels; the incorrect half is not trained
            "labels": correct["labels"][:limit] + [IGNORE_INDEX] * len(ids_a),
            "fgit_side": [int(Side.CORRECT)] * len(ids_c) + [int(Side.INCORRECT)] * len(ids_a),
            "fgit_line": [*mask_c.line.tolist(), *mask_a.line[:keep].tolist()],
            "fgit_edit": [*mask_c.edit.tolist(), *mask_a.edit[:keep].tolist()],
            # flagged when training loses something: correct tokens, or sensitive incorrect ones
            TRUNCATED_COLUMN: int(
                len(correct["input_ids"]) > limit or bool(len(sensitive) and sensitive[-1] >= limit)
            ),
        }


class FGITStrategyLoader(StrategyLoader):
    """Builds the strategy from the ``datasets:`` entry exactly as ``type: chat_template``."""

    def _get_strategy_cls(self, cfg):
        return FGITChatTemplateStrategy

    def _get_strategy_params(self, cfg, ds_cfg: dict[str, Any]):
        columns = dataset_columns(fgit_config(cfg).columns, ds_cfg)
        return {**super()._get_strategy_params(cfg, ds_cfg), "columns": columns}

    def __call__(self, tokenizer, cfg, ds_cfg=None, processor=None):
        if not setting(cfg, "fgit"):
            raise ValueError(
                "datasets: type axolotl_fgit.strategy needs the FGIT plugin and its config; add "
                f"plugins: [{PLUGIN}] and an fgit: block (for example fgit: {{alpha: 2.0}})"
            )
        ds = ds_cfg.model_dump() if isinstance(ds_cfg, BaseModel) else dict(ds_cfg or {})
        if not ds.get("field_messages"):
            ds["field_messages"] = fgit_config(cfg).columns.messages
        return super().__call__(tokenizer, cfg, ds_cfg=ds, processor=processor)


load = FGITStrategyLoader()


def pair_strategy(
    tokenizer,
    sequence_len: int,
    *,
    fgit: dict[str, Any] | None = None,
    dataset: dict[str, Any] | None = None,
    cut_incorrect: bool = True,
    **cfg: Any,
) -> FGITChatTemplateStrategy:
    """The strategy outside ``axolotl train`` (``fgit-eval``, benchmarks), from the same
    settings a config would give: the ``fgit:`` block, a ``datasets:`` entry, top-level keys.
    ``cut_incorrect=False`` keeps every incorrect token (what the benchmark compares with)."""
    from axolotl.utils.dict import DictDefault

    block = FGITConfig(**(fgit or {})).model_dump()
    settings = DictDefault({"sequence_len": sequence_len, "fgit": block, **cfg})
    strategy = load(tokenizer, settings, ds_cfg=dataset or {})
    strategy.cut_incorrect = cut_incorrect
    return strategy
