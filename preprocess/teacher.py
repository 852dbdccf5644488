"""Ask a teacher LLM for similar-but-wrong variants, through litellm (any backend).

Async with bounded concurrency; retries with exponential backoff and jitter, honouring
``Retry-After``, on 429, 5xx, timeouts, connection errors and unreadable answers; 401,
403 and unknown models stop the run at once. Every answer is committed to the
``AnswerCache`` the moment it arrives, so a rerun after a crash repeats no paid call.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import string
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fgit_preprocess.cache import AnswerCache, request_key

LOG = logging.getLogger("fgit.teacher")

DEFAULT_TEMPLATE = """\
You are helping build training data that teaches a code model to tell correct code \
from code that is almost correct.

Task: write a response to the problem below that looks very similar to the reference \
solution but is functionally wrong. Keep the same structure, names and style; introduce \
a subtle bug of the kind programmers really make (an off-by-one, a wrong comparison or \
operator, a swapped argument, a missing statement or condition, a wrong return value). \
Do not mention or comment on the bug. Answer in markdown with the complete code in one \
fenced code block.

Problem:
{problem}

Reference solution:
{solution}
"""
PLACEHOLDERS = frozenset({"problem", "solution"})
_SECRET_ENV = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)$", re.IGNORECASE)


class TeacherFatal(RuntimeError):
    """An error no retry can fix (bad credentials, no permission, unknown model)."""


def load_template(path: Path | None) -> str:
    """The prompt template; a custom one must use exactly ``{problem}`` and ``{solution}``."""
    if path is None:
        return DEFAULT_TEMPLATE
    text = path.read_text()
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as err:
        raise ValueError(
            f"--prompt-template {path}: {err} (write literal braces as {{{{ }}}})"
        ) from err
    missing, unknown = PLACEHOLDERS - names, names - PLACEHOLDERS
    if missing or unknown:
        raise ValueError(
            f"--prompt-template {path}: missing placeholders "
            f"{sorted(missing)}, unknown {sorted(unknown)}; the template "
            "must use {problem} and {solution}"
        )
    return text


def secrets() -> list[str]:
    """Values of credential-looking environment variables, to scrub from any output."""
    return [v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 8]


def redact(text: str, values: Sequence[str] | None = None) -> str:
    """``text`` with every known secret value replaced by ``***``."""
    for value in secrets() if values is None else values:
        text = text.replace(value, "***")
    return text


class RedactFilter(logging.Filter):
    """Scrubs secrets from log records of any logger it is attached to."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


@dataclass(frozen=True, kw_only=True)
class TeacherSettings:
    """How to call the teacher; everything here except ``api_base`` enters cache keys."""

    model: str
    num_variants: int = 4
    temperature: float = 1.0
    max_tokens: int = 2048
    api_base: str | None = None
    timeout: float = 120.0
    concurrency: int = 16
    max_retries: int = 6
    max_cost: float | None = None
    backoff: float = 1.0  # first backoff in seconds; doubles per attempt, full jitter
    max_backoff: float = 60.0
    # Base of a sampling seed sent with every request (None: none sent). Each request's
    # seed depends only on what it asks, so answers do not depend on arrival order.
    seed: int | None = None


@dataclass
class Request:
    """One call: ``n`` variants for row ``row``; ``slot`` separates parallel calls."""

    row: int
    messages: list[dict[str, str]]
    n: int
    slot: int
    key: str = ""


