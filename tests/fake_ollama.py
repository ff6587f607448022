"""A faithful fake Ollama server for herd's tests.

Real HTTP/1.1 on loopback (own asyncio + h11 server, independent of herd.py), realistic
timing, model load/unload/eviction/expiry, per-model parallel slots, a bounded queue, the
native ``/api/*`` surface and the OpenAI ``/v1/*`` surface, plus fault knobs.

Conformance reference: ``/work/shared/spec/ollama-api.md`` (framing §1.3, fields §3,
status codes §4, lifecycle §5, OpenAI §6, client expectations §7).

Quick use::

    async with FakeOllama([FakeModel("llama3.2:3b")], tokens_per_s=0) as fake:
        ...  # fake.url == "http://127.0.0.1:<port>"

    with run_in_thread(FakeOllama()) as fake:   # for blocking clients in sync tests
        ollama.Client(host=fake.url).list()

Subprocess: ``python -m tests.fake_ollama --port 0 --model llama3.2:3b`` prints
``fake-ollama listening on 127.0.0.1:PORT`` and serves until SIGTERM.

Deterministic output: generated text is a function of (canonical model name, prompt key,
token count) — see :func:`fake_tokens`, :func:`chat_prompt_key` and
:meth:`FakeOllama.expected_text` — so tests can compare answers across nodes.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import contextlib
import dataclasses
import datetime as _dt
import email.utils
import hashlib
import http
import ipaddress
import itertools
import json
import math
import random
import re
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import h11

from tests.http_helpers import next_event, serve_h11

__all__ = [
    "BUSY_ERROR",
    "CORS_ALLOW_HEADERS",
    "CORS_ALLOW_METHODS",
    "FakeModel",
    "FakeOllama",
    "LoadedState",
    "RecordedRequest",
    "canonical_name",
    "chat_prompt_key",
    "cors_origin_allowed",
    "fake_embedding",
    "fake_tokens",
    "parse_go_duration",
    "rfc3339",
    "run_in_thread",
]

BUSY_ERROR = "server busy, please try again.  maximum pending requests exceeded"
FOREVER_NS = 2**63 - 1  # Go's time.Duration(math.MaxInt64), used for "keep forever"

_WORD_TEXT = (
    "the quick brown fox jumps over a lazy dog while herd routes tokens across many "
    "small nodes and every model loads then streams words under keep alive pressure "
    "with slots queues caches prompts contexts replies answers rivers mountains "
    "bright calm green"
)
_WORDS = tuple(_WORD_TEXT.split())


# --------------------------------------------------------------------------------------
# helpers shared with tests
# --------------------------------------------------------------------------------------


def canonical_name(name: str) -> str:
    """Ollama model-name normalisation: drop the default registry/namespace, add ``:latest``,
    lowercase (lookups are case-insensitive)."""
    n = name.strip()
    for prefix in ("registry.ollama.ai/library/", "registry.ollama.ai/"):
        if n.lower().startswith(prefix):
            n = n[len(prefix) :]
            break
    last = n.rsplit("/", 1)[-1]
    if ":" not in last:
        n = n + ":latest"
    return n.lower()


_NAME_RE = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*){0,2}(:[A-Za-z0-9_][A-Za-z0-9._\-]{0,127})?$"
)


def _valid_name(name: str) -> bool:
    return bool(name) and len(name) < 350 and bool(_NAME_RE.match(name))


def rfc3339(ns: int | None = None) -> str:
    """Go's ``time.Time`` JSON form: RFC 3339, local offset, nanoseconds (trailing zeros
    trimmed, like ``RFC3339Nano``)."""
    if ns is None:
        ns = time.time_ns()
    sec, frac = divmod(ns, 1_000_000_000)
    dt = _dt.datetime.fromtimestamp(sec).astimezone()
    out = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        out += f".{frac:09d}".rstrip("0")
    off = dt.utcoffset() or _dt.timedelta(0)
    if not off:
        return out + "Z"
    mins = int(off.total_seconds()) // 60
    sign = "+" if mins >= 0 else "-"
    mins = abs(mins)
    return f"{out}{sign}{mins // 60:02d}:{mins % 60:02d}"


_DUR_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_go_duration(text: str) -> float:
    """Go ``time.ParseDuration`` → seconds; raises ValueError with Go's message."""
    orig = text
    s = text
    neg = False
    if s[:1] in ("+", "-"):
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"time: invalid duration {json.dumps(orig)}")
    total = 0.0
    while s:
        m = re.match(r"\d+\.?\d*|\.\d+", s)
        if not m:
            raise ValueError(f"time: invalid duration {json.dumps(orig)}")
        num = float(m.group(0))
        s = s[m.end() :]
        u = re.match(r"[^\d.]+", s)
        if not u:
            raise ValueError(f"time: missing unit in duration {json.dumps(orig)}")
        unit = u.group(0)
        s = s[u.end() :]
        if unit not in _DUR_UNITS:
            raise ValueError(
                f"time: unknown unit {json.dumps(unit)} in duration {json.dumps(orig)}"
            )
        total += num * _DUR_UNITS[unit]
    return -total if neg else total


def parse_keep_alive(value: Any, default_s: float) -> float:
    """``api.Duration`` semantics → seconds; ``math.inf`` = forever, ``0`` = unload."""
    if value is None:
        return default_s
    if isinstance(value, bool):
        raise ValueError("Unsupported type: 'bool'")
    if isinstance(value, int | float):  # whole seconds: Go's int(t) * time.Second
        return math.inf if value < 0 else float(int(value))
    if isinstance(value, str):
        secs = parse_go_duration(value)
        return math.inf if secs < 0 else secs
    kind = "[]interface {}" if isinstance(value, list) else "map[string]interface {}"
    raise ValueError(f"Unsupported type: '{kind}'")


