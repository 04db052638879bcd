"""A real, local, threaded HTTP server speaking a subset of the OpenAI completions API.

Used by the backend tests: it answers ``POST /v1/completions`` with scripted programs,
``GET /v1/models`` with one model, can fail the first requests (any status, optionally
with ``Retry-After``) or stall them, and records every request it receives.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

__all__ = ["RecordedRequest", "StubServer"]


@dataclass
class RecordedRequest:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Optional[dict[str, Any]]
    served_at: float = field(default_factory=time.monotonic)


class StubServer:
    """``with StubServer(programs=...) as server: server.url``.

    ``programs``: a callable ``prompt -> completion text`` (default ``keep_all()\\n``).
    ``failures``: a list of HTTP statuses returned, in order, before normal answers
    (``retry_after`` seconds go in a ``Retry-After`` header). ``stall_first``: that many
    completion requests sleep ``stall_seconds`` before answering (to provoke timeouts).
    ``delay``: seconds every completion takes (to observe concurrency).
    """

    def __init__(
        self,
        programs: Optional[Callable[[str], str]] = None,
        *,
        model: str = "refine-stub",
        failures: Optional[list[int]] = None,
        retry_after: Optional[float] = None,
        stall_first: int = 0,
        stall_seconds: float = 2.0,
        delay: float = 0.0,
    ) -> None:
        self.programs = programs or (lambda prompt: "keep_all()\n")
        self.model = model
        self.failures = list(failures or [])
        self.retry_after = retry_after
        self.stall_first = stall_first
        self.stall_seconds = stall_seconds
        self.delay = delay
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def completions(self) -> list[RecordedRequest]:
        """The recorded completion requests."""
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/completions")]

    def start(self) -> "StubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "StubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- request handling --------------------------------------------------------------

    def _next_failure(self) -> Optional[int]:
        with self._lock:
            return self.failures.pop(0) if self.failures else None

    def _take_stall(self) -> bool:
        with self._lock:
            if self.stall_first > 0:
                self.stall_first -= 1
                return True
            return False

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return  # keep test output clean

            def _send(self, status: int, payload: dict[str, Any], headers: Optional[dict[str, str]] = None) -> None:
                data = json.dumps(payload).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def _record(self, body: Optional[dict[str, Any]]) -> None:
                with stub._lock:
                    stub.requests.append(
                        RecordedRequest(self.command, self.path, dict(self.headers.items()), body)
                    )

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                self._record(None)
                if self.path.rstrip("/").endswith("/v1/models"):
                    self._send(200, {"object": "list", "data": [{"id": stub.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw.decode("utf-8")) if raw else None
                except ValueError:
                    body = None
                self._record(body)
                if not self.path.rstrip("/").endswith("/v1/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
                    self._send(400, {"error": {"message": "prompt must be a string"}})
                    return
                failure = stub._next_failure()
                if failure is not None:
                    headers = {}
                    if stub.retry_after is not None:
                        headers["Retry-After"] = f"{stub.retry_after:g}"
                    self._send(failure, {"error": {"message": f"scripted {failure}"}}, headers)
                    return
                if stub._take_stall():
                    time.sleep(stub.stall_seconds)
                with stub._lock:
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    if stub.delay:
                        time.sleep(stub.delay)
                    text = stub.programs(body["prompt"])
                finally:
                    with stub._lock:
                        stub.in_flight -= 1
                self._send(
                    200,
                    {
                        "id": "cmpl-stub",
                        "object": "text_completion",
                        "model": body.get("model", stub.model),
                        "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                    },
                )

        return Handler