@dataclass
class Outcome:
    """Per-row answers and what went wrong, gathered across a row's requests."""

    texts: dict[int, list[str]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    cost_new: float = 0.0
    cost_cached: float = 0.0
    calls: int = 0
    cached: int = 0
    failed: int = 0
    retries: int = 0
    unsent: int = 0  # requests left for a resumed run because --max-cost was reached
    topped_up: int = 0  # single-answer calls made because a server returned fewer than n
    prompt_tokens: int = 0  # as the server counted them (its usage field), this run's calls
    completion_tokens: int = 0


def _litellm():
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    litellm.telemetry = False
    return litellm


def supported_params(model: str, api_base: str | None = None) -> list[str]:
    """The OpenAI parameters litellm passes to this backend (``n``, ``seed``, ...)."""
    litellm = _litellm()
    try:
        name, provider, _, _ = litellm.get_llm_provider(model, api_base=api_base)
    except Exception as err:  # litellm raises its own BadRequestError here
        raise TeacherFatal(
            f"--teacher {model!r} is not a model litellm knows how to "
            f"call: {err}. Use provider/model, e.g. openai/gpt-4o-mini, "
            "anthropic/claude-3-5-haiku-latest, hosted_vllm/NAME, ollama/NAME"
        ) from err
    return litellm.get_supported_openai_params(model=name, custom_llm_provider=provider) or []


def preflight(settings: TeacherSettings) -> bool:
    """Check, before any request, that litellm knows the model, its key is set and it
    takes a seed if one is given.

    Returns whether the backend takes ``n``; raises ``TeacherFatal`` naming what is missing
    (a ``*_API_BASE`` requirement is met by ``--api-base``).
    """
    params = supported_params(settings.model, settings.api_base)
    if settings.seed is not None and "seed" not in params:
        raise TeacherFatal(
            f"--teacher-seed: litellm sends no seed to {settings.model} (its backend does not "
            "take one); drop --teacher-seed, or use a backend that does (OpenAI, vLLM, "
            "llama.cpp through openai/NAME with --api-base)"
        )
    env = _litellm().validate_environment(model=settings.model, api_base=settings.api_base)
    missing = [
        k
        for k in env.get("missing_keys") or []
        if not (settings.api_base and k.endswith("_API_BASE"))
    ]
    if missing:
        raise TeacherFatal(
            f"--teacher {settings.model} needs {', '.join(missing)} in the environment "
            "(for a local OpenAI-compatible server any non-empty value works); nothing was sent"
        )
    return "n" in params


def build_requests(
    prompts: Sequence[list[dict[str, str]]], settings: TeacherSettings, use_n: bool
) -> list[Request]:
    """One request per row with ``n = K``, or K single-answer requests per row."""
    per_call = settings.num_variants if use_n else 1
    slots = 1 if use_n else settings.num_variants
    out = []
    for row, messages in enumerate(prompts):
        for slot in range(slots):
            key = request_key(
                {
                    "model": settings.model,
                    "messages": messages,
                    "n": per_call,
                    "slot": slot,
                    "temperature": settings.temperature,
                    "max_tokens": settings.max_tokens,
                    # Only when given: caches written without a seed stay valid.
                    **({"seed": settings.seed} if settings.seed is not None else {}),
                }
            )
            out.append(Request(row, messages, per_call, slot, key))
    return out


def request_seed(base: int, key: str, part: int) -> int:
    """The sampling seed of one call: a 31-bit hash of the run's seed, the request and
    which of its calls this is. A retry resends the same seed; top-ups get their own."""
    return zlib.crc32(f"{base}:{key}:{part}".encode()) & 0x7FFFFFFF


def _retry_after(err: Exception) -> float | None:
    headers = (
        getattr(err, "litellm_response_headers", None)
        or getattr(getattr(err, "response", None), "headers", None)
        or {}
    )
    try:
        value = headers.get("retry-after")
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def classify(err: Exception) -> str:
    """``fatal`` (stop the run), ``retry`` (transient) or ``reject`` (this row only)."""
    litellm = _litellm()
    status = getattr(err, "status_code", None)
    if status in (401, 403, 404) or isinstance(
        err, (litellm.AuthenticationError, litellm.PermissionDeniedError, litellm.NotFoundError)
    ):
        return "fatal"
    if (
        isinstance(
            err,
            (
                litellm.Timeout,
                litellm.APIConnectionError,
                litellm.RateLimitError,
                litellm.InternalServerError,
                litellm.ServiceUnavailableError,
                litellm.BadGatewayError,
            ),
        )
        or status in (408, 409, 429)
        or (isinstance(status, int) and status >= 500)
    ):
        return "retry"
    if (
        isinstance(err, (litellm.APIError, asyncio.TimeoutError, ConnectionError))
        and status is None
    ):
        return "retry"
    return "reject"


class Teacher:
    """Runs requests against litellm with cache, retries, budget and live cost."""

    def __init__(
        self,
        settings: TeacherSettings,
        cache: AnswerCache,
        on_progress: Callable[[Outcome], None] | None = None,
    ):
        self.s = settings
        self.cache = cache
        self.on_progress = on_progress or (lambda _o: None)
        self.litellm = _litellm()

    def _cost(self, response: Any) -> float:
        cost = (getattr(response, "_hidden_params", None) or {}).get("response_cost")
        if cost is None:
            try:
                cost = self.litellm.completion_cost(completion_response=response)
            except Exception:  # models without a price (local servers) cost nothing
                cost = 0.0
        return float(cost or 0.0)

    async def _complete(
        self, req: Request, n: int, out: Outcome, part: int = 0
    ) -> tuple[list[str], float]:
        """One completion call asking for ``n`` answers, retried on transient errors;
        ``part`` tells a request's top-up calls apart (each gets its own seed)."""
        kwargs: dict[str, Any] = dict(
            model=self.s.model,
            messages=req.messages,
            temperature=self.s.temperature,
            max_tokens=self.s.max_tokens,
            timeout=self.s.timeout,
            num_retries=0,
            max_retries=0,
        )
        if n > 1:
            kwargs["n"] = n
        if self.s.api_base:
            kwargs["api_base"] = self.s.api_base
        if self.s.seed is not None:
            kwargs["seed"] = request_seed(self.s.seed, req.key, part)
        for attempt in range(self.s.max_retries + 1):
            try:
                response = await asyncio.wait_for(
                    self.litellm.acompletion(**kwargs), self.s.timeout + 5
                )
                usage = getattr(response, "usage", None)
                out.prompt_tokens += getattr(usage, "prompt_tokens", 0) or 0
                out.completion_tokens += getattr(usage, "completion_tokens", 0) or 0
                # A server may echo what it was sent, the key included: scrub before storing.
                texts = [redact(c.message.content or "") for c in response.choices]
                return texts, self._cost(response)
            except Exception as err:  # classified below; nothing is swallowed
                kind = classify(err)
                if kind == "fatal":
                    raise TeacherFatal(redact(f"{type(err).__name__}: {err}")) from None
                if kind == "reject" or attempt == self.s.max_retries:
                    raise
                wait = _retry_after(err)
                if wait is None:
                    wait = random.uniform(0, min(self.s.max_backoff, self.s.backoff * 2**attempt))
                out.retries += 1
                self.on_progress(out)
                LOG.debug("retrying row %d after %s (%.2fs)", req.row, type(err).__name__, wait)
                await asyncio.sleep(min(wait, self.s.max_backoff))
        raise AssertionError("unreachable")

    async def _call(self, req: Request, out: Outcome) -> tuple[list[str], float]:
        """``req.n`` answers. A server that returns fewer choices than ``n`` asked for
        (llama.cpp's ignores ``n``) gets the rest asked for one at a time, in parallel."""
        texts, cost = await self._complete(req, req.n, out)
        missing = req.n - len(texts)
        if missing > 0:
            more = await asyncio.gather(
                *(self._complete(req, 1, out, part) for part in range(1, missing + 1))
            )
            out.topped_up += missing
            texts = [*texts, *(t for answer, _ in more for t in answer)]
            cost += sum(c for _, c in more)
        return texts, cost

    async def _worker(self, queue: asyncio.Queue, out: Outcome) -> None:
        while True:
            req = await queue.get()
            try:
                if (
                    self.s.max_cost is not None
                    and out.cost_new + out.cost_cached >= self.s.max_cost
                ):
                    out.unsent += 1  # budget spent: leave the rest for a resumed run
                    continue
                try:
                    texts, cost = await self._call(req, out)
                except TeacherFatal:
                    raise
                except Exception as err:
                    out.errors[req.row] = redact(f"{type(err).__name__}: {err}")[:500]
                    out.failed += 1
                    continue
                self.cache.put(req.key, texts, cost)
                out.texts.setdefault(req.row, []).extend(texts)
                out.cost_new += cost
                out.calls += 1
                self.on_progress(out)
            finally:
                queue.task_done()

    async def run(self, requests: Sequence[Request]) -> Outcome:
        """Answer ``requests``, cached ones first; ``unsent`` counts what the budget held back."""
        out = Outcome()
        queue: asyncio.Queue = asyncio.Queue()
        pending = 0
        for req in requests:
            hit = self.cache.get(req.key)
            if hit is not None:
                out.texts.setdefault(req.row, []).extend(map(redact, hit[0]))
                out.cost_cached += hit[1]
                out.cached += 1
            else:
                queue.put_nowait(req)
                pending += 1
        self.on_progress(out)
        workers = [
            asyncio.create_task(self._worker(queue, out))
            for _ in range(min(self.s.concurrency, max(pending, 1)))
        ]
        joined = asyncio.create_task(queue.join())
        try:
            done, _ = await asyncio.wait([joined, *workers], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not joined:
                    task.result()  # a worker only ends by raising (TeacherFatal)
        finally:
            for task in [*workers, joined]:
                task.cancel()
            await asyncio.gather(*workers, joined, return_exceptions=True)
        return out