def _count_tokens(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


def _seed(*parts: str) -> bytes:
    return hashlib.sha256("\x00".join(parts).encode()).digest()


def fake_tokens(model: str, prompt_key: str, n: int, *, kind: str = "content") -> list[str]:
    """The deterministic token stream the fake generates for (model, prompt)."""
    seed = _seed(canonical_name(model), kind, prompt_key)
    out: list[str] = []
    for i in range(n):
        h = hashlib.sha256(seed + i.to_bytes(4, "big")).digest()
        word = _WORDS[int.from_bytes(h[:4], "big") % len(_WORDS)]
        out.append(word if i == 0 else " " + word)
    return out


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(
            str(p.get("text", ""))
            for p in content
            if isinstance(p, dict) and p.get("type") == "text"
        )
    return str(content)


def chat_prompt_key(messages: list[dict[str, Any]]) -> str:
    """Prompt key for chat requests (native and OpenAI produce the same text)."""
    return "\n".join(f"{m.get('role', '')}: {_content_text(m.get('content'))}" for m in messages)


def fake_embedding(model: str, text: str, dims: int, *, normalise: bool = True) -> list[float]:
    """Deterministic float32 vector for (model, text); L2-normalised unless asked not to."""
    seed = int.from_bytes(_seed(canonical_name(model), "embed", text)[:8], "big")
    rng = random.Random(seed)
    vec = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    scale = 1.0 / norm if normalise else (5.0 + (seed % 1000) / 100.0) / norm
    return array.array("f", [x * scale for x in vec]).tolist()


def _renormalise(vec: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    return array.array("f", [x / norm for x in vec]).tolist()


# --------------------------------------------------------------------------------------
# data model
# --------------------------------------------------------------------------------------


@dataclass
class FakeModel:
    name: str = "llama3.2:3b"
    size: int = 2_019_393_189
    family: str = "llama"
    families: list[str] | None = None
    parameter_size: str = "3.2B"
    quantization_level: str = "Q4_K_M"
    capabilities: list[str] = field(default_factory=lambda: ["completion"])
    context_length: int = 4096
    embedding_length: int = 2048
    digest: str = ""
    #: per-model slot override; default: server num_parallel (1 for embedding-only models)
    num_parallel: int | None = None
    #: KV-cache bytes per context token per slot (adds to the loaded size in /api/ps)
    kv_bytes_per_token: int = 16_384
    modified_at_ns: int = 0
    template: str = "{{ .Prompt }}"
    system: str = ""
    license: str = "FAKE LICENSE"
    parent_model: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = hashlib.sha256(
                ("model:" + canonical_name(self.name)).encode()
            ).hexdigest()
        if self.families is None:
            self.families = [self.family]
        if not self.modified_at_ns:
            self.modified_at_ns = time.time_ns()
        if ":" not in self.name.rsplit("/", 1)[-1]:
            self.name += ":latest"

    @property
    def is_embedding_only(self) -> bool:
        return "embedding" in self.capabilities and "completion" not in self.capabilities

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": self.parent_model,
            "format": "gguf",
            "family": self.family,
            "families": self.families,
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


def _header_in(headers: list[tuple[str, str]], name: str) -> str | None:
    """The first value of header ``name`` (any case) in ``headers``, else None."""
    low = name.lower()
    for k, v in headers:
        if k.lower() == low:
            return v
    return None


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    started_at: float
    client_disconnected: bool = False
    query: str = ""
    status: int | None = None  # status of the response head sent (None: none sent)
    body_size: int = 0  # bytes received (blob uploads are not kept in ``body``)
    #: the response exactly as this node sent it: head fields and the body payload bytes
    #: (de-chunked), so a test can compare them with what a client got through a proxy
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    response_body: bytearray = field(default_factory=bytearray)

    def response_header(self, name: str) -> str | None:
        return _header_in(self.response_headers, name)

    def header(self, name: str) -> str | None:
        return _header_in(self.headers, name)

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class LoadedState:
    name: str
    model: FakeModel
    size: int
    size_vram: int
    context_length: int
    expires_at: float  # epoch seconds; math.inf = kept forever
    in_flight: int = 0
    slots: int = 1
    keep_alive_s: float = 300.0
    loaded_at: float = 0.0
    last_used: float = 0.0
    loading: bool = True
    draining: bool = False
    max_in_flight: int = 0


@dataclass
class _Fault:
    status: int
    error: str
    count: int
    path: str | None


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _ClientGone(Exception):
    """The client went away (EOF or write failure)."""


class _Dropped(Exception):
    """We dropped the connection on purpose (die_after_chunks)."""


_KNOWN_ROUTES: dict[str, set[str]] = {
    "/": {"GET", "HEAD"},
    "/api/version": {"GET", "HEAD"},
    "/api/status": {"GET"},
    "/api/tags": {"GET", "HEAD"},
    "/api/ps": {"GET"},
    "/api/show": {"POST"},
    "/api/pull": {"POST"},
    "/api/push": {"POST"},
    "/api/create": {"POST"},
    "/api/copy": {"POST"},
    "/api/delete": {"DELETE"},
    "/api/generate": {"POST"},
    "/api/chat": {"POST"},
    "/api/embed": {"POST"},
    "/api/embeddings": {"POST"},
    "/v1/chat/completions": {"POST"},
    "/v1/completions": {"POST"},
    "/v1/embeddings": {"POST"},
    "/v1/models": {"GET"},
    "/v1/responses": {"POST"},
}
_INFERENCE_PATHS = {
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
}


def _route_key(path: str) -> str | None:
    if path in _KNOWN_ROUTES:
        return path
    if path.startswith("/api/blobs/") and len(path) > len("/api/blobs/"):
        return "/api/blobs/:digest"
    if path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
        return "/v1/models/:model"
    return None


_ROUTE_METHODS: dict[str, set[str]] = {
    **_KNOWN_ROUTES,
    "/api/blobs/:digest": {"HEAD", "POST"},
    "/v1/models/:model": {"GET"},
}


def _host_allowed(host_header: str | None) -> bool:
    """Ollama's allowedHostsMiddleware (server bound to loopback)."""
    if not host_header:
        return True
    host = host_header.strip()
    if host.startswith("["):
        host = host[1 : host.index("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    host = host.lower()
    if host in ("localhost", socket.gethostname().lower()):
        return True
    if host.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_unspecified or ip.is_link_local


#: Ollama's CORS set-up (gin-contrib/cors as ``server/routes.go`` configures it; header names
#: come out in Go's canonical form, joined with ",")
CORS_ALLOW_METHODS = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"
CORS_ALLOW_HEADERS = (
    "Authorization",
    "Content-Type",
    "User-Agent",
    "Accept",
    "X-Requested-With",
    "Openai-Beta",
    *(
        "X-Stainless-" + s
        for s in (
            "Arch",
            "Async",
            "Custom-Poll-Interval",
            "Helper-Method",
            "Lang",
            "Os",
            "Package-Version",
            "Poll-Helper",
            "Retry-Count",
            "Runtime",
            "Runtime-Version",
            "Timeout",
        )
    ),
)
_CORS_SCHEMES = (
    "app://",
    "file://",
    "tauri://",
    "vscode-webview://",
    "vscode-file://",
    # AllowBrowserExtensions
    "chrome-extension://",
    "safari-extension://",
    "moz-extension://",
    "ms-browser-extension://",
)


def cors_origin_allowed(origin: str) -> bool:
    """Ollama's default allowed origins (no ``OLLAMA_ORIGINS``): http(s) on localhost,
    127.0.0.1 and 0.0.0.0 with or without a port (``:*`` wildcard), and app-like schemes."""
    if origin.startswith(_CORS_SCHEMES):
        return True
    for scheme in ("http://", "https://"):
        for host in ("localhost", "127.0.0.1", "0.0.0.0"):
            base = scheme + host
            if origin == base or origin.startswith(base + ":"):
                return True
    return False


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _go_type(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object"


def _decode_json_body(body: bytes, go_type: str) -> dict[str, Any]:
    if not body.strip():
        raise _HTTPError(400, "missing request body")
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = getattr(e, "msg", str(e))
        pos = getattr(e, "pos", 0)
        text = body.decode("utf-8", "replace")
        if pos >= len(text.rstrip()):
            raise _HTTPError(400, "unexpected EOF") from None
        raise _HTTPError(
            400, f"invalid character {text[pos]!r} looking for beginning of value ({msg})"
        ) from None
    if not isinstance(obj, dict):
        raise _HTTPError(
            400, f"json: cannot unmarshal {_go_type(obj)} into Go value of type {go_type}"
        )
    return obj


# --------------------------------------------------------------------------------------
# one HTTP exchange
# --------------------------------------------------------------------------------------


class _Exchange:
    def __init__(
        self,
        server: FakeOllama,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        req: h11.Request,
        rec: RecordedRequest,
    ) -> None:
        self.server = server
        self.conn = conn
        self.reader = reader
        self.writer = writer
        self.req = req
        self.rec = rec
        self.method = req.method.decode()
        self.path = rec.path
        self.openai = self.path.startswith("/v1/")
        self.head_sent = False
        self.lines_sent = 0
        self.die_after: int | None = None
        self.cors_headers: list[tuple[str, str]] = []  # set for an allowed cross-origin request
        self.disconnected = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self.t0_ns = time.perf_counter_ns()

    # -- body ---------------------------------------------------------------------
    async def body_chunks(self) -> AsyncIterator[bytes]:
        while True:
            ev = await next_event(self.conn, self.reader, continue_via=self.writer)
            if isinstance(ev, h11.Data):
                self.rec.body_size += len(ev.data)
                yield bytes(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                return
            else:
                raise _ClientGone()

    async def read_body(self) -> bytes:
        parts = [c async for c in self.body_chunks()]
        return b"".join(parts)

    # -- disconnect watch -----------------------------------------------------------
    def start_watch(self) -> None:
        if self._watch_task is None:
            self._watch_task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    self.disconnected.set()
                    return
                with contextlib.suppress(h11.ProtocolError, RuntimeError):
                    self.conn.receive_data(data)  # pipelined bytes: keep for the next cycle
        except (ConnectionError, OSError):
            self.disconnected.set()

    async def stop_watch(self) -> None:
        t, self._watch_task = self._watch_task, None
        if t is not None:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def guard(self, coro: Awaitable[None]) -> None:
        """Run ``coro``; if the client disconnects first, cancel it and raise _ClientGone."""
        self.start_watch()
        task = asyncio.ensure_future(coro)
        dtask = asyncio.ensure_future(self.disconnected.wait())
        try:
            await asyncio.wait({task, dtask}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            dtask.cancel()
            await asyncio.gather(task, dtask, return_exceptions=True)
            raise
        if task.done():
            dtask.cancel()
            await asyncio.gather(dtask, return_exceptions=True)
            await self.stop_watch()
            task.result()
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise _ClientGone()

    # -- sending --------------------------------------------------------------------
    async def _send(self, *events: Any) -> None:
        if self.disconnected.is_set() or self.writer.is_closing():
            raise _ClientGone()
        for ev in events:
            if isinstance(ev, h11.Response):
                self.rec.response_headers = [
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in ev.headers.raw_items()
                ]
            elif isinstance(ev, h11.Data) and self.method != "HEAD":
                self.rec.response_body += ev.data
            data = self.conn.send(ev)
            if data:
                self.writer.write(data)
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as e:
            raise _ClientGone() from e

    def _base_headers(self) -> list[tuple[str, str]]:
        return [("Date", email.utils.formatdate(usegmt=True)), *self.cors_headers]

    async def respond(
        self,
        status: int,
        body: bytes = b"",
        content_type: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        hdrs = self._base_headers()
        if content_type:
            hdrs.append(("Content-Type", content_type))
        hdrs.extend(headers or [])
        if status >= 200 and status != 204 and status != 304:
            hdrs.append(("Content-Length", str(len(body))))
        try:
            reason = http.HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
        events: list[Any] = [h11.Response(status_code=status, headers=hdrs, reason=reason)]
        if body and self.method != "HEAD" and status not in (204, 304):
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        self.head_sent = True
        self.rec.status = status
        await self._send(*events)

    async def respond_json(self, status: int, obj: Any) -> None:
        await self.respond(status, _dumps(obj), "application/json; charset=utf-8")

    async def respond_error(self, status: int, message: str) -> None:
        if self.openai:
            etype = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
            body = {"error": {"message": message, "type": etype, "param": None, "code": None}}
            await self.respond_json(status, body)
        else:
            await self.respond_json(status, {"error": message})

    async def start_stream(self, content_type: str) -> None:
        if self.head_sent:
            return
        self.die_after = self.server.die_after_chunks
        self.server.die_after_chunks = None
        hdrs = [*self._base_headers(), ("Content-Type", content_type)]
        self.head_sent = True
        self.rec.status = 200
        await self._send(h11.Response(status_code=200, headers=hdrs, reason=b"OK"))
        if self.die_after is not None and self.die_after <= 0:
            self.drop()

    async def send_line(self, data: bytes) -> None:
        await self._send(h11.Data(data=data))
        self.lines_sent += 1
        if self.die_after is not None and self.lines_sent >= self.die_after:
            self.drop()

    async def end_stream(self) -> None:
        await self._send(h11.EndOfMessage())

    async def end_stream_with(self, content_type: str, last: bytes) -> None:
        """Start the stream if it is not yet, send one last line (the final chunk, or the
        error of a mid-stream failure) and end it."""
        await self.start_stream(content_type)
        await self.send_line(last)
        await self.end_stream()

    def drop(self) -> None:
        self.server.dropped += 1
        self.writer.transport.abort()
        raise _Dropped()


# --------------------------------------------------------------------------------------
# generation plan
# --------------------------------------------------------------------------------------


@dataclass
class _Plan:
    model: FakeModel
    display: str
    prompt_key: str
    prompt_tokens: int
    num_ctx: int
    keep_alive: float
    events: list[tuple[str, Any]]  # ("thinking"|"content", text) or ("tool_calls", list)
    eval_count: int
    done_reason: str
    context: list[int] | None = None
    #: None: no logprobs asked; else how many top alternatives each token carries
    logprobs: int | None = None

    def logprobs_for(self, kind: str, val: Any) -> list[dict[str, Any]] | None:
        """The ``logprobs`` list of one generated token's chunk (None when not asked)."""
        if self.logprobs is None or kind not in ("thinking", "content"):
            return None
        return [fake_logprob(self.model.name, val, self.logprobs)]

    def all_logprobs(self) -> list[dict[str, Any]]:
        return [lp for k, v in self.events for lp in (self.logprobs_for(k, v) or [])]


@dataclass
class _Outcome:
    thinking: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, int] = field(default_factory=dict)
    done_reason: str = "stop"


# --------------------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------------------


LoadDelay = float | Callable[[FakeModel], float]


class FakeOllama:
    """Fake Ollama node. Every knob is a plain attribute and may be changed at runtime.

    Constructor knobs: ``models`` (default one ``llama3.2:3b``), ``version``,
    ``num_parallel`` (slots per loaded model; embedding-only models get 1 unless
    ``FakeModel.num_parallel`` overrides), ``max_loaded_models`` (LRU-idle eviction beyond it;
    <=0 means 3), ``max_queue`` (requests waiting for a slot/load; beyond → 503 BUSY_ERROR),
    ``load_delay_s`` (seconds, or ``callable(FakeModel) -> seconds``), ``tokens_per_s`` and
    ``prompt_tokens_per_s`` (0 = no sleeping), ``default_keep_alive_s``, ``default_num_ctx``
    (capped at the model's ``context_length``), ``response_tokens`` (natural answer length;
    ``options.num_predict`` / ``max_tokens`` bound it → ``done_reason "length"``),
    ``thinking_tokens``, ``pullable`` (registry for ``/api/pull``), ``pull_step_delay_s``,
    ``vram_bytes`` (None = everything fits; else ``size_vram`` < ``size`` once exceeded),
    ``host``, ``port`` (0 = pick), ``loopback_host_check``.

    Faults: :meth:`fail_next`, :meth:`fail_mid_stream`, ``die_after_chunks`` (next stream: abort
    the TCP connection after N lines, no terminating chunk), ``stall_s`` (inference: hold the
    slot this long before the first byte), ``stall_mid_stream_s`` (pause after the first
    line), :meth:`refuse_connections` / :meth:`revive` (same port).

    Observation: ``requests`` (:class:`RecordedRequest`), ``loaded`` (:class:`LoadedState`
    by model name), ``active``, ``max_active_seen``, ``max_present_seen`` (waiting or
    running), ``max_in_flight_seen`` (per model),
    ``queued``, ``cancelled`` (inference requests stopped because the client went away,
    queued or generating), ``dropped`` (die_after_chunks), ``rejected_busy``,
    ``load_events`` [(model, num_ctx)], ``unload_events`` [(model, reason)], ``blobs``,
    ``errors`` (exceptions inside the fake; should stay empty). :meth:`reset_stats` clears them.
    """

    def __init__(
        self,
        models: list[FakeModel] | None = None,
        *,
        version: str = "0.12.6",
        num_parallel: int = 2,
        max_loaded_models: int = 3,
        max_queue: int = 512,
        load_delay_s: LoadDelay = 0.05,
        tokens_per_s: float = 200.0,
        prompt_tokens_per_s: float = 2000.0,
        default_keep_alive_s: float = 300.0,
        default_num_ctx: int = 4096,
        response_tokens: int = 12,
        thinking_tokens: int = 6,
        pullable: dict[str, FakeModel] | None = None,
        pull_step_delay_s: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        loopback_host_check: bool = True,
        vram_bytes: int | None = None,
    ) -> None:
        if models is None:
            models = [FakeModel("llama3.2:3b")]
        self.models: dict[str, FakeModel] = {canonical_name(m.name): m for m in models}
        self.pullable: dict[str, FakeModel] = {
            canonical_name(k): v for k, v in (pullable or {}).items()
        }
        self.version = version
        self.num_parallel = num_parallel
        self.max_loaded_models = max_loaded_models
        self.max_queue = max_queue
        self.load_delay_s: LoadDelay = load_delay_s
        self.tokens_per_s = tokens_per_s
        self.prompt_tokens_per_s = prompt_tokens_per_s
        self.default_keep_alive_s = default_keep_alive_s
        self.default_num_ctx = default_num_ctx
        self.response_tokens = response_tokens
        self.thinking_tokens = thinking_tokens
        self.pull_step_delay_s = pull_step_delay_s
        self.host = host
        self.port = port
        self.loopback_host_check = loopback_host_check
        self.vram_bytes = vram_bytes
        # fault knobs
        self.die_after_chunks: int | None = None
        self.stall_s: float = 0.0
        self.stall_mid_stream_s: float = 0.0
        self._faults: list[_Fault] = []
        self._mid_stream_error: tuple[int, str] | None = None
        # state
        self.blobs: dict[str, int] = {}
        self.loaded: dict[str, LoadedState] = {}
        self.requests: list[RecordedRequest] = []
        self.active = 0
        self.max_active_seen = 0
        self.max_present_seen = 0  # requests inside at once, waiting for a slot or running
        self.max_in_flight_seen: dict[str, int] = {}
        self.cancelled = 0
        self.dropped = 0
        self.queued = 0
        self.rejected_busy = 0
        self.load_events: list[tuple[str, int]] = []  # (model, num_ctx) per completed load
        self.unload_events: list[tuple[str, str]] = []  # (model, reason)
        self._changed_ev = asyncio.Event()
        self._host_is_loopback = True
        #: unexpected exceptions raised by handlers (a test can assert this stays empty)
        self.errors: list[BaseException] = []
        self._server: asyncio.Server | None = None
        self._conn_tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle ----------------------------------------------------------------
    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed_ev = asyncio.Event()
        self._wake = asyncio.Event()
        await self._listen()
        self._reaper = asyncio.ensure_future(self._reap_loop())

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._on_connection, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._host_is_loopback = self.host == "localhost" or (
            _is_ip(self.host) and ipaddress.ip_address(self.host).is_loopback
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        tasks = list(self._conn_tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
            self._reaper = None

    async def __aenter__(self) -> FakeOllama:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def refuse_connections(self, *, drop_existing: bool = True) -> None:
        """Node down: close the listener (connects get ECONNREFUSED) and, by default, abort
        every open connection. ``await revive()`` listens again on the same port."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if drop_existing:
            for w in list(self._writers):
                w.transport.abort()

    async def revive(self) -> None:
        if self._server is None:
            await self._listen()

    # ---- fault knobs ----------------------------------------------------------------
    def fail_next(
        self, status: int, error: str | None = None, count: int = 1, path: str | None = None
    ) -> None:
        """Answer the next ``count`` requests (to ``path`` if given, else any path except the
        ``/`` liveness probe) with ``status`` and ``{"error": error}`` (OpenAI shape on /v1)."""
        if error is None:
            error = {
                503: BUSY_ERROR,
                500: "llama runner process has terminated: exit status 2",
                404: "model not found",
                429: "too many requests",
                400: "bad request",
            }.get(status, http.HTTPStatus(status).phrase.lower())
        self._faults.append(_Fault(status, error, count, path))

    def fail_mid_stream(
        self, after_chunks: int, error: str = "an error was encountered while running the model"
    ) -> None:
        """Next streaming generation: after ``after_chunks`` lines emit a mid-stream error the
        way Ollama does (native: ``{"error": ...}`` line, HTTP 200, stream ends; /v1: an
        empty delta chunk and the stream ends without finish chunk or [DONE])."""
        self._mid_stream_error = (after_chunks, error)

    def reset_stats(self) -> None:
        self.requests.clear()
        self.max_active_seen = self.active
        self.max_present_seen = self.active + self.queued
        self.max_in_flight_seen = {k: v.in_flight for k, v in self.loaded.items()}
        self.cancelled = 0
        self.dropped = 0
        self.rejected_busy = 0
        self.load_events.clear()
        self.unload_events.clear()

    # ---- observation helpers -----------------------------------------------------------
    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    @staticmethod
    def expected_text(
        model: str,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        n: int = 12,
    ) -> str:
        key = chat_prompt_key(messages) if messages is not None else (prompt or "")
        return "".join(fake_tokens(model, key, n))

    def add_model(self, model: FakeModel) -> None:
        self.models[canonical_name(model.name)] = model

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 10.0) -> Any:
        """Run ``fn(*args)`` (sync or async) on the fake's loop — for use from another thread
        with :func:`run_in_thread` (e.g. ``fake.call(fake.revive)``)."""
        loop = self._loop
        assert loop is not None, "not started"

        async def runner() -> Any:
            res = fn(*args)
            if asyncio.iscoroutine(res):
                res = await res
            return res

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError("use await / direct call on the fake's own loop")
        return asyncio.run_coroutine_threadsafe(runner(), loop).result(timeout)

    # ---- scheduler --------------------------------------------------------------------
    def _notify(self) -> None:
        ev = self._changed_ev
        self._changed_ev = asyncio.Event()
        ev.set()
        if self._wake is not None:
            self._wake.set()

    async def _wait_change(self) -> None:
        await self._changed_ev.wait()

    def _slots_for(self, m: FakeModel) -> int:
        if m.num_parallel is not None:
            return max(1, m.num_parallel)
        if m.is_embedding_only:
            return 1
        return max(1, self.num_parallel)

    def _effective_num_ctx(self, m: FakeModel, requested: Any) -> int:
        if isinstance(requested, int | float) and not isinstance(requested, bool) and requested > 0:
            n = int(requested)
        else:
            n = self.default_num_ctx
        return max(1, min(n, m.context_length))

    def _vram_for(self, size: int) -> int:
        if self.vram_bytes is None:
            return size
        used = sum(s.size_vram for s in self.loaded.values())
        return max(0, min(size, self.vram_bytes - used))

    def _load_delay(self, m: FakeModel) -> float:
        d = self.load_delay_s
        return float(d(m)) if callable(d) else float(d)

    def _unload(self, st: LoadedState, reason: str) -> None:
        if self.loaded.get(st.name) is st:
            del self.loaded[st.name]
            self.unload_events.append((st.name, reason))
            self._notify()

    def _expire(self) -> None:
        now = time.time()
        for st in list(self.loaded.values()):
            if st.in_flight == 0 and not st.loading and st.expires_at <= now:
                self._unload(st, "expired")

    async def _reap_loop(self) -> None:
        assert self._wake is not None
        while True:
            now = time.time()
            idle = [
                s.expires_at for s in self.loaded.values() if s.in_flight == 0 and not s.loading
            ]
            nxt = min(idle, default=math.inf)
            timeout = None if nxt == math.inf else max(0.0, nxt - now) + 0.001
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._expire()

    async def _acquire(self, m: FakeModel, num_ctx: int, keep_alive: float) -> LoadedState:
        """Wait for a slot on ``m`` loaded with ``num_ctx`` (loading/evicting as needed)."""
        key = m.name
        while True:
            self._expire()
            st = self.loaded.get(key)
            if st is not None:
                if st.loading:
                    await self._wait_change()
                    continue
                if st.context_length != num_ctx or st.draining:
                    if st.in_flight == 0:
                        self._unload(st, "reload")
                        continue
                    st.draining = True
                    await self._wait_change()
                    continue
                if st.in_flight < st.slots:
                    st.in_flight += 1
                    st.max_in_flight = max(st.max_in_flight, st.in_flight)
                    self.max_in_flight_seen[key] = max(
                        self.max_in_flight_seen.get(key, 0), st.in_flight
                    )
                    st.keep_alive_s = keep_alive  # last writer wins
                    st.expires_at = time.time() + keep_alive
                    st.last_used = time.time()
                    return st
                await self._wait_change()
                continue
            limit = self.max_loaded_models if self.max_loaded_models > 0 else 3
            if len(self.loaded) >= limit:
                idle = [s for s in self.loaded.values() if s.in_flight == 0 and not s.loading]
                if idle:
                    self._unload(min(idle, key=lambda s: s.last_used), "evicted")
                    continue
                await self._wait_change()
                continue
            break
        slots = self._slots_for(m)
        size = m.size + num_ctx * slots * m.kv_bytes_per_token
        now = time.time()
        st = LoadedState(
            name=key,
            model=m,
            size=size,
            size_vram=self._vram_for(size),
            context_length=num_ctx,
            expires_at=now + keep_alive,
            in_flight=1,
            slots=slots,
            keep_alive_s=keep_alive,
            loaded_at=now,
            last_used=now,
            loading=True,
            max_in_flight=1,
        )
        self.loaded[key] = st
        self.max_in_flight_seen[key] = max(self.max_in_flight_seen.get(key, 0), 1)
        try:
            delay = self._load_delay(m)
            if delay > 0:
                await asyncio.sleep(delay)
        except BaseException:
            st.in_flight = 0
            self._unload(st, "load cancelled")
            raise
        st.loading = False
        st.loaded_at = st.last_used = time.time()
        self.load_events.append((key, num_ctx))
        self._notify()
        return st

    def _release(self, st: LoadedState) -> None:
        st.in_flight -= 1
        st.last_used = time.time()
        if st.in_flight <= 0:
            st.in_flight = 0
            if st.draining or st.keep_alive_s <= 0:
                self._unload(st, "reload" if st.draining else "keep_alive 0")
            else:
                st.expires_at = time.time() + st.keep_alive_s
        self._notify()

    @contextlib.asynccontextmanager
    async def _slot(
        self, m: FakeModel, num_ctx: int, keep_alive: float
    ) -> AsyncIterator[tuple[LoadedState, int]]:
        if self.queued >= self.max_queue:
            self.rejected_busy += 1
            raise _HTTPError(503, BUSY_ERROR)
        t0 = time.perf_counter_ns()
        self.queued += 1
        self.max_present_seen = max(self.max_present_seen, self.queued + self.active)
        try:
            st = await self._acquire(m, num_ctx, keep_alive)
        finally:
            self.queued -= 1
        load_ns = max(1, time.perf_counter_ns() - t0)
        self.active += 1
        self.max_active_seen = max(self.max_active_seen, self.active)
        try:
            yield st, load_ns
        finally:
            self.active -= 1
            self._release(st)

    # ---- connection handling -----------------------------------------------------------
    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        self._writers.add(writer)
        try:
            await serve_h11(
                reader,
                writer,
                lambda conn, req: self._serve_one(conn, reader, writer, req),
                quiet=(_ClientGone, _Dropped),
            )
        finally:
            self._conn_tasks.discard(task)
            self._writers.discard(writer)

    async def _serve_one(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        req: h11.Request,
    ) -> bool:
        target = req.target.decode("latin-1")
        path, _, query = target.partition("?")
        rec = RecordedRequest(
            method=req.method.decode(),
            path=path,
            query=query,
            headers=[
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in req.headers.raw_items()
            ],
            body=b"",
            started_at=time.time(),
        )
        self.requests.append(rec)
        ex = _Exchange(self, conn, reader, writer, req, rec)
        try:
            await self._dispatch(ex)
        except _ClientGone:
            rec.client_disconnected = True
            if path in _INFERENCE_PATHS:
                self.cancelled += 1
            return False
        except _Dropped:
            return False
        except Exception as e:  # noqa: BLE001 - a bug in the fake: record it, answer 500
            self.errors.append(e)
            import traceback

            traceback.print_exc()
            if not ex.head_sent:
                with contextlib.suppress(Exception):
                    await ex.respond_json(500, {"error": f"fake-ollama internal error: {e!r}"})
            return False
        finally:
            await ex.stop_watch()
        return not ex.disconnected.is_set()

    async def _dispatch(self, ex: _Exchange) -> None:
        method, path = ex.method, ex.path
        # CORS runs first (``r.Use(cors.New(...), allowedHostsMiddleware(...))``)
        origin = ex.rec.header("origin")
        host = ex.rec.header("host") or ""
        if origin and origin not in (f"http://{host}", f"https://{host}"):
            if not cors_origin_allowed(origin):
                await self._drain(ex)
                await ex.respond(403)
                return
            if method == "OPTIONS":
                await self._drain(ex)
                ex.cors_headers = [
                    ("Access-Control-Allow-Methods", CORS_ALLOW_METHODS),
                    ("Access-Control-Allow-Headers", ",".join(CORS_ALLOW_HEADERS)),
                    ("Access-Control-Max-Age", "43200"),
                    ("Vary", "Origin"),
                    ("Vary", "Access-Control-Request-Method"),
                    ("Vary", "Access-Control-Request-Headers"),
                    ("Access-Control-Allow-Origin", origin),
                ]
                await ex.respond(204)
                return
            ex.cors_headers = [("Vary", "Origin"), ("Access-Control-Allow-Origin", origin)]
        if self.loopback_host_check and self._host_is_loopback:
            host = ex.rec.header("host")
            if not _host_allowed(host):
                await self._drain(ex)
                await ex.respond(403)
                return
        if method == "OPTIONS":
            await self._drain(ex)
            await ex.respond(204)
            return
        key = _route_key(path)
        if key is None:
            await self._drain(ex)
            await ex.respond(404, b"404 page not found", "text/plain")
            return
        if method not in _ROUTE_METHODS[key]:
            await self._drain(ex)
            await ex.respond(405, b"405 method not allowed", "text/plain")
            return
        if key == "/api/blobs/:digest" and method == "POST":
            body = b""  # streamed by the handler
        else:
            body = await ex.read_body()
            ex.rec.body = body
        fault = self._take_fault(path)
        if fault is not None:
            if key == "/api/blobs/:digest" and method == "POST":
                await self._drain(ex)
            await ex.respond_error(fault.status, fault.error)
            return
        suffix = re.sub(r"[^a-z0-9]+", "_", key.lower()).strip("_")
        handler = getattr(self, "_h_" + (suffix or "root"))
        try:
            if path in _INFERENCE_PATHS:
                await ex.guard(handler(ex, body))
            else:
                await handler(ex, body)
        except _HTTPError as e:
            if ex.head_sent:
                raise _ClientGone() from e  # cannot happen normally; end the connection
            await ex.respond_error(e.status, e.message)

    async def _drain(self, ex: _Exchange) -> None:
        if ex.conn.their_state is h11.SEND_BODY:
            async for _ in ex.body_chunks():
                pass

    def _take_fault(self, path: str) -> _Fault | None:
        for f in self._faults:
            if (f.path is None and path != "/") or f.path == path:
                f.count -= 1
                if f.count <= 0:
                    self._faults.remove(f)
                return f
        return None

    # ---- lookups ----------------------------------------------------------------------
    def _find(self, name: Any) -> FakeModel | None:
        if not isinstance(name, str) or not name:
            return None
        return self.models.get(canonical_name(name))

    def _require(self, name: Any) -> FakeModel:
        m = self._find(name)
        if m is None:
            raise _HTTPError(404, f"model '{name}' not found")
        return m

    @staticmethod
    def _model_field(req: dict[str, Any]) -> str:
        name = req.get("model") or req.get("name") or ""
        return name if isinstance(name, str) else ""

    # ---- simple routes ------------------------------------------------------------------
    async def _h_root(self, ex: _Exchange, body: bytes) -> None:
        await ex.respond(200, b"Ollama is running", "text/plain; charset=utf-8")

    async def _h_api_version(self, ex: _Exchange, body: bytes) -> None:
        await ex.respond_json(200, {"version": self.version})

    async def _h_api_status(self, ex: _Exchange, body: bytes) -> None:
        await ex.respond_json(200, {"cloud": {"disabled": False, "source": "default"}})

    def _tag_entry(self, m: FakeModel) -> dict[str, Any]:
        return {
            "name": m.name,
            "model": m.name,
            "modified_at": rfc3339(m.modified_at_ns),
            "size": m.size,
            "digest": m.digest,
            "details": m.details(),
            "capabilities": list(m.capabilities),
        }

    async def _h_api_tags(self, ex: _Exchange, body: bytes) -> None:
        models = sorted(self.models.values(), key=lambda m: m.modified_at_ns, reverse=True)
        await ex.respond_json(200, {"models": [self._tag_entry(m) for m in models]})

    async def _h_api_ps(self, ex: _Exchange, body: bytes) -> None:
        self._expire()
        now_ns = time.time_ns()
        out = []
        for st in sorted(self.loaded.values(), key=lambda s: s.expires_at, reverse=True):
            if st.expires_at == math.inf:
                exp_ns = now_ns + FOREVER_NS
            else:
                exp_ns = int(st.expires_at * 1e9)
            out.append(
                {
                    "name": st.name,
                    "model": st.name,
                    "size": st.size,
                    "digest": st.model.digest,
                    "details": st.model.details(),
                    "expires_at": rfc3339(exp_ns),
                    "size_vram": st.size_vram,
                    "context_length": st.context_length,
                }
            )
        await ex.respond_json(200, {"models": out})

    async def _h_api_show(self, ex: _Exchange, body: bytes) -> None:
        req = _decode_json_body(body, "api.ShowRequest")
        name = self._model_field(req)
        if not name:
            raise _HTTPError(400, "model is required")
        m = self._require(name)
        arch = m.family
        blob = "sha256-" + m.digest
        modelfile = (
            '# Modelfile generated by "ollama show"\n'
            "# To build a new Modelfile based on this, replace FROM with:\n"
            f"# FROM {m.name}\n\n"
            f"FROM /root/.ollama/models/blobs/{blob}\n"
            f'TEMPLATE """{m.template}"""\n'
            'PARAMETER stop "<|eot_id|>"\n'
            f'LICENSE """{m.license}"""\n'
        )
        model_info: dict[str, Any] = {
            "general.architecture": arch,
            "general.basename": m.name.split(":")[0],
            "general.file_type": 15,
            "general.parameter_count": _param_count(m.parameter_size),
            "general.quantization_version": 2,
            f"{arch}.context_length": m.context_length,
            f"{arch}.embedding_length": m.embedding_length,
            f"{arch}.block_count": 28,
            f"{arch}.attention.head_count": 24,
            "tokenizer.ggml.model": "gpt2",
        }
        resp: dict[str, Any] = {
            "license": m.license,
            "modelfile": modelfile,
            "parameters": 'stop                           "<|eot_id|>"',
            "template": m.template,
            "details": m.details(),
            "model_info": model_info,
            "tensors": [],
            "capabilities": list(m.capabilities),
            "modified_at": rfc3339(m.modified_at_ns),
        }
        if m.system:
            resp["system"] = m.system
        await ex.respond_json(200, resp)

    async def _h_api_copy(self, ex: _Exchange, body: bytes) -> None:
        req = _decode_json_body(body, "api.CopyRequest")
        src, dst = req.get("source"), req.get("destination")
        if not isinstance(src, str) or not _valid_name(src):
            raise _HTTPError(400, f"source {src!r} is invalid")
        if not isinstance(dst, str) or not _valid_name(dst):
            raise _HTTPError(400, f"destination {dst!r} is invalid")
        m = self._find(src)
        if m is None:
            raise _HTTPError(404, f"model {json.dumps(src)} not found")
        new = dataclasses.replace(m, name=_display_name(dst), modified_at_ns=time.time_ns())
        self.add_model(new)
        await ex.respond(200)

    async def _h_api_delete(self, ex: _Exchange, body: bytes) -> None:
        req = _decode_json_body(body, "api.DeleteRequest")
        name = self._model_field(req)
        if not name or not _valid_name(name):
            raise _HTTPError(400, f"invalid model name {name!r}" if name else "model is required")
        m = self._find(name)
        if m is None:
            raise _HTTPError(404, f"model '{name}' not found")
        del self.models[canonical_name(m.name)]
        st = self.loaded.get(m.name)
        if st is not None and st.in_flight == 0 and not st.loading:
            self._unload(st, "deleted")
        await ex.respond(200)

    # ---- blobs -------------------------------------------------------------------------
    async def _h_api_blobs_digest(self, ex: _Exchange, body: bytes) -> None:
        digest = ex.path[len("/api/blobs/") :]
        valid = re.fullmatch(r"sha256[:-][0-9a-f]{64}", digest) is not None
        norm = digest.replace("sha256-", "sha256:", 1)
        if ex.method == "HEAD":
            if not valid:
                await ex.respond_json(400, {"error": "invalid digest format"})
            elif norm in self.blobs:
                await ex.respond(200)
            else:
                await ex.respond_json(404, {"error": f'blob "{digest}" not found'})
            return
        if not valid:
            await self._drain(ex)
            raise _HTTPError(400, "invalid digest format")
        if norm in self.blobs:
            await self._drain(ex)
            await ex.respond(200)
            return
        h = hashlib.sha256()
        size = 0
        async for chunk in ex.body_chunks():
            h.update(chunk)
            size += len(chunk)
        got = "sha256:" + h.hexdigest()
        if got != norm:
            raise _HTTPError(400, f"digest mismatch, expected {norm}, got {got}")
        self.blobs[norm] = size
        await ex.respond(201)

    # ---- pull / push / create ------------------------------------------------------------
    async def _progress(
        self, ex: _Exchange, stream: bool, steps: AsyncIterator[dict[str, Any]]
    ) -> None:
        last: dict[str, Any] = {}
        async for item in steps:
            if "error" in item:
                status = int(item.pop("_status", 500))
                if stream:
                    await ex.end_stream_with("application/x-ndjson", _dumps(item) + b"\n")
                else:
                    await ex.respond_json(status, {"error": item["error"]})
                return
            last = item
            if stream:
                await ex.start_stream("application/x-ndjson")
                await ex.send_line(_dumps(item) + b"\n")
        if stream:
            await ex.end_stream()
        else:
            await ex.respond_json(200, last)

    async def _h_api_pull(self, ex: _Exchange, body: bytes) -> None:
        req = _decode_json_body(body, "api.PullRequest")
        name = self._model_field(req)
        if not _valid_name(name):
            raise _HTTPError(400, "invalid model name")
        stream = req.get("stream") is not False
        src = self.pullable.get(canonical_name(name)) or self._find(name)

        async def steps() -> AsyncIterator[dict[str, Any]]:
            yield {"status": "pulling manifest"}
            await self._pace()
            if src is None:
                yield {"error": "pull model manifest: file does not exist"}
                return
            for digest, total in _layers(src):
                yield {"status": f"pulling {digest[7:19]}", "digest": digest, "total": total}
                parts = 4 if total > 1_000_000 else 1
                for i in range(1, parts + 1):
                    await self._pace()
                    yield {
                        "status": f"pulling {digest[7:19]}",
                        "digest": digest,
                        "total": total,
                        "completed": total * i // parts,
                    }
            for status in (
                "verifying sha256 digest",
                "writing manifest",
                "removing any unused layers",
            ):
                await self._pace()
                yield {"status": status}
            new = dataclasses.replace(src, name=_display_name(name), modified_at_ns=time.time_ns())
            self.add_model(new)
            yield {"status": "success"}

        await self._progress(ex, stream, steps())

    async def _pace(self) -> None:
        if self.pull_step_delay_s > 0:
            await asyncio.sleep(self.pull_step_delay_s)

    async def _h_api_push(self, ex: _Exchange, body: bytes) -> None:
        req = _decode_json_body(body, "api.PushRequest")
        name = self._model_field(req)
        if not _valid_name(name):
            raise _HTTPError(400, "invalid model name")
        stream = req.get("stream") is not False
        m = self._find(name)

        async def steps() -> AsyncIterator[dict[str, Any]]:
            yield {"status": "retrieving manifest"}
            if m is None:
                yield {"error": f"model '{name}' not found", "_status": 404}
                return
            if "/" not in m.name:
                yield {
                    "error": "you are not authorized to push to this namespace, create the "
                    "model under a namespace you own"
                }
                return
            for digest, total in _layers(m):
                await self._pace()
                yield {"status": "starting upload", "digest": digest, "total": total}
                yield {
                    "status": f"pushing {digest[7:19]}",
                    "digest": digest,
                    "total": total,
                    "completed": total,
                }
            await self._pace()
            yield {"status": "pushing manifest"}
            yield {"status": "success"}

        await self._progress(ex, stream, steps())

    async def _h_api_create(self, ex: _Exchange, body: bytes) -> None:
        req = _decode_json_body(body, "api.CreateRequest")
        name = self._model_field(req)
        if not _valid_name(name):
            raise _HTTPError(400, "invalid model name")
        stream = req.get("stream") is not False
        base_name = req.get("from")
        files = req.get("files") or {}
        if not isinstance(files, dict):
            raise _HTTPError(400, "json: cannot unmarshal files")
        base: FakeModel | None = None
        if base_name:
            base = self._find(base_name)
            if base is None:
                raise _HTTPError(404, f"model '{base_name}' not found")
        elif not files:
            raise _HTTPError(400, "neither 'from' or 'files' was specified")
        for fname, digest in files.items():
            if (
                not isinstance(digest, str)
                or digest.replace("sha256-", "sha256:") not in self.blobs
            ):
                raise _HTTPError(400, f"blob {digest!r} for file {fname!r} not found")
        quantize = req.get("quantize") or req.get("quantization")

        async def steps() -> AsyncIterator[dict[str, Any]]:
            if files:
                yield {"status": "parsing GGUF"}
                size = 0
                for digest in files.values():
                    d = digest.replace("sha256-", "sha256:")
                    size += self.blobs[d]
                    yield {"status": f"using existing layer {d}"}
                new = FakeModel(
                    name=_display_name(name),
                    size=size,
                    digest=hashlib.sha256(
                        ("create:" + "".join(files.values())).encode()
                    ).hexdigest(),
                    parameter_size="unknown",
                    quantization_level="F16",
                )
            else:
                assert base is not None
                yield {"status": f"using existing layer sha256:{base.digest}"}
                new = dataclasses.replace(
                    base,
                    name=_display_name(name),
                    parent_model=base.name,
                    digest=hashlib.sha256(("create:" + name + base.digest).encode()).hexdigest(),
                    modified_at_ns=time.time_ns(),
                )
            if quantize:
                q = str(quantize).upper()
                total = new.size
                for i in (1, 2):
                    await self._pace()
                    yield {
                        "status": f"quantizing F16 model to {q}",
                        "digest": "0",
                        "total": total,
                        "completed": total * i // 2,
                    }
                new.quantization_level = q
            for key in ("template", "system"):
                if isinstance(req.get(key), str):
                    setattr(new, key, req[key])
                    digest = hashlib.sha256(req[key].encode()).hexdigest()
                    yield {"status": f"creating new layer sha256:{digest}"}
            await self._pace()
            yield {"status": "writing manifest"}
            new.modified_at_ns = time.time_ns()
            self.add_model(new)
            yield {"status": "success"}

        await self._progress(ex, stream, steps())

    # ---- inference: shared parsing ----------------------------------------------------------
    def _parse_common(self, req: dict[str, Any]) -> tuple[FakeModel, str, dict[str, Any], float]:
        try:
            keep_alive = parse_keep_alive(req.get("keep_alive"), self.default_keep_alive_s)
        except ValueError as e:
            raise _HTTPError(400, str(e)) from None
        options = req.get("options")
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise _HTTPError(
                400,
                f"json: cannot unmarshal {_go_type(options)} into Go struct field "
                "options of type map[string]interface {}",
            )
        name = req.get("model")
        if not isinstance(name, str) or not name:
            raise _HTTPError(400, "model is required")
        m = self._require(name)
        return m, name, options, keep_alive

    @staticmethod
    def _check_logprobs(req: dict[str, Any]) -> int | None:
        """None when logprobs are not asked for, else the number of top alternatives."""
        top = req.get("top_logprobs")
        if top is not None and (not isinstance(top, int) or not 0 <= top <= 20):
            raise _HTTPError(400, "top_logprobs must be between 0 and 20")
        return (top or 0) if req.get("logprobs") is True else None

    @staticmethod
    def _check_format(fmt: Any) -> Any:
        """Native ``format``: ``"json"`` or a JSON schema object; null / "" count as unset."""
        if fmt is None or fmt == "":
            return None
        if fmt == "json" or isinstance(fmt, dict):
            return fmt
        raise _HTTPError(400, 'invalid format: expected "json" or a valid JSON schema')

    def _check_think(self, m: FakeModel, name: str, think: Any) -> bool:
        if think is None or think is False:
            return False
        if isinstance(think, str) and think.lower() in ("none", "false"):
            return False
        if "thinking" not in m.capabilities:
            raise _HTTPError(400, f"{json.dumps(name)} does not support thinking")
        return True

    def _make_plan(
        self,
        m: FakeModel,
        name: str,
        key: str,
        options: dict[str, Any],
        keep_alive: float,
        *,
        think: bool,
        tool_call: dict[str, Any] | None = None,
        with_context: bool = False,
        fmt: Any = None,
        logprobs: int | None = None,
    ) -> _Plan:
        num_predict = options.get("num_predict")
        limit = (
            int(num_predict)
            if isinstance(num_predict, int | float)
            and not isinstance(num_predict, bool)
            and num_predict >= 0
            else None
        )
        events: list[tuple[str, Any]] = []
        if think:
            events += [
                ("thinking", t)
                for t in fake_tokens(m.name, key, self.thinking_tokens, kind="thinking")
            ]
        if tool_call is not None:
            events.append(("tool_calls", [tool_call]))
        elif fmt is not None:  # output constrained to the schema: a JSON document
            events += [("content", t) for t in format_tokens(m.name, key, fmt)]
        else:
            events += [("content", t) for t in fake_tokens(m.name, key, self.response_tokens)]
        natural = len(events)
        done_reason = "stop"
        if limit is not None and limit < natural:
            events = events[:limit]
            done_reason = "length"
        prompt_tokens = max(1, _count_tokens(key))
        num_ctx = self._effective_num_ctx(m, options.get("num_ctx"))
        context = None
        if with_context:
            ids = [
                int.from_bytes(_seed(tok)[:2], "big") % 32000
                for tok in re.findall(r"\w+|[^\w\s]", key)
            ]
            ids += [int.from_bytes(_seed(str(v))[:2], "big") % 32000 for _, v in events]
            context = ids
        return _Plan(
            model=m,
            display=name,
            prompt_key=key,
            prompt_tokens=prompt_tokens,
            num_ctx=num_ctx,
            keep_alive=keep_alive,
            events=events,
            eval_count=sum(8 if k == "tool_calls" else 1 for k, _ in events),
            done_reason=done_reason,
            context=context,
            logprobs=logprobs,
        )

    async def _run_plan(
        self,
        ex: _Exchange,
        plan: _Plan,
        emit: Callable[[str, Any], Awaitable[None]],
        *,
        streaming: bool,
    ) -> _Outcome:
        out = _Outcome(done_reason=plan.done_reason)
        async with self._slot(plan.model, plan.num_ctx, plan.keep_alive) as (_st, load_ns):
            if self.stall_s > 0:
                await asyncio.sleep(self.stall_s)
            t_pe = time.perf_counter_ns()
            if self.prompt_tokens_per_s > 0:
                await asyncio.sleep(plan.prompt_tokens / self.prompt_tokens_per_s)
            pe_ns = max(1, time.perf_counter_ns() - t_pe)
            t_ev = time.perf_counter_ns()
            mid = self._mid_stream_error if streaming else None
            for i, (kind, val) in enumerate(plan.events):
                if i > 0 and self.tokens_per_s > 0:
                    await asyncio.sleep(1.0 / self.tokens_per_s)
                if i == 1 and self.stall_mid_stream_s > 0:
                    await asyncio.sleep(self.stall_mid_stream_s)
                if mid is not None and ex.lines_sent >= mid[0]:
                    self._mid_stream_error = None
                    raise _MidStreamError(mid[1])
                if kind == "thinking":
                    out.thinking += val
                elif kind == "content":
                    out.content += val
                else:
                    out.tool_calls.extend(val)
                await emit(kind, val)
            ev_ns = max(1, time.perf_counter_ns() - t_ev)
            if not plan.events:
                ev_ns = 0
        total_ns = max(1, time.perf_counter_ns() - ex.t0_ns)
        metrics = {
            "total_duration": total_ns,
            "load_duration": load_ns,
            "prompt_eval_count": plan.prompt_tokens,
            "prompt_eval_duration": pe_ns,
            "eval_count": plan.eval_count,
            "eval_duration": ev_ns,
        }
        out.metrics = {k: v for k, v in metrics.items() if v}  # omitempty
        return out

    async def _load_or_unload(
        self,
        ex: _Exchange,
        m: FakeModel,
        name: str,
        options: dict[str, Any],
        keep_alive: float,
        chat: bool,
    ) -> None:
        if keep_alive == 0:
            st = self.loaded.get(m.name)
            if st is not None:
                st.keep_alive_s = 0
                if st.in_flight == 0 and not st.loading:
                    self._unload(st, "keep_alive 0")
            reason = "unload"
        else:
            num_ctx = self._effective_num_ctx(m, options.get("num_ctx"))
            async with self._slot(m, num_ctx, keep_alive):
                pass
            reason = "load"
        resp: dict[str, Any] = {"model": name, "created_at": rfc3339()}
        if chat:
            resp["message"] = {"role": "assistant", "content": ""}
        else:
            resp["response"] = ""
        resp.update({"done": True, "done_reason": reason})
        await ex.respond_json(200, resp)

    # ---- /api/generate ------------------------------------------------------------------
    async def _h_api_generate(self, ex: _Exchange, body: bytes) -> None:
        req = _decode_json_body(body, "api.GenerateRequest")
        m, name, options, keep_alive = self._parse_common(req)
        if req.get("raw") and (req.get("template") or req.get("system") or req.get("context")):
            raise _HTTPError(400, "raw mode does not support template, system, or context")
        if "completion" not in m.capabilities:
            raise _HTTPError(400, f"{json.dumps(name)} does not support generate")
        think = self._check_think(m, name, req.get("think"))
        logprobs = self._check_logprobs(req)
        fmt = self._check_format(req.get("format"))
        prompt = req.get("prompt") or ""
        if not isinstance(prompt, str):
            raise _HTTPError(
                400, "json: cannot unmarshal prompt into Go struct field of type string"
            )
        if prompt == "" and not req.get("images"):
            await self._load_or_unload(ex, m, name, options, keep_alive, chat=False)
            return
        plan = self._make_plan(
            m,
            name,
            prompt,
            options,
            keep_alive,
            think=think,
            with_context=not req.get("raw"),
            fmt=fmt,
            logprobs=logprobs,
        )
        stream = req.get("stream") is not False

        async def emit(kind: str, val: Any) -> None:
            if not stream:
                return
            chunk: dict[str, Any] = {"model": name, "created_at": rfc3339(), "response": ""}
            if kind == "thinking":
                chunk["thinking"] = val
            elif kind == "content":
                chunk["response"] = val
            chunk["done"] = False
            lps = plan.logprobs_for(kind, val)
            if lps is not None:
                chunk["logprobs"] = lps
            await ex.start_stream("application/x-ndjson")
            await ex.send_line(_dumps(chunk) + b"\n")

        def final(out: _Outcome) -> dict[str, Any]:
            last: dict[str, Any] = {"model": name, "created_at": rfc3339()}
            last["response"] = "" if stream else out.content
            if not stream and out.thinking:
                last["thinking"] = out.thinking
            last["done"] = True
            last["done_reason"] = out.done_reason
            if plan.context is not None:
                last["context"] = plan.context
            last.update(out.metrics)
            if not stream and plan.logprobs is not None:
                last["logprobs"] = plan.all_logprobs()
            return last

        await self._native_reply(ex, plan, emit, stream, final)

    async def _native_reply(
        self,
        ex: _Exchange,
        plan: _Plan,
        emit: Callable[[str, Any], Awaitable[None]],
        stream: bool,
        final: Callable[[_Outcome], dict[str, Any]],
    ) -> None:
        """Run the plan, then send the final object (the last NDJSON line, or the whole
        answer), or an error line when the plan fails mid-stream."""
        try:
            out = await self._run_plan(ex, plan, emit, streaming=stream)
        except _MidStreamError as e:
            await ex.end_stream_with("application/x-ndjson", _dumps({"error": e.message}) + b"\n")
            return
        if stream:
            await ex.end_stream_with("application/x-ndjson", _dumps(final(out)) + b"\n")
        else:
            await ex.respond_json(200, final(out))

    # ---- /api/chat ------------------------------------------------------------------------
    def _tool_call_for(
        self, m: FakeModel, name: str, messages: list[dict[str, Any]], tools: Any
    ) -> dict[str, Any] | None:
        if not tools:
            return None
        if not isinstance(tools, list):
            raise _HTTPError(400, "json: cannot unmarshal tools")
        if "tools" not in m.capabilities:
            raise _HTTPError(400, f"{json.dumps(name)} does not support tools")
        last_user = next((x for x in reversed(messages) if x.get("role") == "user"), None)
        if last_user is None or any(x.get("role") == "tool" for x in messages):
            return None
        text = _content_text(last_user.get("content"))
        if "weather" not in text.lower():
            return None
        fns = [t.get("function", {}) for t in tools if isinstance(t, dict)]
        fn = next(
            (f for f in fns if "weather" in str(f.get("name", "")).lower()), fns[0] if fns else {}
        )
        city_m = re.search(r"\bin ([A-Z][\w\- ]*?)(?:[?.!,]|$)", text)
        city = city_m.group(1).strip() if city_m else "Paris"
        params = fn.get("parameters") or {}
        props = params.get("properties") or {"location": {"type": "string"}}
        args: dict[str, Any] = {}
        for pname, spec in props.items():
            ptype = spec.get("type") if isinstance(spec, dict) else "string"
            if ptype in ("number", "integer"):
                args[pname] = 1
            elif ptype == "boolean":
                args[pname] = False
            elif "unit" in pname.lower():
                enum = spec.get("enum") if isinstance(spec, dict) else None
                args[pname] = enum[0] if enum else "celsius"
            else:
                args[pname] = city
        call_id = "call_" + hashlib.sha256(text.encode()).hexdigest()[:8]
        return {
            "id": call_id,
            "function": {"index": 0, "name": str(fn.get("name", "get_weather")), "arguments": args},
        }

    @staticmethod
    def _check_messages(messages: Any) -> list[dict[str, Any]]:
        if messages is None:
            return []
        if not isinstance(messages, list) or not all(isinstance(x, dict) for x in messages):
            raise _HTTPError(
                400,
                "json: cannot unmarshal messages into Go struct field ChatRequest.messages "
                "of type []api.Message",
            )
        return messages

    async def _h_api_chat(self, ex: _Exchange, body: bytes) -> None:
        req = _decode_json_body(body, "api.ChatRequest")
        m, name, options, keep_alive = self._parse_common(req)
        messages = self._check_messages(req.get("messages"))
        if "completion" not in m.capabilities:
            raise _HTTPError(400, f"{json.dumps(name)} does not support chat")
        think = self._check_think(m, name, req.get("think"))
        logprobs = self._check_logprobs(req)
        fmt = self._check_format(req.get("format"))
        tool_call = self._tool_call_for(m, name, messages, req.get("tools"))
        if not messages:
            await self._load_or_unload(ex, m, name, options, keep_alive, chat=True)
            return
        plan = self._make_plan(
            m,
            name,
            chat_prompt_key(messages),
            options,
            keep_alive,
            think=think,
            tool_call=tool_call,
            fmt=fmt,
            logprobs=logprobs,
        )
        stream = req.get("stream") is not False

        async def emit(kind: str, val: Any) -> None:
            if not stream:
                return
            msg: dict[str, Any] = {"role": "assistant", "content": ""}
            if kind == "thinking":
                msg["thinking"] = val
            elif kind == "content":
                msg["content"] = val
            else:
                msg["tool_calls"] = val
            chunk = {"model": name, "created_at": rfc3339(), "message": msg, "done": False}
            lps = plan.logprobs_for(kind, val)
            if lps is not None:
                chunk["logprobs"] = lps
            await ex.start_stream("application/x-ndjson")
            await ex.send_line(_dumps(chunk) + b"\n")

        def final(out: _Outcome) -> dict[str, Any]:
            msg: dict[str, Any] = {"role": "assistant", "content": "" if stream else out.content}
            if not stream and out.thinking:
                msg["thinking"] = out.thinking
            if not stream and out.tool_calls:
                msg["tool_calls"] = out.tool_calls
            last = {
                "model": name,
                "created_at": rfc3339(),
                "message": msg,
                "done": True,
                "done_reason": out.done_reason,
                **out.metrics,
            }
            if not stream and plan.logprobs is not None:
                last["logprobs"] = plan.all_logprobs()
            return last

        await self._native_reply(ex, plan, emit, stream, final)

    # ---- embeddings -------------------------------------------------------------------------
    async def _embed_texts(
        self,
        ex: _Exchange,
        m: FakeModel,
        texts: list[str],
        options: dict[str, Any],
        keep_alive: float,
    ) -> tuple[int, int]:
        """Take a slot, spend prefill time; returns (load_ns, prompt tokens)."""
        num_ctx = self._effective_num_ctx(m, options.get("num_ctx"))
        tokens = sum(max(1, _count_tokens(t)) for t in texts)
        async with self._slot(m, num_ctx, keep_alive) as (_st, load_ns):
            if self.stall_s > 0:
                await asyncio.sleep(self.stall_s)
            if texts and self.prompt_tokens_per_s > 0:
                await asyncio.sleep(tokens / self.prompt_tokens_per_s)
        return load_ns, tokens

    async def _h_api_embed(self, ex: _Exchange, body: bytes) -> None:
        req = _decode_json_body(body, "api.EmbedRequest")
        m, name, options, keep_alive = self._parse_common(req)
        raw = req.get("input")
        if raw is None:
            texts: list[str] = []
        elif isinstance(raw, str):
            texts = [raw] if raw else []
        elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            texts = list(raw)
        else:
            raise _HTTPError(400, "invalid input type")
        dims = req.get("dimensions")
        if dims is not None and (
            not isinstance(dims, int)
            or isinstance(dims, bool)
            or dims < 0
            or dims > m.embedding_length
        ):
            raise _HTTPError(400, f"invalid dimensions: {dims}")
        load_ns, tokens = await self._embed_texts(ex, m, texts, options, keep_alive)
        if not texts:
            await ex.respond_json(200, {"model": name, "embeddings": []})
            return
        vecs = [fake_embedding(m.name, t, m.embedding_length) for t in texts]
        if dims:
            vecs = [_renormalise(v[:dims]) for v in vecs]
        resp = {
            "model": name,
            "embeddings": vecs,
            "total_duration": max(1, time.perf_counter_ns() - ex.t0_ns),
            "load_duration": load_ns,
            "prompt_eval_count": tokens,
        }
        await ex.respond_json(200, resp)

    async def _h_api_embeddings(self, ex: _Exchange, body: bytes) -> None:
        req = _decode_json_body(body, "api.EmbeddingRequest")
        m, _name, options, keep_alive = self._parse_common(req)
        prompt = req.get("prompt") or ""
        if not isinstance(prompt, str):
            raise _HTTPError(400, "json: cannot unmarshal prompt of type string")
        await self._embed_texts(ex, m, [prompt] if prompt else [], options, keep_alive)
        vec = fake_embedding(m.name, prompt, m.embedding_length, normalise=False) if prompt else []
        await ex.respond_json(200, {"embedding": vec})

    # ---- OpenAI /v1 -------------------------------------------------------------------------
    @staticmethod
    def _oa_options(req: dict[str, Any]) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        mt = req.get("max_tokens", req.get("max_completion_tokens"))
        if isinstance(mt, int) and not isinstance(mt, bool):
            opts["num_predict"] = mt
        for k in ("temperature", "top_p", "seed", "stop", "frequency_penalty", "presence_penalty"):
            if req.get(k) is not None:
                opts[k] = req[k]
        opts.setdefault("temperature", 1.0)
        opts.setdefault("top_p", 1.0)
        return opts

    def _oa_chat_model(self, req: dict[str, Any]) -> tuple[FakeModel, str]:
        """The request's model for a chat endpoint (/v1/chat/completions, /v1/responses)."""
        m, name = self._oa_model(req)
        if "completion" not in m.capabilities:
            raise _HTTPError(400, f"{json.dumps(name)} does not support chat")
        return m, name

    def _oa_chat_plan(
        self,
        m: FakeModel,
        name: str,
        messages: list[dict[str, Any]],
        options: dict[str, Any],
        think: bool,
        tool_call: dict[str, Any] | None,
        fmt: Any,
        logprobs: int | None = None,
    ) -> _Plan:
        return self._make_plan(
            m,
            name,
            chat_prompt_key(messages),
            options,
            self.default_keep_alive_s,
            think=think,
            tool_call=tool_call,
            fmt=fmt,
            logprobs=logprobs,
        )

    def _oa_model(self, req: dict[str, Any]) -> tuple[FakeModel, str]:
        name = req.get("model")
        if not isinstance(name, str) or not name:
            raise _HTTPError(400, "model is required")
        return self._require(name), name

    async def _h_v1_chat_completions(self, ex: _Exchange, body: bytes) -> None:
        req = _decode_json_body(body, "openai.ChatCompletionRequest")
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _HTTPError(400, "[] is too short - 'messages'")
        for msg in messages:
            if not isinstance(msg, dict):
                raise _HTTPError(400, "invalid message format")
            content = msg.get("content")
            for part in content if isinstance(content, list) else []:
                url = (part.get("image_url") or {}) if isinstance(part, dict) else {}
                u = url.get("url", "") if isinstance(url, dict) else str(url)
                if u.startswith(("http://", "https://")):
                    raise _HTTPError(
                        400,
                        "image URLs are not currently supported, please use base64 encoded "
                        "data instead",
                    )
        m, name = self._oa_chat_model(req)
        effort = req.get("reasoning_effort") or (req.get("reasoning") or {}).get("effort")
        think = self._check_think(m, name, effort)
        tool_call = self._tool_call_for(m, name, messages, req.get("tools"))
        options = self._oa_options(req)
        logprobs = self._check_logprobs(req)
        fmt = _oa_response_format(req.get("response_format"))
        plan = self._oa_chat_plan(m, name, messages, options, think, tool_call, fmt, logprobs)
        stream = req.get("stream") is True
        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
        cid = f"chatcmpl-{random.randint(0, 998)}"
        created = int(time.time())
        first = True

        def chunk(
            delta: dict[str, Any], finish: str | None, lps: list[dict[str, Any]] | None = None
        ) -> bytes:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            if lps is not None:
                choice["logprobs"] = {"content": lps}
            obj = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "system_fingerprint": "fp_ollama",
                "choices": [choice],
            }
            return b"data: " + _dumps(obj) + b"\n\n"

        async def emit(kind: str, val: Any) -> None:
            nonlocal first
            if not stream:
                return
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            first = False
            if kind == "thinking":
                delta["content"] = ""
                delta["reasoning"] = val
            elif kind == "content":
                delta["content"] = val
            else:
                delta["tool_calls"] = [_oa_tool_call(tc, i) for i, tc in enumerate(val)]
            await ex.start_stream("text/event-stream")
            await ex.send_line(chunk(delta, None, plan.logprobs_for(kind, val)))

        try:
            out = await self._run_plan(ex, plan, emit, streaming=stream)
        except _MidStreamError:
            await ex.end_stream_with(
                "text/event-stream", chunk({"role": "assistant", "content": ""}, None)
            )
            return
        finish = "tool_calls" if out.tool_calls else out.done_reason
        usage = {
            "prompt_tokens": out.metrics.get("prompt_eval_count", 0),
            "completion_tokens": out.metrics.get("eval_count", 0),
            "total_tokens": out.metrics.get("prompt_eval_count", 0)
            + out.metrics.get("eval_count", 0),
        }
        if stream:
            await ex.start_stream("text/event-stream")
            await ex.send_line(chunk({}, finish))
            if include_usage:
                obj = {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": name,
                    "system_fingerprint": "fp_ollama",
                    "choices": [],
                    "usage": usage,
                }
                await ex.send_line(b"data: " + _dumps(obj) + b"\n\n")
            await ex.send_line(b"data: [DONE]\n\n")
            await ex.end_stream()
            return
        message: dict[str, Any] = {"role": "assistant", "content": out.content}
        if out.thinking:
            message["reasoning"] = out.thinking
        if out.tool_calls:
            message["tool_calls"] = [_oa_tool_call(tc, i) for i, tc in enumerate(out.tool_calls)]
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
        if plan.logprobs is not None:
            choice["logprobs"] = {"content": plan.all_logprobs()}
        await ex.respond_json(
            200,
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": name,
                "system_fingerprint": "fp_ollama",
                "choices": [choice],
                "usage": usage,
            },
        )

    async def _h_v1_completions(self, ex: _Exchange, body: bytes) -> None:
        req = _decode_json_body(body, "openai.CompletionRequest")
        prompt = req.get("prompt")
        if not isinstance(prompt, str):
            raise _HTTPError(400, f"invalid type for 'prompt' field: {_go_type(prompt)}")
        m, name = self._oa_model(req)
        if "completion" not in m.capabilities:
            raise _HTTPError(400, f"{json.dumps(name)} does not support generate")
        options = self._oa_options(req)
        plan = self._make_plan(m, name, prompt, options, self.default_keep_alive_s, think=False)
        stream = req.get("stream") is True
        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
        cid = f"cmpl-{random.randint(0, 998)}"
        created = int(time.time())
        zero_usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None) -> bytes:
            obj: dict[str, Any] = {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": name,
                "system_fingerprint": "fp_ollama",
                "choices": choices,
            }
            if usage is not None:
                obj["usage"] = usage
            return b"data: " + _dumps(obj) + b"\n\n"

        async def emit(kind: str, val: Any) -> None:
            if not stream or kind != "content":
                return
            await ex.start_stream("text/event-stream")
            await ex.send_line(
                chunk(
                    [{"text": val, "index": 0, "finish_reason": None}],
                    zero_usage if include_usage else None,
                )
            )

        try:
            out = await self._run_plan(ex, plan, emit, streaming=stream)
        except _MidStreamError:
            await ex.end_stream_with(
                "text/event-stream", chunk([{"text": "", "index": 0, "finish_reason": None}], None)
            )
            return
        usage = {
            "prompt_tokens": out.metrics.get("prompt_eval_count", 0),
            "completion_tokens": out.metrics.get("eval_count", 0),
            "total_tokens": out.metrics.get("prompt_eval_count", 0)
            + out.metrics.get("eval_count", 0),
        }
        if stream:
            await ex.start_stream("text/event-stream")
            await ex.send_line(
                chunk(
                    [{"text": "", "index": 0, "finish_reason": out.done_reason}],
                    zero_usage if include_usage else None,
                )
            )
            if include_usage:
                await ex.send_line(chunk([], usage))
            await ex.send_line(b"data: [DONE]\n\n")
            await ex.end_stream()
            return
        await ex.respond_json(
            200,
            {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": name,
                "system_fingerprint": "fp_ollama",
                "choices": [{"text": out.content, "index": 0, "finish_reason": out.done_reason}],
                "usage": usage,
            },
        )

    async def _h_v1_embeddings(self, ex: _Exchange, body: bytes) -> None:
        req = _decode_json_body(body, "openai.EmbedRequest")
        raw = req.get("input")
        if isinstance(raw, str):
            texts = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
            texts = list(raw)
        elif isinstance(raw, list) and not raw:
            raise _HTTPError(400, "invalid input")
        else:
            raise _HTTPError(400, "invalid input type")
        fmt = req.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise _HTTPError(400, f"invalid encoding format: {fmt!r}, must be 'float' or 'base64'")
        m, name = self._oa_model(req)
        dims = req.get("dimensions")
        _load_ns, tokens = await self._embed_texts(ex, m, texts, {}, self.default_keep_alive_s)
        data = []
        for i, t in enumerate(texts):
            vec = fake_embedding(m.name, t, m.embedding_length)
            if isinstance(dims, int) and 0 < dims < len(vec):
                vec = _renormalise(vec[:dims])
            emb: Any = vec
            if fmt == "base64":
                emb = base64.b64encode(array.array("f", vec).tobytes()).decode()
                if sys.byteorder != "little":  # pragma: no cover
                    a = array.array("f", vec)
                    a.byteswap()
                    emb = base64.b64encode(a.tobytes()).decode()
            data.append({"object": "embedding", "embedding": emb, "index": i})
        await ex.respond_json(
            200,
            {
                "object": "list",
                "data": data,
                "model": name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    # ---- /v1/responses (Ollama's stateless Responses API: openai/responses.go) -------------
    @staticmethod
    def _responses_messages(req: dict[str, Any]) -> list[dict[str, Any]]:
        """The chat messages a Responses request becomes (instructions first)."""
        messages: list[dict[str, Any]] = []
        instructions = req.get("instructions")
        if isinstance(instructions, str) and instructions:
            messages.append({"role": "system", "content": instructions})
        raw = req.get("input")
        if isinstance(raw, str):
            if raw:
                messages.append({"role": "user", "content": raw})
            return messages
        if not isinstance(raw, list):
            raise _HTTPError(400, "input must be a string or array")
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise _HTTPError(400, f"input[{i}]: input item must be an object")
            kind = item.get("type") or ("message" if item.get("role") else "")
            if kind == "message":
                content = item.get("content")
                if isinstance(content, list):
                    text = ""
                    for j, part in enumerate(content):
                        ptype = part.get("type") if isinstance(part, dict) else None
                        if ptype in ("input_text", "output_text"):
                            text += str(part.get("text", ""))
                        elif ptype == "input_file":
                            raise _HTTPError(400, "file inputs are not currently supported")
                        elif ptype != "input_image":
                            raise _HTTPError(
                                400, f"input[{i}]: content[{j}]: unknown content type: {ptype}"
                            )
                    content = text
                messages.append({"role": item.get("role", "user"), "content": content or ""})
            elif kind == "function_call":
                call = {"function": {"name": item.get("name", ""), "arguments": {}}}
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            elif kind == "function_call_output":
                messages.append({"role": "tool", "content": str(item.get("output", ""))})
            elif kind == "reasoning":
                continue
            elif not kind:
                raise _HTTPError(400, f"input[{i}]: input item missing required 'type' field")
            else:
                raise _HTTPError(400, f"input[{i}]: unknown input item type: {json.dumps(kind)}")
        return messages

    async def _h_v1_responses(self, ex: _Exchange, body: bytes) -> None:
        req = _decode_json_body(body, "openai.ResponsesRequest")
        messages = self._responses_messages(req)
        effort = (req.get("reasoning") or {}).get("effort") or ""
        if effort and effort not in ("none", "low", "medium", "high", "max"):
            raise _HTTPError(
                400,
                f'invalid reasoning value: {json.dumps(effort)} (must be "high", '
                '"medium", "low", "max", or "none")',
            )
        tools = [
            {
                "type": t.get("type", "function"),
                "function": {
                    "name": t.get("name", ""),
                    "description": t.get("description") or "",
                    "parameters": t.get("parameters") or {},
                },
            }
            for t in (req.get("tools") or [])
            if isinstance(t, dict)
        ]
        fmt_spec = (req.get("text") or {}).get("format")
        fmt = None
        if isinstance(fmt_spec, dict) and fmt_spec.get("type") == "json_schema":
            fmt = fmt_spec.get("schema") if isinstance(fmt_spec.get("schema"), dict) else None
        m, name = self._oa_chat_model(req)
        think = self._check_think(m, name, effort or None)
        tool_call = self._tool_call_for(m, name, messages, tools)
        options: dict[str, Any] = {"temperature": req.get("temperature", 1.0)}
        if isinstance(req.get("max_output_tokens"), int):
            options["num_predict"] = req["max_output_tokens"]
        plan = self._oa_chat_plan(m, name, messages, options, think, tool_call, fmt)
        stream = req.get("stream") is True
        rid = f"resp_{random.randint(0, 999998)}"
        item_id = f"msg_{random.randint(0, 999998)}"
        reasoning_id = f"rs_{random.randint(0, 999998)}"
        seq = 0
        text = ""
        thinking = ""
        calls: list[dict[str, Any]] = []

        def response_obj(status: str, output: list[Any], usage: Any) -> dict[str, Any]:
            text_format: dict[str, Any] = {"type": "text"}
            if isinstance(fmt_spec, dict):
                text_format = {k: v for k, v in fmt_spec.items() if v is not None}
            reasoning = None
            if req.get("reasoning"):
                r = req["reasoning"]
                reasoning = {"effort": r.get("effort"), "summary": r.get("summary")}
            return {
                "id": rid,
                "object": "response",
                "created_at": int(time.time()),
                "completed_at": int(time.time()) if status == "completed" else None,
                "status": status,
                "incomplete_details": None,
                "model": name,
                "previous_response_id": None,
                "instructions": req.get("instructions") or None,
                "output": output,
                "error": None,
                "tools": req.get("tools") or [],
                "tool_choice": "auto",
                "truncation": req.get("truncation") or "disabled",
                "parallel_tool_calls": True,
                "text": {"format": text_format},
                "top_p": req.get("top_p", 1.0),
                "presence_penalty": 0,
                "frequency_penalty": 0,
                "top_logprobs": 0,
                "temperature": req.get("temperature", 1.0),
                "reasoning": reasoning,
                "usage": usage,
                "max_output_tokens": req.get("max_output_tokens"),
                "max_tool_calls": None,
                "store": False,
                "background": bool(req.get("background")),
                "service_tier": "default",
                "metadata": {},
                "safety_identifier": None,
                "prompt_cache_key": None,
            }

        def message_item(status: str) -> dict[str, Any]:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            return {
                "id": item_id,
                "type": "message",
                "status": status,
                "role": "assistant",
                "content": [part] if status == "completed" else [],
            }

        def reasoning_item() -> dict[str, Any]:
            return {
                "id": reasoning_id,
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": thinking}],
                "encrypted_content": thinking,
            }

        async def event(kind: str, data: dict[str, Any]) -> None:
            nonlocal seq
            data = {**data, "type": kind, "sequence_number": seq}
            seq += 1
            await ex.start_stream("text/event-stream")
            await ex.send_line(b"event: " + kind.encode() + b"\ndata: " + _dumps(data) + b"\n\n")

        # reasoning item: "" (none yet), "open", "done"; the message item: opened or not
        state = {"reasoning": "", "text": "", "first": "yes"}
        out_index = 0

        async def finish_reasoning() -> None:
            nonlocal out_index
            if state["reasoning"] == "open":
                await event(
                    "response.reasoning_summary_text.done",
                    {
                        "item_id": reasoning_id,
                        "output_index": out_index,
                        "summary_index": 0,
                        "text": thinking,
                    },
                )
                await event(
                    "response.output_item.done",
                    {"output_index": out_index, "item": reasoning_item()},
                )
                state["reasoning"] = "done"
                out_index += 1

        async def emit(kind: str, val: Any) -> None:
            nonlocal text, thinking
            if kind == "thinking":
                thinking += val
            elif kind == "content":
                text += val
            else:
                calls.extend(val)
            if not stream:
                return
            if state["first"]:
                state["first"] = ""
                for k in ("response.created", "response.in_progress"):
                    await event(k, {"response": response_obj("in_progress", [], None)})
            if kind == "thinking":
                if not state["reasoning"]:
                    state["reasoning"] = "open"
                    await event(
                        "response.output_item.added",
                        {
                            "output_index": out_index,
                            "item": {"id": reasoning_id, "type": "reasoning", "summary": []},
                        },
                    )
                await event(
                    "response.reasoning_summary_text.delta",
                    {
                        "item_id": reasoning_id,
                        "output_index": out_index,
                        "summary_index": 0,
                        "delta": val,
                    },
                )
                return
            await finish_reasoning()
            if kind == "tool_calls":
                for i, tc in enumerate(val):
                    fc = _responses_call(tc, f"fc_{random.randint(0, 999998)}_{i}")
                    await event(
                        "response.output_item.added",
                        {
                            "output_index": out_index + i,
                            "item": {**fc, "status": "in_progress", "arguments": ""},
                        },
                    )
                    await event(
                        "response.function_call_arguments.delta",
                        {
                            "item_id": fc["id"],
                            "output_index": out_index + i,
                            "delta": fc["arguments"],
                        },
                    )
                    await event(
                        "response.function_call_arguments.done",
                        {
                            "item_id": fc["id"],
                            "output_index": out_index + i,
                            "arguments": fc["arguments"],
                        },
                    )
                    await event(
                        "response.output_item.done", {"output_index": out_index + i, "item": fc}
                    )
                return
            if not state["text"]:
                state["text"] = "open"
                await event(
                    "response.output_item.added",
                    {"output_index": out_index, "item": message_item("in_progress")},
                )
                await event(
                    "response.content_part.added",
                    {
                        "item_id": item_id,
                        "output_index": out_index,
                        "content_index": 0,
                        "part": {
                            "type": "output_text",
                            "text": "",
                            "annotations": [],
                            "logprobs": [],
                        },
                    },
                )
            await event(
                "response.output_text.delta",
                {
                    "item_id": item_id,
                    "output_index": out_index,
                    "content_index": 0,
                    "delta": val,
                    "logprobs": [],
                },
            )

        try:
            result = await self._run_plan(ex, plan, emit, streaming=stream)
        except _MidStreamError:
            await ex.end_stream()
            return
        usage = {
            "input_tokens": result.metrics.get("prompt_eval_count", 0),
            "output_tokens": result.metrics.get("eval_count", 0),
            "total_tokens": result.metrics.get("prompt_eval_count", 0)
            + result.metrics.get("eval_count", 0),
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }
        output: list[Any] = [reasoning_item()] if thinking else []
        if calls:
            output += [_responses_call(tc, f"fc_{rid}_{i}") for i, tc in enumerate(calls)]
        else:
            output.append(message_item("completed"))
        if not stream:
            await ex.respond_json(200, response_obj("completed", output, usage))
            return
        await finish_reasoning()
        if state["text"] and not calls:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            await event(
                "response.output_text.done",
                {
                    "item_id": item_id,
                    "output_index": out_index,
                    "content_index": 0,
                    "text": text,
                    "logprobs": [],
                },
            )
            await event(
                "response.content_part.done",
                {
                    "item_id": item_id,
                    "output_index": out_index,
                    "content_index": 0,
                    "part": part,
                },
            )
            await event(
                "response.output_item.done",
                {"output_index": out_index, "item": message_item("completed")},
            )
        await event("response.completed", {"response": response_obj("completed", output, usage)})
        await ex.end_stream()

    def _oa_model_entry(self, m: FakeModel) -> dict[str, Any]:
        owner = m.name.split("/")[-2] if "/" in m.name else "library"
        return {
            "id": m.name,
            "object": "model",
            "created": m.modified_at_ns // 1_000_000_000,
            "owned_by": owner,
        }

    async def _h_v1_models(self, ex: _Exchange, body: bytes) -> None:
        models = sorted(self.models.values(), key=lambda m: m.modified_at_ns, reverse=True)
        # Real Ollama quirk: an empty list serialises as null.
        data = [self._oa_model_entry(m) for m in models] or None
        await ex.respond_json(200, {"object": "list", "data": data})

    async def _h_v1_models_model(self, ex: _Exchange, body: bytes) -> None:
        name = urllib.parse.unquote(ex.path[len("/v1/models/") :])
        m = self._find(name)
        if m is None:
            raise _HTTPError(404, f"model '{name}' not found")
        await ex.respond_json(200, self._oa_model_entry(m))


class _MidStreamError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def fake_logprob(model: str, token: str, top: int) -> dict[str, Any]:
    """Deterministic log probability of ``token`` (and ``top`` alternatives, the token first)."""

    def entry(tok: str, rank: int) -> dict[str, Any]:
        h = int.from_bytes(_seed(canonical_name(model), "logprob", token)[:4], "big")
        lp = -((h % 4000) / 1000.0) - rank * 0.75
        return {"token": tok, "logprob": round(lp, 6), "bytes": list(tok.encode())}

    out = entry(token, 0)
    if top > 0:
        alts = [w for w in _WORDS if w != token.strip()][: top - 1]
        out["top_logprobs"] = [entry(token, 0)] + [
            entry(" " + w, i + 1) for i, w in enumerate(alts)
        ]
    return out


def _schema_value(schema: Any, words: Iterator[str], root: Any, depth: int = 0) -> Any:
    """A value that satisfies a (plain) JSON schema, as a grammar-constrained model gives."""
    if not isinstance(schema, dict) or depth > 8:
        return next(words)
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/") and isinstance(root, dict):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return _schema_value(target, words, root, depth + 1)
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            pick = next((o for o in options if o != {"type": "null"}), options[0])
            return _schema_value(pick, words, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties")
        if not isinstance(props, dict):
            return {}
        return {k: _schema_value(v, words, root, depth + 1) for k, v in props.items()}
    if kind == "array":
        return [_schema_value(schema.get("items"), words, root, depth + 1)]
    if kind == "integer":
        return len(next(words))
    if kind == "number":
        return len(next(words)) + 0.5
    if kind == "boolean":
        return len(next(words)) % 2 == 0
    if kind == "null":
        return None
    return next(words)


def format_tokens(model: str, prompt_key: str, fmt: Any) -> list[str]:
    """The answer to a request with ``format`` (``"json"`` or a schema): a JSON document in
    small pieces, deterministic per (model, prompt)."""
    words = itertools.cycle([w.strip() for w in fake_tokens(model, prompt_key, 8)])
    if isinstance(fmt, dict):
        value = _schema_value(fmt, words, fmt)
    else:
        value = {"response": " ".join(next(words) for _ in range(4))}
    text = json.dumps(value)
    return [text[i : i + 5] for i in range(0, len(text), 5)]


def _oa_response_format(value: Any) -> Any:
    """OpenAI ``response_format`` → the native ``format`` it becomes (None for plain text)."""
    if not isinstance(value, dict):
        return None
    if value.get("type") == "json_object":
        return "json"
    if value.get("type") == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else "json"
    return None


def _oa_tool_call(tc: dict[str, Any], i: int) -> dict[str, Any]:
    fn = tc.get("function", {})
    return {
        "id": tc.get("id") or f"call_{i}",
        "index": i,
        "type": "function",
        "function": {"name": fn.get("name", ""), "arguments": json.dumps(fn.get("arguments", {}))},
    }


def _responses_call(tc: dict[str, Any], item_id: str) -> dict[str, Any]:
    fn = tc.get("function", {})
    return {
        "id": item_id,
        "type": "function_call",
        "status": "completed",
        "call_id": tc.get("id") or item_id,
        "name": fn.get("name", ""),
        "arguments": json.dumps(fn.get("arguments", {})),
    }


def _display_name(name: str) -> str:
    n = name.strip()
    for prefix in ("registry.ollama.ai/library/",):
        if n.lower().startswith(prefix):
            n = n[len(prefix) :]
    if ":" not in n.rsplit("/", 1)[-1]:
        n += ":latest"
    return n


def _layers(m: FakeModel) -> list[tuple[str, int]]:
    out = [("sha256:" + m.digest, m.size)]
    for kind, size in (("template", 1429), ("license", 7711), ("params", 96)):
        out.append(("sha256:" + hashlib.sha256(f"{kind}:{m.name}".encode()).hexdigest(), size))
    return out


def _param_count(parameter_size: str) -> int:
    mm = re.fullmatch(r"([\d.]+)\s*([KMBT]?)", parameter_size.strip().upper())
    if not mm:
        return 0
    mult = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}[mm.group(2)]
    return int(float(mm.group(1)) * mult)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------
# running in a background thread (for blocking clients) and as a subprocess
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def run_in_thread(
    fake: FakeOllama, *, use_uvloop: bool = False, timeout: float = 10.0
) -> Iterator[FakeOllama]:
    """Serve ``fake`` on its own event loop in a daemon thread for the ``with`` block.
    Use ``fake.call(fn, *args)`` to run knobs that touch asyncio state from the test thread."""
    if use_uvloop:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()

    def runner() -> None:
        asyncio.set_event_loop(loop)
        loop.run_forever()

    thread = threading.Thread(target=runner, name=f"fake-ollama-{id(fake):x}", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(fake.start(), loop).result(timeout)
        fake._thread_loop = loop
        yield fake
    finally:
        try:
            if fake._loop is loop:
                asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            loop.close()
            fake._thread_loop = None


def _parse_model_arg(spec: str) -> FakeModel:
    """``name`` or ``name=cap1,cap2`` (e.g. ``nomic-embed-text=embedding``)."""
    name, _, caps = spec.partition("=")
    if caps:
        cap_list = [c for c in caps.split(",") if c]
        kw: dict[str, Any] = {"capabilities": cap_list}
        if "embedding" in cap_list and "completion" not in cap_list:
            kw.update(
                family="nomic-bert", parameter_size="137M", size=274_302_450, embedding_length=768
            )
        return FakeModel(name, **kw)
    return FakeModel(name)


async def _amain(args: argparse.Namespace) -> None:
    models = [_parse_model_arg(s) for s in (args.model or ["llama3.2:3b"])]
    fake = FakeOllama(
        models,
        version=args.version,
        num_parallel=args.num_parallel,
        max_loaded_models=args.max_loaded_models,
        max_queue=args.max_queue,
        load_delay_s=args.load_delay,
        tokens_per_s=args.tokens_per_s,
        prompt_tokens_per_s=args.prompt_tokens_per_s,
        host=args.host,
        port=args.port,
        loopback_host_check=not args.no_host_check,
    )
    await fake.start()
    print(f"fake-ollama listening on {fake.host}:{fake.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m tests.fake_ollama", description=__doc__.split("\n")[0]
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--model", action="append", help="name or name=cap1,cap2 (repeatable)")
    p.add_argument("--version", default="0.12.6")
    p.add_argument("--num-parallel", type=int, default=2)
    p.add_argument("--max-loaded-models", type=int, default=3)
    p.add_argument("--max-queue", type=int, default=512)
    p.add_argument("--load-delay", type=float, default=0.05)
    p.add_argument("--tokens-per-s", type=float, default=200.0)
    p.add_argument("--prompt-tokens-per-s", type=float, default=2000.0)
    p.add_argument("--no-host-check", action="store_true")
    p.add_argument("--uvloop", action="store_true")
    args = p.parse_args(argv)
    if args.uvloop:
        import uvloop

        uvloop.run(_amain(args))
    else:
        asyncio.run(_amain(args))


if __name__ == "__main__":
    main()
