"""The LLM expert: an OpenAI-compatible chat-completions endpoint refines whole documents.

``LLMExpert`` sends each document (chunked on line boundaries when it exceeds the
endpoint's input budget) with our refinement instruction (``conf/prompts/``), at
temperature 0, and reassembles the chunk answers in order. It is batch-safe:

* bounded concurrency: at most ``max_concurrency`` requests in flight per expert instance,
  whatever the number of threads calling ``refine_batch``;
* retries with exponential backoff and full jitter on timeouts, connection errors (a
  refused or dropped connection, a body cut short), HTTP 408/409/425/429/5xx and malformed
  answers (bad or undecodable JSON, no ``choices``, no content; an empty content too when
  ``empty_answer_ok`` is false), honouring ``Retry-After`` up to ``backoff_max_s``; after
  ``max_attempts`` the document's output is ``FAILED`` with the last error -
  ``refine_batch`` never raises for endpoint problems;
* a response cache (``refinex.experts.cache.ResponseCache``) keyed by model, prompt
  version and document hash, so a rerun makes no request for a document already refined.

The API key comes from an environment variable (``REFINEX_EXPERT_API_KEY`` by default) or,
on Databricks, a secret scope. It is held in a ``Secret`` that never renders its value, is
redacted from every error message and log line, and is not part of ``params()``.

Spark: build the expert on the driver (``LLMExpert.from_yaml``), optionally call
``resolve_api_key()`` there, and use it inside ``mapInPandas``: the instance pickles
without its HTTP client, locks or statistics, and each task calls ``refine_stream`` over its
partition with ``max_concurrency`` sized to the endpoint's limit divided by the number of
concurrent tasks. Aggregate the written outputs with ``aggregate_outputs``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union
from urllib.parse import urlsplit, urlunsplit

import httpx

from refinex.experts.base import FAILED, OK, ExpertInput, ExpertOutput
from refinex.experts.cache import CachedResponse, ResponseCache, cache_key, doc_hash
from refinex.httputil import retry_after_seconds
from refinex.settings import settings_from_mapping

logger = logging.getLogger(__name__)

__all__ = [
    "Chunk",
    "LLMConfig",
    "LLMExpert",
    "LLMStats",
    "Prompt",
    "Secret",
    "aggregate_outputs",
    "create_llm_expert",
    "load_prompt",
    "resolve_conf_path",
    "split_for_budget",
]

DEFAULT_API_KEY_ENV = "REFINEX_EXPERT_API_KEY"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROMPT_PATH = "conf/prompts/refine_v1.txt"
DEFAULT_CONFIG_PATH = "conf/experts/llm.yaml"
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
REDACTED = "***"


class Secret:
    """A string that never shows itself: ``repr``/``str`` are masked, pickling keeps it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret value (only for building the Authorization header)."""
        return self._value

    def redact(self, text: str) -> str:
        """``text`` with every occurrence of the secret replaced by ``***``."""
        return text.replace(self._value, REDACTED) if self._value else text

    def __repr__(self) -> str:
        return f"Secret({REDACTED})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __getstate__(self) -> str:
        return self._value

    def __setstate__(self, state: str) -> None:
        self._value = state


@dataclass(frozen=True)
class Prompt:
    """The refinement instruction and its version (file stem + content hash)."""

    text: str
    version: str


def resolve_conf_path(path: Union[str, "os.PathLike[str]"]) -> Path:
    """A config/prompt path: absolute or existing as given; else ``conf/...`` under
    ``$REFINEX_CONF_DIR`` when it has the file, else in the shipped ``conf`` (the wheel's
    ``refinex/conf`` or the repository's, :func:`refinex.config.find_conf_file`); else
    relative to the repository."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    if len(candidate.parts) > 1 and candidate.parts[0] == "conf":
        from refinex.config import find_conf_file

        return find_conf_file(*candidate.parts[1:])
    return REPO_ROOT / candidate


def load_prompt(path: Union[str, "os.PathLike[str]"] = DEFAULT_PROMPT_PATH) -> Prompt:
    """Read a prompt file (relative paths: the working directory, else the repository).

    The version is ``<file stem>-<first 12 hex of sha256(text)>``, so editing the prompt
    changes the version and therefore every cache key.
    """
    resolved = resolve_conf_path(path)
    text = resolved.read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"prompt file {resolved} is empty")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return Prompt(text=text, version=f"{resolved.stem}-{digest}")


