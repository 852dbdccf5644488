"""Functional correctness: a model writes each held-out function, the sandbox runs it.

Generation is batched (left padding, prompts of similar length together) and stops at
the closing code fence. The assistant turn is opened with the code fence and the module's
imports, as the training responses start; the model writes the signature and the body.
The prompt ends at a line break after the imports, where the tokenizer would break the
text anyway: ending it inside the function (after its ``def`` line) would cut through a
newline-plus-indent token and make every model close the fence at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from fgit_bench.metrics import pass_at_k
from fgit_bench.problems import Problem
from fgit_preprocess.sandbox import Limits, run_many

FENCE = "```"
OPENING = f"{FENCE}python\n"


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How answers are drawn: one greedy answer (pass@1) and ``samples`` sampled ones."""

    samples: int = 2
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 256
    batch_size: int = 16
    seed: int = 0


@dataclass(frozen=True)
class Answers:
    """What one model wrote for one problem."""

    greedy: str  # the whole code: the given imports and the generated function
    sampled: list[str]


def answer_start(problem: Problem) -> str:
    """The code every answer starts with (given, not generated)."""
    return problem.imports


def prompt_text(tokenizer, problem: Problem) -> str:
    """The chat-formatted request, the assistant turn opened up to the function."""
    messages = [{"role": "user", "content": problem.instruction}]
    head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return head + OPENING + answer_start(problem)


def code_of(completion: str) -> str:
    """The code a completion wrote: everything before the closing fence."""
    return completion.split(FENCE, 1)[0]


def _generate(model, tokenizer, prompts: list[str], n: int, sampling: Sampling, greedy: bool):
    """``n`` completions per prompt, in prompt order."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    per_batch = max(1, sampling.batch_size // n)
    out: list[list[str]] = [[] for _ in prompts]
    desc = "Greedy answers" if greedy else f"Sampled answers (n={n})"
    for start in tqdm(range(0, len(order), per_batch), desc=desc, unit="batch"):
        chosen = order[start : start + per_batch]
        enc = tokenizer(
            [prompts[i] for i in chosen],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        ).to(device)
        with torch.no_grad():
            ids = model.generate(
                **enc,
                do_sample=not greedy,
                num_return_sequences=n,
                max_new_tokens=sampling.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                stop_strings=[FENCE],
                tokenizer=tokenizer,
                **(
                    {} if greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p}
                ),
            )
        texts = tokenizer.batch_decode(
            ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
        for j, i in enumerate(chosen):
            out[i] = [code_of(t) for t in texts[j * n : (j + 1) * n]]
    return out


def write_answers(model, tokenizer, problems: list[Problem], sampling: Sampling) -> list[Answers]:
    """A greedy and ``sampling.samples`` sampled answers per problem."""
    import torch

    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        prompts = [prompt_text(tokenizer, p) for p in problems]
        greedy = _generate(model, tokenizer, prompts, 1, sampling, greedy=True)
        torch.manual_seed(sampling.seed)
        sampled = (
            _generate(model, tokenizer, prompts, sampling.samples, sampling, greedy=False)
            if sampling.samples
            else [[] for _ in problems]
        )
    finally:
        tokenizer.padding_side = padding_side
    starts = [answer_start(p) for p in problems]
    return [
        Answers(start + g[0], [start + text for text in s])
        for start, g, s in zip(starts, greedy, sampled)
    ]


@dataclass(frozen=True)
class Verdicts:
    """Which answers passed the problem's tests, and why the others did not."""

    greedy: bool
    sampled: list[bool]
    reasons: list[str]  # greedy first, then each sample

    def pass_at(self, k: int) -> float:
        return pass_at_k(len(self.sampled), sum(self.sampled), k)


def judge(
    problems: list[Problem], answers: list[Answers], limits: Limits = Limits()
) -> list[Verdicts]:
    """Run every answer against its problem's tests in the sandbox."""
    jobs, owners = [], []
    for i, (problem, ans) in enumerate(zip(problems, answers)):
        for code in (ans.greedy, *ans.sampled):
            jobs.append((code, problem.tests))
            owners.append(i)
    outcomes = run_many(jobs, limits, desc="Running answers")
    by_problem: list[list] = [[] for _ in problems]
    for i, outcome in zip(owners, outcomes):
        by_problem[i].append(outcome)
    return [
        Verdicts(o[0].passed, [x.passed for x in o[1:]], [x.reason for x in o]) for o in by_problem
    ]
