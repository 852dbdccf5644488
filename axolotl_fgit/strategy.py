"""Dataset ``type: axolotl_fgit.strategy``: tokenize an FGIT pair as one training sample.

A sample is ``prompt + correct`` followed by ``prompt + incorrect``, both rendered with
the model's chat template. ``fgit_side`` marks the halves (1 correct, 2 incorrect), so
Axolotl's packing, step counting and ``sequence_len`` see every token the model reads,
and the collator restarts position ids at the second half. Labels cover the correct
response only (the same tokens plain SFT trains on); ``fgit_line`` / ``fgit_edit`` are
the span masks projected onto the real tokens through the offset mapping.
"""

from __future__ import annotations

from typing import Any

try:
    from axolotl.prompt_tokenizers import PromptTokenizingStrategy

    from axolotl_fgit.args import fgit_config
    from axolotl_fgit.contract import IGNORE_INDEX, Columns, Side, project, row_spans
except ModuleNotFoundError as err:
    # Axolotl's strategy loader turns a ModuleNotFoundError into "unhandled prompt
    # tokenization strategy"; a plain ImportError reaches the user with its cause.
    raise ImportError(
        f"axolotl_fgit.strategy cannot import {err.name!r} ({err}); "
        "reinstall axolotl-fgit and its dependencies"
    ) from err


class FGITPromptStrategy(PromptTokenizingStrategy):
    """Renders, tokenizes and aligns both halves of a pair (one row at a time)."""

    def __init__(self, tokenizer, columns: Columns, sequence_len: int):
        super().__init__(None, tokenizer, train_on_inputs=False, sequence_len=sequence_len)
        self.columns = columns
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "FGIT needs a fast tokenizer (offset mappings); "
                f"{type(tokenizer).__name__} is not one"
            )

    def _messages(self, row: dict[str, Any]) -> list[dict[str, str]]:
        c = self.columns
        if row.get(c.messages):
            return [{"role": t["role"], "content": t["content"]} for t in row[c.messages]]
        if isinstance(row.get(c.prompt), str):
            return [{"role": "user", "content": row[c.prompt]}]
        raise ValueError(
            f"FGIT row has neither a {c.prompt!r} string nor {c.messages!r} "
            f"turns; columns present: {sorted(row)}"
        )

    def _render(self, messages: list[dict[str, str]], response: str) -> tuple[str, int]:
        """Full text and the offset where ``response`` starts in it."""
        tok = self.tokenizer
        if tok.chat_template:
            prefix = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(
                [*messages, {"role": "assistant", "content": response}], tokenize=False
            )
            if full.startswith(prefix) and full[len(prefix) :].startswith(response):
                return full, len(prefix)
            return prefix + response + (tok.eos_token or ""), len(prefix)
        prefix = (tok.bos_token or "") + "\n\n".join(m["content"] for m in messages) + "\n\n"
        return prefix + response + (tok.eos_token or ""), len(prefix)

    def _half(
        self, messages, response: str, line_spans, edit_spans, limit: int
    ) -> dict[str, list[int]]:
        text, start = self._render(messages, response)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"][:limit], enc["offset_mapping"][:limit]
        masks = project(offsets, line_spans, edit_spans, shift=start)
        in_response = [end > start for _, end in offsets]
        return {
            "ids": ids,
            "response": in_response,
            "line": masks.line.tolist(),
            "edit": masks.edit.tolist(),
        }

    def tokenize_prompt(self, prompt: dict[str, Any]) -> dict[str, list[int]]:
        c = self.columns
        if missing := c.missing(prompt):
            raise ValueError(
                f"FGIT dataset lacks columns {missing}; it has {sorted(prompt)}. "
                "Run fgit-preprocess, or map names under fgit.columns"
            )
        messages = self._messages(prompt)
        limit = self.sequence_len // 2  # each half gets half of sequence_len
        spans = row_spans(prompt, c)
        correct = self._half(
            messages,
            prompt[c.correct],
            spans[c.correct_line_spans],
            spans[c.correct_edit_spans],
            limit,
        )
        incorrect = self._half(
            messages,
            prompt[c.incorrect],
            spans[c.incorrect_line_spans],
            spans[c.incorrect_edit_spans],
            limit,
        )
        labels = [t if r else IGNORE_INDEX for t, r in zip(correct["ids"], correct["response"])]
        n_correct, n_incorrect = len(correct["ids"]), len(incorrect["ids"])
        in_response = correct["response"] + incorrect["response"]
        return {
            "input_ids": correct["ids"] + incorrect["ids"],
            "attention_mask": [1] * (n_correct + n_incorrect),
            "labels": labels + [IGNORE_INDEX] * n_incorrect,
            "fgit_side": [int(Side.CORRECT)] * n_correct + [int(Side.INCORRECT)] * n_incorrect,
            # Sensitivity is only meaningful on response tokens; prompt tokens stay 0.
            "fgit_line": [v * r for v, r in zip(correct["line"] + incorrect["line"], in_response)],
            "fgit_edit": [v * r for v, r in zip(correct["edit"] + incorrect["edit"], in_response)],
        }


def load(tokenizer, cfg, ds_cfg: dict[str, Any] | None = None) -> FGITPromptStrategy:
    """Entry point Axolotl calls for ``type: axolotl_fgit.strategy``."""
    return FGITPromptStrategy(tokenizer, fgit_config(cfg).columns, cfg["sequence_len"])