@dataclass(frozen=True)
class LLMConfig:
    """Endpoint, budget, retry and pricing settings (no secret in here, only where to find it)."""

    base_url: str
    model: str
    temperature: float = 0.0
    max_tokens: int = 4096  # completion budget per request
    timeout_s: float = 120.0  # per request (connect, read, write, pool)
    max_input_tokens: int = 3500  # document tokens per request, excluding the instruction
    chars_per_token: float = 4.0  # token estimate: len(text) / chars_per_token
    max_concurrency: int = 4  # requests in flight per expert instance
    max_attempts: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    prompt_path: str = DEFAULT_PROMPT_PATH
    api_key_env: str = DEFAULT_API_KEY_ENV
    secret_scope: Optional[str] = None  # Databricks secret scope holding the key
    secret_key: Optional[str] = None  # key name inside that scope
    price_input_per_1m: float = 0.0  # USD per 1M prompt tokens
    price_output_per_1m: float = 0.0  # USD per 1M completion tokens
    trust_env: bool = True  # honour HTTP(S)_PROXY / SSL env variables
    # An empty answer means "the whole input is noise" (the shipped prompt asks for nothing
    # then); false, with a prompt that never does, retries it like a malformed answer.
    empty_answer_ok: bool = True
    name: str = "llm"

    def __post_init__(self) -> None:
        if not self.base_url:
            raise ValueError("base_url is required")
        if not self.model:
            raise ValueError("model is required")
        positive = ("max_tokens", "timeout_s", "max_input_tokens", "chars_per_token", "max_concurrency", "max_attempts")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise ValueError("backoff delays must be >= 0")
        if (self.secret_scope is None) != (self.secret_key is None):
            raise ValueError("secret_scope and secret_key go together")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "LLMConfig":
        """Build from a mapping; unknown keys are an error (typos must not pass silently)."""
        return settings_from_mapping(cls, values, "LLM expert")

    @classmethod
    def from_yaml(cls, path: Union[str, "os.PathLike[str]"] = DEFAULT_CONFIG_PATH, **overrides: Any) -> "LLMConfig":
        """Load ``conf/experts/llm.yaml`` (the ``llm:`` section, or the top level)."""
        import yaml

        with open(resolve_conf_path(path), "r", encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        section = data.get("llm", data) if isinstance(data, dict) else {}
        merged = {**section, **{k: v for k, v in overrides.items() if v is not None}}
        return cls.from_mapping(merged)


@dataclass
class LLMStats:
    """Counters of one expert instance (or aggregated over outputs)."""

    docs: int = 0
    docs_requested: int = 0  # documents that needed at least one request
    cache_hits: int = 0
    failures: int = 0  # documents whose output is FAILED
    chunks: int = 0
    requests: int = 0  # HTTP attempts, retries included
    retries: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = 0.0  # summed over documents
    price_input_per_1m: float = 0.0
    price_output_per_1m: float = 0.0

    @property
    def cost_usd(self) -> float:
        return (self.tokens_in * self.price_input_per_1m + self.tokens_out * self.price_output_per_1m) / 1e6

    @property
    def cost_per_1k_docs(self) -> float:
        """Estimated USD per 1000 documents sent to the endpoint (cache hits cost nothing)."""
        return 1000.0 * self.cost_usd / self.docs_requested if self.docs_requested else 0.0

    def as_metrics(self, prefix: str = "expert.") -> dict[str, float]:
        """Flat numeric metrics for MLflow (``mlflow.log_metrics``)."""
        values = {k: v for k, v in asdict(self).items() if not k.startswith("price_")}
        values["cost_usd"] = self.cost_usd
        values["cost_per_1k_docs"] = self.cost_per_1k_docs
        values["mean_latency_s"] = self.latency_s / self.docs_requested if self.docs_requested else 0.0
        return {f"{prefix}{k}": float(v) for k, v in values.items()}


def aggregate_outputs(
    outputs: Iterable[Union[ExpertOutput, Mapping[str, Any]]],
    price_input_per_1m: float = 0.0,
    price_output_per_1m: float = 0.0,
) -> LLMStats:
    """Statistics from stored outputs (``ExpertOutput`` or rows with its field names).

    This is how the Spark stage aggregates over executors: retries and chunk counts are
    not in the outputs, so they stay 0 here.
    """
    stats = LLMStats(price_input_per_1m=price_input_per_1m, price_output_per_1m=price_output_per_1m)
    for out in outputs:
        row = asdict(out) if isinstance(out, ExpertOutput) else out
        stats.docs += 1
        if row.get("cached"):
            stats.cache_hits += 1
        if row.get("status") == FAILED:
            stats.failures += 1
        n_requests = int(row.get("requests") or 0)
        if n_requests:
            stats.docs_requested += 1
        stats.requests += n_requests
        stats.tokens_in += int(row.get("tokens_in") or 0)
        stats.tokens_out += int(row.get("tokens_out") or 0)
        stats.latency_s += float(row.get("latency_s") or 0.0)
    return stats


@dataclass(frozen=True)
class Chunk:
    """A piece of a document; ``joins_line`` when it continues the previous piece's line."""

    text: str
    joins_line: bool = False


def _split_long_line(line: str, max_chars: int) -> list[str]:
    """Cut one over-long line into pieces of at most ``max_chars``, at whitespace if possible."""
    pieces: list[str] = []
    rest = line
    while len(rest) > max_chars:
        cut = rest.rfind(" ", max_chars // 2, max_chars)
        cut = cut + 1 if cut > 0 else max_chars
        pieces.append(rest[:cut])
        rest = rest[cut:]
    pieces.append(rest)
    return pieces


def split_for_budget(text: str, max_chars: int) -> list[Chunk]:
    """Greedy chunks of whole lines of at most ``max_chars`` characters, in order.

    A single line longer than the budget is split at whitespace (pieces marked
    ``joins_line``). Joining the chunks (``""`` before a ``joins_line`` chunk, ``"\\n"``
    otherwise) gives back ``text`` exactly.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be >= 1")
    chunks: list[Chunk] = []
    current: list[str] = []
    size = 0
    for line in text.split("\n"):
        if len(line) > max_chars:
            if current:
                chunks.append(Chunk("\n".join(current)))
                current, size = [], 0
            for i, piece in enumerate(_split_long_line(line, max_chars)):
                chunks.append(Chunk(piece, joins_line=i > 0))
            continue
        added = len(line) + (1 if current else 0)
        if current and size + added > max_chars:
            chunks.append(Chunk("\n".join(current)))
            current, size = [], 0
            added = len(line)
        current.append(line)
        size += added
    if current or not chunks:
        chunks.append(Chunk("\n".join(current)))
    return chunks


def _strip_fence(answer: str, source: str) -> str:
    """Remove one code fence wrapping the whole answer (unless the source itself is fenced)."""
    stripped = answer.strip()
    if len(stripped) < 6 or not (stripped.startswith("```") and stripped.endswith("```")):
        return answer
    if source.lstrip().startswith("```"):
        return answer
    inner = stripped[3:-3]
    first, newline, rest = inner.partition("\n")
    if newline and (not first.strip() or re.fullmatch(r"[A-Za-z0-9_+-]{1,20}", first.strip())):
        inner = rest
    return inner.strip("\n")


def _on_databricks() -> bool:
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def _databricks_secret(scope: str, key: str) -> Optional[str]:
    """``dbutils.secrets.get(scope, key)`` via the active Spark session or the notebook's
    ``dbutils``; ``None`` (logged without any value) when neither can read it."""
    try:
        try:
            from pyspark.dbutils import DBUtils  # type: ignore[import-not-found]
            from pyspark.sql import SparkSession

            spark = SparkSession.getActiveSession()
            if spark is not None:
                return str(DBUtils(spark).secrets.get(scope=scope, key=key))
        except ImportError:
            pass
        try:
            import IPython  # type: ignore[import-not-found]
        except ImportError:
            return None
        shell = IPython.get_ipython()
        dbutils = shell.user_ns.get("dbutils") if shell is not None else None
        return str(dbutils.secrets.get(scope=scope, key=key)) if dbutils is not None else None
    except Exception as exc:  # noqa: BLE001 - a missing scope/permission must not crash a batch
        logger.warning("could not read Databricks secret %s/%s (%s)", scope, key, type(exc).__name__)
        return None


class _RequestError(Exception):
    """One failed attempt; ``retryable`` tells whether another attempt may succeed."""

    def __init__(self, message: str, retryable: bool, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass
class _ChunkResult:
    text: Optional[str] = None
    error: Optional[str] = None
    tokens_in: int = 0
    tokens_out: int = 0
    attempts: int = 0
    elapsed_s: float = 0.0


@dataclass
class _DocPlan:
    index: int
    doc: ExpertInput
    key: str
    doc_hash: str
    chunks: list[Chunk] = field(default_factory=list)
    results: list[_ChunkResult] = field(default_factory=list)


class LLMExpert:
    """An ``Expert`` backed by an OpenAI-compatible ``/chat/completions`` endpoint."""

    needs_html: bool = False  # refines the document text

    io_bound = True  # waits on the network: a consensus runs it alongside CPU-bound members

    def __init__(
        self,
        config: LLMConfig,
        cache: Optional[ResponseCache] = None,
        prompt: Optional[Prompt] = None,
        api_key: Optional[Union[str, Secret]] = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.config = config
        self.cache = cache
        self.prompt = prompt or load_prompt(config.prompt_path)
        self.name = config.name
        self.version = f"{config.model}+{self.prompt.version}"
        self._api_key: Optional[Secret] = Secret(api_key) if isinstance(api_key, str) else api_key
        self._key_resolved = api_key is not None
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._client: Optional[httpx.Client] = None
        self._client_lock = threading.Lock()
        self._in_flight = threading.BoundedSemaphore(self.config.max_concurrency)
        self._stats_lock = threading.Lock()
        self._stats = LLMStats(
            price_input_per_1m=self.config.price_input_per_1m,
            price_output_per_1m=self.config.price_output_per_1m,
        )

    @classmethod
    def from_yaml(
        cls,
        path: Union[str, "os.PathLike[str]"] = DEFAULT_CONFIG_PATH,
        cache: Optional[ResponseCache] = None,
        **overrides: Any,
    ) -> "LLMExpert":
        """An expert from ``conf/experts/llm.yaml`` with keyword overrides."""
        return cls(LLMConfig.from_yaml(path, **overrides), cache=cache)

    # -- pickling (Spark ships the expert to executors) -----------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = {
            "config": self.config,
            "cache": self.cache,
            "prompt": self.prompt,
            "name": self.name,
            "version": self.version,
            "_api_key": self._api_key,
            "_key_resolved": self._key_resolved,
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._sleep = time.sleep
        self._rng = random.Random()
        self._init_runtime()

    def __repr__(self) -> str:
        return (
            f"LLMExpert(name={self.name!r}, model={self.config.model!r}, "
            f"base_url={_safe_url(self.config.base_url)!r}, prompt_version={self.prompt.version!r}, "
            f"max_concurrency={self.config.max_concurrency})"
        )

    __str__ = __repr__

    # -- configuration facts --------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self.config.base_url.rstrip("/") + "/chat/completions"

    @property
    def max_chunk_chars(self) -> int:
        """Characters of document text per request."""
        return max(1, int(self.config.max_input_tokens * self.config.chars_per_token))

    def params(self) -> dict[str, str]:
        """Settings safe to log as MLflow params (no secret, credentials stripped from URLs)."""
        c = self.config
        return {
            "expert.name": self.name,
            "expert.version": self.version,
            "expert.model": c.model,
            "expert.base_url": _safe_url(c.base_url),
            "expert.prompt_version": self.prompt.version,
            "expert.temperature": str(c.temperature),
            "expert.max_tokens": str(c.max_tokens),
            "expert.max_input_tokens": str(c.max_input_tokens),
            "expert.timeout_s": str(c.timeout_s),
            "expert.max_concurrency": str(c.max_concurrency),
            "expert.max_attempts": str(c.max_attempts),
            "expert.empty_answer_ok": str(c.empty_answer_ok),
            "expert.api_key_source": (
                f"databricks:{c.secret_scope}/{c.secret_key}" if c.secret_scope else f"env:{c.api_key_env}"
            ),
            "expert.price_input_per_1m": str(c.price_input_per_1m),
            "expert.price_output_per_1m": str(c.price_output_per_1m),
        }

    def stats(self) -> LLMStats:
        """A snapshot of this instance's counters."""
        with self._stats_lock:
            return LLMStats(**asdict(self._stats))

    # -- secrets --------------------------------------------------------------------------

    def resolve_api_key(self) -> bool:
        """Look the API key up now (Databricks secret scope, else the environment variable).

        Returns whether a key is available. Call it on the driver before shipping the expert
        to executors when executors cannot read the secret themselves.
        """
        if not self._key_resolved:
            c = self.config
            value: Optional[str] = None
            if c.secret_scope and c.secret_key and _on_databricks():
                value = _databricks_secret(c.secret_scope, c.secret_key)
            if not value:
                value = os.environ.get(c.api_key_env) or None
            self._api_key = Secret(value) if value else None
            self._key_resolved = True
            if value is None:
                logger.info("no API key found (%s); requests go without Authorization", self.params()["expert.api_key_source"])
        return self._api_key is not None

    def _redact(self, text: str) -> str:
        return self._api_key.redact(text) if self._api_key is not None else text

    # -- HTTP -----------------------------------------------------------------------------

    def _http(self) -> httpx.Client:
        with self._client_lock:
            if self._client is None:
                n = self.config.max_concurrency
                self._client = httpx.Client(
                    timeout=httpx.Timeout(self.config.timeout_s),
                    limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                    trust_env=self.config.trust_env,
                )
            return self._client

    def close(self) -> None:
        """Close the HTTP client (a later call opens a new one)."""
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __enter__(self) -> "LLMExpert":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key.reveal()}"
        return headers

    def request_body(self, text: str) -> dict[str, Any]:
        """The chat-completions request body for one chunk of document text."""
        return {
            "model": self.config.model,
            "messages": [
                {"role": "system", "content": self.prompt.text},
                {"role": "user", "content": text},
            ],
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }

    def _attempt(self, text: str) -> tuple[str, int, int]:
        """One HTTP attempt: ``(answer, tokens_in, tokens_out)`` or ``_RequestError``."""
        try:
            with self._in_flight:
                response = self._http().post(self.endpoint, json=self.request_body(text), headers=self._headers())
        except httpx.TimeoutException as exc:
            raise _RequestError(f"timeout after {self.config.timeout_s:g}s ({type(exc).__name__})", True) from None
        except httpx.TransportError as exc:
            raise _RequestError(f"connection error ({type(exc).__name__}: {self._redact(str(exc))})", True) from None
        except httpx.DecodingError as exc:  # a body its Content-Encoding cannot decode: must not escape the batch
            raise _RequestError(f"malformed response: undecodable body ({self._redact(str(exc))})", True) from None
        status = response.status_code
        if status != 200:
            body = self._redact(response.text[:300].replace("\n", " "))
            retryable = status in RETRYABLE_STATUS or status >= 500
            retry_after = retry_after_seconds(response.headers.get("Retry-After")) if retryable else None
            raise _RequestError(f"HTTP {status}: {body}", retryable, retry_after)
        try:
            payload = response.json()
        except ValueError:
            raise _RequestError("malformed response: not JSON", True) from None
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise _RequestError("malformed response: no choices", True)
        choice = choices[0]
        finish = choice.get("finish_reason")
        if finish == "length":
            raise _RequestError(f"answer truncated at max_tokens={self.config.max_tokens} (finish_reason=length)", False)
        if finish == "content_filter":
            raise _RequestError("answer blocked by the endpoint's content filter", False)
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            raise _RequestError("malformed response: no message content", True)
        if not content.strip() and text.strip() and not self.config.empty_answer_ok:
            raise _RequestError("empty answer (empty_answer_ok is false)", True)
        usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
        return content, _as_int(usage.get("prompt_tokens")), _as_int(usage.get("completion_tokens"))

    def _backoff(self, attempt: int, retry_after: Optional[float]) -> float:
        """Full jitter: uniform(0, min(max, base * 2**(attempt-1))); Retry-After wins when given,
        never beyond ``backoff_max_s`` (0 included: a server's Retry-After cannot stall a task)."""
        cap = self.config.backoff_max_s
        if retry_after is not None:
            return min(retry_after, cap)
        return self._rng.uniform(0.0, min(cap, self.config.backoff_base_s * 2 ** (attempt - 1)))

    def _call(self, text: str) -> _ChunkResult:
        """Request one chunk with retries; never raises."""
        result = _ChunkResult()
        started = time.monotonic()
        for attempt in range(1, self.config.max_attempts + 1):
            result.attempts = attempt
            try:
                answer, tokens_in, tokens_out = self._attempt(text)
            except _RequestError as err:
                result.error = err.message
                if not err.retryable or attempt == self.config.max_attempts:
                    logger.warning("chat request failed after %d attempt(s): %s", attempt, err.message)
                    break
                delay = self._backoff(attempt, err.retry_after)
                logger.info("chat request attempt %d failed (%s); retrying in %.2fs", attempt, err.message, delay)
                with self._stats_lock:
                    self._stats.retries += 1
                self._sleep(delay)
                continue
            result.text = _strip_fence(answer, text)
            result.error = None
            result.tokens_in += tokens_in
            result.tokens_out += tokens_out
            break
        result.elapsed_s = time.monotonic() - started
        with self._stats_lock:
            self._stats.requests += result.attempts
            self._stats.chunks += 1
        return result

    # -- the Expert protocol --------------------------------------------------------------

    def refine_batch(self, docs: Sequence[ExpertInput]) -> list[ExpertOutput]:
        """One output per input, in order; endpoint failures become FAILED outputs."""
        outputs: list[Optional[ExpertOutput]] = [None] * len(docs)
        plans: list[_DocPlan] = []
        for i, doc in enumerate(docs):
            if not doc.text.strip():
                outputs[i] = ExpertOutput(doc.doc_id, doc.text)
                continue
            h = doc_hash(doc.text)
            plans.append(_DocPlan(i, doc, cache_key(self.config.model, self.prompt.version, h), h))
        cached = self.cache.get_many([p.key for p in plans]) if (self.cache is not None and plans) else {}
        todo: list[_DocPlan] = []
        first_of_key: dict[str, _DocPlan] = {}
        duplicates: list[_DocPlan] = []
        for plan in plans:
            hit = cached.get(plan.key)
            if hit is not None:
                outputs[plan.index] = ExpertOutput(plan.doc.doc_id, hit.refined_text, cached=True)
            elif plan.key in first_of_key:
                duplicates.append(plan)
            else:
                first_of_key[plan.key] = plan
                plan.chunks = split_for_budget(plan.doc.text, self.max_chunk_chars)
                todo.append(plan)
        if todo:
            self._request_all(todo)
        new_rows: list[CachedResponse] = []
        for plan in todo:
            out = self._assemble(plan)
            outputs[plan.index] = out
            if out.status == OK and out.refined_text is not None:
                new_rows.append(
                    CachedResponse(plan.key, self.config.model, self.prompt.version, plan.doc_hash,
                                   out.refined_text, out.tokens_in, out.tokens_out)
                )
        for plan in duplicates:
            first = outputs[first_of_key[plan.key].index]
            assert first is not None
            outputs[plan.index] = ExpertOutput(
                plan.doc.doc_id, first.refined_text, first.status, first.error, cached=first.status == OK
            )
        if new_rows and self.cache is not None:
            self.cache.put_many(new_rows)
        final = [o for o in outputs if o is not None]
        assert len(final) == len(docs)
        with self._stats_lock:
            self._stats.docs += len(final)
            self._stats.docs_requested += len(todo)
            self._stats.cache_hits += sum(1 for o in final if o.cached)
            self._stats.failures += sum(1 for o in final if o.status == FAILED)
            for o in final:
                self._stats.tokens_in += o.tokens_in
                self._stats.tokens_out += o.tokens_out
                self._stats.latency_s += o.latency_s
        return final

    def refine_stream(self, docs: Iterable[ExpertInput], batch_size: int = 64) -> Iterator[ExpertOutput]:
        """``refine_batch`` over consecutive batches of ``docs`` (for a Spark partition)."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        batch: list[ExpertInput] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) >= batch_size:
                yield from self.refine_batch(batch)
                batch = []
        if batch:
            yield from self.refine_batch(batch)

    def _request_all(self, plans: Sequence[_DocPlan]) -> None:
        """Send every chunk of every plan, at most ``max_concurrency`` at a time."""
        if not self.resolve_api_key() and self.config.secret_scope and _on_databricks():
            error = f"API key unavailable from Databricks secret {self.config.secret_scope}/{self.config.secret_key}"
            for plan in plans:
                plan.results = [_ChunkResult(error=error) for _ in plan.chunks]
            return
        jobs = [(plan, chunk) for plan in plans for chunk in plan.chunks]
        workers = min(self.config.max_concurrency, len(jobs))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="refinex-llm") as pool:
            results = list(pool.map(lambda job: self._call(job[1].text), jobs))
        cursor = 0
        for plan in plans:
            plan.results = results[cursor : cursor + len(plan.chunks)]
            cursor += len(plan.chunks)

    def _assemble(self, plan: _DocPlan) -> ExpertOutput:
        """Join chunk answers in order, or report the document's failure."""
        tokens_in = sum(r.tokens_in for r in plan.results)
        tokens_out = sum(r.tokens_out for r in plan.results)
        attempts = sum(r.attempts for r in plan.results)
        latency = sum(r.elapsed_s for r in plan.results)
        failed = [r for r in plan.results if r.text is None]
        if failed:
            error = failed[-1].error or "no answer"
            if len(plan.chunks) > 1:
                error = f"{len(failed)}/{len(plan.chunks)} chunks failed; last: {error}"
            return ExpertOutput(plan.doc.doc_id, None, FAILED, self._redact(error), tokens_in, tokens_out, attempts, latency)
        lines: list[str] = []
        for chunk, result in zip(plan.chunks, plan.results):
            piece = (result.text or "").strip("\n")
            if chunk.joins_line and lines:
                lines[-1] += piece
            else:
                lines.append(piece)
        text = "\n".join(line for line in lines if line)
        return ExpertOutput(plan.doc.doc_id, text, OK, None, tokens_in, tokens_out, attempts, latency)


def _as_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _safe_url(url: str) -> str:
    """``url`` without user info or query string (they may carry credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))



def create_llm_expert(
    config_path: Union[str, "os.PathLike[str]"] = DEFAULT_CONFIG_PATH,
    cache: Optional[ResponseCache] = None,
    cache_path: Optional[str] = None,
    **overrides: Any,
) -> LLMExpert:
    """Registry factory: ``get_expert("llm", config_path=..., cache_path=..., model=...)``.

    ``overrides`` replace keys of the YAML file; ``cache_path`` gives a local JSON-lines
    cache when no ``cache`` object is passed (the Spark stage passes its Delta-backed one).
    """
    if cache is None and cache_path:
        from refinex.experts.cache import JsonlResponseCache

        cache = JsonlResponseCache(cache_path)
    return LLMExpert(LLMConfig.from_yaml(config_path, **overrides), cache=cache)


