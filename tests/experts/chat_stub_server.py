"""A scripted OpenAI-compatible chat-completions server for tests (127.0.0.1, random port).

``POST /v1/chat/completions`` answers according to markers in the last user message:

* no marker - a normal refinement (``refine``): lines containing ``Cookie`` are deleted,
  the word ``colour`` is rewritten to ``color`` and an invented sentence is appended, so
  tests can show that distillation discards everything but deletions;
* ``[[fail500:N]]`` - the first N requests with this content get HTTP 500;
* ``[[fail503:N]]`` - the first N get HTTP 503 (``Retry-After`` only with ``[[retry-after:S]]``);
* ``[[rate429:N]]`` - the first N get HTTP 429 with ``Retry-After: 1``;
* ``[[retry-after:S]]`` - the ``Retry-After`` of those 429/503 answers is S (delta-seconds);
* ``[[retry-after-date:S]]`` - ... is the HTTP date S seconds from now;
* ``[[malformed:N]]`` - the first N get a 200 whose body is truncated JSON;
* ``[[notjson:N]]`` - the first N get a 200 whose body is an HTML page;
* ``[[truncated:N]]`` - the first N get a 200 whose body stops halfway (the connection closes
  before ``Content-Length`` bytes);
* ``[[badgzip:N]]`` - the first N get a 200 claiming ``Content-Encoding: gzip`` over plain bytes;
* ``[[nochoices:N]]`` - the first N get a 200 JSON body without ``choices``;
* ``[[emptychoices:N]]`` - the first N get ``"choices": []``;
* ``[[nullcontent:N]]`` - the first N get a choice whose message content is null;
* ``[[empty:N]]`` - the first N get an empty answer (content ``""``, ``finish_reason: "stop"``);
* ``[[slow:S]]`` - every answer waits S seconds first (beyond the client's timeout);
* ``[[hang:N]]`` - the first N answers wait ``hang_s`` seconds first, later ones do not;
* ``[[delay:S]]`` - every answer waits S seconds, then succeeds (concurrency tests);
* ``[[length]]`` - the answer is cut off (``finish_reason: "length"``);
* ``[[echo-key]]`` - HTTP 400 whose body echoes the Authorization header it received.

With ``expected_key`` set, a request without ``Authorization: Bearer <expected_key>`` gets
HTTP 401. Outages the test switches on and off: while a key of ``failing`` occurs in the
user message, the answer is that HTTP status. ``die_after=N``: the first N requests to arrive
are answered; the next one kills the server (``kill``): it is recorded and dropped without an
answer, the port stops listening (connections are refused) and any later request on an open
connection is dropped unrecorded. ``port``: the port to bind (0: a free one), the bound one
once started, so a new server can take over the address of one that died.

Every request is recorded (path, headers, parsed body, arrival time) and the server tracks
the largest number of requests in flight at once.
"""
from __future__ import annotations

import email.utils
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
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
    at: float = field(default=0.0, compare=False)  # time.monotonic() on arrival


class _Truncated:
    """A body the handler cuts in half (with the full ``Content-Length``), then hangs up."""

    def __init__(self, data: bytes) -> None:
        self.data = data


class ChatStubServer:
    """A threaded HTTP server; use as a context manager or call ``start``/``stop``."""

    def __init__(
        self,
        expected_key: Optional[str] = None,
        model: str = "stub-model",
        *,
        die_after: Optional[int] = None,
        port: int = 0,
        hang_s: float = 2.0,
    ) -> None:
        self.expected_key = expected_key
        self.model = model
        self.die_after = die_after
        self.port = port
        self.hang_s = hang_s
        self.failing: dict[str, int] = {}
        self.dead = False
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

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="chat-stub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            if not self.dead:
                self._server.shutdown()
            self._server.server_close()
            self._server = None

    def kill(self) -> None:
        """Die: stop listening; requests still arriving on open connections get no answer."""
        with self._lock:
            if self.dead:
                return
            self.dead = True
        self._stop_listening()

    def _stop_listening(self) -> None:
        server = self._server
        if server is not None:
            server.shutdown()  # fine from a handler thread: serve_forever runs in its own
            server.server_close()

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
            if self.dead:
                handler.close_connection = True  # a dead server answers nothing
                return
            self.requests.append(RecordedRequest(handler.path, dict(handler.headers.items()), body, time.monotonic()))
            dying = self.die_after is not None and len(self.requests) > self.die_after
            if dying:
                self.dead = True
            else:
                self._in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self._in_flight)
        if dying:
            handler.close_connection = True
            self._stop_listening()
            return
        try:
            status, payload, headers = self._answer(handler.path, handler.headers.get("Authorization"), body)
            truncated = isinstance(payload, _Truncated)
            if truncated:
                data = payload.data
            else:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
            handler.send_response(status)
            if "Content-Type" not in headers:
                handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            try:
                handler.wfile.write(data[: len(data) // 2] if truncated else data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)
            if truncated:
                handler.close_connection = True
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
        with self._lock:
            outage = next((status for needle, status in self.failing.items() if needle in text), None)
        if outage is not None:
            return outage, {"error": {"message": f"outage (HTTP {outage})"}}, {}

        def first(name: str) -> bool:  # the first N requests with this content carry the fault
            return name in markers and seen < int(markers[name] or 1)

        for name in ("slow", "delay"):
            if name in markers:
                time.sleep(float(markers[name] or 0))
        if first("hang"):
            time.sleep(self.hang_s)
        retry_after: dict[str, str] = {}
        if "retry-after" in markers:
            retry_after["Retry-After"] = markers["retry-after"]
        elif "retry-after-date" in markers:
            when = time.time() + float(markers["retry-after-date"] or 0)
            retry_after["Retry-After"] = email.utils.formatdate(when, usegmt=True)
        if "echo-key" in markers:
            return 400, {"error": {"message": f"bad request with Authorization {auth}"}}, {}
        if first("fail500"):
            return 500, {"error": {"message": "internal error"}}, {}
        if first("fail503"):
            return 503, {"error": {"message": "service unavailable"}}, retry_after
        if first("rate429"):
            return 429, {"error": {"message": "rate limited"}}, retry_after or {"Retry-After": "1"}
        if first("malformed"):
            return 200, b'{"choices": [ {"message": ', {}
        if first("notjson"):
            return 200, b"<html><body>502 Bad Gateway</body></html>", {"Content-Type": "text/html"}
        if first("badgzip"):
            return 200, json.dumps(self._completion(body, refine(text), "stop")).encode(), {"Content-Encoding": "gzip"}
        if first("truncated"):
            return 200, _Truncated(json.dumps(self._completion(body, refine(text), "stop")).encode()), {}
        if first("nochoices"):
            return 200, {"id": "x", "object": "chat.completion"}, {}
        if first("emptychoices"):
            return 200, {"id": "x", "object": "chat.completion", "choices": []}, {}
        if first("nullcontent"):
            completion = self._completion(body, "", "stop")
            completion["choices"][0]["message"]["content"] = None
            return 200, completion, {}
        if first("empty"):
            return 200, self._completion(body, "", "stop"), {}
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
