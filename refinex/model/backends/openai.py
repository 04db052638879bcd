"""OpenAI-compatible ``/v1/completions`` backend (the sidecar pattern).

One inference server (e.g. ``vllm serve``) runs per GPU node; the Spark UDF is its client.
Each chunk's prompt is one completion request (temperature 0 unless sampling, ``stop`` at a
blank line), sent by a bounded thread pool over one pooled HTTP client. Transient failures
(timeouts, connection errors, 408/409/429 and 5xx) are retried with exponential backoff and
jitter, honouring ``Retry-After``; other errors fail at once. With ``constrained`` the
chunk's :func:`~refinex.model.constrained.program_regex` is sent as structured output:
``guided="structured_outputs"`` (vLLM >= 0.10: ``{"structured_outputs": {"regex": ...}}``)
or ``guided="guided_regex"`` (older vLLM). The API key is read from an environment variable.
"""
from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

from refinex.httputil import retry_after_seconds
from refinex.model.backends.base import (
    BackendError,
    DecodeConfig,
    GenerationRequest,
    finish_program,
)

__all__ = ["OpenAIBackend", "GUIDED_MODES"]

GUIDED_MODES = ("structured_outputs", "guided_regex", "none")
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class OpenAIBackend:
    """Programs from an OpenAI-compatible completions server.

    ``base_url`` is the server root or its ``/v1`` root. ``model``: the served model name
    (default: the first entry of ``GET /v1/models``). ``api_key_env``: the environment
    variable holding the key (sent as a bearer token when set). ``timeout``: seconds per
    request; ``max_retries``: retries after the first attempt; ``concurrency``: requests in
    flight; ``extra_body``: merged into every request body.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        config: DecodeConfig = DecodeConfig(),
        *,
        model: Optional[str] = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        concurrency: int = 16,
        guided: str = "structured_outputs",
        extra_body: Optional[dict[str, Any]] = None,
        transport: Any = None,
    ) -> None:
        import httpx

        if guided not in GUIDED_MODES:
            raise ValueError(f"guided must be one of {GUIDED_MODES}, got {guided!r}")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0 and timeout > 0")
        root = base_url.rstrip("/")
        self.api_root = root if root.endswith("/v1") else root + "/v1"
        self.config = config
        self.guided = guided
        self.extra_body = dict(extra_body or {})
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.concurrency = concurrency
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(api_key_env) if api_key_env else None
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._client = httpx.Client(
            headers=headers, timeout=httpx.Timeout(timeout), limits=limits, transport=transport
        )
        self._random = random.Random(config.seed)
        self._lock = threading.Lock()
        self._model = model
        #: Counters since creation: requests sent (attempts) and retries.
        self.stats = {"attempts": 0, "retries": 0, "completions": 0}

    # -- public API --------------------------------------------------------------------

    @property
    def model(self) -> str:
        """The served model name (looked up once when not given)."""
        if self._model is None:
            data = self._request("GET", "/models", None)
            models = data.get("data") or []
            if not models or not isinstance(models[0], dict) or "id" not in models[0]:
                raise BackendError(f"{self.api_root}/models lists no model")
            self._model = str(models[0]["id"])
        return self._model

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Raw program text per request, in input order (raises :class:`BackendError`)."""
        if not requests:
            return []
        model = self.model
        if self.concurrency == 1 or len(requests) == 1:
            return [self._complete(model, r) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(lambda r: self._complete(model, r), requests))

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    def __enter__(self) -> "OpenAIBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------

    def body(self, model: str, request: GenerationRequest) -> dict[str, Any]:
        """The JSON body of one completion request."""
        cfg = self.config
        body: dict[str, Any] = {
            "model": model,
            "prompt": request.prompt,
            "max_tokens": cfg.max_new_tokens,
            "temperature": 0.0 if cfg.greedy else cfg.temperature,
            "n": 1,
            "stop": list(cfg.stop),
        }
        if not cfg.greedy:
            body["top_p"] = cfg.top_p
            body["seed"] = cfg.seed
        if cfg.constrained and self.guided != "none":
            regex = request.regex()
            if self.guided == "structured_outputs":
                body["structured_outputs"] = {"regex": regex}
            else:
                body["guided_regex"] = regex
        body.update(self.extra_body)
        return body

    def _complete(self, model: str, request: GenerationRequest) -> str:
        data = self._request("POST", "/completions", self.body(model, request))
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise BackendError(f"completion response without choices: {str(data)[:200]}")
        text = choices[0].get("text")
        if not isinstance(text, str):
            raise BackendError(f"completion choice without text: {str(choices[0])[:200]}")
        with self._lock:
            self.stats["completions"] += 1
        return finish_program(text, self.config.stop, self.config.constrained)

    def _delay(self, attempt: int, retry_after: Optional[float]) -> float:
        with self._lock:
            jitter = 0.5 + self._random.random() / 2
        delay = min(self.backoff_max, self.backoff_base * (2**attempt)) * jitter
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay

    def _request(self, method: str, path: str, body: Optional[dict[str, Any]]) -> dict[str, Any]:
        import httpx

        url = self.api_root + path
        last_error = ""
        for attempt in range(self.max_retries + 1):
            with self._lock:
                self.stats["attempts"] += 1
                if attempt:
                    self.stats["retries"] += 1
            retry_after: Optional[float] = None
            try:
                response = self._client.request(method, url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    try:
                        data = response.json()
                    except ValueError as exc:
                        raise BackendError(f"{method} {url}: invalid JSON ({exc})") from None
                    if not isinstance(data, dict):
                        raise BackendError(f"{method} {url}: expected a JSON object")
                    return data
                last_error = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code not in RETRYABLE_STATUS:
                    raise BackendError(f"{method} {url} failed: {last_error}")
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            if attempt < self.max_retries:
                time.sleep(self._delay(attempt, retry_after))
        raise BackendError(
            f"{method} {url} failed after {self.max_retries + 1} attempts: {last_error}"
        )
