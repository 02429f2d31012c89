"""OpenAI-compatible chat client with our own retries, a concurrency limit and the answer cache.

Works with any endpoint that speaks the OpenAI chat-completions API (OpenAI, Azure, vLLM,
Ollama, llama.cpp server). The ``openai`` client's own retries are switched off
(``max_retries=0``) and done here instead, so every attempt is counted in the audit and the
policy is testable: exponential backoff with jitter on 429, 5xx, 408/409, timeouts, connection
errors and malformed or empty answers, honouring ``Retry-After`` / ``retry-after-ms``. The API
key is read from the environment variable named in the config and is never logged.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import openai

from cxrfoundry.net import is_loopback
from cxrfoundry.reports.cache import ResponseCache, cache_key

log = logging.getLogger(__name__)

#: Defaults of the ``reports.openai`` config block.
OPENAI_DEFAULTS: dict[str, Any] = {
    "base_url": "http://127.0.0.1:8000/v1",
    "model": "Qwen/Qwen2.5-7B-Instruct",
    "api_key_env": "OPENAI_API_KEY",
    "temperature": 0.0,
    "max_tokens": 512,
    "timeout": 60.0,
    "concurrency": 8,
    "max_retries": 5,
    "backoff": 1.0,
    "backoff_max": 60.0,
    "jitter": 0.5,
    "allowed_hosts": [],
    "managed": None,
}


class LLMError(RuntimeError):
    """A request that failed after every retry (or failed permanently)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


@dataclass
class LLMSettings:
    """One endpoint + model and its request policy (see :data:`OPENAI_DEFAULTS`)."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int = 512
    timeout: float = 60.0
    concurrency: int = 8
    max_retries: int = 5
    backoff: float = 1.0
    backoff_max: float = 60.0
    jitter: float = 0.5

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> LLMSettings:
        """Build from a config mapping; unknown keys are ignored, missing ones defaulted."""
        merged = {**OPENAI_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
        names = cls.__dataclass_fields__
        settings = cls(**{k: v for k, v in merged.items() if k in names})
        if settings.concurrency < 1 or settings.max_retries < 0 or settings.timeout <= 0:
            raise ValueError(
                "reports.openai: concurrency must be >= 1, max_retries >= 0 and timeout > 0"
            )
        return settings

    def params(self) -> dict[str, Any]:
        """The sampling parameters that shape an answer (part of the cache key)."""
        return {"max_tokens": self.max_tokens, "temperature": self.temperature}


@dataclass
class LLMStats:
    """Request counters for the audit."""

    requests_sent: int = 0
    responses_ok: int = 0
    retries: int = 0
    cache_hits: int = 0
    failed_requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (errors sorted by kind)."""
        return {
            "requests_sent": self.requests_sent,
            "responses_ok": self.responses_ok,
            "retries": self.retries,
            "cache_hits": self.cache_hits,
            "failed_requests": self.failed_requests,
            "errors": dict(sorted(self.errors.items())),
        }


def _retry_after(response: Any) -> float | None:
    headers = getattr(response, "headers", None) or {}
    if ms := headers.get("retry-after-ms"):
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


class LLMClient:
    """Async chat client: semaphore-limited, retried, cached. Use as ``async with``."""

    def __init__(
        self,
        settings: LLMSettings,
        *,
        prompt_sha256: str,
        cache: ResponseCache,
        stats: LLMStats | None = None,
    ) -> None:
        self.settings = settings
        self.prompt_sha256 = prompt_sha256
        self.cache = cache
        self.stats = stats or LLMStats()
        key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        if not key:
            if not is_loopback(settings.base_url):
                raise ValueError(
                    f"reports.openai: environment variable {settings.api_key_env!r} is not set "
                    f"(needed for the non-local endpoint {settings.base_url})"
                )
            key = "not-needed"  # local servers (vLLM, llama.cpp) accept any key
        self._client = openai.AsyncOpenAI(
            base_url=settings.base_url, api_key=key, timeout=settings.timeout, max_retries=0
        )
        self._semaphore = asyncio.Semaphore(settings.concurrency)
        self._jitter = random.Random()  # timing only; never affects content

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.close()

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        s = self.settings
        base = min(s.backoff_max, s.backoff * (2**attempt))
        base *= 1.0 + s.jitter * (self._jitter.random() - 0.5)
        if retry_after is not None:
            # The server knows best; never retry earlier than it asked.
            return max(retry_after, 0.0)
        return base

    async def _attempt(
        self, messages: list[dict[str, str]], validate: Callable[[str], str | None]
    ) -> str:
        async with self._semaphore:
            self.stats.requests_sent += 1
            response = await self._client.chat.completions.create(
                model=self.settings.model,
                messages=messages,  # type: ignore[arg-type]
                temperature=self.settings.temperature,
                max_tokens=self.settings.max_tokens,
            )
        choices = getattr(response, "choices", None)
        if not choices:
            raise LLMError("malformed", "answer has no choices")
        content = getattr(choices[0].message, "content", None)
        if not isinstance(content, str) or not content.strip():
            raise LLMError("empty", "answer has no text")
        problem = validate(content)
        if problem:
            raise LLMError("malformed", problem)
        return content.strip()

    async def complete(
        self, messages: list[dict[str, str]], validate: Callable[[str], str | None]
    ) -> str:
        """The (cached) answer to ``messages``; ``validate`` returns a problem string or None.

        Raises :class:`LLMError` after ``max_retries`` retries, or at once for a permanent
        error (4xx other than 408/409/429).
        """
        key = cache_key(self.settings.model, self.prompt_sha256, self.settings.params(), messages)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats.cache_hits += 1
            return cached
        last: LLMError | None = None
        for attempt in range(self.settings.max_retries + 1):
            retry_after = None
            try:
                content = await self._attempt(messages, validate)
            except openai.APIStatusError as exc:
                status = exc.status_code
                kind = "rate_limited" if status == 429 else f"http_{status}"
                last = LLMError(kind, f"HTTP {status}")
                retry_after = _retry_after(exc.response)
                if status < 500 and status not in (408, 409, 429):
                    self.stats.errors[kind] += 1
                    break
            except openai.APITimeoutError:
                last = LLMError("timeout", f"no answer within {self.settings.timeout} s")
            except openai.APIConnectionError as exc:
                last = LLMError("connection", type(exc).__name__)
            except LLMError as exc:
                last = exc
            except (
                openai.APIResponseValidationError,
                ValueError,
                TypeError,
                AttributeError,
            ) as exc:
                # A 200 with a body that is not a chat completion (garbage JSON).
                last = LLMError("malformed", type(exc).__name__)
            else:
                # fsync-ed atomic write off the event loop, so it does not stall other requests.
                await asyncio.to_thread(self.cache.put, key, self.settings.model, content)
                self.stats.responses_ok += 1
                return content
            self.stats.errors[last.kind] += 1
            if attempt < self.settings.max_retries:
                self.stats.retries += 1
                delay = self._delay(attempt, retry_after)
                log.debug("request failed (%s); retry %d in %.2f s", last, attempt + 1, delay)
                await asyncio.sleep(delay)
        self.stats.failed_requests += 1
        assert last is not None
        raise last
