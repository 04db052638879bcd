"""A scripted OpenAI-compatible chat-completions server for tests (127.0.0.1, random port).

``POST /v1/chat/completions`` answers according to markers in the last user message:

* no marker - a normal refinement (``refine``): lines containing ``Cookie`` are deleted,
  the word ``colour`` is rewritten to ``color`` and an invented sentence is appended, so
  tests can show that distillation discards everything but deletions;
* ``[[fail500:N]]`` - the first N requests with this content get HTTP 500;
* ``[[rate429:N]]`` - the first N get HTTP 429 with ``Retry-After: 1``;
* ``[[malformed:N]]`` - the first N get a 200 whose body is not JSON;
* ``[[nochoices:N]]`` - the first N get a 200 JSON body without ``choices``;
* ``[[slow:S]]`` - every answer waits S seconds first (beyond the client's timeout);
* ``[[delay:S]]`` - every answer waits S seconds, then succeeds (concurrency tests);
* ``[[length]]`` - the answer is cut off (``finish_reason: "length"``);
* ``[[echo-key]]`` - HTTP 400 whose body echoes the Authorization header it received.

With ``expected_key`` set, a request without ``Authorization: Bearer <expected_key>`` gets
HTTP 401. Every request is recorded (path, headers, parsed body) and the server tracks the
largest number of requests in flight at once.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

INVENTED_SENTENCE = "This sentence was invented by the stub model."
_MARKER = re.compile(r"\[\[(\w[\w-]*)(?::([\d.]+))?\]\]")


def refine(text: str) -> str:
    """The stub's refinement: delete ``Cookie`` lines, rewrite a word, invent a sentence."""
    kept = [line for line in text.split("\n") if "Cookie" not in line]
    body = "\n".join(kept).replace("colour", "color")
    return f"{body}\n{INVENTED_SENTENCE}" if body else INVENTED_SENTENCE


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: Any


class ChatStubServer:
    """A threaded HTTP server; use as a context manager or call ``start``/``stop``."""

    def __init__(self, expected_key: Optional[str] = None, model: str = "stub-model") -> None:
        self.expected_key = expected_key
        self.model = model
        self.requests: list[RecordedRequest] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "ChatStubServer":
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr
                return None

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                stub._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="chat-stub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "ChatStubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def requests_for(self, marker: str) -> list[RecordedRequest]:
        """Recorded requests whose user message contains ``marker``."""
        with self._lock:
            return [r for r in self.requests if marker in _user_text(r.body)]

    # -- request handling -----------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length)
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        with self._lock:
            self.requests.append(RecordedRequest(handler.path, dict(handler.headers.items()), body))
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            status, payload, headers = self._answer(handler.path, handler.headers.get("Authorization"), body)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            try:
                handler.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _answer(self, path: str, auth: Optional[str], body: Any) -> tuple[int, Any, dict[str, str]]:
        if path.rstrip("/") != "/v1/chat/completions":
            return 404, {"error": {"message": f"no route {path}"}}, {}
        if self.expected_key is not None and auth != f"Bearer {self.expected_key}":
            return 401, {"error": {"message": "invalid API key"}}, {}
        text = _user_text(body)
        markers = {name: value for name, value in _MARKER.findall(text)}
        with self._lock:
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            seen = self._seen.get(digest, 0)
            self._seen[digest] = seen + 1
        for name in ("slow", "delay"):
            if name in markers:
                time.sleep(float(markers[name] or 0))
        if "echo-key" in markers:
            return 400, {"error": {"message": f"bad request with Authorization {auth}"}}, {}
        if "fail500" in markers and seen < int(markers["fail500"] or 1):
            return 500, {"error": {"message": "internal error"}}, {}
        if "rate429" in markers and seen < int(markers["rate429"] or 1):
            return 429, {"error": {"message": "rate limited"}}, {"Retry-After": "1"}
        if "malformed" in markers and seen < int(markers["malformed"] or 1):
            return 200, b'{"choices": [ {"message": ', {}
        if "nochoices" in markers and seen < int(markers["nochoices"] or 1):
            return 200, {"id": "x", "object": "chat.completion"}, {}
        answer = refine(text)
        finish = "length" if "length" in markers else "stop"
        return 200, self._completion(body, answer, finish), {}

    def _completion(self, body: Any, answer: str, finish: str) -> dict[str, Any]:
        prompt_chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
        return {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "model": body.get("model", self.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": max(1, prompt_chars // 4),
                "completion_tokens": max(1, len(answer) // 4),
                "total_tokens": max(1, prompt_chars // 4) + max(1, len(answer) // 4),
            },
        }


def _user_text(body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    messages = [m for m in body.get("messages", []) if isinstance(m, dict) and m.get("role") == "user"]
    return str(messages[-1].get("content", "")) if messages else ""
