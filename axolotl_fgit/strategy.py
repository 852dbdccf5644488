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

from axolotl.prompt_tokenizers import PromptTokenizingStrategy

from axolotl_fgit.args import FGITColumns, FGITConfig, missing_columns
from axolotl_fgit.loss import CORRECT, IGNORE, INCORRECT
from preprocess.masks import project

FGIT_COLUMNS = ("fgit_side", "fgit_line", "fgit_edit")


def fgit_config(cfg: Any) -> FGITConfig:
    """The validated ``fgit:`` block from an Axolotl cfg (dict or pydantic)."""
    raw = cfg.get("fgit") if hasattr(cfg, "get") else getattr(cfg, "fgit", None)
    if isinstance(raw, FGITConfig):
        return raw
    return FGITConfig(**(dict(raw) if raw else {}))


class FGITPromptStrategy(PromptTokenizingStrategy):
    """Renders, tokenizes and aligns both halves of a pair (one row at a time)."""

    def __init__(self, tokenizer, columns: FGITColumns, sequence_len: int):
        super().__init__(None, tokenizer, train_on_inputs=False, sequence_len=sequence_len)
        self.columns = columns
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("FGIT needs a fast tokenizer (offset mappings); "
                             f"{type(tokenizer).__name__} is not one")

    def _messages(self, row: dict[str, Any]) -> list[dict[str, str]]:
        c = self.columns
        if row.get(c.messages):
            return [{"role": t["role"], "content": t["content"]} for t in row[c.messages]]
        if isinstance(row.get(c.prompt), str):
            return [{"role": "user", "content": row[c.prompt]}]
        raise ValueError(f"FGIT row has neither a {c.prompt!r} string nor {c.messages!r} "
                         f"turns; columns present: {sorted(row)}")

    def _render(self, messages: list[dict[str, str]], response: str) -> tuple[str, int]:
        """Full text and the offset where ``response`` starts in it."""
        tok = self.tokenizer
        if tok.chat_template:
            prefix = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template([*messages, {"role": "assistant", "content": response}],
                                           tokenize=False)
            if full.startswith(prefix) and full[len(prefix):].startswith(response):
                return full, len(prefix)
            return prefix + response + (tok.eos_token or ""), len(prefix)
        prefix = (tok.bos_token or "") + "\n\n".join(m["content"] for m in messages) + "\n\n"
        return prefix + response + (tok.eos_token or ""), len(prefix)

    def _half(self, messages, response: str, line_spans, edit_spans, limit: int) -> dict[str, list[int]]:
        text, start = self._render(messages, response)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"][:limit], enc["offset_mapping"][:limit]
        masks = project(offsets, line_spans, edit_spans, shift=start)
        in_response = [end > start for _, end in offsets]
        return {"ids": ids, "response": in_response, "line": masks.line.tolist(),
                "edit": masks.edit.tolist()}

    def tokenize_prompt(self, prompt: dict[str, Any]) -> dict[str, list[int]]:
        c = self.columns
        if missing := missing_columns(set(prompt), c):
            raise ValueError(f"FGIT dataset lacks columns {missing}; it has {sorted(prompt)}. "
                             "Run fgit-preprocess, or map names under fgit.columns")
        messages = self._messages(prompt)
        limit = self.sequence_len // 2  # each half gets half of sequence_len
        good = self._half(messages, prompt[c.correct], prompt[c.correct_line_spans],
                          prompt[c.correct_edit_spans], limit)
        bad = self._half(messages, prompt[c.incorrect], prompt[c.incorrect_line_spans],
                         prompt[c.incorrect_edit_spans], limit)
        labels = [t if r else IGNORE for t, r in zip(good["ids"], good["response"])]
        n_good, n_bad = len(good["ids"]), len(bad["ids"])
        return {
            "input_ids": good["ids"] + bad["ids"],
            "attention_mask": [1] * (n_good + n_bad),
            "labels": labels + [IGNORE] * n_bad,
            "fgit_side": [CORRECT] * n_good + [INCORRECT] * n_bad,
            # Sensitivity is only meaningful on response tokens; prompt tokens stay 0.
            "fgit_line": [v * r for v, r in zip(good["line"] + bad["line"], good["response"] + bad["response"])],
            "fgit_edit": [v * r for v, r in zip(good["edit"] + bad["edit"], good["response"] + bad["response"])],
        }


def load(tokenizer, cfg, ds_cfg: dict[str, Any] | None = None) -> FGITPromptStrategy:
    """Entry point Axolotl calls for ``type: axolotl_fgit.strategy``."""
    return FGITPromptStrategy(tokenizer, fgit_config(cfg).columns, cfg["sequence_len"])
