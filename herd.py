"""herd — one endpoint for a fleet of Ollama machines.

``python herd.py`` starts the router on ``0.0.0.0:11435``. It speaks the Ollama API and
Ollama's OpenAI-compatible ``/v1`` API, and sends every request to the node that will
finish it soonest (``scoring.py`` decides; this module moves bytes and keeps state).

Sections: errors and small helpers · HttpStream (the only code that moves HTTP bytes) ·
HTTP server · backend client pool · relays · fleet model · queues · the Router (routes,
handlers, proxying, retries) · heartbeats and discovery · metrics · lifecycle and CLI.
See ARCHITECTURE.md for the contracts between modules.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import functools
import gc
import hashlib
import hmac
import http
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import signal
import socket
import sys
import time
import typing
import uuid
from collections import OrderedDict, deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import h11

import scoring
import store
from scoring import AnswerKind, CircuitState, NodeStatus, TraceStatus

__version__ = "0.1.0"
log = logging.getLogger("herd")

JSON = dict[str, Any]
Headers = list[tuple[bytes, bytes]]
Framing = Literal["ndjson", "sse", "raw"]
CAPABILITY_KINDS = frozenset({"image", "stt"})  # jobs an agent's service runs, not Ollama

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)
OLLAMA_RUNNING = b"Ollama is running"
MiB = 1024 * 1024
MAX_HELD_NODES = 256  # pending/rejected agent nodes kept in memory (consent)
LOAD_LISTED_DONE_S = 300.0  # a load herd sent, listed by /api/ps this long: done anyway
REASON_PHRASES = MappingProxyType({s.value: s.phrase.encode() for s in http.HTTPStatus})
# Body fields herd reads and strips before forwarding an inference request
# ("metadata" only loses its "tags", and only when it has them).
HERD_BODY_FIELDS = ("metadata", "fallback_models", "fallback", "node_id")


# =======================================================================================
# Errors and small helpers
# =======================================================================================


class HttpError(Exception):
    """An error that already knows its HTTP meaning; rendered in the client's dialect."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)
        self.kind = kind


class ConnectionClosed(Exception):
    """The peer closed the connection (or it broke) while we were using it."""


class ClientGone(Exception):
    """The client disconnected while its request was being served."""


class UpstreamFailure(Exception):
    """An attempt on a node failed before any byte reached the client."""

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: int = 502,
        body: bytes = b"",
        headers: Headers | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = AnswerKind(kind)  # a failure kind: see scoring.retry_decision
        self.message = message
        self.status = status
        self.body = body
        self.headers = headers or []


EMPTY_FLEET = (
    "no node is online (the fleet is empty): run herd-node on each Ollama machine, or start "
    "the router with --node http://HOST:11434"
)
TRACE_ERROR_MAX = 1000  # characters of an error text kept in a trace row


def error_text(body: bytes, limit: int = TRACE_ERROR_MAX) -> str:
    """The error a client got in an answer body, bounded: the ``error`` of an Ollama
    ``{"error": "..."}`` or the ``error.message`` of an OpenAI error object, else the
    body's text."""
    text = body[: 4 * limit].decode("utf-8", "replace").strip()
    if body[:1] == b"{" and len(body) <= 64 * 1024:
        with contextlib.suppress(ValueError):
            obj = json.loads(body)
            err = obj.get("error") if isinstance(obj, dict) else None
            if isinstance(err, dict):
                err = err.get("message")
            if isinstance(err, str) and err:
                text = err
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def is_loopback_host(host: str) -> bool:
    """Is a listen address reachable only from this machine?"""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def has_herd_fields(body: JSON) -> bool:
    """Whether herd takes something out of this inference body before forwarding it: its
    own fields, or ``metadata`` when it holds herd's ``tags`` (or is an empty object, which
    goes with them). A client's own ``metadata`` (OpenAI's) is not herd's."""
    meta = body.get("metadata")
    if isinstance(meta, dict) and ("tags" in meta or not meta):
        return True
    return any(k in body for k in HERD_BODY_FIELDS if k != "metadata")


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


def error_body(path: str, status: int, message: str) -> bytes:
    """The error object in the dialect of the path (Ollama or OpenAI)."""
    if is_openai_path(path):
        etype = {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
        }.get(status, "api_error")
        obj: JSON = {"error": {"message": message, "type": etype, "param": None, "code": None}}
    else:
        obj = {"error": message}
    return json.dumps(obj).encode()


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    for k, v in headers:
        if k == name:
            return v.decode("latin-1")
    return None


def parse_rfc3339(value: object) -> float | None:
    """Epoch seconds of an Ollama timestamp (RFC 3339 with nanoseconds); None if unparsable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        stamp = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if stamp.year < 1970:  # Go's zero time "0001-01-01T00:00:00Z"
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.timestamp()


def rfc3339(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat().replace("+00:00", "Z")


def split_url(url: str) -> tuple[str, int, str]:
    """``http://host:port`` → (host, port, netloc). Only plain HTTP is spoken to nodes."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", ""):
        raise ValueError(f"unsupported scheme in {url!r} (nodes speak plain HTTP)")
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 11434
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return host, port, netloc


def normalize_url(url: str) -> str:
    _, _, netloc = split_url(url)
    return f"http://{netloc}"


def sign(key: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(
    key: str, header: str | None, body: bytes, now: float, max_skew_s: float = 60.0
) -> bool:
    if not header:
        return False
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        stamp = int(fields["t"])
        given = fields["v1"]
    except (ValueError, KeyError):
        return False
    if abs(now - stamp) > max_skew_s:
        return False
    expected = sign(key, stamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, given)


# =======================================================================================
# HttpStream: one h11 connection over one asyncio stream pair
# =======================================================================================


_METHOD = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]*")
_TARGET = re.compile(rb"[\x21-\x7e]*")
_REQUEST_LINE = re.compile(
    rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]{1,32} [\x21-\x7e]+ HTTP/[0-9]\.[0-9]\r?"
)
_VERSION_SHAPE = b"HTTP/#.#\r"  # '#': a digit


def request_line_possible(buf: bytes) -> bool:
    """Can ``buf``, what a client has sent so far, still become a valid request line
    (``METHOD SP target SP HTTP/d.d``, RFC 9112 §3; empty lines before it are allowed)?
    False as soon as its first bytes show it cannot (a TLS handshake, binary noise, a
    32-character "method"), so the server refuses it at once instead of waiting for the
    header deadline."""
    data = buf.lstrip(b"\r\n")
    line, newline, _ = data.partition(b"\n")
    if newline:
        return _REQUEST_LINE.fullmatch(line) is not None
    m = _METHOD.match(line).end()  # type: ignore[union-attr]
    if m == len(line):
        return m <= 32
    if m == 0 or m > 32 or line[m] != 0x20:
        return False
    rest = line[m + 1 :]
    t = _TARGET.match(rest).end()  # type: ignore[union-attr]
    if t == len(rest):
        return True
    if t == 0 or rest[t] != 0x20:
        return False
    version = rest[t + 1 :]
    return len(version) <= len(_VERSION_SHAPE) and all(
        (c in b"0123456789") if want == ord("#") else c == want
        for c, want in zip(version, _VERSION_SHAPE, strict=False)
    )


class HttpStream:
    """The only code that reads or writes a connection, for the server and the client side
    alike (tests/test_purity.py checks it)."""

    __slots__ = ("conn", "corked", "drain_above", "peer", "reader", "watches", "writer")
    READ_SIZE = 256 * 1024

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        role: type[h11.CLIENT] | type[h11.SERVER],
        *,
        max_head_bytes: int = 64 * 1024,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(role, max_incomplete_event_size=max_head_bytes)
        self.corked: list[bytes | bytearray | memoryview] = []
        # a send waits for the peer (drain) only once the transport holds more than its
        # high-water mark, as asyncio's own flow control would: no drain() call per chunk
        self.drain_above = writer.transport.get_write_buffer_limits()[1]
        peer = writer.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self.watches: dict[float, IdleWatch] | None = None

    def watch(self, timeout: float) -> IdleWatch:
        """This connection's bound of ``timeout`` seconds on a wait, for the task serving
        it: one lazily re-armed timer kept across its requests (``IdleWatch``), instead
        of a timer made and cancelled per wait (``asyncio.timeout``)."""
        if self.watches is None:
            self.watches = {}
        w = self.watches.get(timeout)
        if w is None:
            w = self.watches[timeout] = IdleWatch(timeout)
        return w

    def close_watches(self) -> None:
        for w in (self.watches or {}).values():
            w.close()
        self.watches = None

    async def read_watched(self, watch: IdleWatch) -> bytes:
        """The next bytes (b"" at EOF), the wait bounded by ``watch`` (``TimeoutError``)."""
        watch.begin()
        try:
            return await self._read()
        except asyncio.CancelledError:
            if watch.timed_out():
                raise TimeoutError from None
            raise
        finally:
            watch.reading = False

    async def _read(self) -> bytes:
        try:
            return await self.reader.read(self.READ_SIZE)
        except (ConnectionError, OSError):
            return b""

    async def receive(
        self, timeout: float | None = None, *, check_request_line: bool = False
    ) -> h11.Event | type[h11.PAUSED]:
        """Next h11 event; reads as needed. ``timeout`` bounds the whole wait.
        ``check_request_line`` (server, waiting for a request): bytes that cannot become a
        request line raise ``h11.RemoteProtocolError`` (400) as soon as they arrive."""
        event = self.conn.next_event()
        if event is not h11.NEED_DATA:  # already buffered: no timer needed
            return cast("h11.Event | type[h11.PAUSED]", event)
        async with asyncio.timeout(timeout):
            while True:
                if check_request_line:
                    self._refuse_impossible_request_line()
                self.conn.receive_data(await self._read())
                event = self.conn.next_event()
                if event is not h11.NEED_DATA:
                    return cast("h11.Event | type[h11.PAUSED]", event)

    async def receive_watched(self, watch: IdleWatch) -> h11.Event | type[h11.PAUSED]:
        """Next h11 event; each wait for bytes is bounded by ``watch`` (one timer per
        response, see ``IdleWatch``): a wait that overruns raises ``TimeoutError``."""
        conn = self.conn
        event = conn.next_event()
        if event is not h11.NEED_DATA:  # already buffered: no wait
            return event  # type: ignore[return-value]
        watch.begin()
        try:
            while True:
                try:
                    data = await self.reader.read(self.READ_SIZE)
                except (ConnectionError, OSError):
                    data = b""
                conn.receive_data(data)
                event = conn.next_event()
                if event is not h11.NEED_DATA:
                    return event  # type: ignore[return-value]
        except asyncio.CancelledError:
            if watch.timed_out():
                raise TimeoutError from None
            raise
        finally:
            watch.reading = False

    def _refuse_impossible_request_line(self) -> None:
        if self.conn.their_state is not h11.IDLE:
            return
        pending, closed = self.conn.trailing_data
        if closed or not pending or request_line_possible(pending):
            return
        # End the head here so that h11 itself rejects the line: its state becomes ERROR,
        # which lets the server still send its 400 through h11 before closing.
        self.conn.receive_data(b"\r\n\r\n")
        try:
            self.conn.next_event()
        except h11.RemoteProtocolError:
            pass
        raise h11.RemoteProtocolError(
            "not an HTTP/1.x request: the request line cannot become valid", 400
        )

    async def send(self, event: h11.Event, *, flush: bool = True) -> None:
        """Send one event. ``flush=False`` corks it: it goes out with the next flushed send,
        so a response head and its first bytes (or a small request) leave in one write."""
        try:
            data = self.conn.send_with_data_passthrough(event)
        except h11.LocalProtocolError:
            self.conn.send_failed()
            raise
        if data:
            self.corked.extend(data)
        if not flush or not self.corked:
            return
        if self.writer.is_closing():
            self.corked.clear()
            raise ConnectionClosed("connection closed")
        self.writer.writelines(self.corked)
        self.corked.clear()
        if self.writer.transport.get_write_buffer_size() <= self.drain_above:
            return  # the transport took it (asyncio pauses writing only above this)
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ConnectionClosed(str(exc)) from exc

    async def refuse_busy(self) -> None:
        """A canned 503 for a connection over ``Limits.max_connections``, written without
        h11 parsing anything (the server cannot afford this connection); the caller closes."""
        body = b'{"error":"too many connections to herd, retry shortly"}'
        self.writer.write(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"retry-after: 1\r\nconnection: close\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self.writer.drain()

    async def linger_close(self, *, seconds: float = 2.0, max_bytes: int = 64 * MiB) -> None:
        """Half-close, then read and drop what the client is still sending for a moment, so
        the error response it has not read yet is not destroyed by a TCP reset."""
        with contextlib.suppress(OSError, RuntimeError):
            if self.writer.can_write_eof():
                self.writer.write_eof()
        dropped = 0
        with contextlib.suppress(OSError, TimeoutError, ConnectionError):
            async with asyncio.timeout(seconds):
                while dropped < max_bytes:
                    data = await self.reader.read(256 * 1024)
                    if not data:
                        break
                    dropped += len(data)

    def at_eof(self) -> bool:
        return self.reader.at_eof() or self.writer.is_closing()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


# =======================================================================================
# HTTP server
# =======================================================================================


@dataclass(slots=True)
class Limits:
    max_connections: int = 1024
    max_header_bytes: int = 64 * 1024
    max_header_count: int = 100
    max_json_bytes: int = 512 * MiB  # base64 images can be large; see README
    max_upload_bytes: int = 64 * 1024 * MiB  # blobs / audio uploads (streamed)
    header_timeout_s: float = 30.0  # the request head must be complete within this
    body_idle_timeout_s: float = 60.0  # no body byte for this long → 408
    min_body_rate: float = 16 * 1024  # bytes/s a body must average after 4 idle timeouts
    keepalive_idle_s: float = 75.0  # idle keep-alive connection is closed after this


class Request:
    """One parsed request. The body is read on demand (streamed or whole, with limits)."""

    __slots__ = (
        "_body_done",
        "_by_name",
        "body_error",
        "client_ip",
        "disconnected",
        "headers",
        "http",
        "key_id",
        "limits",
        "method",
        "path",
        "query",
        "received_at",
        "request_id",
        "target",
    )

    def __init__(
        self, event: h11.Request, stream: HttpStream, limits: Limits, request_id: str
    ) -> None:
        self.method = event.method.decode("ascii", "replace").upper()
        self.target = target = event.target.decode("latin-1")
        if target.startswith("/") and not any(c in target for c in "?%#"):
            self.path, self.query = target, {}  # the usual case: a plain path
        else:
            parts = urlsplit(target)
            self.path = unquote(parts.path) or "/"
            self.query = dict(parse_qsl(parts.query))
        self.headers: Headers = list(event.headers)
        # one pass over the head: each name's first value (what ``header_value`` finds)
        self._by_name = dict(reversed(self.headers))
        self.http = stream
        self.limits = limits
        self.client_ip = stream.peer
        self.received_at = time.time()
        self.request_id = self.header("x-request-id") or request_id
        self.disconnected = False
        self.key_id = ""  # set when an API key authenticated the request
        self.body_error = False  # the body was refused (408/413): the connection must close
        self._body_done = False

    def header(self, name: str) -> str | None:
        value = self._by_name.get(name.lower().encode())
        return None if value is None else value.decode("latin-1")

    @property
    def content_length(self) -> int | None:
        raw = self.header("content-length")
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            return None

    @property
    def body_consumed(self) -> bool:
        return self._body_done

    def _declared_length(self, limit: int) -> int | None:
        """The body's Content-Length; 413 when it declares more than ``limit``."""
        length = self.content_length
        if length is not None and length > limit:
            self.body_error = True
            raise HttpError(413, f"request body too large: {length} bytes (limit {limit})")
        return length

    def _counted(self, total: int, data: bytes | bytearray, limit: int) -> int:
        """``total`` plus a chunk of the body; 413 once past ``limit``."""
        total += len(data)
        if total > limit:
            self.body_error = True
            raise HttpError(413, f"request body too large (limit {limit} bytes)")
        return total

    async def body_chunks(self, limit: int, *, _total: int = 0) -> AsyncIterator[bytes]:
        """Yield the request body as it arrives; 413 past ``limit``, 408 when it stalls.
        (``_total``: bytes of it ``read_body`` already took from the buffer.)"""
        if self._body_done:
            return
        length = self._declared_length(limit)
        total = _total
        started = time.monotonic()
        grace = 4 * self.limits.body_idle_timeout_s
        while True:
            # Idle timeout per read, plus an absolute deadline that only grows with the data
            # (grace + bytes / min rate): a client trickling a byte at a time cannot hold a
            # connection, a large upload at a sane rate is never cut.
            expected = max(length or 0, total)
            deadline = started + grace + expected / self.limits.min_body_rate
            wait = min(self.limits.body_idle_timeout_s, deadline - time.monotonic())
            try:
                if wait <= 0:
                    raise TimeoutError
                event = await self.http.receive(wait)
            except TimeoutError:
                self.body_error = True
                raise HttpError(408, "request body not received in time") from None
            if isinstance(event, h11.Data):
                total = self._counted(total, event.data, limit)
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._body_done = True
                return
            else:  # ConnectionClosed
                raise ClientGone("client closed the connection while sending the body")

    async def read_body(self, limit: int) -> bytes:
        """The whole body (``body_chunks``' limits). What already arrived with the head,
        the usual case for a small JSON body, is taken straight from h11's buffer."""
        parts: list[bytes] = []
        total = 0
        if not self._body_done:
            self._declared_length(limit)
            conn = self.http.conn
            while True:
                event = conn.next_event()
                if type(event) is h11.Data:
                    total = self._counted(total, event.data, limit)
                    parts.append(bytes(event.data))
                elif type(event) is h11.EndOfMessage:
                    self._body_done = True
                    return b"".join(parts)
                elif event is h11.NEED_DATA:
                    break  # the rest is still on its way: wait for it, with the deadlines
                else:  # ConnectionClosed
                    raise ClientGone("client closed the connection while sending the body")
        parts += [chunk async for chunk in self.body_chunks(limit, _total=total)]
        return b"".join(parts)

    async def json(self, limit: int) -> JSON:
        """The body as a JSON object, or 400 in Ollama's words."""
        body = await self.read_body(limit)
        return await parse_json_body(body)


MAX_JSON_DEPTH = 64


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _json_depth_ok(obj: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, dict | list))
    return True


def _strict_loads(body: bytes) -> Any:
    data = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    # nesting needs an opening bracket per level: most bodies cannot be too deep at all
    if body.count(b"{") + body.count(b"[") > MAX_JSON_DEPTH and not _json_depth_ok(data):
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return data


async def parse_json_body(body: bytes) -> JSON:
    if not body.strip():
        raise HttpError(400, "missing request body")
    try:
        if len(body) > MiB:  # large base64 payloads: keep the event loop free
            data = await asyncio.to_thread(_strict_loads, body)
        else:
            data = _strict_loads(body)
    except (ValueError, RecursionError) as exc:
        raise HttpError(400, f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HttpError(400, "request body must be a JSON object")
    return cast(JSON, data)


class Response:
    """Writes one response on the server side; knows whether anything was sent yet."""

    __slots__ = ("bytes_sent", "cors_origin", "ended", "headers_sent", "http", "is_head",
                 "status")

    def __init__(self, stream: HttpStream, method: str) -> None:
        self.http = stream
        self.is_head = method == "HEAD"
        self.headers_sent = False
        self.ended = False
        self.status = 0
        self.bytes_sent = 0
        # an allowed cross-origin request: every answer grants that origin, as Ollama's do
        self.cors_origin: bytes | None = None

    async def start(self, status: int, headers: Sequence[tuple[str | bytes, str | bytes]]) -> None:
        encoded: Headers = []
        for k, v in headers:
            kb = k.encode("latin-1") if isinstance(k, str) else k
            vb = v.encode("latin-1") if isinstance(v, str) else v
            encoded.append((kb, vb))
        if self.cors_origin and not any(k == b"access-control-allow-origin" for k, _ in encoded):
            encoded += [(b"vary", b"Origin"), (b"access-control-allow-origin", self.cors_origin)]
        reason = REASON_PHRASES.get(status, b"")
        self.status = status
        self.headers_sent = True
        # corked: the head leaves with the first body bytes (or the end)
        await self.http.send(h11.Response(status_code=status, headers=encoded, reason=reason),
                             flush=False)

    async def write(self, data: bytes) -> None:
        if data and not self.is_head:
            self.bytes_sent += len(data)
            try:
                await self.http.send(h11.Data(data=data))
            except ConnectionClosed as exc:
                raise ClientGone(str(exc)) from None

    async def end(self) -> None:
        if not self.ended:
            self.ended = True
            try:
                await self.http.send(h11.EndOfMessage())
            except ConnectionClosed as exc:
                raise ClientGone(str(exc)) from None

    async def send(
        self, status: int, body: bytes, content_type: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        hdrs: list[tuple[str | bytes, str | bytes]] = [
            ("content-type", content_type),
            ("content-length", str(len(body))),
            *headers,
        ]
        await self.start(status, hdrs)
        await self.write(body)
        await self.end()

    async def json(
        self, obj: Any, status: int = 200, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        await self.send(status, dumps(obj), "application/json; charset=utf-8", headers)


Handler = Callable[[Request, Response], Awaitable[None]]


class _ServerProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol plus a hook for the peer going away (EOF or a lost
    connection): a request in progress is cancelled the moment its client hangs up, with
    no reader task per request to notice it."""

    on_gone: Callable[[], None] | None = None

    def eof_received(self) -> bool:
        self._gone()
        return bool(super().eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()
        super().connection_lost(exc)

    def _gone(self) -> None:
        hook, self.on_gone = self.on_gone, None
        if hook is not None:
            hook()


class HttpServer:
    """asyncio + h11 server: keep-alive, limits, deadlines, graceful shutdown."""

    def __init__(
        self,
        handler: Handler,
        limits: Limits,
        on_error: Callable[[Request | None, Response | None, HttpError], Awaitable[None]],
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.on_error = on_error
        self.server: asyncio.Server | None = None
        self.connections: set[asyncio.Task[None]] = set()
        self.busy: set[HttpStream] = set()
        self.idle: set[HttpStream] = set()
        self.closing = False
        self.rejected_connections = 0
        self.all_idle = asyncio.Event()
        self.lingering: set[HttpStream] = set()
        # request ids: random per process, then counted (16 hex digits, like a uuid4's)
        self.id_prefix = secrets.token_hex(4)
        self.request_count = 0

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()

        def protocol() -> _ServerProtocol:
            reader = asyncio.StreamReader(limit=self.limits.max_header_bytes, loop=loop)
            return _ServerProtocol(reader, self._serve, loop=loop)

        self.server = await loop.create_server(protocol, host or None, port, backlog=1024)
        sock = self.server.sockets[0]
        addr = sock.getsockname()
        return str(addr[0]), int(addr[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        stream: HttpStream | None = None
        try:
            # a connection accepted just as the listener closes still gets its one request
            # served (``_connection`` serves the first request even while closing): a 503
            # here would be an answer a load balancer does not retry elsewhere
            if len(self.connections) > self.limits.max_connections:
                self.rejected_connections += 1
                await HttpStream(reader, writer, h11.SERVER).refuse_busy()
                return
            stream = HttpStream(reader, writer, h11.SERVER,
                                max_head_bytes=self.limits.max_header_bytes)
            await self._connection(stream)
        except asyncio.CancelledError:
            pass  # shutdown: asyncio logs cancelled connection tasks as errors otherwise
        finally:
            if stream is not None and stream in self.lingering:
                self.lingering.discard(stream)
                await stream.linger_close()
            self.connections.discard(task)
            if stream is not None:
                stream.close_watches()
            with contextlib.suppress(Exception):
                writer.close()

    async def _connection(self, stream: HttpStream) -> None:
        first = True
        while not self.closing or first:
            self.idle.add(stream)
            try:
                if not first and not stream.conn.trailing_data[0]:
                    # idle keep-alive: wait for the next request's first byte...
                    data = await stream.read_watched(stream.watch(self.limits.keepalive_idle_s))
                    stream.conn.receive_data(data)
                # ...then the whole head must arrive within the header deadline
                event = await stream.receive(
                    self.limits.header_timeout_s, check_request_line=True
                )
            except TimeoutError:
                started_head = bool(stream.conn.trailing_data[0])
                if first or started_head or stream.conn.their_state is not h11.IDLE:
                    await self._protocol_error(stream, 408, "request header not received in time")
                return
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                await self._protocol_error(
                    stream,
                    431
                    if "too long" in str(exc).lower() or "exceeds" in str(exc).lower()
                    else status,
                    str(exc),
                )
                return
            finally:
                self.idle.discard(stream)
            first = False
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed or garbage after close
            if len(event.headers) > self.limits.max_header_count:
                await self._protocol_error(stream, 431, "too many request headers")
                return
            head_bytes = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if head_bytes > self.limits.max_header_bytes:
                await self._protocol_error(stream, 431, "request header fields too large")
                return
            names = [k for k, _ in event.headers]
            if b"transfer-encoding" in names and b"content-length" in names:
                # RFC 9112 §6.3: ambiguous framing (request smuggling); refuse and close
                await self._protocol_error(
                    stream, 400, "both Content-Length and Transfer-Encoding given"
                )
                return
            self.busy.add(stream)
            try:
                keep = await self._one_request(event, stream)
            finally:
                self.busy.discard(stream)
                if not self.busy:
                    self.all_idle.set()
            if not keep or self.closing:
                return

    async def _protocol_error(self, stream: HttpStream, status: int, message: str) -> None:
        if stream.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = dumps({"error": message})
        with contextlib.suppress(Exception):
            await stream.send(
                h11.Response(
                    status_code=status,
                    headers=[
                        (b"content-type", b"application/json; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                    reason=http.HTTPStatus(status).phrase.encode(),
                )
            )
            await stream.send(h11.Data(data=body))
            await stream.send(h11.EndOfMessage())

    async def _one_request(self, event: h11.Request, stream: HttpStream) -> bool:
        """Serve one request; True when the connection may be reused.

        The handler runs in this connection's task; if the client hangs up meanwhile (EOF
        or reset, seen by ``_ServerProtocol``), the task is cancelled, so the handler stops
        waiting on its node (which closes the upstream request) and records it.
        """
        self.request_count += 1
        request = Request(event, stream, self.limits,
                          f"{self.id_prefix}{self.request_count & 0xFFFFFFFF:08x}")
        response = Response(stream, request.method)
        task = asyncio.current_task()
        assert task is not None
        protocol = stream.writer.transport.get_protocol()
        watch = protocol if isinstance(protocol, _ServerProtocol) else None

        def client_gone() -> None:
            request.disconnected = True
            task.cancel()

        if watch is not None:
            watch.on_gone = client_gone
        try:
            keep = await self._run_handler(request, response)
        except asyncio.CancelledError:
            if request.disconnected and task.uncancel() == 0:
                return False  # our own cancel: the client is gone
            raise
        finally:
            if watch is not None:
                watch.on_gone = None
        if not keep or request.disconnected:
            return False
        conn = stream.conn
        if conn.their_state is h11.SEND_BODY and request.body_error:
            # a refused body is not drained: close, but linger so the client (still
            # sending) reads our answer instead of a reset
            self.lingering.add(stream)
            return False
        if conn.their_state is h11.SEND_BODY:
            # The handler answered without reading the body: drain a bounded amount.
            try:
                async for _ in request.body_chunks(limit=8 * MiB):
                    pass
            except (HttpError, ClientGone, TimeoutError, h11.RemoteProtocolError):
                return False
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return False
            return True
        return False

    async def _run_handler(self, request: Request, response: Response) -> bool:
        try:
            await self.handler(request, response)
            if not response.headers_sent:
                raise HttpError(500, "handler sent no response")
            await response.end()
            return True
        except HttpError as exc:
            if response.headers_sent:
                return False
            try:
                await self.on_error(request, response, exc)
                return True
            except (ConnectionClosed, h11.LocalProtocolError):
                return False
        except (ConnectionClosed, ClientGone):
            request.disconnected = True
            return False
        except h11.RemoteProtocolError as exc:
            if not response.headers_sent:
                with contextlib.suppress(Exception):
                    await self.on_error(request, response, HttpError(400, str(exc)))
            return False
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("unhandled error in %s %s", request.method, request.path)
            if not response.headers_sent:
                with contextlib.suppress(Exception):
                    await self.on_error(request, response, HttpError(500, f"internal error: {exc}"))
                    return True
            return False

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, let in-flight requests finish up to ``grace_s``, then close."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        for stream in list(self.idle):
            stream.close()
        if self.busy:
            self.all_idle.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self.all_idle.wait()
        for task in list(self.connections):
            task.cancel()
        if self.connections:
            await asyncio.wait(list(self.connections), timeout=2)
        if self.server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self.server.wait_closed()


# =======================================================================================
# Backend client: h11 over a per-node keep-alive pool
# =======================================================================================


class IdleWatch:
    """Bounds each wait for a node's next bytes by ``timeout`` seconds, like
    ``asyncio.timeout`` around every read, but with one timer for the whole response
    instead of one per chunk: a chunk only notes when its wait began, and the timer, when it
    fires early, re-arms itself for the current wait's deadline. A wait that reaches its
    deadline cancels the reading task, which ``receive`` turns into ``TimeoutError`` (an
    outside cancellation stays a cancellation). Waiting on the *client* (a slow reader)
    never counts: only time spent inside ``receive``."""

    __slots__ = ("_loop", "_task", "expired", "handle", "reading", "since", "timeout")

    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self.timeout = timeout
        self.reading = False
        self.since = self._loop.time()
        self.expired = False
        self.handle: asyncio.TimerHandle | None = None

    def _check(self) -> None:
        self.handle = None
        if not self.reading:
            return  # re-armed by the next wait
        due = self.since + self.timeout
        if self._loop.time() < due:
            self.handle = self._loop.call_at(due, self._check)
            return
        self.expired = True
        if self._task is not None:
            self._task.cancel()

    async def receive(self, stream: HttpStream) -> h11.Event | type[h11.PAUSED]:
        """``stream``'s next event, reading as needed, each read bounded as above."""
        return await stream.receive_watched(self)

    def begin(self) -> None:
        """A wait for the node's bytes starts now (a watch kept across waits, as
        ``HttpStream.watch`` keeps one per connection, starts over after a timeout)."""
        self.since = self._loop.time()
        self.reading = True
        self.expired = False
        if self.handle is None:
            self.handle = self._loop.call_at(self.since + self.timeout, self._check)

    def timed_out(self) -> bool:
        """In a cancelled wait: was the cancel this watch's own (the wait overran)?"""
        return self.expired and self._task is not None and self._task.uncancel() == 0

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class UpstreamResponse:
    """A node's response head plus its body as a stream; returns the connection to the pool."""

    __slots__ = ("_done", "_pool", "_stream", "headers", "key", "status")

    def __init__(
        self, status: int, headers: Headers, stream: HttpStream, pool: Pool, key: tuple[str, int]
    ) -> None:
        self.status = status
        self.headers = headers
        self._stream = stream
        self._pool = pool
        self.key = key
        self._done = False

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name.encode())

    async def chunks(
        self, idle_timeout: float | None = None, first_timeout: float | None = None,
        *, first_watch: IdleWatch | None = None,
    ) -> AsyncIterator[bytes]:
        """The body as it arrives. ``idle_timeout`` bounds the wait for each chunk, and
        ``first_timeout`` (when given) the wait for the first one instead, or
        ``first_watch``: the caller's kept bound (``HttpStream.watch``).

        The first wait has its own timer (or the caller's watch); the later ones share one
        ``IdleWatch`` per response (no timer per chunk): the same bound, checked lazily."""
        if self._done:
            return
        timeout = first_timeout if first_timeout is not None else idle_timeout
        stream = self._stream
        watch: IdleWatch | None = None
        try:
            while True:
                try:
                    if watch is None:
                        if first_watch is not None:
                            event = await stream.receive_watched(first_watch)
                        else:
                            event = await stream.receive(timeout)
                        if idle_timeout is not None:
                            watch = IdleWatch(idle_timeout)
                    else:
                        event = await stream.receive_watched(watch)
                except h11.RemoteProtocolError as exc:
                    raise ConnectionClosed(f"node broke the response: {exc}") from None
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    self._done = True
                    self._pool.release(self.key, stream)
                    return
                else:
                    raise ConnectionClosed("node closed the connection mid-response")
        finally:
            if watch is not None:
                watch.close()
            if not self._done:
                self.close()

    async def read(self, limit: int = 64 * MiB, idle_timeout: float | None = 60.0) -> bytes:
        out = bytearray()
        async for chunk in self.chunks(idle_timeout):
            out += chunk
            if len(out) > limit:
                self.close()
                raise ConnectionClosed("node response too large")
        return bytes(out)

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._stream.close()


class Pool:
    """Keep-alive connections per node address; bounded idle set; stale ones discarded."""

    def __init__(
        self,
        *,
        max_idle_per_node: int = 32,
        connect_timeout_s: float = 3.0,
        max_head_bytes: int = 256 * 1024,
    ) -> None:
        self.idle: dict[tuple[str, int], deque[HttpStream]] = {}
        self.max_idle = max_idle_per_node
        self.connect_timeout_s = connect_timeout_s
        self.max_head_bytes = max_head_bytes
        self.addresses: dict[str, tuple[str, int, str]] = {}  # base URL -> split_url()

    def release(self, key: tuple[str, int], stream: HttpStream) -> None:
        conn = stream.conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE and not stream.at_eof():
            conn.start_next_cycle()
            idle = self.idle.setdefault(key, deque())
            if len(idle) < self.max_idle:
                idle.append(stream)
                return
        stream.close()

    async def _connect(self, host: str, port: int) -> HttpStream:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(
                    host, port, limit=self.max_head_bytes
                )
        except TimeoutError:
            raise UpstreamFailure("connect", f"connect to {host}:{port} timed out") from None
        except OSError as exc:
            raise UpstreamFailure("connect", f"cannot connect to {host}:{port}: {exc}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return HttpStream(reader, writer, h11.CLIENT, max_head_bytes=self.max_head_bytes)

    def _take_idle(self, key: tuple[str, int]) -> HttpStream | None:
        idle = self.idle.get(key)
        while idle:
            stream = idle.pop()
            if not stream.at_eof():
                return stream
            stream.close()
        return None

    async def request(
        self,
        base_url: str,
        method: str,
        path: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
        body: bytes | AsyncIterator[bytes] | None = None,
        *,
        head_timeout: float | None = None,
        head_watch: IdleWatch | None = None,
    ) -> UpstreamResponse:
        """Send one request; returns once the response head arrived.

        ``head_watch`` (instead of ``head_timeout``): the caller's kept bound on the wait
        for the head (``HttpStream.watch``: no timer made per request).

        Failures raise UpstreamFailure with a kind: ``connect`` (nothing reached the node),
        ``reset`` (the connection broke), ``timeout_first_byte`` (no response head in time).
        """
        address = self.addresses.get(base_url)
        if address is None:
            if len(self.addresses) >= 1024:  # node URLs change rarely; never grow unbounded
                self.addresses.clear()
            address = self.addresses[base_url] = split_url(base_url)
        host, port, netloc = address
        key = (host, port)
        hdrs: Headers = [(b"host", netloc.encode())]
        hdrs += [(k, v) for k, v in headers if k not in HOP_BY_HOP]
        if isinstance(body, bytes):
            hdrs.append((b"content-length", str(len(body)).encode()))
        elif body is not None:
            hdrs.append((b"transfer-encoding", b"chunked"))
        elif method in ("POST", "PUT", "DELETE", "PATCH"):
            hdrs.append((b"content-length", b"0"))
        req = h11.Request(method=method.encode(), target=path.encode(), headers=hdrs)
        for attempt in range(2):
            stream = self._take_idle(key) if attempt == 0 else None
            reused = stream is not None
            if stream is None:
                stream = await self._connect(host, port)
            try:
                await stream.send(req, flush=False)
                if isinstance(body, bytes):
                    if body:
                        await stream.send(h11.Data(data=body), flush=False)
                elif body is not None:
                    async for chunk in body:
                        if chunk:
                            await stream.send(h11.Data(data=chunk))
                await stream.send(h11.EndOfMessage())
                if head_watch is not None:
                    event = await stream.receive_watched(head_watch)
                    while isinstance(event, h11.InformationalResponse):
                        event = await stream.receive_watched(head_watch)
                else:
                    event = await stream.receive(head_timeout)
                    while isinstance(event, h11.InformationalResponse):
                        event = await stream.receive(head_timeout)
            except TimeoutError:
                stream.close()
                waited = head_watch.timeout if head_watch is not None else head_timeout
                raise UpstreamFailure(
                    "timeout_first_byte", f"no response from {netloc} within {waited:g}s"
                ) from None
            except (
                ConnectionClosed,
                h11.RemoteProtocolError,
                h11.LocalProtocolError,
                OSError,
            ) as exc:
                stream.close()
                if reused and not isinstance(body, AsyncIterator):
                    continue  # stale keep-alive connection: one fresh try
                raise UpstreamFailure("reset", f"connection to {netloc} failed: {exc}") from None
            except BaseException:
                stream.close()
                raise
            if isinstance(event, h11.Response):
                return UpstreamResponse(event.status_code, list(event.headers), stream, self, key)
            stream.close()
            if reused and not isinstance(body, AsyncIterator):
                continue
            raise UpstreamFailure("reset", f"{netloc} closed the connection without a response")
        raise UpstreamFailure("reset", f"connection to {netloc} failed twice")

    async def get_json(
        self, base_url: str, path: str, timeout: float, body: JSON | None = None
    ) -> Any:
        """Small JSON request/response (polling, fan-out); raises UpstreamFailure or ValueError."""
        async with asyncio.timeout(timeout):
            payload = dumps(body) if body is not None else None
            method = "POST" if body is not None else "GET"
            hdrs = [(b"content-type", b"application/json")] if body is not None else []
            resp = await self.request(base_url, method, path, hdrs, payload)
            data = await resp.read(limit=64 * MiB, idle_timeout=timeout)
        if resp.status != 200:
            raise UpstreamFailure(
                "status_5xx" if resp.status >= 500 else "status_4xx",
                f"{path} answered {resp.status}",
                status=resp.status,
                body=data,
            )
        return json.loads(data)

    def close(self) -> None:
        for idle in self.idle.values():
            for stream in idle:
                stream.close()
        self.idle.clear()


# =======================================================================================
# Relays: NDJSON / SSE line-exact, raw passthrough
# =======================================================================================


class LineRelay:
    """Splits a byte stream into whole records (NDJSON lines or SSE events).

    A partial record is held back until its terminator arrives, so a node that dies in the
    middle of a record never leaves half a JSON object on the client's stream.
    """

    __slots__ = ("buf", "framing", "last_final", "sep")

    def __init__(self, framing: Framing) -> None:
        self.framing = framing
        self.sep = b"\n\n" if framing == "sse" else b"\n"
        self.buf = bytearray()
        self.last_final: bytes | None = None

    def feed(self, chunk: bytes) -> bytes:
        """Append a chunk; return the bytes that now form complete records."""
        if self.framing == "raw":
            return chunk
        sep = self.sep
        if self.buf:
            cut = chunk.rfind(sep)
            if cut >= 0:  # the last record ends in this chunk: held part + chunk, one copy
                cut += len(sep)
                view = memoryview(chunk)
                out = b"".join((self.buf, view[:cut]))
                self.buf.clear()
                self.buf += view[cut:]
            else:  # none ends here (or a separator straddles the two): append and look
                self.buf += chunk
                cut = self.buf.rfind(sep)
                if cut < 0:
                    return b""
                cut += len(sep)
                out = bytes(self.buf[:cut])
                del self.buf[:cut]
        elif chunk.endswith(sep):  # whole records, nothing held: no copy
            out = chunk
        else:  # nothing held: copy only the complete records out, hold the partial rest
            cut = chunk.rfind(sep)
            if cut < 0:
                self.buf += chunk
                return b""
            cut += len(sep)
            out = chunk[:cut]
            self.buf += memoryview(chunk)[cut:]
        self._note(out)
        return out

    def _note(self, out: bytes) -> None:
        if self.framing == "ndjson":
            # Ollama's final object is a stream's last line: look at each output's last line
            start = out.rfind(b"\n", 0, len(out) - 1) + 1
            if out.find(b'"done"', start) >= 0 and (
                out.find(b'"done":true', start) >= 0 or out.find(b'"done": true', start) >= 0
            ):
                self.last_final = out[start:]
        else:
            if b'"usage"' in out:
                for record in out.split(b"\n\n"):
                    # "data: {...}", or "event: <type>\ndata: {...}" (Responses API)
                    at = 0 if record.startswith(b"data: ") else record.find(b"\ndata: ") + 1
                    if b'"usage"' in record and at >= 0 and record.startswith(b"data: ", at):
                        try:
                            obj = json.loads(record[at + 6 :])
                        except ValueError:
                            continue
                        if isinstance(obj, dict) and isinstance(usage_of(obj), dict):
                            self.last_final = record[at + 6 :]

    def tail(self) -> bytes:
        """Whatever is left at a clean end of stream (a last line without newline)."""
        out = bytes(self.buf)
        self.buf.clear()
        if out and self.framing == "ndjson" and b'"done"' in out:
            self.last_final = out
        return out

    def final_object(self) -> JSON | None:
        if self.last_final is None:
            return None
        try:
            obj = json.loads(self.last_final)
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None


def usage_of(obj: JSON) -> object:
    """OpenAI ``usage``: top level, or inside ``response`` (Responses API stream events)."""
    nested = obj.get("response")
    if "usage" not in obj and isinstance(nested, dict):
        return nested.get("usage")
    return obj.get("usage")


def midstream_error_record(framing: Framing, message: str) -> bytes:
    if framing == "sse":
        return (
            b"data: "
            + dumps(
                {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
            )
            + b"\n\n"
        )
    if framing == "ndjson":
        return dumps({"error": message}) + b"\n"
    return b""


def framing_of(content_type: str | None) -> Framing:
    ct = (content_type or "").lower()
    if "ndjson" in ct:
        return "ndjson"
    if "event-stream" in ct:
        return "sse"
    return "raw"


def herd_headers(node_id: str, attempt: Attempt) -> Headers:
    """What herd adds to a relayed answer: who served it, which model, after how many
    retries, under which request id."""
    return [
        (b"x-herd-node", node_id.encode()),
        (b"x-herd-model", attempt.served_model.encode()),
        (b"x-herd-retries", str(attempt.retries).encode()),
        (b"x-request-id", attempt.request_id.encode()),
    ]


@dataclass(slots=True)
class RelayOutcome:
    """What relaying one node answer came to, filled in as it goes (so a caller that sees
    the relay raise still knows how far it got): the trace status, its error, when the
    first record reached the client, the record splitter (its final object) and the start
    of a raw-framed body (up to ``keep`` bytes: a JSON answer's metrics or error text)."""

    relay: LineRelay
    keep: int = 0
    status: TraceStatus = TraceStatus.COMPLETED
    error: str = ""
    first_at: float | None = None
    body: bytearray = field(default_factory=bytearray)


async def relay_answer(
    up: UpstreamResponse,
    response: Response,
    extra_headers: Headers,
    out: RelayOutcome,
    *,
    node_id: str,
    stall_timeout_s: float,
    first: bytes = b"",
    chunks: AsyncIterator[bytes] | None = None,
    complete: bool = False,
) -> None:
    """The one relay: a node's answer to the client, whole records at a time.

    ``first``: bytes already read (with ``complete``, the whole body: it is sent sized).
    ``chunks``: the rest (default: the answer's body, ``stall_timeout_s`` between chunks).
    A node that stalls (``reaped``) or drops (``incomplete``) mid-answer ends a 200 stream
    with an error record in its framing; a sized or non-200 body cannot be ended cleanly,
    so the client connection is dropped (``ClientGone``). The client leaving raises
    ``ClientGone`` / ``CancelledError`` with ``out.status`` ``client_disconnected``; the
    node's connection is closed on every exception."""
    framing = out.relay.framing
    headers = [(k, v) for k, v in up.headers if k not in RESPONSE_DROP]
    if complete:
        headers = [(k, v) for k, v in headers if k != b"content-length"]
        headers.append((b"content-length", str(len(first)).encode()))
    headers += extra_headers
    keep = out.keep if framing == "raw" else 0
    try:
        await response.start(up.status, headers)
        if first:
            if len(out.body) < keep:
                out.body += first
            data = out.relay.feed(first)
            if data:
                await response.write(data)
                out.first_at = time.monotonic()
        if not complete:
            if chunks is None:
                chunks = up.chunks(stall_timeout_s)
            try:
                async for chunk in chunks:
                    data = out.relay.feed(chunk)
                    if len(out.body) < keep:
                        out.body += chunk
                    if data:
                        await response.write(data)
                        if out.first_at is None:
                            out.first_at = time.monotonic()
                tail = out.relay.tail()
                if tail:
                    await response.write(tail)
            except TimeoutError:
                up.close()
                out.status = TraceStatus.REAPED
                out.error = (
                    f"node {node_id} made no progress for {stall_timeout_s:g}s; request reaped"
                )
            except ConnectionClosed as exc:
                out.status = TraceStatus.INCOMPLETE
                out.error = f"node {node_id} disconnected mid-stream: {exc}"
            if out.status != TraceStatus.COMPLETED:
                record = midstream_error_record(framing, out.error)
                if not record or up.status != 200 or up.header("content-length"):
                    raise ClientGone(out.error)  # a sized body cannot be ended cleanly
                await response.write(record)
        await response.end()  # the client has everything; bookkeeping comes after
    except BaseException as exc:
        up.close()
        client_left = isinstance(exc, ClientGone | asyncio.CancelledError)
        if client_left and (
            out.status == TraceStatus.COMPLETED or isinstance(exc, asyncio.CancelledError)
        ):
            out.status, out.error = TraceStatus.CLIENT_DISCONNECTED, "client disconnected"
        raise


# =======================================================================================
# Fleet model
# =======================================================================================


# ---------------------------------------------------------------- node reports ---------
# A node report (a heartbeat's JSON, ARCHITECTURE.md "Heartbeat protocol") is parsed once, at
# the edge, into the frozen types below; `NodeReport.parse` is the one validating constructor
# (the router's /heartbeat uses it, tests run the agent's own beats through it). Everything a
# snapshot turns into numbers is checked here, before any state changes: one bad beat gets a
# 400, it does not break routing for the whole fleet later.


class ReportError(ValueError):
    """A report that breaks the heartbeat contract; the text is the router's 400 reason."""


def _malformed(problem: str) -> ReportError:
    return ReportError(f"malformed heartbeat: {problem}")


def _bad_fields(obj: object, where: str, *numbers: str) -> str | None:
    """Why ``obj`` (null allowed) is not an object whose ``numbers`` are numbers, or None."""
    if obj is None:
        return None
    if not isinstance(obj, dict):
        return f"{where} must be an object"
    for k in numbers:
        v = obj.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            return f"{where}.{k} must be a number"
    return None


def _entry_name(m: JSON) -> str:
    """The model key of a reported /api/ps or /api/tags entry: the one place a node's model
    names are normalised (``LoadedModels.of`` / ``AvailableModels.of`` keep the result)."""
    return scoring.normalize_model(str(m.get("name") or m.get("model") or ""))


def _loaded_problem(m: object) -> str | None:
    return _bad_fields(m, "ollama.loaded[]", "size", "size_vram", "context_length")


def _available_problem(m: object) -> str | None:
    problem = _bad_fields(m, "ollama.available[]", "size")
    if problem or not isinstance(m, dict):
        return problem
    details = m.get("details")
    problem = _bad_fields(details, "ollama.available[].details")
    if problem:
        return problem
    families = details.get("families") if isinstance(details, dict) else None
    for k, v in (("capabilities", m.get("capabilities")), ("details.families", families)):
        if v is not None and not isinstance(v, list):
            return f"ollama.available[].{k} must be a list"
    return None


def _kept_named(
    entries: Iterable[object], problem: Callable[[object], str | None]
) -> tuple[tuple[JSON, ...], tuple[tuple[str, JSON], ...]]:
    """The valid entries of a reported model list, and each with its normalised name."""
    kept = tuple(m for m in entries if isinstance(m, dict) and not problem(m))
    return kept, tuple((_entry_name(m), m) for m in kept)


def _loaded_model(name: str, m: JSON) -> scoring.LoadedModel:
    ctx = m.get("context_length")
    return scoring.LoadedModel(
        name=name,
        size=int(m.get("size") or 0),
        size_vram=int(m.get("size_vram") or 0),
        context_length=int(ctx) if isinstance(ctx, int | float) and ctx else None,
        expires_at=parse_rfc3339(m.get("expires_at")),
    )


def _available_model(name: str, m: JSON) -> scoring.AvailableModel:
    raw = m.get("details")
    details: JSON = raw if isinstance(raw, dict) else {}
    families = details.get("families") or []
    caps = m.get("capabilities") or []
    return scoring.AvailableModel(
        name=name,
        size=int(m.get("size") or 0),
        family=str(details.get("family") or ""),
        families=tuple(str(f) for f in families if isinstance(f, str)),
        parameter_size=str(details.get("parameter_size") or ""),
        capabilities=tuple(str(c) for c in caps if isinstance(c, str)),
    )


@dataclass(frozen=True, slots=True)
class LoadedModels:
    """An /api/ps ``models`` list: the entries as reported, and parsed by model name."""

    entries: tuple[JSON, ...] = ()
    models: Mapping[str, scoring.LoadedModel] = field(default_factory=dict)
    names: frozenset[str] = frozenset()
    named: tuple[tuple[str, JSON], ...] = ()  # (model key, entry) for each entry

    @classmethod
    def of(cls, entries: Iterable[object]) -> LoadedModels:
        """Parse valid entries (a poll keeps what it can read: non-objects and entries with
        non-numeric sizes are skipped); heartbeats are checked whole by ``OllamaReport``."""
        kept, named = _kept_named(entries, _loaded_problem)
        models = {name: _loaded_model(name, m) for name, m in named}
        return cls(kept, MappingProxyType(models), frozenset(models), named)


def unexpired(models: Mapping[str, scoring.LoadedModel],
              now: float) -> dict[str, scoring.LoadedModel]:
    """The loaded models whose keep-alive has not run out at ``now`` (an expired one is
    being unloaded)."""
    return {name: lm for name, lm in models.items()
            if lm.expires_at is None or lm.expires_at >= now}


@dataclass(frozen=True)
class AvailableModels:
    """An /api/tags ``models`` list: the entries as reported, parsed by model name, and (built
    on first use, once per list) the part /fleet/status shows."""

    entries: tuple[JSON, ...] = ()
    models: Mapping[str, scoring.AvailableModel] = field(default_factory=dict)
    names: frozenset[str] = frozenset()
    named: tuple[tuple[str, JSON], ...] = ()  # (model key, entry) for each entry

    @classmethod
    def of(cls, entries: Iterable[object]) -> AvailableModels:
        """Like ``LoadedModels.of``: valid entries only."""
        kept, named = _kept_named(entries, _available_problem)
        models = {name: _available_model(name, m) for name, m in named}
        return cls(kept, MappingProxyType(models), frozenset(models), named)

    @functools.cached_property
    def public(self) -> list[JSON]:
        """The entries as /fleet/status shows them (read-only)."""
        return [
            {
                "name": m.get("name"),
                "size": m.get("size"),
                "modified_at": m.get("modified_at"),
                "details": m.get("details"),
            }
            for m in self.entries
        ]

    @functools.cached_property
    def encoded(self) -> bytes:
        """``public`` as JSON bytes (most of /fleet/status)."""
        return dumps(self.public)


@dataclass(frozen=True, slots=True)
class HardwareReport:
    """The beat's ``hardware`` object as reported (/fleet/status shows it) and what routing
    reads of it."""

    raw: JSON = field(default_factory=dict)
    ram_total: int = 0
    ram_available: int = 0
    memory_pressure: str = "normal"
    vram_total: int = 0
    vram_used: int = 0
    cpu_load: float = 0.0  # 0..1

    @classmethod
    def parse(cls, raw: object) -> HardwareReport:
        if not isinstance(raw, dict):
            raise ReportError("ollama and hardware must be objects")
        mem, cpu, gpu = raw.get("memory"), raw.get("cpu"), raw.get("gpu")
        devices = gpu.get("devices") if isinstance(gpu, dict) else None
        problem = (
            _bad_fields(mem, "hardware.memory", "total_bytes", "available_bytes")
            or _bad_fields(cpu, "hardware.cpu", "cores", "utilization_pct")
            or _bad_fields(raw.get("disk"), "hardware.disk", "total_bytes", "free_bytes")
            or _bad_fields(gpu, "hardware.gpu")
            or (None if devices is None or isinstance(devices, list) else
                "gpu.devices must be a list")
            or next((p for d in devices or () if (p := _bad_fields(
                d, "gpu.devices[]", "memory_total_bytes", "memory_used_bytes"))), None)
        )
        if problem:
            raise _malformed(problem)
        vram_total = vram_used = 0
        if isinstance(gpu, dict) and not gpu.get("unified"):
            for dev in devices or ():
                if isinstance(dev, dict):
                    vram_total += int(dev.get("memory_total_bytes") or 0)
                    vram_used += int(dev.get("memory_used_bytes") or 0)
        mem = mem if isinstance(mem, dict) else {}
        return cls(
            raw=raw,
            ram_total=int(mem.get("total_bytes") or 0),
            ram_available=int(mem.get("available_bytes") or 0),
            memory_pressure=str(mem.get("pressure") or "normal"),
            vram_total=vram_total,
            vram_used=vram_used,
            cpu_load=float(cpu.get("utilization_pct") or 0.0) / 100.0
            if isinstance(cpu, dict) else 0.0,
        )


@dataclass(frozen=True, slots=True)
class OllamaReport:
    """The beat's ``ollama`` object. ``loaded`` None: not reported; ``available`` None:
    unchanged since the last beat (``available_hash`` says which list the agent has)."""

    reachable: bool = True
    version: str = ""
    num_parallel: int | None = None
    max_loaded_models: int | None = None
    loaded: LoadedModels | None = None
    available: AvailableModels | None = None
    available_hash: str = ""

    @classmethod
    def parse(cls, raw: object) -> OllamaReport:
        if not isinstance(raw, dict):
            raise ReportError("ollama and hardware must be objects")
        loaded, available = raw.get("loaded"), raw.get("available")
        if loaded is not None and not isinstance(loaded, list):
            raise ReportError("ollama.loaded must be a list")
        if available is not None and not isinstance(available, list):
            raise ReportError("ollama.available must be a list or null")
        problem = next((p for m in loaded or () if (p := _loaded_problem(m))), None) or next(
            (p for m in available or () if (p := _available_problem(m))), None)
        if problem:
            raise _malformed(problem)
        np_, ml = raw.get("num_parallel"), raw.get("max_loaded_models")
        return cls(
            reachable=bool(raw.get("reachable", True)),
            version=str(raw.get("version") or ""),
            num_parallel=int(np_) if isinstance(np_, int) and np_ > 0 else None,
            max_loaded_models=int(ml) if isinstance(ml, int) and ml > 0 else None,
            loaded=LoadedModels.of(loaded) if loaded is not None else None,
            available=AvailableModels.of(available) if available is not None else None,
            available_hash=str(raw.get("available_hash") or ""),
        )


@dataclass(frozen=True, slots=True)
class CapabilitiesReport:
    """The beat's ``capabilities`` object as reported, and the image/STT models it names."""

    raw: JSON = field(default_factory=dict)
    models: tuple[tuple[str, str], ...] = ()  # (kind, normalised model name)
    slots: Mapping[tuple[str, str], int] = field(default_factory=dict)  # as reported, 1..64

    @classmethod
    def parse(cls, raw: object) -> CapabilitiesReport:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise _malformed("capabilities: object")
        for kind in ("image", "stt"):
            if raw.get(kind) is not None and not isinstance(raw.get(kind), list):
                raise _malformed(f"capabilities.{kind} must be a list")
        named = [
            ((kind, scoring.normalize_model(str(entry["name"]))), entry)
            for kind in ("image", "stt")
            for entry in raw.get(kind) or ()
            if isinstance(entry, dict) and entry.get("name")
        ]
        slots = {
            key: n for key, entry in named
            if isinstance(n := entry.get("slots"), int) and 0 < n <= 64
        }  # fmt: skip
        return cls(raw, tuple(key for key, _ in named), MappingProxyType(slots))


@dataclass(frozen=True, slots=True)
class NodeReport:
    """One heartbeat, parsed: see ``parse``."""

    node_id: str
    ollama_url: str  # normalised
    interval_s: float | None  # None: not sent (the router's default applies)
    agent_version: str
    draining: bool
    hardware: HardwareReport
    ollama: OllamaReport
    capabilities: CapabilitiesReport
    errors: tuple[JSON, ...]

    @classmethod
    def parse(cls, beat: JSON) -> NodeReport:
        """The one validating constructor: ``ReportError`` (its text is the 400 reason)
        names the first field that breaks the contract."""
        node_id = beat.get("node_id")
        if not valid_node_id(node_id):
            raise ReportError("node_id must match [A-Za-z0-9._-]{1,64}")
        assert isinstance(node_id, str)
        url = beat.get("ollama_url")
        if not isinstance(url, str):
            raise ReportError("ollama_url is required")
        try:
            url = normalize_url(url)
        except ValueError as exc:
            raise ReportError(str(exc)) from None
        ollama_raw, hardware_raw = beat.get("ollama") or {}, beat.get("hardware") or {}
        if not isinstance(ollama_raw, dict) or not isinstance(hardware_raw, dict):
            raise ReportError("ollama and hardware must be objects")
        for key, what in (("loaded", "a list"), ("available", "a list or null")):
            if ollama_raw.get(key) is not None and not isinstance(ollama_raw.get(key), list):
                raise ReportError(f"ollama.{key} must be {what}")
        hardware = HardwareReport.parse(hardware_raw)
        ollama = OllamaReport.parse(ollama_raw)
        capabilities = CapabilitiesReport.parse(beat.get("capabilities"))
        interval = beat.get("interval_s")
        if "interval_s" in beat and (
                not isinstance(interval, int | float) or not 0.05 <= interval <= 300):
            raise ReportError("interval_s must be a number between 0.05 and 300")
        errors = beat.get("errors")
        return cls(
            node_id=node_id,
            ollama_url=url,
            interval_s=float(interval) if isinstance(interval, int | float) else None,
            agent_version=str(beat.get("agent_version") or ""),
            draining=bool(beat.get("draining")),
            hardware=hardware,
            ollama=ollama,
            capabilities=capabilities,
            errors=tuple(e for e in errors if isinstance(e, dict))
            if isinstance(errors, list) else (),
        )


@dataclass(slots=True)
class Node:
    """What the router knows about one node; fed by polling (static) or heartbeats (agent)."""

    node_id: str
    url: str  # the node's Ollama, e.g. http://10.0.0.5:11434
    source: str  # "static" | "local" | "agent"
    status: NodeStatus = NodeStatus.OFFLINE
    first_seen: float = 0.0
    last_seen: float = 0.0  # last successful poll / heartbeat
    last_change: float = 0.0
    poll_failures: int = 0
    last_error: str = ""
    version: str = ""
    reachable: bool = False
    loaded_models: LoadedModels = field(default_factory=LoadedModels)  # /api/ps, parsed
    available_models: AvailableModels = field(default_factory=AvailableModels)  # /api/tags
    available_hash: str = ""
    recently_unloaded: dict[str, float] = field(default_factory=dict)
    hardware_report: HardwareReport = field(default_factory=HardwareReport)
    num_parallel: int | None = None
    max_loaded_models: int | None = None
    capabilities_report: CapabilitiesReport = field(default_factory=CapabilitiesReport)
    errors: list[JSON] = field(default_factory=list)
    agent_addr: str = ""  # address heartbeats come from
    agent_version: str = ""
    interval_s: float = 5.0
    last_beat_stamp: float = 0.0  # agent clock of the last accepted signed beat
    loading: dict[str, float] = field(default_factory=dict)  # model → when a load was sent
    # model → the model whose load (sent by herd, not done yet) is expected to evict it:
    # Ollama serves it no new request meanwhile, so a poll listing it does not make it hot
    evicting: dict[str, str] = field(default_factory=dict)
    ps_listed: LoadedModels = field(default_factory=LoadedModels)  # before ``evicting``
    # model → requests sent here that no answer byte has come back for yet
    awaiting: dict[str, int] = field(default_factory=dict)
    held_since: float = 0.0  # pending / rejected (consent): since when, and why
    held_reason: str = ""
    # the last snapshot and what it was built from (``snapshot`` reuses it while unchanged)
    snap_cache: SnapshotCache | None = field(default=None, repr=False, compare=False)
    # the snapshot with what the router learned folded in, and the inputs of that
    # (``Fleet._with_learned``): snapshot, reported model cap, memory bounds, capacity
    learned_cache: LearnedCache | None = field(default=None, repr=False, compare=False)

    # the reports' entries as reported (read-only: replaced by polls and heartbeats)
    @property
    def loaded(self) -> tuple[JSON, ...]:
        return self.loaded_models.entries

    @property
    def available(self) -> tuple[JSON, ...]:
        return self.available_models.entries

    @available.setter
    def available(self, entries: Iterable[object]) -> None:
        self.available_models = AvailableModels.of(entries)

    @property
    def hardware(self) -> JSON:
        return self.hardware_report.raw

    @property
    def capabilities(self) -> JSON:
        return self.capabilities_report.raw

    def loaded_names(self) -> frozenset[str]:
        return self.loaded_models.names

    def available_names(self) -> frozenset[str]:
        return self.available_models.names

    def has_model(self, model: str) -> bool:
        return model in self.available_names() or model in self.loaded_names()

    def set_loaded(self, entries: Iterable[object] | LoadedModels, now: float) -> None:
        before = self.loaded_names()
        loaded = entries if isinstance(entries, LoadedModels) else LoadedModels.of(entries)
        self.ps_listed = loaded
        for back in loaded.names:
            # Ollama lists a model from the moment its load starts: a load herd sent is
            # done when an answer for it begins (``load_done``), not when it is listed;
            # one listed this long after it was sent is done whoever saw it end
            sent = self.loading.get(back)
            if sent is not None and now - sent > LOAD_LISTED_DONE_S:
                del self.loading[back]
        if self.evicting:
            # a victim stays out until the load that evicts it is done (or given up): listed
            # meanwhile, it is draining, and a request for it would wait for that load and
            # then reload it; once that load is done, what is listed is the truth
            self.evicting = {v: by for v, by in self.evicting.items() if by in self.loading}
            if self.evicting.keys() & loaded.names:
                loaded = LoadedModels.of(
                    [e for name, e in loaded.named if name not in self.evicting])
        self.loaded_models = loaded
        after = loaded.names
        for gone in before - after:
            self.recently_unloaded[gone] = now
        for back in after:
            self.recently_unloaded.pop(back, None)
        for name, when in list(self.recently_unloaded.items()):
            if now - when > 3600:
                del self.recently_unloaded[name]

    def sent(self, model: str) -> None:
        """A request for ``model`` went to this node; ``answered`` when its first byte is
        back or the attempt ends without one."""
        self.awaiting[model] = self.awaiting.get(model, 0) + 1

    def answered(self, model: str) -> None:
        n = self.awaiting.get(model, 0) - 1
        if n > 0:
            self.awaiting[model] = n
        else:
            self.awaiting.pop(model, None)

    def unseen_loads(self) -> list[str]:
        """Models requests here still wait on that ``/api/ps`` no longer lists and that no
        load herd knows of brings: Ollama evicted them (a load herd did not see coming, a
        drain) and will load them again for those requests."""
        listed = self.ps_listed.names
        return [m for m in self.awaiting if m not in listed and m not in self.loading]

    def load_done(self, model: str) -> None:
        """An answer for ``model`` began here (or it loaded for a pre-warm): no load of it
        is under way any more, and what that load was to evict is gone (the next /api/ps
        read says what stayed)."""
        if self.loading.pop(model, None) is not None and self.evicting:
            self.evicting = {v: by for v, by in self.evicting.items() if by != model}

    def snapshot(self, now: float) -> scoring.NodeSnapshot:
        """What scoring reads of this node at ``now``. Every request snapshots every node:
        while nothing it is built from changed (the reports are frozen objects, replaced
        whole; the two small dicts are compared by value) and ``now`` has not passed a
        loaded model's expiry or a load's 900 s horizon, the same frozen snapshot serves."""
        c = self.snap_cache
        if (
            c is not None
            and c.since <= now <= c.expires
            and now < c.loading_until
            and c.status == self.status
            and c.reachable == self.reachable
            and c.loaded_models is self.loaded_models
            and c.available_models is self.available_models
            and c.hardware_report is self.hardware_report
            and c.capabilities_report is self.capabilities_report
            and c.num_parallel == self.num_parallel
            and c.loading == self.loading
            and c.snap.recently_unloaded == self.recently_unloaded
        ):
            return c.snap
        snap = self._build_snapshot(now)
        self.snap_cache = SnapshotCache(
            snap=snap,
            since=now,
            expires=min((lm.expires_at for lm in snap.loaded.values()
                         if lm.expires_at is not None), default=math.inf),
            loading_until=min((t + 900 for t in snap.loading.values()), default=math.inf),
            status=self.status,
            reachable=self.reachable,
            loaded_models=self.loaded_models,
            available_models=self.available_models,
            hardware_report=self.hardware_report,
            capabilities_report=self.capabilities_report,
            num_parallel=self.num_parallel,
            loading=dict(self.loading),
        )
        return snap

    def _build_snapshot(self, now: float) -> scoring.NodeSnapshot:
        loaded = unexpired(self.loaded_models.models, now)  # expired: unloading
        available = dict(self.available_models.models)
        for kind, cname in self.capabilities_report.models:
            available.setdefault(
                cname, scoring.AvailableModel(name=cname, size=0, capabilities=(kind,)))
        hw = self.hardware_report
        return scoring.NodeSnapshot(
            node_id=self.node_id,
            status=self.status,
            ram_total=hw.ram_total,
            ram_available=hw.ram_available,
            vram_total=hw.vram_total,
            vram_available=max(0, hw.vram_total - hw.vram_used),
            memory_pressure=hw.memory_pressure,
            loaded=loaded,
            available=available,
            recently_unloaded=dict(self.recently_unloaded),
            loading={m: t for m, t in self.loading.items() if now - t < 900},
            num_parallel=self.num_parallel,
            cpu_load=hw.cpu_load,
            reachable=self.reachable,
        )

    def public(self, now: float) -> JSON:
        """The node as /fleet/status shows it."""
        return {
            "node_id": self.node_id,
            "url": self.url,
            "source": self.source,
            "status": self.status,
            "last_seen": self.last_seen,
            "seconds_since_seen": round(now - self.last_seen, 3) if self.last_seen else None,
            "last_error": self.last_error,
            "version": self.version,
            "reachable": self.reachable,
            "agent_version": self.agent_version,
            "num_parallel": self.num_parallel,
            "max_loaded_models": self.max_loaded_models,
            # memory, cpu and disk once, at the top level; the rest (arch, chip, gpu, ...)
            "hardware": {k: v for k, v in self.hardware.items() if k not in NODE_TOP_FIELDS},
            "memory": self.hardware.get("memory"),
            "cpu": self.hardware.get("cpu"),
            "disk": self.hardware.get("disk"),
            "loaded_models": [
                {
                    "name": m.get("name"),
                    "size": m.get("size"),
                    "size_vram": m.get("size_vram"),
                    "context_length": m.get("context_length"),
                    "expires_at": m.get("expires_at"),
                }
                for m in self.loaded
            ],
            "available_models": self.available_public(),
            "capabilities": self.capabilities,
            "errors": self.errors,
        }

    def available_public(self) -> list[JSON]:
        """``available`` as /fleet/status shows it (built once per reported list; read-only)."""
        return self.available_models.public

    def available_json(self) -> bytes:
        """``available_public()`` encoded, once per reported list (most of /fleet/status)."""
        return self.available_models.encoded


LearnedCache = tuple[scoring.NodeSnapshot, int | None, "scoring.MemoryBounds | None",
                     tuple[int, str] | None, scoring.NodeSnapshot]


class StatsTable(dict[tuple[str, str], scoring.ServiceStats]):
    """``Fleet.stats``: a dict that counts its changes (``version``), so what is derived
    from it can be reused until the next one (``Fleet.stats_view``), and notes the keys
    set or deleted since ``take_changes`` (``None``: a change it cannot name)."""

    version = 0
    changed: set[tuple[str, str]] | None = None

    def __setitem__(self, key: tuple[str, str], value: scoring.ServiceStats) -> None:
        super().__setitem__(key, value)
        self._note(key)

    def __delitem__(self, key: tuple[str, str]) -> None:
        super().__delitem__(key)
        self._note(key)

    def _note(self, key: tuple[str, str] | None) -> None:
        self.version += 1
        if key is None:
            self.changed = None
        elif self.changed is not None:
            self.changed.add(key)

    def take_changes(self) -> set[tuple[str, str]] | None:
        """The keys changed since the last call (``None``: unknown), and start afresh."""
        changed, self.changed = self.changed, set()
        return changed

    def pop(self, *args: Any) -> Any:
        self._note(args[0] if args else None)
        return super().pop(*args)

    def popitem(self) -> tuple[tuple[str, str], scoring.ServiceStats]:
        self._note(None)
        return super().popitem()

    def clear(self) -> None:
        self._note(None)
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._note(None)
        super().update(*args, **kwargs)

    def setdefault(self, *args: Any) -> Any:
        self._note(args[0] if args else None)
        return super().setdefault(*args)

    def __ior__(self, other: Any) -> StatsTable:  # type: ignore[override,misc]
        self._note(None)
        super().__ior__(other)
        return self


@dataclass(slots=True, frozen=True)
class SnapshotCache:
    """A node's last snapshot, the inputs it was built from, and the span of ``now`` it
    holds for (``since`` .. the first loaded model's expiry, before the first load in
    progress turns 900 s old)."""

    snap: scoring.NodeSnapshot
    since: float
    expires: float
    loading_until: float
    status: str
    reachable: bool
    loaded_models: LoadedModels
    available_models: AvailableModels
    hardware_report: HardwareReport
    capabilities_report: CapabilitiesReport
    num_parallel: int | None
    loading: dict[str, float]


NODE_TOP_FIELDS = frozenset({"memory", "cpu", "disk"})  # hardware shown at a node's top level
NODE_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def valid_node_id(value: object) -> bool:
    return (
        isinstance(value, str) and 0 < len(value) <= 64 and all(c in NODE_ID_CHARS for c in value)
    )


def node_id_from_url(url: str) -> str:
    host, port, _ = split_url(url)
    base = host.replace(":", "-").strip("[]")
    return base if port == 11434 else f"{base}-{port}"


# =======================================================================================
# Queues (router-side, per node:model, capacity = the node's real parallel slots)
# =======================================================================================


class Waiter:
    """One request waiting for a slot of one model on any of several ``node:model`` queues.

    ``seq`` is its place in arrival order. It sits in the ``waiters`` of every queue whose
    slot it would take (keeping its place in each); a freed slot is handed to it directly
    (``granted``) and it leaves every other queue at once, so a slot is never free while
    someone waits for it and a newcomer cannot barge in.
    """

    __slots__ = ("expired", "fut", "granted", "queues", "seq")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.expired = False  # its deadline passed: the next choice is its last
        self.queues: list[SlotQueue] = []
        self.granted: SlotQueue | None = None  # a slot handed over, not yet used
        self.fut: asyncio.Future[None] | None = None

    def register(self, queues: Iterable[SlotQueue]) -> None:
        """Wait on exactly ``queues``: keeps its place in those it already waits on, joins the
        others at its own place (``seq``); may be granted a slot at once."""
        new = list({id(q): q for q in queues}.values())
        keep = {id(q) for q in new}
        for q in self.queues:
            if id(q) not in keep:
                q.waiters.pop(self.seq, None)
        had = {id(q) for q in self.queues}
        self.queues = new
        for q in new:
            if self.granted is not None:
                break
            if id(q) not in had:
                q.enqueue(self)

    def grant(self, q: SlotQueue) -> None:
        """``q`` hands this waiter a slot (already counted in flight); leave every queue."""
        for other in self.queues:
            if other is not q:
                other.waiters.pop(self.seq, None)
        self.queues = []
        self.granted = q
        self.wake()

    def wake(self) -> None:
        if self.fut is not None and not self.fut.done():
            self.fut.set_result(None)

    def expire(self) -> None:
        self.expired = True
        self.wake()

    def take(self) -> SlotQueue | None:
        """The granted slot, now the caller's to release."""
        q, self.granted = self.granted, None
        return q

    def leave(self) -> None:
        """Stop waiting (served, rejected, cancelled): a slot granted but not taken goes to
        the next waiter of that queue."""
        for q in self.queues:
            q.waiters.pop(self.seq, None)
        self.queues = []
        held = self.take()
        if held is not None:
            held.release()

    async def wait(self) -> None:
        """Until granted a slot or woken (fleet changed, deadline)."""
        if self.granted is not None:
            return
        self.fut = asyncio.get_running_loop().create_future()
        try:
            await self.fut
        finally:
            self.fut = None


@dataclass(slots=True, eq=False)
class SlotQueue:
    """One ``node:model``: ``slots`` (capacity, an input that may change at run time),
    ``in_flight`` (slots taken) and the FIFO of waiters that would take a slot of it.

    Invariant: a slot is never free while a waiter waits on this queue (``hand_over``
    runs on every release, resize and enqueue), so releases are O(1) in the waiters."""

    node_id: str
    model: str
    kind: str = "text"
    slots: int = 1
    sure: int = 0  # slots confirmed (told, reported or seen at once); 0: all of them
    progress_at: float = 0.0  # epoch s a slot last freed, or the idle queue took a request
    pending: int = 0
    in_flight: int = 0
    done: int = 0
    failed: int = 0
    waiters: OrderedDict[int, Waiter] = field(default_factory=OrderedDict, repr=False)
    # epoch s each request in flight started, oldest first (a release retires the oldest:
    # the one most likely done; it tells scoring when the next slot should free)
    starts: deque[float] = field(default_factory=deque, repr=False)
    last_snapshot: scoring.QueueSnapshot = field(default_factory=scoring.QueueSnapshot,
                                                 repr=False)
    # requests in flight per node, every model: shared by all the queues of one Admission
    # (kept as slots are taken and freed, so no request sums every queue)
    node_in_flight: dict[str, int] = field(default_factory=dict, repr=False)

    def snapshot(self) -> scoring.QueueSnapshot:
        """Scoring snapshots the queues it looks up (``QueueView``): an unchanged queue
        returns the same (frozen) snapshot instead of building a new one."""
        snap = self.last_snapshot
        if (snap.in_flight != self.in_flight or snap.pending != self.pending
                or snap.slots != self.slots or snap.sure != self.sure
                or snap.progress_at != self.progress_at
                or snap.oldest_at != (self.starts[0] if self.starts else 0.0)):
            snap = self.last_snapshot = scoring.QueueSnapshot(
                pending=self.pending, in_flight=self.in_flight, slots=self.slots,
                sure=self.sure, progress_at=self.progress_at,
                oldest_at=self.starts[0] if self.starts else 0.0,
            )
        return snap

    def public(self) -> JSON:
        return {
            "node_id": self.node_id,
            "model": self.model,
            "kind": self.kind,
            "pending": self.pending,
            "in_flight": self.in_flight,
            "done": self.done,
            "failed": self.failed,
            "slots": self.slots,
        }

    def take(self) -> None:
        now = time.time()
        if self.in_flight == 0:
            self.progress_at = now
        self.in_flight += 1
        self.node_in_flight[self.node_id] = self.node_in_flight.get(self.node_id, 0) + 1
        self.starts.append(now)

    def release(self) -> None:
        """A slot frees: it goes to the longest-waiting waiter of this queue, if any."""
        self.in_flight -= 1
        self.node_in_flight[self.node_id] -= 1
        if self.starts:
            self.starts.popleft()
        self.progress_at = time.time()
        self.hand_over()

    def resize(self, slots: int) -> None:
        self.slots = slots
        self.hand_over()

    def enqueue(self, w: Waiter) -> None:
        last = next(reversed(self.waiters), None)
        self.waiters[w.seq] = w
        if last is not None and last > w.seq:  # rejoining: back to its place (rare)
            for seq in [s for s in self.waiters if s > w.seq]:
                self.waiters.move_to_end(seq)
        self.hand_over()

    def hand_over(self) -> None:
        while self.in_flight < max(1, self.slots) and self.waiters:
            _, w = self.waiters.popitem(last=False)
            now = time.time()
            if self.in_flight == 0:
                self.progress_at = now
            self.in_flight += 1
            self.node_in_flight[self.node_id] = self.node_in_flight.get(self.node_id, 0) + 1
            self.starts.append(now)
            w.grant(self)


class QueueView(Mapping[tuple[str, str], scoring.QueueSnapshot]):
    """Admission's queues as scoring reads them: a queue is snapshotted when it is looked
    up, so a request snapshots the queues of its own model (and of an eviction's victims),
    not every queue of the fleet."""

    __slots__ = ("_queues",)

    def __init__(self, queues: Mapping[tuple[str, str], SlotQueue]) -> None:
        self._queues = queues

    def __getitem__(self, key: tuple[str, str]) -> scoring.QueueSnapshot:
        return self._queues[key].snapshot()

    def get(self, key: tuple[str, str], default: Any = None) -> Any:
        q = self._queues.get(key)
        return default if q is None else q.snapshot()

    def __contains__(self, key: object) -> bool:
        return key in self._queues

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._queues)

    def __len__(self) -> int:
        return len(self._queues)


class Rejected(Exception):
    def __init__(self, choice: scoring.Choice, message: str) -> None:
        super().__init__(message)
        self.choice = choice
        self.message = message


# =======================================================================================
# Configuration
# =======================================================================================


@dataclass(slots=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 11435
    nodes: list[str] = field(default_factory=list)  # static node URLs (agentless)
    data_dir: Path = field(default_factory=lambda: Path.home() / ".fleet-manager")
    local_ollama: str | None = "http://127.0.0.1:11434"  # probed at start; None = off
    poll_interval_s: float = 5.0
    poll_timeout_s: float = 3.0
    heartbeat_interval_s: float = 5.0
    first_byte_timeout_s: float = 300.0  # no response head / first byte → retry elsewhere
    stall_timeout_s: float = 300.0  # zombie reaper: no progress mid-stream for this long
    connect_timeout_s: float = 3.0
    grace_s: float = 10.0
    drain_delay_s: float = 0.0  # after SIGTERM: /healthz says 503 this long before we stop
    retention_days: float = 30.0
    fleet_key: str | None = None
    fleet_id: str = "default"
    open_fleet: bool = False  # unsigned agents from other machines join without approval
    mdns: bool = True
    slots: dict[str, int] = field(default_factory=dict)  # node_id → configured parallel slots
    limits: Limits = field(default_factory=Limits)
    policy: scoring.Policy = field(default_factory=scoring.Policy)
    log_level: str = "INFO"
    admin_token: str | None = None
    api_keys: list[str] = field(default_factory=list)
    trusted_hosts: list[str] = field(default_factory=list)  # extra Host names for admin calls
    persist_learning: bool = True  # keep what was learned across restarts (learned_facts)
    learning_save_interval_s: float = 30.0
    learning_max_age_s: float = 7 * 86400.0  # a fact not updated for this long is dropped


DEFAULT_SETTINGS: dict[str, object] = {
    "auto_pull": False,  # downloads can be 100 GB: opt in
    "vram_fallback": False,  # serving another model than asked is opt in, never silent
    "context_protection": True,
    "image_generation": True,
    "transcription": True,
}


# =======================================================================================
# Metrics (Prometheus text exposition, no dependency)
# =======================================================================================

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}  # (endpoint, kind, status)
        self.latency: dict[str, list[int]] = {}  # kind → bucket counts (+Inf last)
        self.latency_sum: dict[str, float] = {}
        self.retries = 0
        self.fallbacks = 0
        self.rejected = 0
        self.reaped = 0

    def observe(self, endpoint: str, kind: str, status: str, latency_s: float) -> None:
        key = (endpoint, kind, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        buckets = self.latency.setdefault(kind, [0] * (len(LATENCY_BUCKETS) + 1))
        for i, bound in enumerate(LATENCY_BUCKETS):
            if latency_s <= bound:
                buckets[i] += 1
        buckets[-1] += 1
        self.latency_sum[kind] = self.latency_sum.get(kind, 0.0) + latency_s

    def render(self, nodes: Iterable[Node], queues: Iterable[SlotQueue], active: int) -> str:
        """The Prometheus text exposition of the counters and the fleet gauges."""
        out: list[str] = []
        m = self
        queues = list(queues)

        def metric(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        metric("herd_requests_total", "counter", "Client requests by endpoint, kind and outcome")
        for (endpoint, kind, status), n in sorted(m.requests.items()):
            out.append(
                f'herd_requests_total{{endpoint="{prom_escape(endpoint)}",'
                f'kind="{kind}",status="{status}"}} {n}'
            )
        metric("herd_request_duration_seconds", "histogram", "Request latency")
        for kind, buckets in sorted(m.latency.items()):
            for bound, count in zip(LATENCY_BUCKETS, buckets, strict=False):
                out.append(
                    f'herd_request_duration_seconds_bucket{{kind="{kind}",le="{bound}"}} {count}'
                )
            out.append(
                f'herd_request_duration_seconds_bucket{{kind="{kind}",le="+Inf"}} {buckets[-1]}'
            )
            out.append(
                f'herd_request_duration_seconds_sum{{kind="{kind}"}} '
                f"{m.latency_sum.get(kind, 0.0):.6f}"
            )
            out.append(f'herd_request_duration_seconds_count{{kind="{kind}"}} {buckets[-1]}')
        for name, kind_, help_, value in (
            ("herd_retries_total", "counter", "Attempts retried on another node", m.retries),
            ("herd_fallbacks_total", "counter", "Requests served by a fallback model",
             m.fallbacks),
            ("herd_rejected_total", "counter", "Requests rejected (saturation or unservable)",
             m.rejected),
            ("herd_reaped_total", "counter", "Streams cancelled for making no progress",
             m.reaped),
            ("herd_requests_active", "gauge", "Requests being served now", active),
        ):
            metric(name, kind_, help_)
            out.append(f"{name} {value}")
        metric("herd_node_up", "gauge", "1 when the node is online")
        for node in nodes:
            up = 1 if node.status == NodeStatus.ONLINE else 0
            out.append(
                f'herd_node_up{{node="{prom_escape(node.node_id)}",status="{node.status}"}} {up}'
            )
        metric("herd_queue_in_flight", "gauge", "In-flight requests per node:model")
        for q in queues:
            out.append(
                f'herd_queue_in_flight{{node="{prom_escape(q.node_id)}",'
                f'model="{prom_escape(q.model)}"}} {q.in_flight}'
            )
        metric("herd_queue_pending", "gauge", "Requests waiting for a slot per node:model")
        for q in queues:
            out.append(
                f'herd_queue_pending{{node="{prom_escape(q.node_id)}",'
                f'model="{prom_escape(q.model)}"}} {q.pending}'
            )
        metric("herd_queue_slots", "gauge", "Parallel slots per node:model")
        for q in queues:
            out.append(
                f'herd_queue_slots{{node="{prom_escape(q.node_id)}",'
                f'model="{prom_escape(q.model)}"}} {q.slots}'
            )
        return "\n".join(out) + "\n"


def prom_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# =======================================================================================
# Request bookkeeping
# =======================================================================================


def ended_since(ends: deque[float], since: float, run_start: float, tol: float
                ) -> tuple[int, bool]:
    """Of the answers that ended after ``since`` (``ends``: end times in time order): how
    many ended by ``run_start``, and whether one ended within ``tol`` of it. Reads only
    those newest entries, not the whole history."""
    finished = 0
    freed = False
    for t in reversed(ends):
        if t <= since:
            break
        finished += t <= run_start
        freed = freed or abs(t - run_start) <= tol
    return finished, freed


@dataclass(slots=True)
class Attempt:
    """What one routed client request carries through its attempts."""

    request_id: str
    kind: str
    endpoint: str
    original_model: str
    tags: list[str]
    client_ip: str
    received_at: float
    started: float  # monotonic
    retries: int = 0
    fallback_used: bool = False
    served_model: str = ""
    node_id: str = ""
    queue_ms: float = 0.0
    # learning: the dispatch this attempt's timings are read against
    dispatch_k: int = 0  # requests herd had in flight on that node:model, this one included
    dispatch_mono: float = 0.0
    dispatch_hot: bool = False  # the model was resident there when it was sent
    dispatch_streams: int = 0  # other requests herd had in flight on that node (any model)
    dispatch_load_queued: bool = False  # it was sent cold while another load was under way
    affinity_key: str | None = None  # prompt-prefix key to remember once served
    affinity_tokens: int = 0


INFERENCE_PATHS: dict[str, tuple[str, str]] = {
    # path → (kind, dialect)
    "/api/generate": ("text", "native"),
    "/api/chat": ("text", "native"),
    "/api/embed": ("embed", "native"),
    "/api/embeddings": ("embed", "native"),
    "/v1/chat/completions": ("text", "openai"),
    "/v1/completions": ("text", "openai"),
    "/v1/embeddings": ("embed", "openai"),
    "/v1/responses": ("text", "openai"),
    "/v1/messages": ("text", "openai"),
}


GO_DURATION_TERM = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
GO_DURATION_NS = MappingProxyType(
    {"ns": 1, "us": 10**3, "\u00b5s": 10**3, "\u03bcs": 10**3, "ms": 10**6, "s": 10**9,
     "m": 60 * 10**9, "h": 3600 * 10**9}
)


def keep_alive_ns(value: object) -> int | None:
    """``keep_alive`` as Ollama's ``api.Duration`` reads it: nanoseconds (negative = keep
    forever), or None where Ollama answers 400. A number is whole seconds (``0.9`` is 0); a
    string is a Go duration (``"-0s"`` and ``"0h0m"`` are 0; ``"0.0"`` and ``"10"`` lack a
    unit)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return -1 if value < 0 else int(value) * 10**9
    if not isinstance(value, str):
        return None
    text = value[1:] if value[:1] in ("+", "-") else value
    if text == "0":
        return 0
    if not text:
        return None
    total, pos = 0, 0
    while pos < len(text):
        term = GO_DURATION_TERM.match(text, pos)
        if term is None:
            return None
        total += int(float(term[1]) * GO_DURATION_NS[term[2]])
        pos = term.end()
    return -total if value[:1] == "-" else total


def is_zero_keep_alive(value: object) -> bool:
    """True when Ollama reads ``keep_alive`` as "unload now" (see :func:`keep_alive_ns`)."""
    return keep_alive_ns(value) == 0


def extract_tags(body: JSON, request: Request) -> list[str]:
    """Tags from ``metadata.tags``, ``X-Herd-Tags`` and OpenAI ``user``; removed from body."""
    tags: list[str] = []
    meta = body.get("metadata")
    if isinstance(meta, dict):
        raw = meta.pop("tags", None)
        if isinstance(raw, list):
            tags += [str(t) for t in raw if isinstance(t, str | int | float)]
        elif isinstance(raw, str):
            tags += [t for t in raw.split(",")]
        if not meta:
            body.pop("metadata", None)
    header = request.header("x-herd-tags")
    if header:
        tags += header.split(",")
    user = body.get("user")
    if isinstance(user, str) and user and request.path.startswith("/v1/"):
        tags.append(f"user:{user}")
    seen: dict[str, None] = {}
    for t in tags:
        t = t.strip()[:64]
        if t:
            seen.setdefault(t, None)
    return list(seen)[:32]


def estimate_tokens(body: JSON, raw_len: int) -> int:
    """Rough prompt size: ~4 bytes a token of the text fields (images excluded)."""
    text = 0
    for key in ("prompt", "system", "suffix", "input"):
        v = body.get(key)
        if isinstance(v, str):
            text += len(v)
        elif isinstance(v, list):
            text += sum(len(x) for x in v if isinstance(x, str))
    msgs = body.get("messages")
    if isinstance(msgs, list):
        for m in msgs:
            if isinstance(m, dict):
                c = m.get("content")
                if isinstance(c, str):
                    text += len(c)
                elif isinstance(c, list):
                    text += sum(len(str(p.get("text", ""))) for p in c if isinstance(p, dict))
    if not text:
        text = min(raw_len, 1_000_000)
    return max(1, text // 4)


def _check_images(value: object, where: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise HttpError(400, f"{where} must be a list of base64-encoded images")
    return bool(value)


def needs_vision(body: JSON) -> bool:
    if _check_images(body.get("images"), "images"):
        return True
    msgs = body.get("messages")
    if isinstance(msgs, list):
        for m in msgs:
            if not isinstance(m, dict):
                continue
            if _check_images(m.get("images"), "messages[].images"):
                return True
            c = m.get("content")
            if isinstance(c, list) and any(
                isinstance(p, dict) and p.get("type") == "image_url" for p in c
            ):
                return True
    return False


def requested_num_ctx(body: JSON) -> int | None:
    opts = body.get("options")
    if isinstance(opts, dict):
        v = opts.get("num_ctx")
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def requested_max_tokens(body: JSON) -> int | None:
    """The client's cap on completion tokens, in any dialect: Ollama ``options.num_predict``
    (a positive one: -1 and -2 mean no cap), OpenAI ``max_tokens`` /
    ``max_completion_tokens``, Responses ``max_output_tokens``."""
    opts = body.get("options")
    values = [opts.get("num_predict")] if isinstance(opts, dict) else []
    values += [body.get(k) for k in ("max_tokens", "max_completion_tokens", "max_output_tokens")]
    caps = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return min(caps) if caps else None


def without_node_id(raw: bytes, body: JSON) -> bytes:
    """The body to forward once herd's ``node_id`` is taken out: the client's own bytes when
    it had none (and is a plain UTF-8 JSON object), else ``body`` re-serialised without it."""
    if "node_id" not in body and raw[:1] == b"{" and raw[1:2] != b"\x00":
        return raw
    body.pop("node_id", None)
    return dumps(body)


def upstream_headers(request: Request) -> Headers:
    """Client headers to forward: hop-by-hop, herd's own and credentials for herd removed."""
    out: Headers = []
    for k, v in request.headers:
        if k in HOP_BY_HOP or k.startswith(b"x-herd-") or k == b"expect":
            continue
        out.append((k, v))
    out.append((b"x-request-id", request.request_id.encode()))
    return out


RESPONSE_DROP = HOP_BY_HOP - {b"content-length"}


class DashboardApi:
    """The dashboard's JSON API: traces, usage, settings, benchmarks, and the health and
    recommendation analytics (cached 10 s). Owns the benchmark run and the analytics cache;
    reads the fleet and the store through the router."""

    def __init__(self, router: Router) -> None:
        self.r = router
        self.benchmark_task: asyncio.Task[None] | None = None
        self.benchmark_run: int | None = None
        self._analytics_cache: dict[str, tuple[float, JSON]] = {}

    def node_facts(self, now: float) -> tuple[scoring.NodeFacts, ...]:
        """Every node as ``scoring.NodeFacts`` (memory, disk, models, versions, breakers)."""
        out: list[scoring.NodeFacts] = []

        def num(obj: object, key: str) -> int:
            v = obj.get(key) if isinstance(obj, dict) else None
            return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0

        for node in self.r.fleet.nodes.values():
            snap = node.snapshot(now)
            mem = node.hardware.get("memory") or {}
            disk = node.hardware.get("disk")
            swap_total = num(mem, "swap_total_bytes")
            swap_free = num(mem, "swap_free_bytes")
            on_disk: list[scoring.DiskModel] = []
            for name, m in node.available_models.named:
                am = snap.available.get(name)
                on_disk.append(scoring.DiskModel(
                    name=name, size=int(m.get("size") or 0),
                    modified_at=parse_rfc3339(m.get("modified_at")),
                    family=am.family if am is not None else "",
                    capabilities=am.capabilities if am is not None else ()))
            caps: dict[str, tuple[str, ...]] = {}
            for kind in ("image", "stt"):
                caps[kind] = tuple(
                    name for k, name in node.capabilities_report.models if k == kind)
            prefix = f"{node.node_id}:"
            model_breakers = {k[len(prefix):]: b for k, b in self.r.fleet.breakers.items()
                              if k.startswith(prefix)}
            out.append(scoring.NodeFacts(
                node_id=node.node_id, status=node.status, source=node.source, url=node.url,
                seconds_since_seen=(now - node.last_seen) if node.last_seen else None,
                last_error=node.last_error,
                ram_total=snap.ram_total, ram_available=snap.ram_available,
                vram_total=snap.vram_total, vram_available=snap.vram_available,
                memory_pressure=snap.memory_pressure,
                swap_total=swap_total,
                swap_used=max(0, swap_total - swap_free) if swap_total else 0,
                disk_total=num(disk, "total_bytes") if isinstance(disk, dict) else None,
                disk_free=num(disk, "free_bytes") if isinstance(disk, dict) else None,
                loaded=tuple(snap.loaded.values()), on_disk=tuple(on_disk),
                agent_version=node.agent_version, ollama_version=node.version,
                reachable=node.reachable,
                errors=tuple(f"{e.get('collector', '?')}: {e.get('error', '')}"
                             for e in node.errors),
                image_models=caps["image"], stt_models=caps["stt"],
                num_parallel=node.num_parallel, max_loaded_models=node.max_loaded_models,
                breaker=self.r.fleet.breakers.get(node.node_id), model_breakers=model_breakers))
        return tuple(out)

    async def analytics_inputs(self, now: float) -> dict[str, Any]:
        """Store reads behind health and recommendations (bounded; rollups, not raw scans)."""
        day = 86400.0
        st = self.r.store

        def fnum(v: object) -> float:
            return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0

        use = scoring.ModelUse.from_row
        usage_24h = tuple(use(r) for r in await st.node_model_stats(1, now=now))
        # "recent": the current and the previous UTC hour (60-120 minutes of traffic)
        usage_recent = tuple(use(r) for r in await st.node_model_stats(2 / 24, now=now))
        usage_7d = tuple(use(r) for r in await st.node_model_stats(7, now=now))
        incidents: list[scoring.Incident] = []
        for status in ("failed", "retried", "incomplete", "reaped"):
            for t in await st.traces(2000, status=status, since=now - day):
                incidents.append(scoring.Incident(
                    timestamp=fnum(t.get("timestamp")),
                    node_id=str(t.get("node_id") or ""), model=str(t.get("model") or ""),
                    status=status, http_status=int(fnum(t.get("http_status"))),
                    latency_ms=fnum(t.get("latency_ms")),
                    error=str(t.get("error_message") or ""), kind=str(t.get("kind") or "")))
        not_found: dict[str, int] = {}
        for t in await st.traces(5000, status="failed", since=now - 7 * day):
            if t.get("http_status") == 404 and not t.get("node_id"):
                name = scoring.normalize_model(str(t.get("original_model") or t.get("model")))
                not_found[name] = not_found.get(name, 0) + 1
        events = tuple(
            scoring.FleetEvent(fnum(e.get("timestamp")), str(e.get("kind") or ""),
                               str(e.get("node_id") or ""),
                               cast(JSON, d) if isinstance(d := e.get("detail"), dict) else {})
            for e in await st.events(2000, since=now - day))
        firsts = [fnum(r.get("first_used")) for r in await st.models(30, now=now)
                  if isinstance(r.get("first_used"), int | float)]
        return {"usage_24h": usage_24h, "usage_recent": usage_recent, "usage_7d": usage_7d,
                "incidents": tuple(incidents), "events": events, "not_found_7d": not_found,
                "history_s": now - min(firsts) if firsts else 0.0}

    async def _analytics_cached(self, key: str, build: Callable[[float], Awaitable[JSON]]
                                ) -> JSON:
        cache = self._analytics_cache
        now = time.time()
        hit = cache.get(key)
        if hit is not None and 0 <= now - hit[0] < 10.0:
            return hit[1]
        payload = await build(now)
        cache[key] = (now, payload)
        return payload

    async def _build_health(self, now: float) -> JSON:
        data = await self.analytics_inputs(now)
        stats = self.r.store.stats()
        inp = scoring.HealthInput(
            now=now, nodes=self.node_facts(now), router_version=__version__,
            usage_24h=data["usage_24h"], usage_recent=data["usage_recent"],
            incidents=data["incidents"], events=data["events"],
            store_dropped=stats.dropped, store_write_errors=stats.write_errors,
            store_queue_depth=stats.queue_depth, settings=dict(self.r.settings),
            stall_timeout_s=self.r.config.stall_timeout_s,
            pending_nodes=tuple(
                scoring.PendingNode(n.node_id, n.agent_addr, n.url, n.held_since, n.held_reason)
                for n in self.r.fleet.consent.held_nodes.values()
                if n.status == NodeStatus.PENDING))
        return scoring.health_checks(inp).to_dict()

    async def _build_recommendations(self, now: float) -> JSON:
        data = await self.analytics_inputs(now)
        report = scoring.recommendations(
            now, self.node_facts(now), data["usage_24h"], data["usage_7d"],
            data["not_found_7d"], history_s=data["history_s"], scoring_policy=self.r.policy)
        return report.to_dict()

    async def h_dash_health(self, request: Request, response: Response) -> None:
        await response.json(await self._analytics_cached("health", self._build_health))

    async def h_dash_recommendations(self, request: Request, response: Response) -> None:
        await response.json(
            await self._analytics_cached("recommendations", self._build_recommendations))

    def query_number(self, request: Request, name: str, default: float, lo: float,
                     hi: float) -> float:
        raw = request.query.get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise HttpError(400, f"query parameter {name} must be a number") from None
        if not math.isfinite(value) or not lo <= value <= hi:
            raise HttpError(400, f"query parameter {name} must be between {lo:g} and {hi:g}")
        return value

    async def h_dashboard(self, request: Request, response: Response) -> None:
        page = find_dashboard()
        if page is None:
            raise HttpError(404, "dashboard.html is not installed next to herd.py")
        data = await asyncio.to_thread(page.read_bytes)
        await response.send(200, data, "text/html; charset=utf-8", [
            ("cache-control", "no-cache"),
            ("content-security-policy",
             "default-src 'self'; script-src 'self' 'unsafe-inline'; "
             "style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
             "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
            ("x-content-type-options", "nosniff"),
            ("referrer-policy", "no-referrer"),
        ])

    async def h_dash_traces(self, request: Request, response: Response) -> None:
        limit = int(self.query_number(request, "limit", 100, 1, 5000))
        q = request.query
        rows = await self.r.store.traces(limit, status=q.get("status") or None,
                                       model=q.get("model") or None,
                                       node_id=q.get("node") or q.get("node_id") or None,
                                       tag=q.get("tag") or None)
        await response.json({"traces": rows})

    async def h_dash_usage(self, request: Request, response: Response) -> None:
        days = int(self.query_number(request, "days", 7, 1, 3650))
        await response.json(await self.r.store.usage(days, now=time.time()))

    async def h_dash_models(self, request: Request, response: Response) -> None:
        days = self.query_number(request, "days", 7, 0.01, 3650)
        rows = await self.r.store.models(days, now=time.time())
        by_model = {str(r.get("model")): r for r in rows}
        out: list[JSON] = []
        names = {_entry_name(m) for m in self.r.merged_tags()}
        for name in sorted(names | set(by_model)):
            entry: JSON = dict(by_model.get(name) or {"model": name, "requests": 0})
            entry["loaded_on"] = sorted(n.node_id for n in self.r.fleet.healthy_nodes()
                                        if name in n.loaded_names())
            entry["available_on"] = sorted(n.node_id for n in self.r.fleet.healthy_nodes()
                                           if name in n.available_names())
            out.append(entry)
        out.sort(key=lambda e: -float(e.get("requests") or 0))
        await response.json({"models": out, "days": days})

    async def h_dash_apps(self, request: Request, response: Response) -> None:
        days = self.query_number(request, "days", 7, 0.01, 3650)
        await response.json({"apps": await self.r.store.apps(days, now=time.time()), "days": days})

    async def h_dash_trends(self, request: Request, response: Response) -> None:
        hours = int(self.query_number(request, "hours", 24, 1, 24 * 90))
        await response.json({"hours": hours,
                             "buckets": await self.r.store.trends(hours, now=time.time())})

    async def h_dash_events(self, request: Request, response: Response) -> None:
        limit = int(self.query_number(request, "limit", 100, 1, 5000))
        await response.json({"events": await self.r.store.events(limit)})

    async def h_dash_settings(self, request: Request, response: Response) -> None:
        await response.json(self.settings_view())

    def settings_view(self) -> JSON:
        cfg = self.r.config
        return {
            "settings": dict(self.r.settings),
            "config": {
                "host": cfg.host, "port": self.r.address[1], "data_dir": str(cfg.data_dir),
                "static_nodes": list(cfg.nodes), "poll_interval_s": cfg.poll_interval_s,
                "heartbeat_interval_s": cfg.heartbeat_interval_s,
                "first_byte_timeout_s": cfg.first_byte_timeout_s,
                "stall_timeout_s": cfg.stall_timeout_s, "retention_days": cfg.retention_days,
                "fleet_id": cfg.fleet_id, "fleet_key_set": bool(cfg.fleet_key),
                "open_fleet": cfg.open_fleet,
                "admin_token_set": bool(cfg.admin_token), "api_keys": len(cfg.api_keys),
                "mdns": cfg.mdns, "max_queue_wait_s": self.r.policy.max_queue_wait_s,
                "max_retries": self.r.policy.max_retries,
            },
            "versions": {"herd": __version__,
                         "nodes": {n.node_id: {"ollama": n.version, "agent": n.agent_version}
                                   for n in self.r.fleet.nodes.values()}},
        }

    async def h_dash_settings_post(self, request: Request, response: Response) -> None:
        self.r.require_admin(request)
        body = await request.json(64 * 1024)
        changes: dict[str, object] = {}
        for key, value in body.items():
            if key not in DEFAULT_SETTINGS:
                raise HttpError(400, f"unknown setting {key!r}; known: "
                                     f"{', '.join(sorted(DEFAULT_SETTINGS))}")
            if not isinstance(value, bool):
                raise HttpError(400, f"setting {key!r} must be true or false")
            changes[key] = value
        if not changes:
            raise HttpError(400, "no settings given")
        await self.r.store.set_settings(changes)
        self.r.settings.update(changes)
        log.info("settings changed: %s", changes)
        self.r.store.record_event("settings", "", {"changes": changes})
        await response.json(self.settings_view())

    async def h_dash_benchmarks(self, request: Request, response: Response) -> None:
        runs = await self.r.store.benchmarks(int(self.query_number(request, "limit", 20, 1, 500)))
        await response.json({"runs": runs, "active": self.benchmark_run})

    async def h_dash_benchmark_start(self, request: Request, response: Response) -> None:
        self.r.require_admin(request)
        body = await request.json(64 * 1024)
        if self.benchmark_task is not None and not self.benchmark_task.done():
            raise HttpError(409, "a benchmark is already running; cancel it first")
        models = body.get("models")
        if models is None:
            models = [str(m.get("name")) for m in self.r.merged_tags()
                      if "embedding" not in (m.get("capabilities") or [])]
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models) \
                or not models:
            raise HttpError(400, "models must be a non-empty list of model names")
        per_model = body.get("requests_per_model", 6)
        concurrency = body.get("concurrency", 2)
        max_tokens = body.get("max_tokens", 64)
        for name, value, hi in (("requests_per_model", per_model, 1000),
                                ("concurrency", concurrency, 64), ("max_tokens", max_tokens, 4096)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= hi:
                raise HttpError(400, f"{name} must be an integer between 1 and {hi}")
        params: JSON = {"models": models, "requests_per_model": per_model,
                        "concurrency": concurrency, "max_tokens": max_tokens,
                        "prompt": str(body.get("prompt") or
                                      "Write a short paragraph about the sea.")[:4000]}
        run_id = await self.r.store.create_benchmark(params, now=time.time())
        self.benchmark_run = run_id
        self.benchmark_task = self.r._spawn(self.run_benchmark(run_id, params), "benchmark")
        await response.json({"run_id": run_id, "status": "running", "params": params},
                            status=202)

    async def h_dash_benchmark_cancel(self, request: Request, response: Response) -> None:
        self.r.require_admin(request)
        task = self.benchmark_task
        if task is None or task.done():
            raise HttpError(404, "no benchmark is running")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await response.json({"run_id": self.benchmark_run, "status": "cancelled"})

    async def run_benchmark(self, run_id: int, params: JSON) -> None:
        """Send the requests through the router itself, so routing is part of the figure."""
        models = list(params["models"])
        total = len(models) * int(params["requests_per_model"])
        started = time.time()
        await self.r.store.update_benchmark(run_id, status="running", started_at=started,
                                          progress=0.0)
        lat: list[float] = []
        ttft: list[float] = []
        tokens = 0
        eval_s = 0.0
        failures = 0
        done = 0
        per: dict[str, JSON] = {}
        sem = asyncio.Semaphore(int(params["concurrency"]))
        base = f"http://127.0.0.1:{self.r.address[1]}"

        async def one(model: str) -> None:
            nonlocal tokens, eval_s, failures, done
            async with sem:
                t0 = time.monotonic()
                body = dumps({"model": model, "prompt": params["prompt"], "stream": False,
                              "options": {"num_predict": params["max_tokens"]},
                              "metadata": {"tags": ["benchmark"]}})
                node = "?"
                try:
                    up = await self.r.pool.request(base, "POST", "/api/generate",
                                                 [(b"content-type", b"application/json")], body,
                                                 head_timeout=self.r.config.first_byte_timeout_s)
                    data = await up.read(idle_timeout=self.r.config.stall_timeout_s)
                    node = up.header("x-herd-node") or "?"
                    obj = json.loads(data) if up.status == 200 else {}
                    if up.status != 200:
                        raise ValueError(f"status {up.status}")
                    n = int(obj.get("eval_count") or 0)
                    secs = float(obj.get("eval_duration") or 0) / 1e9
                    tokens += n
                    eval_s += secs
                    lat.append((time.monotonic() - t0) * 1000)
                    ttft.append(float(obj.get("load_duration") or 0) / 1e6 +
                                float(obj.get("prompt_eval_duration") or 0) / 1e6)
                    key = f"{node}:{model}"
                    entry = per.setdefault(key, {"node_id": node, "model": model,
                                                 "requests": 0, "tokens": 0, "eval_s": 0.0})
                    entry["requests"] += 1
                    entry["tokens"] += n
                    entry["eval_s"] += secs
                except (UpstreamFailure, ConnectionClosed, TimeoutError, ValueError):
                    failures += 1
                done += 1

        try:
            tasks = [one(m) for m in models for _ in range(int(params["requests_per_model"]))]
            for chunk_start in range(0, len(tasks), 8):
                await asyncio.gather(*tasks[chunk_start:chunk_start + 8])
                await self.r.store.update_benchmark(run_id, progress=round(done / total, 3),
                                                  requests=done, failures=failures)
            status = "done"
        except asyncio.CancelledError:
            status = "cancelled"
        duration = time.time() - started
        results = [{**e, "tokens_per_s": round(e["tokens"] / e["eval_s"], 2)
                    if e["eval_s"] else None} for e in per.values()]
        await self.r.store.update_benchmark(
            run_id, status=status, finished_at=time.time(), duration_s=round(duration, 3),
            requests=done, failures=failures, progress=round(done / total, 3) if total else 1,
            rps=round(done / duration, 3) if duration else None,
            tokens_per_s=round(tokens / eval_s, 2) if eval_s else None,
            latency_p50_ms=percentile(lat, 50), latency_p95_ms=percentile(lat, 95),
            latency_p99_ms=percentile(lat, 99), ttft_p50_ms=percentile(ttft, 50),
            ttft_p95_ms=percentile(ttft, 95), ttft_p99_ms=percentile(ttft, 99),
            results={"per_node_model": results},
        )
        self.benchmark_run = None
        if status == "cancelled":
            raise asyncio.CancelledError


class ModelAdmin:
    """Model management: Ollama's pull/push/create/blobs/copy/delete/show sent to the right
    node (or fanned out to every holder), the dashboard's pull and delete, pull jobs and
    auto-pull. Owns the pull jobs, the running auto-pulls and the blob pins."""

    def __init__(self, router: Router) -> None:
        self.r = router
        self.blob_pins: dict[str, str] = {}  # blob digest → node_id (blobs are node-local)
        self.pull_jobs: dict[str, JSON] = {}
        self.auto_pulls: dict[str, asyncio.Future[None]] = {}

    def forget_node(self, node_id: str) -> None:
        """Blobs pinned to a node that left go (the next HEAD finds them again), and so do
        its finished pull jobs (a running one stays until it ends)."""
        for digest in [d for d, n in self.blob_pins.items() if n == node_id]:
            del self.blob_pins[digest]
        for key in [k for k, j in self.pull_jobs.items()
                    if j["node_id"] == node_id and j["status"] != "pulling"]:
            del self.pull_jobs[key]

    async def h_show(self, request: Request, response: Response) -> None:
        await self.forward_to_holders(request, response)

    async def forward_to_holders(self, request: Request, response: Response) -> None:
        """Proxy to a healthy node that holds the body's model (hot first); 404 if none."""
        raw = await request.read_body(self.r.limits.max_json_bytes)
        body = await parse_json_body(raw)
        model = scoring.normalize_model(self.r.model_of(body))
        candidates = self.r.fleet.nodes_with(model)
        if not candidates:
            raise self.r.model_not_found(f"'{self.r.model_of(body)}'")
        await self.forward_simple(request, response, candidates, raw)

    async def forward_simple(
        self,
        request: Request,
        response: Response,
        candidates: Sequence[Node],
        raw: bytes | None,
    ) -> Node:
        """Proxy to the first candidate that answers (connect failures move on)."""
        last: UpstreamFailure | None = None
        for node in candidates:
            try:
                up = await self.r.pool.request(
                    node.url,
                    request.method,
                    request.target,
                    upstream_headers(request),
                    raw,
                    head_timeout=self.r.config.first_byte_timeout_s,
                )
            except UpstreamFailure as exc:
                last = exc
                self.r.fleet.breaker_failure(node.node_id, "", exc.kind, time.time())
                continue
            await self.relay_plain(up, response, node)
            return node
        raise HttpError(502, f"no node answered: {last.message if last else 'none available'}")

    async def relay_plain(self, up: UpstreamResponse, response: Response, node: Node) -> None:
        """Relay a node's answer as it is (admin and metadata endpoints)."""
        out = RelayOutcome(LineRelay(framing_of(up.header("content-type"))))
        await relay_answer(up, response, [(b"x-herd-node", node.node_id.encode())], out,
                           node_id=node.node_id, stall_timeout_s=self.r.config.stall_timeout_s)

    async def h_pull(self, request: Request, response: Response) -> None:
        self.r.guard_browser_mutation(request)
        raw = await request.read_body(self.r.limits.max_json_bytes)
        body = await parse_json_body(raw)
        model_raw = self.r.model_of(body)
        target = self.r.pick_node(request, body)
        if target is None:
            healthy = self.r.fleet.healthy_nodes()
            missing = [
                n for n in healthy if scoring.normalize_model(model_raw) not in n.available_names()
            ]
            target = self.r.fleet.roomiest(missing or healthy)
        if target is None:
            raise HttpError(503, "no node is online to pull to")
        node = await self.forward_simple(request, response, [target], without_node_id(raw, body))
        self.r._spawn(self.r.fleet.refresh_node(node), "refresh")

    async def h_push(self, request: Request, response: Response) -> None:
        self.r.guard_browser_mutation(request)
        await self.forward_to_holders(request, response)

    async def h_create(self, request: Request, response: Response) -> None:
        self.r.guard_browser_mutation(request)
        raw = await request.read_body(self.r.limits.max_json_bytes)
        body = await parse_json_body(raw)
        self.r.model_of(body)
        target = self.r.pick_node(request, body)
        files = body.get("files")
        if target is None and isinstance(files, dict):
            for digest in files.values():
                pinned = self.blob_pins.get(str(digest))
                if pinned in self.r.fleet.nodes:
                    target = self.r.fleet.nodes[pinned]
                    break
        if target is None and isinstance(body.get("from"), str):
            holders = self.r.fleet.nodes_with(scoring.normalize_model(body["from"]))
            target = holders[0] if holders else None
        if target is None:
            target = self.r.fleet.roomiest(self.r.fleet.healthy_nodes())
        if target is None:
            raise HttpError(503, "no node is online")
        node = await self.forward_simple(request, response, [target], without_node_id(raw, body))
        self.r._spawn(self.r.fleet.refresh_node(node), "refresh")

    async def h_blob_head(self, request: Request, response: Response) -> None:
        digest = request.path[len("/api/blobs/") :]
        pinned = self.blob_pins.get(digest)
        fleet = self.r.fleet
        candidates = [fleet.nodes[pinned]] if pinned in fleet.nodes else fleet.healthy_nodes()

        async def has(node: Node) -> bool:
            try:
                async with asyncio.timeout(self.r.config.poll_timeout_s):
                    up = await self.r.pool.request(node.url, "HEAD", request.target)
                    await up.read()
                return up.status == 200
            except (UpstreamFailure, ConnectionClosed, TimeoutError):
                return False

        found = await asyncio.gather(*(has(n) for n in candidates))
        for node, ok in zip(candidates, found, strict=True):
            if ok:
                self.blob_pins[digest] = node.node_id
                await response.send(
                    200, b"", "text/plain", [("x-herd-node", node.node_id), ("content-length", "0")]
                )
                return
        await response.send(404, b"", "text/plain")

    async def h_blob_post(self, request: Request, response: Response) -> None:
        self.r.guard_browser_mutation(request)
        digest = request.path[len("/api/blobs/") :]
        target = self.r.pick_node(request, None)
        if target is None and self.blob_pins.get(digest) in self.r.fleet.nodes:
            target = self.r.fleet.nodes[self.blob_pins[digest]]
        if target is None:
            target = self.r.fleet.roomiest(self.r.fleet.healthy_nodes())
        if target is None:
            raise HttpError(503, "no node is online to receive the blob")
        body = request.body_chunks(self.r.limits.max_upload_bytes)
        headers = upstream_headers(request)
        try:
            up = await self.r.pool.request(
                target.url,
                "POST",
                request.target,
                headers,
                body,
                head_timeout=self.r.config.first_byte_timeout_s,
            )
        except UpstreamFailure as exc:
            raise HttpError(502, f"blob upload to {target.node_id} failed: {exc.message}") from None
        if up.status < 300:
            self.blob_pins[digest] = target.node_id
        await self.relay_plain(up, response, target)

    async def broadcast(
        self, request: Request, response: Response, model_raw: str, raw: bytes
    ) -> None:
        """Send a model admin request to every healthy node holding the model."""
        model = scoring.normalize_model(model_raw)
        holders = self.r.fleet.nodes_with(model)
        if not holders:
            raise self.r.model_not_found(f"'{model_raw}'")

        async def one(node: Node) -> tuple[Node, int, bytes]:
            try:
                async with asyncio.timeout(60):
                    up = await self.r.pool.request(
                        node.url, request.method, request.target, upstream_headers(request), raw
                    )
                    data = await up.read()
                return node, up.status, data
            except (UpstreamFailure, ConnectionClosed, TimeoutError) as exc:
                return node, 502, dumps({"error": str(exc)})

        results = await asyncio.gather(*(one(n) for n in holders))
        for node, _, _ in results:
            self.r._spawn(self.r.fleet.refresh_node(node), "refresh")
        ok = [r for r in results if r[1] < 300]
        served = ",".join(r[0].node_id for r in ok)
        if ok:
            await response.send(
                200, b"", "application/json; charset=utf-8", [("x-herd-node", served)]
            )
            return
        status, data = results[0][1], results[0][2]
        await response.send(status, data, "application/json; charset=utf-8")

    async def h_copy(self, request: Request, response: Response) -> None:
        self.r.guard_browser_mutation(request)
        raw = await request.read_body(self.r.limits.max_json_bytes)
        body = await parse_json_body(raw)
        source = body.get("source")
        if not isinstance(source, str) or not isinstance(body.get("destination"), str):
            raise HttpError(400, "source and destination are required")
        await self.broadcast(request, response, source, raw)

    async def h_delete(self, request: Request, response: Response) -> None:
        self.r.guard_browser_mutation(request)
        raw = await request.read_body(self.r.limits.max_json_bytes)
        body = await parse_json_body(raw)
        await self.broadcast(request, response, self.r.model_of(body), raw)

    async def auto_pull(self, model: str, attempt: Attempt) -> bool:
        """``auto_pull`` on: a model no node has is pulled to the node with most room."""
        if attempt.kind not in ("text", "embed") or not scoring.is_valid_model_name(model):
            return False
        target = self.r.fleet.roomiest(self.r.fleet.healthy_nodes())
        if target is None:
            return False
        key = scoring.normalize_model(model)
        task = self.auto_pulls.get(key)
        if task is None:  # one pull per model at a time; concurrent callers wait on it
            log.info("request %s: auto-pulling %s to %s", attempt.request_id, model,
                     target.node_id)
            self.r.store.record_event("auto_pull", target.node_id, {"model": model})
            job: JSON = {"id": f"{target.node_id}:{key}", "node_id": target.node_id,
                         "model": model, "status": "pulling", "completed": 0, "total": 0,
                         "detail": "", "started_at": time.time(), "error": "", "auto": True}
            self.pull_jobs[job["id"]] = job
            task = self.r._spawn(self.run_pull(target, model, job), f"auto-pull-{key}")
            self.auto_pulls[key] = task
            task.add_done_callback(lambda _t: self.auto_pulls.pop(key, None))
        else:
            job = next(j for j in self.pull_jobs.values()
                       if scoring.normalize_model(str(j["model"])) == key)
            target = self.r.fleet.nodes.get(str(job["node_id"]), target)
        await asyncio.shield(task)
        ok = job["status"] == "done" and target.has_model(key)
        if not ok:
            log.warning("auto-pull of %s on %s failed: %s", model, target.node_id, job["error"])
        return ok

    async def h_dash_model_management(self, request: Request, response: Response) -> None:
        usage = await self.r.store.node_model_stats(30, now=time.time())
        last_used = {(str(u.get("node_id")), str(u.get("model"))): u for u in usage}
        nodes: list[JSON] = []
        for node in self.r.fleet.nodes.values():
            loaded = node.loaded_names()
            models: list[JSON] = []
            for name, m in node.available_models.named:
                stats = last_used.get((node.node_id, name)) or {}
                models.append({"name": m.get("name"), "size": m.get("size"),
                               "modified_at": m.get("modified_at"), "loaded": name in loaded,
                               "last_used": stats.get("last_used"),
                               "requests_30d": stats.get("requests", 0)})
            models.sort(key=lambda e: -int(e.get("size") or 0))
            disk = node.hardware.get("disk") or {}
            nodes.append({"node_id": node.node_id, "status": node.status, "models": models,
                          "disk_free_bytes": disk.get("free_bytes")
                          if isinstance(disk, dict) else None,
                          "models_bytes": sum(int(m.get("size") or 0) for m in node.available)})
        await response.json({"nodes": nodes, "pulls": list(self.pull_jobs.values())})

    def admin_target(self, body: JSON) -> tuple[Node, str]:
        node_id, model = body.get("node_id"), body.get("model")
        if not isinstance(node_id, str) or node_id not in self.r.fleet.nodes:
            raise HttpError(404, f"node {node_id!r} is not in the fleet")
        if not isinstance(model, str) or not scoring.is_valid_model_name(model):
            raise HttpError(400, "a valid model name is required")
        return self.r.fleet.nodes[node_id], model

    async def h_dash_pull_jobs(self, request: Request, response: Response) -> None:
        await response.json({"pulls": list(self.pull_jobs.values())})

    async def h_dash_pull(self, request: Request, response: Response) -> None:
        self.r.require_admin(request)
        node, model = self.admin_target(await request.json(64 * 1024))
        key = f"{node.node_id}:{scoring.normalize_model(model)}"
        job = self.pull_jobs.get(key)
        if job is not None and job["status"] == "pulling":
            await response.json(job, status=202)
            return
        job = {"id": key, "node_id": node.node_id, "model": model, "status": "pulling",
               "completed": 0, "total": 0, "detail": "", "started_at": time.time(),
               "error": ""}
        self.pull_jobs[key] = job
        self.r._spawn(self.run_pull(node, model, job), f"pull-{key}")
        self.r.store.record_event("pull", node.node_id, {"model": model})
        await response.json(job, status=202)

    async def run_pull(self, node: Node, model: str, job: JSON) -> None:
        """Pull on one node and keep the latest progress for the dashboard."""
        try:
            up = await self.r.pool.request(node.url, "POST", "/api/pull",
                                         [(b"content-type", b"application/json")],
                                         dumps({"model": model, "stream": True}),
                                         head_timeout=self.r.config.first_byte_timeout_s)
            relay = LineRelay("ndjson")
            async for chunk in up.chunks(self.r.config.stall_timeout_s):
                for line in relay.feed(chunk).splitlines():
                    with contextlib.suppress(ValueError):
                        obj = json.loads(line)
                        if isinstance(obj, dict):
                            if obj.get("error"):
                                job["error"] = str(obj["error"])
                            job["detail"] = str(obj.get("status") or "")
                            if isinstance(obj.get("total"), int):
                                job["total"] = obj["total"]
                                job["completed"] = int(obj.get("completed") or 0)
            if up.status >= 400 and not job["error"]:
                job["error"] = f"node answered {up.status}"
            job["status"] = "failed" if job["error"] else "done"
        except (UpstreamFailure, ConnectionClosed, TimeoutError) as exc:
            job["status"], job["error"] = "failed", str(exc)
        job["finished_at"] = time.time()
        await self.r.fleet.refresh_node(node)

    async def h_dash_delete(self, request: Request, response: Response) -> None:
        self.r.require_admin(request)
        node, model = self.admin_target(await request.json(64 * 1024))
        try:
            up = await self.r.pool.request(node.url, "DELETE", "/api/delete",
                                         [(b"content-type", b"application/json")],
                                         dumps({"model": model}), head_timeout=60)
            data = await up.read()
        except (UpstreamFailure, ConnectionClosed, TimeoutError) as exc:
            raise HttpError(502, f"delete on {node.node_id} failed: {exc}") from None
        await self.r.fleet.refresh_node(node)
        self.r.store.record_event("delete", node.node_id, {"model": model, "status": up.status})
        if up.status >= 400:
            await response.send(up.status, data or dumps({"error": "delete failed"}),
                                "application/json; charset=utf-8")
            return
        await response.json({"ok": True, "node_id": node.node_id, "model": model})


class Admission:
    """Admission: the per node:model slot queues, the requests waiting for a slot (FIFO,
    woken when the fleet changes) and pre-warming the runner-up. Owns the queues, the
    waiters and the pre-warms in flight; asks the router for the fleet and the scores."""

    def __init__(self, router: Router) -> None:
        self.r = router
        self.queues: dict[tuple[str, str], SlotQueue] = {}
        self.node_in_flight: dict[str, int] = {}  # every queue's in_flight, summed by node
        self.queue_view = QueueView(self.queues)
        self.waiters: dict[int, Waiter] = {}  # every request waiting for a slot, by arrival
        self.waiter_seq = 0
        self.prewarming: set[tuple[str, str]] = set()
        self.score_memo = scoring.ScoreMemo()  # factors kept from request to request

    def _wake_waiters(self) -> None:
        """The fleet changed (node state, models, memory): every waiter re-scores, in arrival
        order, keeping its place in the queues it still wants."""
        for w in self.waiters.values():
            w.wake()

    def queue_for(self, node_id: str, model: str, kind: str) -> SlotQueue:
        key = (node_id, model)
        q = self.queues.get(key)
        node = self.r.fleet.nodes.get(node_id)
        slots = 1
        sure = 0
        if node is not None and kind in ("image", "stt"):
            slots = self.r.jobs.capability_slots(node, kind, model)
        elif node is not None:  # configured > reported > learned parallelism
            configured = self.r.config.slots.get(node_id)
            if configured or node.num_parallel:  # told: what is learned does not count
                slots = scoring.slots_for(node.num_parallel, configured, self.r.policy, None)
            else:  # learned: only what ran at once is sure, the rest is a probe
                learned, seen = self.r.learner.slots_and_sure(node_id, model)
                slots = scoring.slots_for(None, None, self.r.policy, learned)
                sure = min(slots, seen)
        if q is None:
            q = self.queues[key] = SlotQueue(node_id=node_id, model=model, kind=kind, slots=slots,
                                             node_in_flight=self.node_in_flight)
        elif q.slots != slots:
            q.resize(slots)  # more slots: hand them to waiters at once
        q.sure = sure
        return q

    def _queue_snapshots(self, model: str, kind: str) -> QueueView:
        """The queues as scoring reads them, each ``model``'s queue up to date (its slots);
        a queue is snapshotted only when scoring looks it up."""
        if kind in ("image", "stt"):
            for node in self.r.jobs.capability_models(kind).get(model, []):
                self.queue_for(node.node_id, model, kind)
        else:
            for node in self.r.fleet.nodes.values():
                if node.has_model(model):
                    self.queue_for(node.node_id, model, kind)
        return self.queue_view

    async def acquire(
        self, rreq: scoring.RouteRequest, snaps: list[scoring.NodeSnapshot] | None = None
    ) -> tuple[Node, SlotQueue, scoring.Choice, float]:
        """A slot on the best node, or wait in arrival order (FIFO) for one.

        A waiter sits in the queues of every node it would take (``scoring.wait_targets``);
        a freed slot is handed to the longest-waiting one there, which dispatches without
        re-scoring. It re-scores only when the fleet changes, at its deadline, or when a
        handed slot turns out unusable (it passes the slot on and keeps its place).
        ``snaps``: a fleet snapshot taken a moment ago, for the first choice only.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        waiter: Waiter | None = None
        deadline: asyncio.TimerHandle | None = None
        q_wait: SlotQueue | None = None  # the queue counting us as pending
        choice: scoring.Choice | None = None
        try:
            while True:
                now = time.time()
                granted = waiter.take() if waiter is not None else None
                if granted is not None:
                    node = self.r.fleet.nodes.get(granted.node_id)
                    if (
                        choice is not None
                        and node is not None
                        and self._slot_usable(node, rreq.model, now)
                    ):
                        picked = dataclasses.replace(
                            choice, action="dispatch", node_id=node.node_id,
                            reason=f"slot handed over in arrival order ({choice.reason})",
                        )
                        return self._dispatched(node, granted, rreq, picked, now, start)
                    granted.release()  # not usable after all: the next waiter's
                if snaps is None:
                    snaps = self.r.fleet._snapshots(now)
                queues = self._queue_snapshots(rreq.model, rreq.kind)
                choice = scoring.choose(
                    rreq,
                    snaps,
                    queues,
                    self.r.fleet.stats_view(),
                    self.r.fleet.breakers,
                    now,
                    self.r.rng.random(),
                    self.r.policy,
                    waited_s=(
                        self.r.policy.max_queue_wait_s
                        if waiter is not None and waiter.expired
                        else loop.time() - start
                    ),
                    node_in_flight=self.node_in_flight,
                    memo=self.score_memo,
                )
                self.maybe_prewarm(rreq, choice, queues, snaps)
                snaps = None  # after a wait, the next round takes a fresh snapshot
                if choice.action == "dispatch" and choice.node_id in self.r.fleet.nodes:
                    node = self.r.fleet.nodes[choice.node_id]
                    q = self.queue_for(node.node_id, rreq.model, rreq.kind)
                    if waiter is not None:
                        waiter.leave()
                    q.take()
                    return self._dispatched(node, q, rreq, choice, now, start)
                if choice.action != "wait":
                    raise Rejected(choice, choice.reason)
                if waiter is None:
                    self.waiter_seq += 1
                    waiter = self.waiters[self.waiter_seq] = Waiter(self.waiter_seq)
                    deadline = loop.call_at(start + self.r.policy.max_queue_wait_s, waiter.expire)
                want = choice.wait_for
                if q_wait is None or q_wait.node_id != want:
                    if q_wait is not None:
                        q_wait.pending -= 1
                    q_wait = self.queue_for(want, rreq.model, rreq.kind) if want else None
                    if q_wait is not None:
                        q_wait.pending += 1
                targets = scoring.wait_targets(choice, self.r.policy)
                waiter.register(
                    self.queue_for(n, rreq.model, rreq.kind)
                    for n in targets if n in self.r.fleet.nodes
                )
                await waiter.wait()
        finally:
            if deadline is not None:
                deadline.cancel()
            if waiter is not None:
                del self.waiters[waiter.seq]
                waiter.leave()  # a slot handed over but not taken goes on
            if q_wait is not None:
                q_wait.pending -= 1

    def _slot_usable(self, node: Node, model: str, now: float) -> bool:
        """A handed-over slot is still worth taking (fleet changes re-score everyone; this
        catches what changed since without scoring: status and breakers)."""
        if node.status in scoring.UNROUTABLE_STATUSES or not node.reachable:
            return False
        return all(
            scoring.breaker_allows(self.r.fleet.breakers.get(key), now)
            for key in (node.node_id, f"{node.node_id}:{model}")
        )

    def _dispatched(
        self, node: Node, q: SlotQueue, rreq: scoring.RouteRequest, choice: scoring.Choice,
        now: float, start: float,
    ) -> tuple[Node, SlotQueue, scoring.Choice, float]:
        if rreq.kind in ("text", "embed") and rreq.model not in node.loaded_names():
            node.loading.setdefault(rreq.model, now)
            self.r.fleet.note_evictions(node, rreq, self._queue_snapshots(rreq.model, rreq.kind),
                                        now)
        self.r.fleet.breakers_probe(node.node_id, rreq.model, now)
        return node, q, choice, (asyncio.get_running_loop().time() - start) * 1000

    def forget_node(self, node_id: str) -> None:
        """Its idle queues go; a busy one stays until a later departure finds it idle."""
        for key in [k for k, q in self.queues.items()
                    if k[0] == node_id and not (q.in_flight or q.pending or q.waiters)]:
            del self.queues[key]
        if not self.node_in_flight.get(node_id):
            self.node_in_flight.pop(node_id, None)

    def release(self, q: SlotQueue, ok: bool) -> None:
        if ok:
            q.done += 1
        else:
            q.failed += 1
        q.release()

    def maybe_prewarm(self, rreq: scoring.RouteRequest, choice: scoring.Choice,
                      queues: Mapping[tuple[str, str], scoring.QueueSnapshot],
                      snaps: Sequence[scoring.NodeSnapshot]) -> None:
        """A deep queue on the winner: load the model on the runner-up before it is needed."""
        if rreq.kind not in ("text", "embed"):
            return
        target = scoring.prewarm_target(rreq, choice, queues, self.r.policy, snaps)
        if target is None or target not in self.r.fleet.nodes:
            return
        key = (target, rreq.model)
        if key in self.prewarming:
            return
        self.prewarming.add(key)
        node = self.r.fleet.nodes[target]
        # a load like any other: it queues behind loads under way there (serial loads),
        # requests for it join it, and what it evicts stops counting as hot
        now = time.time()
        node.loading.setdefault(rreq.model, now)
        self.r.fleet.note_evictions(node, rreq, queues, now)
        self.r._spawn(self.prewarm(node, rreq.model, rreq.kind), "prewarm")

    async def prewarm(self, node: Node, model: str, kind: str) -> None:
        path = "/api/embed" if kind == "embed" else "/api/generate"
        body: JSON = {"model": model} if kind != "embed" else {"model": model, "input": ""}
        log.info("pre-warming %s on %s (queue is deep elsewhere)", model, node.node_id)
        try:
            async with asyncio.timeout(self.r.config.first_byte_timeout_s):
                up = await self.r.pool.request(node.url, "POST", path,
                                             [(b"content-type", b"application/json")],
                                             dumps(body))
                await up.read()
            if up.status == 200:
                self.r.fleet.mark_loaded(node, model, None, time.time())
                self.r.store.record_event("prewarm", node.node_id, {"model": model})
        except (UpstreamFailure, ConnectionClosed, TimeoutError) as exc:
            log.info("pre-warm of %s on %s failed: %s", model, node.node_id, exc)
        finally:
            node.load_done(model)  # loaded, or failed: no load of it under way either way
            self.prewarming.discard((node.node_id, model))
            self._wake_waiters()


class Learner:
    """What herd learns by watching nodes work, and owns: parallel slots per node:model and
    per node (Ollama's own durations against herd's in-flight count at dispatch), memory
    capacity and keep-alive per node (from successive /api/ps readings) and prompt-cache
    affinity (which node holds which prompt prefix in its KV cache). The learning rules are
    scoring's pure functions; this is their state and glue. Learned facts outlive a node's
    absence (a re-approved node keeps them)."""

    def __init__(self, policy: scoring.Policy, configured_slots: Mapping[str, int]) -> None:
        self.policy = policy
        self.configured_slots = configured_slots  # --slots: facts win over learning
        self.slot_bounds: dict[tuple[str, str], scoring.SlotBounds] = {}
        self.node_slot_bounds: dict[str, scoring.SlotBounds] = {}
        self.memory_bounds: dict[str, scoring.MemoryBounds] = {}
        self.ps_seen: dict[str, Mapping[str, scoring.LoadedModel]] = {}
        self.run_ends: dict[tuple[str, str], deque[float]] = {}  # monotonic ends of answers
        self.affinity: OrderedDict[str, scoring.AffinityEntry] = OrderedDict()
        self.affinity_writes = 0
        # facts restored from the store at start (LearningKeeper), (kind, key) -> the object
        # restored: a fact still that object was not observed again in this run
        self.restored: dict[tuple[str, object], object] = {}

    def _slot_bounds_for(self, node_id: str, model: str) -> scoring.SlotBounds | None:
        """The node:model's bounds, or the node's best-evidenced ones before it has any; a
        rarely used model's lower bound is lifted to what the node has shown
        (``scoring.lift_slot_bounds``)."""
        b = self.slot_bounds.get((node_id, model))
        nb = self.node_slot_bounds.get(node_id)
        if b is None or b.n == 0:
            return nb
        return scoring.lift_slot_bounds(b, nb) if nb is not None else b

    def learned_slots(self, node_id: str, model: str) -> int | None:
        return scoring.learned_slots(self._slot_bounds_for(node_id, model), time.time(),
                                     self.policy)

    def slots_and_sure(self, node_id: str, model: str) -> tuple[int | None, int]:
        """``learned_slots`` and ``sure_slots`` from one lookup of the bounds (every
        request asks both of every node that has its model)."""
        b = self._slot_bounds_for(node_id, model)
        return scoring.learned_slots(b, time.time(), self.policy), scoring.sure_slots(b)

    def learn_memory(self, node: Node, now: float) -> None:
        """Fold a fresh /api/ps reading into what the node's memory is known to hold."""
        after = unexpired(node.ps_listed.models, now)  # draining ones too
        before = self.ps_seen.get(node.node_id, {})
        self.ps_seen[node.node_id] = after
        self.memory_bounds[node.node_id] = scoring.learn_memory(
            self.memory_bounds.get(node.node_id), before, after, now, self.policy)

    def learn_timings(self, attempt: Attempt, node_id: str, model: str, final: JSON | None,
                      m: Mapping[str, Any]) -> None:
        """Ollama's own durations against herd's in-flight count at dispatch: slot bounds."""
        key = (node_id, model)
        end = time.monotonic()
        ends = self.run_ends.get(key)
        if ends is None:
            ends = self.run_ends[key] = deque(maxlen=256)
        total = final.get("total_duration") if final else None
        if (isinstance(total, int | float) and not isinstance(total, bool)
                and attempt.dispatch_k > 0):
            pe, ev = float(m["prompt_eval_ms"] or 0.0), float(m["eval_ms"] or 0.0)
            queue_ms = scoring.hidden_queue_ms(total / 1e6, float(m["load_ms"] or 0.0), pe, ev,
                                               attempt.dispatch_hot)
            if queue_ms is not None:
                run_start = end - (pe + ev) / 1000.0
                tol = 0.25 + 0.02 * queue_ms / 1000.0
                finished, freed = ended_since(ends, attempt.dispatch_mono, run_start, tol)
                clean_k = attempt.dispatch_k - finished
                if not attempt.dispatch_hot:  # a load's wait may hide a slot wait: k=1 only
                    clean_k = min(clean_k, 1)
                self.slot_bounds[key] = scoring.learn_slots(
                    self.slot_bounds.get(key), concurrency=attempt.dispatch_k,
                    concurrency_clean=clean_k, queue_ms=queue_ms, work_ms=pe + ev,
                    now=time.time(), policy=self.policy, started_as_one_ended=freed)
                self.node_slot_bounds[node_id] = scoring.node_slot_bounds(
                    [b for (n, _m), b in self.slot_bounds.items() if n == node_id])
        ends.append(end)

    def remember_prefix(self, key: str, node_id: str, tokens: int, now: float) -> None:
        """Prompt-cache affinity: this prefix now lives in that node's KV cache."""
        self.affinity[key] = scoring.AffinityEntry(node_id, now, tokens)
        self.affinity.move_to_end(key)
        self.affinity_writes += 1
        if (len(self.affinity) > self.policy.affinity_max_entries
                or self.affinity_writes % 1024 == 0):
            for k in scoring.affinity_evictions(self.affinity, now, self.policy):
                self.affinity.pop(k, None)

    def restore_state(self, facts: Iterable[store.LearnedFact], stats: StatsTable,
                      now: float) -> RestoredLearning:
        """Install what an earlier run learned (rows of the store's ``learned_facts``, oldest
        first) into the tables here and ``stats`` (``Fleet.stats``). A row that does not
        parse (another herd version, edited by hand) is skipped with a log line; an affinity
        entry past its TTL is dropped."""
        out = RestoredLearning()
        hints = {kind: typing.get_type_hints(cls) for kind, cls in LEARNED_TYPES.items()}
        affinity: list[tuple[str, scoring.AffinityEntry]] = []
        for f in facts:
            try:
                key = learned_key(f.kind, f.key)
                value = learned_value(LEARNED_TYPES[f.kind], hints[f.kind], f.value)
            except (KeyError, ValueError) as exc:
                log.warning("learning: skipped a saved %s fact %r: %s", f.kind, f.key,
                            exc if not isinstance(exc, KeyError) else "unknown kind")
                out.skipped.append((f.kind, f.key))
                continue
            if isinstance(value, scoring.SlotBounds) and isinstance(key, tuple):
                self.slot_bounds[key] = value
            elif isinstance(value, scoring.MemoryBounds) and isinstance(key, str):
                self.memory_bounds[key] = value
            elif isinstance(value, scoring.ServiceStats) and isinstance(key, tuple):
                stats[key] = value
            elif isinstance(value, scoring.AffinityEntry) and isinstance(key, str):
                if now - value.at > self.policy.affinity_ttl_s:
                    out.skipped.append((f.kind, f.key))  # stale: no node still caches it
                    continue
                affinity.append((key, value))
                continue
            self.restored[(f.kind, key)] = value
        for key, entry in sorted(affinity, key=lambda ke: ke[1].at):  # LRU order: oldest first
            self.affinity[key] = entry
        for k in scoring.affinity_evictions(self.affinity, now, self.policy):
            self.affinity.pop(k, None)
        slot_nodes = {n for n, _m in self.slot_bounds}
        for node_id in slot_nodes:
            self.node_slot_bounds[node_id] = scoring.node_slot_bounds(
                [b for (n, _m), b in self.slot_bounds.items() if n == node_id])
        out.slots = len(self.slot_bounds)
        out.memory = len(self.memory_bounds)
        out.stats = len(stats)
        out.affinity = len(self.affinity)
        out.nodes = len(slot_nodes | set(self.memory_bounds) | {n for n, _m in stats})
        return out

    def is_restored(self, kind: str, key: object, value: object) -> bool:
        """Whether ``value`` (a fact now) is still what was restored at start."""
        was = self.restored.get((kind, key))
        if was is None or was is value:
            return was is not None
        if isinstance(was, scoring.MemoryBounds) and isinstance(value, scoring.MemoryBounds):
            # polls replace the object; the bounds are the earlier run's until they change
            return (was.fits, was.evicts_at, was.model_cap) == (
                value.fits, value.evicts_at, value.model_cap)
        return False

    def learned_public(
        self, node: Node, stats: Mapping[tuple[str, str], scoring.ServiceStats], now: float
    ) -> JSON:
        """What herd has learned about a node, and how sure it is (for /fleet/status)."""
        configured = self.configured_slots.get(node.node_id)
        nb = self.node_slot_bounds.get(node.node_id)
        source = ("configured" if configured else "reported" if node.num_parallel
                  else "learned" if nb is not None and nb.n else "probing")
        models: dict[str, JSON] = {}
        for (nid, model), b in self.slot_bounds.items():
            if nid == node.node_id:
                models.setdefault(model, {})["slots"] = {
                    **b.to_dict(now, self.policy),
                    "restored": self.is_restored(LEARNED_SLOTS, (nid, model), b),
                }
        for (nid, model), st in stats.items():
            if nid != node.node_id:
                continue
            models.setdefault(model, {}).update({
                "stats_restored": self.is_restored(LEARNED_STATS, (nid, model), st),
                "load_s": round(st.load_ms_ewma / 1000, 2) if st.load_n else None,
                "loads_seen": st.load_n,
                "prefill_tokens_per_s": round(st.prompt_tps_ewma, 1) or None,
                "decode_tokens_per_s": round(st.eval_tps_ewma, 1) or None,
                "answer_tokens": round(st.completion_tokens_ewma) or None,
                "samples": st.count - st.failures,
            })
        mb = self.memory_bounds.get(node.node_id)
        slow, slow_learned = scoring.stream_slowdown(node.node_id, stats, self.policy)
        return {
            "decode_slowdown": {  # each other stream on the node slows a new one by this
                "per_stream": round(slow, 3),
                "basis": "learned" if slow_learned else "prior",
            },
            "slots": {
                "source": source,
                "in_use": scoring.slots_for(node.num_parallel, configured, self.policy,
                                            self.learned_slots(node.node_id, "")),
                **(nb.to_dict(now, self.policy) if nb is not None else {"observations": 0}),
            },
            "memory": None if mb is None else {
                **mb.to_dict(now, self.policy),
                "restored": self.is_restored(LEARNED_MEMORY, node.node_id, mb),
            },
            "models": models,
        }


# What the Learner and Fleet.stats learned, kept across restarts (LearningKeeper): the kind
# of each table in the store's learned_facts, and the frozen type of its facts.
LEARNED_SLOTS, LEARNED_MEMORY, LEARNED_STATS, LEARNED_AFFINITY = (
    "slots", "memory", "stats", "affinity")
LEARNED_TYPES: Mapping[str, Callable[..., object]] = MappingProxyType({
    LEARNED_SLOTS: scoring.SlotBounds,  # key: [node_id, model]
    LEARNED_MEMORY: scoring.MemoryBounds,  # key: node_id
    LEARNED_STATS: scoring.ServiceStats,  # key: [node_id, model]
    LEARNED_AFFINITY: scoring.AffinityEntry,  # key: the prompt-prefix hash
})
LEARNED_PAIR_KINDS = frozenset({LEARNED_SLOTS, LEARNED_STATS})
LEARNED_MAX_ROWS = 10_000  # rows kept per kind (affinity: its bound in Policy)


@dataclass(slots=True)
class RestoredLearning:
    """What ``Learner.restore_state`` put back (counts of facts) and the rows it skipped."""

    nodes: int = 0
    slots: int = 0
    memory: int = 0
    stats: int = 0
    affinity: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def learned_key(kind: str, raw: str) -> tuple[str, str] | str:
    """A table's key from its ``learned_facts`` text: ``[node_id, model]`` or the text."""
    if kind not in LEARNED_PAIR_KINDS:
        return raw
    try:
        pair = json.loads(raw)
    except ValueError:
        pair = None
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
        raise ValueError(f"key {raw!r} is not [node_id, model]")
    return (pair[0], pair[1])


def learned_key_text(key: object) -> str:
    """The ``learned_facts`` text of a table's key (``learned_key`` reads it back)."""
    return json.dumps(list(key)) if isinstance(key, tuple) else str(key)


def learned_value(cls: Callable[..., object], hints: Mapping[str, Any], raw: object) -> object:
    """A frozen dataclass of learned state from the JSON object of its fields. A field an
    older herd did not write takes its default; a field this herd does not know, a number
    that is negative, not finite or of the wrong type, is a ValueError (the row is
    skipped)."""
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ValueError(f"unknown fields {unknown}")
    values: dict[str, object] = {}
    for name, value in raw.items():
        want = hints[name]
        if ((want is str and isinstance(value, str))
                or (want is int and type(value) is int and value >= 0)):
            values[name] = value
        elif want is float and _finite_number(value):
            values[name] = float(cast(float, value))
        elif (want not in (str, int, float) and isinstance(value, dict)
              and all(isinstance(k, str) and _finite_number(v) for k, v in value.items())):
            values[name] = {k: float(v) for k, v in value.items()}  # name -> epoch s
        else:
            kind = getattr(want, "__name__", want)
            raise ValueError(f"field {name}: {value!r} is not a valid {kind}")
    try:
        return cls(**values)
    except TypeError as exc:  # a field without a default is missing
        raise ValueError(str(exc)) from None


def _finite_number(value: object) -> bool:
    """A JSON number (not a bool) that is finite and not negative."""
    return type(value) in (int, float) and math.isfinite(cast(float, value)) and cast(
        float, value) >= 0


class LearningKeeper:
    """What herd learned (``Learner``: slot and memory bounds, prompt-cache affinity;
    ``Fleet.stats``) survives a restart, as rows of the store's ``learned_facts``.

    Restored once at start, before the listener opens; saved every
    ``Config.learning_save_interval_s`` by a background task and once at a clean stop. A
    save sends only what changed since the last committed save, found without serialising
    anything on the loop: learned state is frozen objects, replaced on every change, so for
    slots, memory and stats (a few per node:model) identity against the last save tells;
    the affinity map (up to ``Policy.affinity_max_entries``) is in write order, so the
    entries written since are its last ``Learner.affinity_writes`` - (writes then). The
    store's writer thread serialises and writes them. Rows are bounded per kind
    (``limits``): age (``Config.learning_max_age_s``; affinity its TTL) and count."""

    def __init__(self, router: Router) -> None:
        self.r = router
        self.saved: dict[str, dict[object, object]] = {}  # kind -> key -> object committed
        self.affinity_writes = 0  # Learner.affinity_writes at the last committed save
        self.gone: list[tuple[str, str]] = []  # rows to delete at the next save
        self.restored: RestoredLearning | None = None  # None: not restored (off, or no start)
        self.saves = 0
        self.facts_written = 0
        self.lock = asyncio.Lock()

    def tables(self) -> dict[str, Mapping[Any, object]]:
        """The learned tables kept by identity diff (the affinity map is kept by order)."""
        learner = self.r.learner
        return {LEARNED_SLOTS: learner.slot_bounds, LEARNED_MEMORY: learner.memory_bounds,
                LEARNED_STATS: self.r.fleet.stats}

    def limits(self) -> dict[str, tuple[float, int]]:
        """kind -> (max age s, max rows) of ``learned_facts``."""
        age, policy = self.r.config.learning_max_age_s, self.r.policy
        return {**dict.fromkeys(self.tables(), (age, LEARNED_MAX_ROWS)),
                LEARNED_AFFINITY: (min(age, policy.affinity_ttl_s),
                                   policy.affinity_max_entries)}

    def changes(self) -> tuple[dict[str, dict[object, object]], list[tuple[str, str]],
                               dict[str, dict[object, object]], int]:
        """(kind -> {key: fact} changed since the last save, (kind, key text) gone, the
        identity-kept tables as of now, the affinity write count as of now)."""
        snapshot = {kind: dict(table) for kind, table in self.tables().items()}
        changed: dict[str, dict[object, object]] = {}
        gone = list(self.gone)
        for kind, current in snapshot.items():
            saved = self.saved.get(kind, {})
            new = changed[kind] = {k: v for k, v in current.items() if saved.get(k) is not v}
            added = sum(1 for k in new if k not in saved)
            if len(saved) + added > len(current):  # some keys went
                gone += ((kind, learned_key_text(k)) for k in saved.keys() - current.keys())
        learner = self.r.learner
        writes = learner.affinity_writes
        recent = min(writes - self.affinity_writes, len(learner.affinity))
        # every key written since is among the last `recent` (each write moved it to the
        # end); evicted ones age out of the table by the affinity limits
        changed[LEARNED_AFFINITY] = dict(
            itertools.islice(reversed(learner.affinity.items()), max(0, recent)))
        return changed, gone, snapshot, writes

    async def facts(self, changed: Mapping[str, Mapping[object, object]], now: float,
                    chunk: int = 250) -> list[store.LearnedFact]:
        """The store's rows for ``changed``, built ``chunk`` at a time with the loop free
        in between (frozen objects in this call's own dicts: nothing changes meanwhile)."""
        out: list[store.LearnedFact] = []
        for kind, table in changed.items():
            for key, value in table.items():
                node_id, at = ((value.node_id, value.at)  # an entry ages from its last use
                               if isinstance(value, scoring.AffinityEntry)
                               else (key[0] if isinstance(key, tuple) else str(key), now))
                out.append(store.LearnedFact(kind, learned_key_text(key), node_id, value, at))
                if len(out) % chunk == 0:
                    await asyncio.sleep(0)
        return out

    async def restore(self, now: float) -> RestoredLearning:
        facts = await self.r.store.load_learned(now=now, limits=self.limits())
        got = self.r.learner.restore_state(facts, self.r.fleet.stats, now)
        self.restored = got
        self.gone = list(got.skipped)
        self.saved = {kind: dict(table) for kind, table in self.tables().items()}
        self.affinity_writes = self.r.learner.affinity_writes
        log.info("restored learning for %d nodes: slots for %d models, memory for %d nodes, "
                 "%d affinity entries, service stats for %d node:models%s",
                 got.nodes, got.slots, got.memory, got.affinity, got.stats,
                 f" ({len(got.skipped)} saved facts skipped)" if got.skipped else "",
                 extra={"nodes": got.nodes, "slots": got.slots, "memory": got.memory,
                        "affinity": got.affinity, "stats": got.stats,
                        "skipped": len(got.skipped)})
        return got

    async def save(self) -> int:
        """Write what changed since the last save; the number of facts written (0 when
        nothing changed or the store failed, which it logged)."""
        async with self.lock:  # the periodic save and the one at stop never interleave
            now = time.time()
            changed, gone, snapshot, writes = self.changes()
            if not gone and not any(changed.values()):
                return 0
            facts = await self.facts(changed, now)
            if not await self.r.store.save_learned(facts, gone, now=now, limits=self.limits()):
                return 0
            self.saved, self.affinity_writes, self.gone = snapshot, writes, []
            self.saves += 1
            self.facts_written += len(facts)
            return len(facts)

    async def run(self) -> None:
        """The background task: save every ``learning_save_interval_s``."""
        while True:
            await asyncio.sleep(max(0.05, self.r.config.learning_save_interval_s))
            await self.save()


class Consent:
    """Who may join the fleet (issue 18): agent nodes held while they wait for an operator's
    approval or after a rejection (never routed to), the operator's decisions (store table
    ``node_admissions``), this machine's own addresses (an agent here needs no approval),
    and the approve / reject endpoints. A held node that is approved joins ``Fleet.nodes``.
    """

    def __init__(self, router: Router, fleet: Fleet) -> None:
        self.r = router
        self.fleet = fleet
        self.held_nodes: dict[str, Node] = {}
        self.admissions: dict[str, JSON] = {}
        self.own_addrs: frozenset[str] = frozenset()
        self.own_addrs_at = 0.0

    async def load_admissions(self) -> None:
        self.admissions = await self.r.store.node_admissions()
        await self.refresh_own_addresses(time.time())
        if self.r.config.open_fleet:
            log.warning(
                "open fleet (--open-fleet): any host that can reach this router may join as a "
                "node and receive prompts, without approval"
            )

    async def refresh_own_addresses(self, now: float) -> None:
        if self.own_addrs_at and 0 <= now - self.own_addrs_at < 30.0:
            return
        self.own_addrs_at = now
        self.own_addrs = await asyncio.to_thread(own_addresses)

    def is_own_address(self, host: str) -> bool:
        """A loopback address or one of this machine's own (no DNS: names never are, but
        ``localhost``)."""
        if host == "localhost":
            return True
        try:
            ip = ipaddress.ip_address(host.strip("[]").split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_loopback or str(ip) in self.own_addrs

    def is_local_agent(self, addr: str, url: str) -> bool:
        """An agent on the router's own machine: it beats from here and its Ollama is here."""
        return self.is_own_address(addr) and self.is_own_address(urlsplit(url).hostname or "")

    def local_beat(self, raw: bytes, addr: str) -> bool:
        try:
            beat = json.loads(raw)
            return isinstance(beat, dict) and self.is_local_agent(
                addr, normalize_url(str(beat.get("ollama_url"))))
        except ValueError:
            return False

    def admission_of(self, node_id: str, addr: str, url: str, *, signed: bool) -> tuple[str, str]:
        """``approved`` / ``pending`` / ``rejected`` for a beat, and why."""
        if signed:
            return "approved", "signed with the fleet key"
        if self.is_local_agent(addr, url):
            return "approved", "agent on the router's own machine"
        if self.r.config.open_fleet:
            return "approved", "open fleet (--open-fleet)"
        record = self.admissions.get(node_id)
        if record is None:
            return "pending", "new node: an operator has to approve it"
        if record.get("decision") == "rejected":
            return "rejected", "rejected by an operator"
        if record.get("addr") != addr:
            return "pending", f"address changed from {record.get('addr')} to {addr} since approval"
        if record.get("ollama_url") != url:
            return "pending", (f"Ollama URL changed from {record.get('ollama_url')} to {url} "
                               "since approval")
        return "approved", "approved by an operator"

    def hold_node(self, node_id: str, addr: str, url: str, now: float, state: str,
                  why: str) -> Node:
        """The node a held beat updates: out of routing (at once, if it was in the fleet)."""
        node = self.fleet.nodes.pop(node_id, None)
        if node is not None:
            self.r.store.record_event("node_left", node_id, {"reason": why})
            self.fleet.on_change()
            self.fleet.on_node_gone(node_id)
        else:
            node = self.held_nodes.get(node_id)
        if node is None:
            stale = [k for k, n in self.held_nodes.items() if now - n.last_seen > 86400]
            for k in stale:
                del self.held_nodes[k]
            if len(self.held_nodes) >= MAX_HELD_NODES:  # bounded: the longest silent goes
                quiet = min(self.held_nodes.values(), key=lambda n: n.last_seen)
                del self.held_nodes[quiet.node_id]
            node = Node(node_id=node_id, url=url, source="agent", first_seen=now)
        if node_id not in self.held_nodes or (node.status, node.agent_addr, node.url) != (
                state, addr, url):
            node.held_since, node.held_reason = now, why
            if state == "pending":
                log.warning("node %s from %s (Ollama %s) waits for approval: %s; it gets no "
                            "requests until approved (dashboard, or POST "
                            "/dashboard/api/nodes/approve)", node_id, addr, url, why)
            else:
                log.info("node %s from %s is rejected: it gets no requests", node_id, addr)
            self.r.store.record_event(f"node_{state}", node_id,
                                    {"addr": addr, "url": url, "reason": why})
        self.held_nodes[node_id] = node
        return node

    def held_public(self, now: float) -> list[JSON]:
        """Held nodes for /fleet/status and the dashboard (pending first, oldest first), and
        rejected node ids that have not beaten since the router started."""
        out: list[JSON] = []
        for n in self.held_nodes.values():
            gpu = n.hardware.get("gpu")
            devices = gpu.get("devices") if isinstance(gpu, dict) else None
            out.append({
                "node_id": n.node_id, "state": n.status, "reason": n.held_reason,
                "addr": n.agent_addr, "ollama_url": n.url, "first_seen": n.first_seen,
                "waiting_since": n.held_since, "last_seen": n.last_seen,
                "seconds_since_seen": round(now - n.last_seen, 3) if n.last_seen else None,
                "agent_version": n.agent_version, "ollama_version": n.version,
                "hardware": {
                    "arch": n.hardware.get("arch"), "chip": n.hardware.get("chip"),
                    "cpu": n.hardware.get("cpu"), "memory": n.hardware.get("memory"),
                    "gpus": [d.get("name") for d in devices if isinstance(d, dict)]
                    if isinstance(devices, list) else [],
                },
                "models": sorted(n.available_names()),
                "loaded_models": sorted(n.loaded_names()),
            })
        for node_id, record in self.admissions.items():
            if record.get("decision") == "rejected" and node_id not in self.held_nodes \
                    and node_id not in self.fleet.nodes:
                out.append({
                    "node_id": node_id, "state": "rejected", "reason": "rejected by an operator",
                    "addr": record.get("addr"), "ollama_url": record.get("ollama_url"),
                    "first_seen": None, "waiting_since": record.get("decided_at"),
                    "last_seen": None, "seconds_since_seen": None, "agent_version": "",
                    "ollama_version": "", "hardware": {}, "models": [], "loaded_models": [],
                })
        out.sort(key=lambda e: (e["state"] != "pending", e["waiting_since"] or 0.0))
        return out

    async def _decide(self, request: Request, decision: str) -> tuple[str, str, str]:
        """Admin guard and body of approve/reject: the node id and the binding decided."""
        self.r.require_admin(request)
        body = await request.json(64 * 1024)
        node_id = body.get("node_id")
        if not valid_node_id(node_id):
            raise HttpError(400, "node_id must match [A-Za-z0-9._-]{1,64}")
        assert isinstance(node_id, str)
        held = self.held_nodes.get(node_id)
        record = self.admissions.get(node_id)
        live = self.fleet.nodes.get(node_id)
        if held is not None:
            addr, url = held.agent_addr, held.url
        elif live is not None and decision == "rejected":
            if live.source != "agent":
                raise HttpError(409, f"node '{node_id}' is a --node/local node: remove it from "
                                     "the router's configuration instead")
            if record is None or record.get("decision") != "approved":
                raise HttpError(409, f"node '{node_id}' joined without approval (fleet key, this "
                                     "machine or open fleet): stop its agent instead")
            addr, url = live.agent_addr, live.url
        elif record is not None and record.get("decision") == "rejected":
            addr, url = str(record.get("addr") or ""), str(record.get("ollama_url") or "")
        else:
            raise HttpError(404, f"node '{node_id}' is not waiting for approval")
        if decision == "approved":
            # what the operator saw is what gets approved: a stranger that took over the
            # pending id in the meantime is not approved by a stale click
            for key, have in (("addr", addr), ("ollama_url", url)):
                given = body.get(key)
                if not isinstance(given, str):
                    raise HttpError(400, f"{key} is required: the {key} you are approving "
                                         "(see pending_nodes in /fleet/status)")
                if given != have:
                    raise HttpError(409, f"node '{node_id}' now has {key} {have}, not {given}: "
                                         "check it again before approving")
        now = time.time()
        await self.r.store.set_node_admission(node_id, decision, addr=addr, ollama_url=url, now=now)
        self.admissions[node_id] = {"node_id": node_id, "decision": decision, "addr": addr,
                                    "ollama_url": url, "decided_at": now}
        log.info("node %s %s by an operator (%s, %s)", node_id, decision, addr, url)
        self.r.store.record_event(f"node_{decision}", node_id,
                                {"addr": addr, "url": url, "client": request.client_ip})
        return node_id, addr, url

    async def h_node_approve(self, request: Request, response: Response) -> None:
        node_id, addr, url = await self._decide(request, "approved")
        node = self.held_nodes.get(node_id)
        joined = False
        if node is not None and (node.agent_addr, node.url) == (addr, url) \
                and node_id not in self.fleet.nodes:
            # it joins now with the facts of its last beat; its next beat refreshes them
            del self.held_nodes[node_id]
            self.fleet.nodes[node_id] = node
            now = time.time()
            fresh = node.last_seen and now - node.last_seen <= 3 * node.interval_s
            new = (
                (NodeStatus.ONLINE if node.reachable else NodeStatus.DEGRADED)
                if fresh
                else NodeStatus.OFFLINE
            )
            self.fleet.set_status(node, new, now)
            joined = True
        await response.json({"ok": True, "node_id": node_id, "admission": "approved",
                             "addr": addr, "ollama_url": url, "joined": joined})

    async def h_node_reject(self, request: Request, response: Response) -> None:
        node_id, addr, url = await self._decide(request, "rejected")
        node = self.fleet.nodes.pop(node_id, None)
        if node is not None:
            self.held_nodes[node_id] = node
            self.fleet.on_change()
            self.fleet.on_node_gone(node_id)
        node = node or self.held_nodes.get(node_id)
        if node is not None:
            node.status, node.held_since = NodeStatus.REJECTED, time.time()
            node.held_reason = "rejected by an operator"
        await response.json({"ok": True, "node_id": node_id, "admission": "rejected",
                             "addr": addr, "ollama_url": url})


class Fleet:
    """The fleet model: the nodes, what herd learned about them, their breakers and service
    stats; polling, heartbeats and ``/fleet/status``. Who may join is ``Consent``'s. Tells
    the others that the fleet changed through ``on_change``."""

    def __init__(self, router: Router, learner: Learner, on_change: Callable[[], None],
                 on_node_gone: Callable[[str], None]) -> None:
        self.r = router
        self.learner = learner  # what was learned about the nodes (slots, memory, affinity)
        self.on_change = on_change  # the fleet changed: waiters re-score
        self.on_node_gone = on_node_gone  # a node left the fleet: drop what is keyed by it
        self.nodes: dict[str, Node] = {}
        self.consent = Consent(router, self)  # who may join: held nodes, decisions
        self.stats: StatsTable = StatsTable()
        self._stats_view: tuple[int, scoring.FleetStats] | None = None
        self.breakers: dict[str, scoring.BreakerState] = {}
        self.refreshing: set[str] = set()  # nodes with an early /api/ps read under way
        # learned from Ollama's own timings and /api/ps (agent reports and --slots win)

    def add_static_node(self, url: str, source: str, now: float) -> Node:
        url = normalize_url(url)
        for node in self.nodes.values():
            if node.url == url:
                return node
        node_id = node_id_from_url(url)
        if source == "local":
            node_id = socket.gethostname().split(".")[0] or "local"
        base, n = node_id, 2
        while node_id in self.nodes:
            node_id, n = f"{base}-{n}", n + 1
        node = Node(node_id=node_id, url=url, source=source, first_seen=now, last_change=now)
        self.nodes[node_id] = node
        log.info("node %s added (%s, %s)", node_id, source, url)
        self.r.store.record_event("node_added", node_id, {"url": url, "source": source})
        return node

    async def _probe_local(self, url: str) -> None:
        """Add a local Ollama as a node when one answers (checked again every minute)."""
        first = True
        while True:
            if not any(n.url == normalize_url(url) for n in self.nodes.values()):
                try:
                    await self.r.pool.get_json(url, "/api/version", self.r.config.poll_timeout_s)
                except (UpstreamFailure, ValueError, TimeoutError, OSError):
                    if first and not self.r.config.nodes:
                        log.warning("no Ollama answered at %s and no node is configured: %s",
                                    url, EMPTY_FLEET)
                else:
                    node = self.add_static_node(url, "local", time.time())
                    await self.refresh_node(node)
            first = False
            await asyncio.sleep(60)

    async def _poll_loop(self) -> None:
        while True:
            targets = [n for n in self.nodes.values() if n.source in ("static", "local")]
            if targets:
                await asyncio.gather(*(self.refresh_node(n) for n in targets))
            await asyncio.sleep(self.r.config.poll_interval_s)

    async def refresh_node(self, node: Node) -> bool:
        """Poll a node's Ollama (/api/ps, /api/tags, /api/version) concurrently."""
        timeout = self.r.config.poll_timeout_s
        results = await asyncio.gather(
            self.r.pool.get_json(node.url, "/api/ps", timeout),
            self.r.pool.get_json(node.url, "/api/tags", timeout),
            self.r.pool.get_json(node.url, "/api/version", timeout),
            return_exceptions=True,
        )
        now = time.time()
        before = self._routing_key(node, now)
        ps, tags, version = results
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for err in errors:
                if isinstance(err, asyncio.CancelledError):
                    raise err
            if node.source == "agent":
                node.reachable = False
                node.last_error = f"router cannot reach Ollama: {errors[0]}"
                return False
            node.poll_failures += 1
            node.last_error = str(errors[0]) or type(errors[0]).__name__
            node.reachable = False
            new = NodeStatus.DEGRADED if node.poll_failures < 3 else NodeStatus.OFFLINE
            self.set_status(node, new, now)
            return False
        node.poll_failures = 0
        node.reachable = True
        node.last_seen = now
        node.last_error = ""
        if isinstance(ps, dict) and isinstance(ps.get("models"), list):
            node.set_loaded([m for m in ps["models"] if isinstance(m, dict)], now)
            self.learner.learn_memory(node, now)
            self.note_unseen_loads(node, now)
        if isinstance(tags, dict) and isinstance(tags.get("models"), list):
            node.available = [m for m in tags["models"] if isinstance(m, dict)]
        if isinstance(version, dict):
            node.version = str(version.get("version") or "")
        if node.status != NodeStatus.DRAINING:
            self.set_status(node, NodeStatus.ONLINE, now)
        if self._routing_key(node, now) != before:
            self.on_change()
        return True

    def refresh_soon(self, node: Node) -> None:
        """Read a polled node's /api/ps now, not at the next poll: a load herd sent there
        has just finished (what it evicted is gone now), or a request herd sent to a model
        it believed resident was answered after a load (something evicted it unseen). One
        read at a time per node; agent nodes report on their own beat."""
        if node.source not in ("static", "local") or node.node_id in self.refreshing:
            return
        self.refreshing.add(node.node_id)

        async def read() -> None:
            try:
                await self.refresh_node(node)
            finally:
                self.refreshing.discard(node.node_id)

        self.r._spawn(read(), "refresh")

    def set_status(self, node: Node, status: NodeStatus, now: float) -> None:
        if node.status != status:
            log.info("node %s: %s -> %s", node.node_id, node.status, status)
            self.r.store.record_event(
                f"node_{status}", node.node_id, {"from": node.status, "error": node.last_error}
            )
            node.status = status
            node.last_change = now
            self.on_change()

    async def _monitor_loop(self) -> None:
        """Agent nodes: degraded after a missed beat, offline within three."""
        while True:
            now = time.time()
            for node in list(self.nodes.values()):
                if node.source != "agent" or node.status in scoring.UNROUTABLE_STATUSES:
                    continue
                silence = now - node.last_seen
                if silence > 3 * node.interval_s:
                    self.set_status(node, NodeStatus.OFFLINE, now)
                elif silence > 1.5 * node.interval_s:
                    self.set_status(node, NodeStatus.DEGRADED, now)
            await asyncio.sleep(min(1.0, self.r.config.heartbeat_interval_s / 4))

    def _routing_key(self, node: Node, now: float) -> tuple[object, ...]:
        """What routing reads from a node, coarsely (memory in whole GB, no expiry times): a
        poll or heartbeat that leaves it unchanged wakes no waiter (no periodic wake-ups)."""
        snap = node.snapshot(now)
        return (
            node.url,
            snap.status,
            snap.reachable,
            frozenset((m.name, m.context_length) for m in snap.loaded.values()),
            frozenset(snap.available.values()),
            snap.num_parallel,
            snap.memory_pressure,
            snap.ram_available >> 30,
            snap.vram_available >> 30,
            repr(node.capabilities),
        )

    def stats_view(self) -> scoring.FleetStats:
        """``stats`` for scoring: one view (per-node groups and what scoring derives from
        them, e.g. learned decode rates) shared by every request until ``stats`` changes."""
        view = self._stats_view
        if view is None or view[0] != self.stats.version:
            # carried over: what was derived from the nodes whose entries did not change
            changed = self.stats.take_changes()
            view = self._stats_view = (self.stats.version, scoring.FleetStats(
                self.stats, view[1] if view is not None else None, changed))
        return view[1]

    def _snapshots(self, now: float) -> list[scoring.NodeSnapshot]:
        return [self._with_learned(n.snapshot(now), now) for n in self.nodes.values()]

    def _with_learned(self, snap: scoring.NodeSnapshot, now: float) -> scoring.NodeSnapshot:
        """A node nobody reports memory for gets the capacity learned from /api/ps. The
        result is reused while its inputs are the same objects and values."""
        node = self.nodes.get(snap.node_id)
        reported_cap = node.max_loaded_models if node is not None else None
        mb = self.learner.memory_bounds.get(snap.node_id)
        cap = mb.capacity(now, self.r.policy) if mb is not None else None
        hit = node.learned_cache if node is not None else None
        if (hit is not None and hit[0] is snap and hit[1] == reported_cap and hit[2] is mb
                and hit[3] == cap):
            return hit[4]
        out = self._apply_learned(snap, reported_cap, mb, cap, self.r.policy.default_max_loaded)
        if node is not None:
            node.learned_cache = (snap, reported_cap, mb, cap, out)
        return out

    @staticmethod
    def _apply_learned(
        snap: scoring.NodeSnapshot, reported_cap: int | None, mb: scoring.MemoryBounds | None,
        capacity: tuple[int, str] | None, default_cap: int,
    ) -> scoring.NodeSnapshot:
        count_cap = reported_cap or (mb.model_cap if mb is not None else 0)
        if not count_cap:  # Ollama's default, until the node shows more loaded at once
            seen = max(mb.max_models if mb is not None else 0, len(snap.loaded))
            if seen <= default_cap:
                count_cap = default_cap
        if count_cap and count_cap != snap.max_loaded:
            snap = dataclasses.replace(snap, max_loaded=count_cap)
        if mb is None or capacity is None:
            return snap
        if mb.keep_alive_s > 0:
            snap = dataclasses.replace(snap, keep_alive_s=mb.keep_alive_s)
        if snap.ram_total > 0 or snap.vram_total > 0:
            return snap
        cap, how = capacity
        if cap <= 0:
            return snap
        used = sum(lm.size for lm in snap.loaded.values())
        return dataclasses.replace(snap, ram_total=cap, ram_available=max(0, cap - used),
                                   memory_learned=how)

    def note_unseen_loads(self, node: Node, now: float) -> None:
        """A model requests here wait on that ``/api/ps`` stopped listing is being loaded
        again for them (``Node.unseen_loads``): from this reading on it is a load like one
        herd sent — "loading" until an answer begins, later loads queue behind it, and what
        it will evict stops counting as hot — instead of a surprise when those requests
        report their load, and a cascade of requests sent to its victims meanwhile."""
        for model in node.unseen_loads():
            node.loading[model] = now
            rreq = scoring.RouteRequest(model)
            self.note_evictions(node, rreq, self.r.admission.queue_view, now)

    def note_evictions(self, node: Node, rreq: scoring.RouteRequest,
                       queues: Mapping[tuple[str, str], scoring.QueueSnapshot],
                       now: float) -> None:
        """A cold load was just sent: the models it will evict stop counting as hot there
        now, not at the next /api/ps (which corrects the guess either way); when busy ones
        must drain first, the load (and the node's scheduler) waits for them."""
        snap = self._with_learned(node.snapshot(now), now)
        gone = scoring.predicted_evictions(rreq, snap, queues, self.r.policy)
        if gone:
            drain = scoring.drain_wait_s(snap, gone, queues, self.stats_view(), now,
                                         self.r.policy)
            node.evicting.update(dict.fromkeys(gone, rreq.model))
            node.set_loaded(node.loaded_models, now)
            if drain > 0 and rreq.model in node.loading:  # the load starts once they drain
                node.loading[rreq.model] = max(node.loading[rreq.model], now + drain)

    def breakers_probe(self, node_id: str, model: str, now: float) -> None:
        """Taking a half-open breaker's single probe marks it in flight."""
        for key in (node_id, f"{node_id}:{model}"):
            state = self.breakers.get(key)
            if (
                state is not None
                and state.state != CircuitState.CLOSED
                and scoring.breaker_allows(state, now)
            ):
                self.breakers[key] = scoring.breaker_begin_probe(state, now, self.r.policy)

    def breaker_failure(self, node_id: str, model: str, kind: str, now: float) -> None:
        if kind == AnswerKind.STATUS_4XX:
            return  # the request's own fault (scoring.classify_answer): not the node's
        total = max(1, len(self.nodes))
        ejected = sum(
            1 for k, s in self.breakers.items() if ":" not in k and s.state == CircuitState.OPEN
        )
        share = (ejected + 1) / total  # the share ejected if this breaker opened too
        keys = [node_id] if kind in scoring.NO_ANSWER_KINDS else [f"{node_id}:{model}", node_id]
        for key in keys:
            state = self.breakers.get(key, scoring.BreakerState())
            new = scoring.breaker_on_failure(state, now, self.r.policy, share, kind)
            if new.state == CircuitState.OPEN and state.state != CircuitState.OPEN:
                log.warning(
                    "breaker open for %s after %s failure(s)", key, new.consecutive_failures
                )
                self.r.store.record_event("breaker_open", node_id, {"key": key, "kind": kind})
                self.on_change()  # waiters drop the node from the queues they wait on
            self.breakers[key] = new
        node = self.nodes.get(node_id)
        if node is not None:
            node.load_done(model)
            if kind == AnswerKind.CONNECT:
                node.reachable = False

    def breaker_success(self, node_id: str, model: str, now: float) -> None:
        for key in (node_id, f"{node_id}:{model}"):
            state = self.breakers.get(key)
            if state is not None:
                self.breakers[key] = scoring.breaker_on_success(state, now, self.r.policy)
        node = self.nodes.get(node_id)
        if node is not None:
            node.reachable = True

    def healthy_nodes(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.status in scoring.ROUTABLE_STATUSES]

    def nodes_with(self, model: str, *, healthy: bool = True) -> list[Node]:
        pool = self.healthy_nodes() if healthy else list(self.nodes.values())
        hot = [n for n in pool if model in n.loaded_names()]
        cold = [n for n in pool if n not in hot and model in n.available_names()]
        return hot + cold

    def roomiest(self, candidates: Sequence[Node]) -> Node | None:
        def room(n: Node) -> tuple[int, int]:
            disk = n.hardware.get("disk") or {}
            mem = n.hardware.get("memory") or {}
            return (
                int(disk.get("free_bytes") or 0) if isinstance(disk, dict) else 0,
                int(mem.get("total_bytes") or 0) if isinstance(mem, dict) else 0,
            )

        return max(candidates, key=room) if candidates else None

    async def h_fleet_status(self, request: Request, response: Response) -> None:
        doc = self.status_json(self.fleet_status(time.time()))
        await response.send(200, doc, "application/json; charset=utf-8")

    def status_json(self, doc: JSON) -> bytes:
        """``dumps(doc)``, with each node's model list spliced in already encoded (it changes
        only when the node reports a new one, and it is most of the document)."""
        parts: list[bytes] = []
        for entry in doc["nodes"]:
            node = self.nodes.get(entry["node_id"])
            avail = entry.get("available_models")
            if node is None or avail is not node.available_public():
                parts.append(dumps(entry))
                continue
            rest = dumps({k: v for k, v in entry.items() if k != "available_models"})
            parts.append(rest[:-1] + b',"available_models":' + node.available_json() + b"}")
        top = dumps({k: v for k, v in doc.items() if k != "nodes"})
        return top[:-1] + b',"nodes":[' + b",".join(parts) + b"]}"

    def fleet_status(self, now: float) -> JSON:
        nodes = [n.public(now) for n in self.nodes.values()]
        for entry in nodes:
            br = self.breakers.get(entry["node_id"])
            entry["breaker"] = dataclasses.asdict(br) if br is not None else None
            entry["learned"] = self.learner.learned_public(
                self.nodes[entry["node_id"]], self.stats, now)
        return {
            "router_id": self.r.router_id,
            "version": __version__,
            "generated_at": now,
            "uptime_s": round(now - self.r.started_at, 1),
            "fleet": {
                "nodes_total": len(self.nodes),
                "nodes_online": sum(1 for n in self.nodes.values() if n.status == "online"),
                "nodes_pending": sum(1 for n in self.consent.held_nodes.values()
                                     if n.status == "pending"),
                "models_loaded": sum(len(n.loaded) for n in self.healthy_nodes()),
                "requests_active": self.r.proxy.active_requests,
            },
            "nodes": nodes,
            "pending_nodes": self.consent.held_public(now),
            "queues": {
                f"{q.node_id}:{q.model}": q.public() for q in self.r.admission.queues.values()
            },
            "pulls": list(self.r.model_admin.pull_jobs.values()),
            "settings": dict(self.r.settings),
            "routers": self.r.routers_public(now),
        }

    async def h_heartbeat(self, request: Request, response: Response) -> None:
        raw = await request.read_body(4 * MiB)
        now = time.time()
        await self.consent.refresh_own_addresses(now)
        key = self.r.config.fleet_key
        signature = request.header("x-herd-signature")
        # with a fleet key, only an agent on this machine may beat unsigned (consent rules)
        if (
            key
            and (signature is not None or not self.consent.local_beat(raw, request.client_ip))
            and not verify_signature(key, signature, raw, now)
        ):
            raise HttpError(401, "heartbeat signature missing, bad or stale (fleet key)")
        signed = bool(key) and signature is not None
        body = await parse_json_body(raw)
        if signed:
            # a signed beat is valid for 60 s; beats carry the agent's timestamp, so a
            # recorded beat replayed later (e.g. to drain a node) is refused
            stamp = body.get("timestamp")
            node = self.nodes.get(str(body.get("node_id")))
            if not isinstance(stamp, int | float) or isinstance(stamp, bool):
                raise HttpError(400, "a signed heartbeat needs a numeric timestamp")
            if node is not None and stamp <= node.last_beat_stamp:
                raise HttpError(409, "heartbeat replayed (timestamp not newer than the last)")
        reply = self.apply_heartbeat(body, request.client_ip, now, signed=signed)
        if signed:
            self.nodes[str(body["node_id"])].last_beat_stamp = float(body["timestamp"])
        payload = dumps(reply)
        headers = [("x-herd-signature", sign(key, int(now), payload))] if key else []
        await response.send(200, payload, "application/json; charset=utf-8", headers)

    def apply_heartbeat(self, beat: JSON, addr: str, now: float, *, signed: bool) -> JSON:
        """Register or refresh an agent node; 400 on a malformed beat, 409 on a takeover."""
        try:
            report = NodeReport.parse(beat)
        except ReportError as exc:
            raise HttpError(400, str(exc)) from None
        node_id, url = report.node_id, report.ollama_url
        node = self.nodes.get(node_id)
        if node is not None and node.source != "agent":
            raise HttpError(409, f"node id '{node_id}' is taken by a static node")
        if (
            node is not None
            and node.status in scoring.ROUTABLE_STATUSES
            and not signed
            and node.agent_addr
            and node.agent_addr != addr
        ):
            log.warning(
                "heartbeat for node %s from %s refused: it is online from %s (no fleet key)",
                node_id,
                addr,
                node.agent_addr,
            )
            self.r.store.record_event(
                "node_takeover_refused", node_id, {"addr": addr, "online_from": node.agent_addr}
            )
            raise HttpError(409, f"node '{node_id}' is online from another address")
        before: tuple[object, ...] | None = None
        admission, why = self.consent.admission_of(node_id, addr, url, signed=signed)
        if admission != "approved":
            # held (pending | rejected): routers see a change only when a routed node leaves
            was_routed = node_id in self.nodes
            node = self.consent.hold_node(node_id, addr, url, now, admission, why)
            if not was_routed:
                before = self._routing_key(node, now)
        elif node is None:
            # a held node that is now approved joins with the facts of its last beat
            node = self.consent.held_nodes.pop(node_id, None) or Node(
                node_id=node_id, url=url, source="agent", first_seen=now)
            self.nodes[node_id] = node
            log.info("node %s joined from %s (%s)", node_id, addr, url)
            self.r.store.record_event("node_joined", node_id, {"addr": addr, "url": url})
        else:
            before = self._routing_key(node, now)
        need_full = False
        node.url = url
        node.agent_addr = addr
        node.last_seen = now
        node.interval_s = float(
            self.r.config.heartbeat_interval_s if report.interval_s is None else report.interval_s)
        node.hardware_report = report.hardware
        node.agent_version = report.agent_version
        ollama = report.ollama
        node.version = ollama.version or node.version
        node.reachable = ollama.reachable
        node.num_parallel = ollama.num_parallel
        node.max_loaded_models = ollama.max_loaded_models
        if ollama.loaded is not None:
            node.set_loaded(ollama.loaded, now)
            self.note_unseen_loads(node, now)
        if ollama.available is not None:
            node.available_models = ollama.available
            node.available_hash = ollama.available_hash
        elif ollama.available_hash != node.available_hash:
            need_full = True
        node.capabilities_report = report.capabilities
        node.errors = list(report.errors)
        if admission != "approved":
            node.status = NodeStatus(admission)  # pending | rejected: held, never routed to
        elif report.draining:
            self.set_status(node, NodeStatus.DRAINING, now)
        elif not node.reachable:
            node.last_error = "agent reports its Ollama unreachable"
            self.set_status(node, NodeStatus.DEGRADED, now)
        else:
            self.set_status(node, NodeStatus.ONLINE, now)
        if before != self._routing_key(node, now):
            self.on_change()
        return {
            "ok": True,
            "router_id": self.r.router_id,
            "fleet_id": self.r.config.fleet_id,
            "interval_s": node.interval_s,
            "need_full": need_full,
            "admission": admission,
            "admission_reason": why,
        }

    def mark_loaded(self, node: Node, model: str, num_ctx: int | None, now: float) -> None:
        """After serving, the model is resident: say so before the next poll confirms it."""
        node.load_done(model)
        if model in node.loaded_names():
            return
        am = node.available_models.models.get(model)
        size = am.size if am is not None else 0
        node.set_loaded(
            [
                *node.loaded,
                {
                    "name": model,
                    "model": model,
                    "size": size,
                    "size_vram": 0,
                    "context_length": num_ctx,
                    "expires_at": rfc3339(now + 300),
                    "herd_assumed": True,
                },
            ],
            now,
        )

    # ---------------------------------------------------------------- image and speech ----

    # ---------------------------------------------------------------- admin protection ----


# one attempt on a chosen node; raises UpstreamFailure while nothing reached the client
Send = Callable[[Node, scoring.RouteRequest, scoring.Choice], Awaitable[None]]


class FactorJson:
    """A scoring factor's JSON text for the trace store, remembered (bounded): most factors
    repeat request after request ("loaded in memory (hot)", "healthy", ...), and at 20
    nodes a request's breakdown holds 140 of them. Called on the store's writer thread."""

    __slots__ = ("limit", "lists", "memo", "seen")

    def __init__(self, limit: int = 8192) -> None:
        # keyed by the factor's fields as a tuple: the same equality as the Factor's own,
        # without a call of its generated __hash__ and __eq__ per factor looked up
        self.memo: dict[tuple[str, float, float, str], str] = {}
        # and by the record itself: most factors are the very records scoring keeps from
        # request to request (scoring.ScoreMemo); the record is held, so its id stays its own
        self.seen: dict[int, tuple[scoring.Factor, str]] = {}
        # a score's whole list of factors by their ids: the entry holds the records, so
        # while it is there no other record can have those ids
        self.lists: dict[tuple[int, ...], tuple[tuple[scoring.Factor, ...], str]] = {}
        self.limit = limit

    def __call__(self, factor: scoring.Factor) -> str:
        hit = self.seen.get(id(factor))
        if hit is not None and hit[0] is factor:
            return hit[1]
        key = (factor.name, factor.value, factor.contribution, factor.reason)
        text = self.memo.get(key)
        if text is None:
            if len(self.memo) >= self.limit:
                self.memo.clear()
            text = self.memo[key] = factor.to_json()
        if len(self.seen) >= self.limit:
            self.seen.clear()
        self.seen[id(factor)] = (factor, text)
        return text

    def listed(self, factors: tuple[scoring.Factor, ...]) -> str:
        """A score's factors, comma-joined (``Score.to_json``'s ``factors_json``)."""
        key = tuple(map(id, factors))
        hit = self.lists.get(key)
        if hit is not None:
            return hit[1]
        text = ",".join(map(self, factors))
        if len(self.lists) >= self.limit:
            self.lists.clear()
        self.lists[key] = (factors, text)
        return text


class Proxy:
    """Inference: prepare a request, choose (through Admission), try with retries and
    fallbacks, relay the answer, write its trace; image and speech jobs. Owns the count of
    requests in flight; reads the fleet and the counters through the router."""

    def __init__(self, router: Router) -> None:
        self.r = router
        self.active_requests = 0
        self.factor_json = FactorJson()

    async def h_inference(self, request: Request, response: Response) -> None:
        kind, dialect = INFERENCE_PATHS[request.path]
        raw = await request.read_body(self.r.limits.max_json_bytes)
        body = await parse_json_body(raw)
        # Forward the client's own bytes when herd changes nothing in the body (no herd
        # fields to strip, plain UTF-8 object); otherwise re-serialise what is left.
        pristine = (raw[:1] == b"{" and raw[1:2] != b"\x00"
                    and not has_herd_fields(body))
        model_raw = self.r.model_of(body)
        tags = extract_tags(body, request)
        if request.key_id:
            tags.append(request.key_id)
        fallbacks = body.pop("fallback_models", None)
        fallback_models = (
            [f for f in fallbacks if isinstance(f, str)] if isinstance(fallbacks, list) else []
        )
        opt_out = body.pop("fallback", True) is False or (
            request.header("x-herd-no-fallback") or ""
        ).lower() in ("1", "true", "yes")
        pinned = body.pop("node_id", None) or request.header("x-herd-node")
        if pinned is not None and not isinstance(pinned, str):
            raise HttpError(400, "node_id must be a string")
        attempt = Attempt(
            request_id=request.request_id,
            kind=kind,
            endpoint=request.path,
            original_model=model_raw,
            tags=tags,
            client_ip=request.client_ip,
            received_at=request.received_at,
            started=time.monotonic(),
        )
        self.active_requests += 1
        try:
            if (
                dialect == "native"
                and request.path in ("/api/generate", "/api/chat")
                and is_zero_keep_alive(body.get("keep_alive"))
                and not body.get("prompt")
                and not body.get("messages")
            ):
                await self.unload_everywhere(
                    request, response, body, attempt, raw if pristine else None
                )
                return
            await self.serve_routed(
                request,
                response,
                body,
                attempt,
                fallback_models,
                allow_vram_fallback=not opt_out,
                pinned=pinned,
                raw=raw if pristine else None,
                raw_len=len(raw),
            )
        finally:
            self.active_requests -= 1

    async def unload_everywhere(
        self, request: Request, response: Response, body: JSON, attempt: Attempt,
        raw: bytes | None = None,
    ) -> None:
        """``raw``: the client's body bytes, sent to every holder when herd changed nothing."""
        model = scoring.normalize_model(str(body["model"]))
        holders = [n for n in self.r.fleet.healthy_nodes() if model in n.loaded_names()]
        if not any(n.has_model(model) for n in self.r.fleet.healthy_nodes()):
            raise self.r.model_not_found(f"'{body['model']}'")
        payload = raw if raw is not None else dumps(body)

        async def one(node: Node) -> None:
            with contextlib.suppress(UpstreamFailure, ConnectionClosed, TimeoutError):
                async with asyncio.timeout(30):
                    up = await self.r.pool.request(
                        node.url, "POST", request.path, upstream_headers(request), payload
                    )
                    await up.read()
            await self.r.fleet.refresh_node(node)

        await asyncio.gather(*(one(n) for n in holders))
        out: JSON = {"model": body["model"], "created_at": rfc3339(time.time())}
        if request.path == "/api/chat":
            out["message"] = {"role": "assistant", "content": ""}
        else:
            out["response"] = ""
        out.update({"done": True, "done_reason": "unload"})
        await response.json(
            out,
            headers=[
                ("x-herd-node", ",".join(n.node_id for n in holders)),
                ("x-herd-model", str(body["model"])),
                ("x-herd-retries", "0"),
            ],
        )
        self.trace(attempt, status=TraceStatus.COMPLETED, http_status=200, model=model)

    async def serve_routed(
        self,
        request: Request,
        response: Response,
        body: JSON,
        attempt: Attempt,
        fallback_models: Sequence[str],
        *,
        allow_vram_fallback: bool,
        pinned: str | None,
        raw: bytes | None,
        raw_len: int,
    ) -> None:
        """Route across the model chain (primary, then ``fallback_models``) with retries.

        ``raw``: the client's body bytes, forwarded as they are while ``body`` is unchanged.
        """
        chain = scoring.fallback_chain(attempt.original_model, fallback_models)
        est = estimate_tokens(body, raw_len)
        vision = needs_vision(body)
        first_error: HttpError | None = None
        for index, model in enumerate(chain):
            served_model, payload, rreq, snaps = self._prepare(
                model, index, body, raw, attempt, est, vision,
                allow_vram_fallback=allow_vram_fallback, pinned=pinned,
            )  # fmt: skip
            send = self._inference_send(request, response, payload, attempt)
            try:
                await self.route_with_retries(
                    request, response, rreq, attempt, served_model, send, snaps
                )
                return
            except HttpError as exc:
                if exc.kind != "unservable":
                    raise
                if exc.status == 404 and self.r.settings.get("auto_pull") and not pinned \
                        and await self.r.model_admin.auto_pull(served_model, attempt):
                    try:
                        await self.route_with_retries(request, response, rreq, attempt,
                                                      served_model, send)
                        return
                    except HttpError as again:
                        if again.kind != "unservable":
                            raise
                first_error = first_error or exc
                continue
        assert first_error is not None
        self.trace(
            attempt,
            status=TraceStatus.REJECTED if first_error.status == 503 else TraceStatus.FAILED,
            http_status=first_error.status,
            error=first_error.message,
        )
        self.r.metrics.rejected += 1
        raise first_error

    def _prepare(
        self,
        model: str,
        index: int,
        body: JSON,
        raw: bytes | None,
        attempt: Attempt,
        est: int,
        vision: bool,
        *,
        allow_vram_fallback: bool,
        pinned: str | None,
    ) -> tuple[str, bytes, scoring.RouteRequest, list[scoring.NodeSnapshot] | None]:
        """One model of the chain (``index`` 0 = the one asked for): VRAM fallback and
        context protection may change the model and the body; the prompt-cache affinity
        hint. Returns the served model, the bytes to send, the routing request and the
        fleet snapshot taken for the decisions (reused for the first choice)."""
        served_model = model
        send_body = body
        vram_fallback = bool(
            allow_vram_fallback and self.r.settings.get("vram_fallback") and not pinned
        )
        protect = bool(self.r.settings.get("context_protection"))
        # one fleet snapshot serves both pre-routing decisions for this model
        snaps = self.r.fleet._snapshots(time.time()) if vram_fallback or protect else None
        if snaps is not None and vram_fallback:
            alt = scoring.vram_fallback(model, snaps, vision, attempt.kind)
            if alt is not None:
                served_model, why = alt
                log.info(
                    "request %s: vram fallback %s -> %s (%s)",
                    attempt.request_id,
                    model,
                    served_model,
                    why,
                )
        if snaps is not None and protect:
            decision = scoring.protect_context(
                served_model,
                requested_num_ctx(body),
                est,
                snaps,
                allow_upgrade=allow_vram_fallback,
            )
            if decision.action != "keep":
                log.debug(
                    "request %s: context protection %s (%s)",
                    attempt.request_id,
                    decision.action,
                    decision.reason,
                )
                send_body = apply_context_decision(send_body, decision)
                served_model = decision.model
        if served_model != model or send_body is not body or index > 0:
            send_body = dict(send_body)
            send_body["model"] = (
                served_model if served_model != model or index > 0 else send_body.get("model")
            )
        attempt.fallback_used = index > 0 or served_model != model
        payload = raw if raw is not None and send_body is body else dumps(send_body)
        norm = scoring.normalize_model(served_model)
        hit: scoring.AffinityEntry | None = None
        attempt.affinity_key = None
        if attempt.kind == "text" and not pinned:
            keys, attempt.affinity_key = scoring.prefix_keys(
                norm, send_body.get("messages"), send_body.get("prompt"),
                send_body.get("system"), self.r.policy)
            attempt.affinity_tokens = est
            hit = scoring.affinity_lookup(keys, self.r.learner.affinity, time.time(),
                                          self.r.policy)
        rreq = scoring.RouteRequest(
            model=norm,
            kind=attempt.kind,
            est_tokens=est,
            num_ctx=requested_num_ctx(send_body),
            max_tokens=requested_max_tokens(send_body),
            needs_vision=vision,
            pinned_node=pinned,
            cache_node=hit.node_id if hit is not None else None,
            cached_tokens=min(est, hit.tokens) if hit is not None else 0,
        )
        return served_model, payload, rreq, snaps

    def _unservable(
        self, rreq: scoring.RouteRequest, choice: scoring.Choice, display: str
    ) -> HttpError:
        anywhere = any(n.has_model(rreq.model) for n in self.r.fleet.nodes.values())
        if choice.reject_kind == "not_found" or rreq.kind in ("image", "stt") or not anywhere:
            return self.r.model_not_found(f"'{display}'", kind="unservable")
        return HttpError(
            503,
            f"no node can serve '{display}' right now: {choice.reason}",
            headers=[("retry-after", "5")],
            kind="unservable",
        )

    def _inference_send(
        self, request: Request, response: Response, payload: bytes, attempt: Attempt
    ) -> Send:
        def send(node: Node, rreq: scoring.RouteRequest, choice: scoring.Choice) -> Awaitable[None]:
            return self.attempt_on(request, response, node, rreq, payload, attempt, choice)

        return send

    async def route_with_retries(
        self,
        request: Request,
        response: Response,
        rreq: scoring.RouteRequest,
        attempt: Attempt,
        served_model: str,
        send: Send,
        snaps: list[scoring.NodeSnapshot] | None = None,
        *,
        replayable: bool = True,
    ) -> None:
        """The one attempt loop (inference, image and speech): choose a node through
        Admission, ``send`` the request there while holding its slot, and on a failure
        before the first byte reached the client retry on the next-best node.

        ``snaps``: a fleet snapshot the caller just took, used for the first choice.
        ``replayable``: False when the request body is a stream that a failed attempt may
        have consumed (an upload): then only a failed connect is retried."""
        tried: set[str] = set()
        last: UpstreamFailure | None = None
        base_retries = attempt.retries  # retries spent on earlier models of the chain
        while True:
            if tried:
                rreq = dataclasses.replace(rreq, exclude=frozenset(tried))
            got = await self._acquire_or_answer(request, response, rreq, attempt, served_model,
                                                snaps, last)
            if got is None:
                return  # every candidate failed: the client got the last failure
            node, queue, choice, queue_ms = got
            snaps = None
            self._mark_dispatch(attempt, node, queue, rreq, served_model, queue_ms)
            attempt.retries = base_retries + len(tried)  # one failed node per attempt
            if tried:
                self.r.metrics.retries += 1
            ok = False
            try:
                await send(node, rreq, choice)
                ok = True
                return
            except UpstreamFailure as fail:
                retry = self._note_failure(attempt, node, rreq, choice, served_model, fail,
                                           len(tried), replayable)
                tried.add(node.node_id)
                last = fail
                if not retry:
                    await self._send_failure(request, response, fail, attempt)
                    return
            finally:
                self.r.admission.release(queue, ok)

    async def _acquire_or_answer(
        self,
        request: Request,
        response: Response,
        rreq: scoring.RouteRequest,
        attempt: Attempt,
        served_model: str,
        snaps: list[scoring.NodeSnapshot] | None,
        last: UpstreamFailure | None,
    ) -> tuple[Node, SlotQueue, scoring.Choice, float] | None:
        """A slot on the chosen node, or why not: None once the client has been sent the
        last node's failure (every candidate failed); a busy fleet raises 503 with
        Retry-After, a model no node can serve raises its 404/400; a client gone while
        queued is traced and re-raised."""
        try:
            return await self.r.admission.acquire(rreq, snaps)
        except asyncio.CancelledError:
            self.trace(attempt, status=TraceStatus.CLIENT_DISCONNECTED, http_status=0,
                       error="client disconnected while queued", model=served_model,
                       node_id="")
            raise
        except Rejected as rej:
            if last is not None:  # every candidate failed: the client gets the last failure
                self.trace(attempt, status=TraceStatus.FAILED, http_status=last.status,
                           error=f"no node left to try: {last.message}", model=served_model,
                           node_id="")
                await self._send_failure(request, response, last, attempt)
                return None
            job = rreq.kind in CAPABILITY_KINDS  # its nodes offer the model: busy
            if rej.choice.retry_after_s is None and not job:
                raise self._unservable(rreq, rej.choice, served_model) from None
            retry_after = max(1, math.ceil(rej.choice.retry_after_s or 5))
            what = f"all {rreq.kind} nodes" if job else "all nodes"
            self.trace(attempt, status=TraceStatus.REJECTED, http_status=503,
                       error=f"{what} are busy: {rej.message}", choice=rej.choice,
                       model=served_model)
            self.r.metrics.rejected += 1
            raise HttpError(503, f"{what} are busy: {rej.message}",
                            headers=[("retry-after", str(retry_after))]) from None

    def _mark_dispatch(self, attempt: Attempt, node: Node, queue: SlotQueue,
                       rreq: scoring.RouteRequest, served_model: str, queue_ms: float) -> None:
        """What the learning needs to know about this dispatch, on the attempt."""
        attempt.queue_ms += queue_ms
        attempt.dispatch_k = queue.in_flight
        attempt.dispatch_streams = self.r.admission.node_in_flight.get(node.node_id, 0) - 1
        attempt.dispatch_mono = time.monotonic()
        attempt.dispatch_hot = (rreq.model in node.loaded_names()
                                and rreq.model not in node.loading)
        attempt.dispatch_load_queued = False
        if self.r.policy.serial_loads and not attempt.dispatch_hot and len(node.loading) > 1:
            now = time.time()
            attempt.dispatch_load_queued = scoring.other_load_under_way(
                node.snapshot(now), rreq.model, self.r.fleet.stats_view(), now, self.r.policy)
        attempt.node_id = node.node_id
        attempt.served_model = served_model

    def _note_failure(self, attempt: Attempt, node: Node, rreq: scoring.RouteRequest,
                      choice: scoring.Choice, served_model: str, fail: UpstreamFailure,
                      tried: int, replayable: bool) -> bool:
        """A node failed before the first byte reached the client: its breaker, a trace row
        (retried or failed), and whether to try the next node."""
        self.r.fleet.breaker_failure(node.node_id, rreq.model, fail.kind, time.time())
        spent = not replayable and fail.kind != AnswerKind.CONNECT
        decision = scoring.retry_decision(tried, fail.kind, spent, self.r.policy)
        self.trace(
            attempt,
            status=TraceStatus.RETRIED if decision.retry else TraceStatus.FAILED,
            http_status=fail.status if not decision.retry else 0,
            error=fail.message,
            choice=choice,
            model=served_model,
            node_id=node.node_id,
        )
        if decision.retry:
            log.warning("request %s: %s failed before first byte (%s); retrying",
                        attempt.request_id, node.node_id, fail.message)
        return decision.retry

    async def _send_failure(
        self, request: Request, response: Response, fail: UpstreamFailure, attempt: Attempt
    ) -> None:
        headers = [
            ("x-herd-node", attempt.node_id),
            ("x-herd-retries", str(attempt.retries)),
            ("x-herd-model", attempt.served_model),
        ]
        if attempt.retries and is_openai_path(request.path):
            # herd already tried other nodes: an SDK retrying on top multiplies the attempts
            headers.append(("x-should-retry", "false"))
        if fail.body and fail.status >= 400 and attempt.kind not in CAPABILITY_KINDS:
            # an inference node answers in the client's dialect; an agent's job service
            # does not, so its failure is re-said in the client's dialect (below)
            ctype = header_value(fail.headers, b"content-type") or "application/json"
            await response.send(fail.status, fail.body, ctype, headers)
            return
        status = 504 if fail.kind == AnswerKind.TIMEOUT_FIRST_BYTE else 502
        if attempt.kind in CAPABILITY_KINDS and fail.status >= 400:
            status = fail.status
        raise HttpError(status, fail.message, headers=headers)

    def upstream_request_headers(self, request: Request) -> Headers:
        hdrs = upstream_headers(request)
        if self.r.config.api_keys:  # herd's own keys are never forwarded to nodes
            hdrs = [(k, v) for k, v in hdrs if k not in (b"authorization", b"x-api-key")]
        return [(k, v) for k, v in hdrs if k not in (b"content-type",)] + [
            (b"content-type", b"application/json")
        ]

    async def attempt_on(
        self,
        request: Request,
        response: Response,
        node: Node,
        rreq: scoring.RouteRequest,
        payload: bytes,
        attempt: Attempt,
        choice: scoring.Choice,
    ) -> None:
        """One attempt: raises UpstreamFailure when nothing reached the client yet."""
        node.sent(rreq.model)
        waiting = True
        try:
            timeout = self.r.config.first_byte_timeout_s
            first_byte = request.http.watch(timeout)  # the connection's, kept across requests
            up = await self.r.pool.request(
                node.url,
                "POST",
                request.target,
                self.upstream_request_headers(request),
                payload,
                head_watch=first_byte,
            )
            if not 200 <= up.status < 400:
                broken = ""
                try:
                    data = await up.read(limit=MiB, idle_timeout=10)
                except (ConnectionClosed, TimeoutError) as exc:
                    data, broken = b"", str(exc) or "no body within 10s"
                verdict = scoring.classify_answer(
                    up.status, data, node_lists_model=node.has_model(rreq.model)
                )
                if broken and not verdict.node_fault:
                    raise UpstreamFailure(
                        "reset", f"node {node.node_id} answered {up.status}, then: {broken}"
                    )
                if verdict.kind == AnswerKind.MODEL_NOT_FOUND:
                    # the node lost the model since its last report: refresh it, try elsewhere
                    self.r._spawn(self.r.fleet.refresh_node(node), "refresh")
                    raise UpstreamFailure(
                        "model_not_found",
                        f"node {node.node_id} no longer has {rreq.model}",
                        status=404,
                        body=data,
                        headers=up.headers,
                    )
                if verdict.node_fault:
                    raise UpstreamFailure(
                        verdict.kind,
                        f"node {node.node_id} answered {up.status}: {error_text(data)}",
                        status=up.status,
                        body=data,
                        headers=up.headers,
                    )
                # the client's own error: any node would answer the same; relay it as is
                await self._relay_response(
                    up, response, node, rreq, attempt, choice, first=data, complete=True
                )
                return
            chunks = up.chunks(self.r.config.stall_timeout_s, first_watch=first_byte)
            try:
                first = await anext(chunks, b"")
            except TimeoutError:
                up.close()
                raise UpstreamFailure(
                    "timeout_first_byte",
                    f"node {node.node_id} sent no body within {timeout:g}s",
                    status=504,
                ) from None
            except ConnectionClosed as exc:
                raise UpstreamFailure("reset", f"node {node.node_id}: {exc}") from None
            node.answered(rreq.model)
            waiting = False
            if rreq.model in node.loading:  # an answer began: its load is done
                node.load_done(rreq.model)
            if not attempt.dispatch_hot:  # see what the load evicted, now
                self.r.fleet.refresh_soon(node)
            await self._relay_response(
                up, response, node, rreq, attempt, choice, first=first, chunks=chunks
            )
        except asyncio.CancelledError:
            if not response.headers_sent:  # (once relaying, the relay traces it)
                self.trace(attempt, status=TraceStatus.CLIENT_DISCONNECTED, http_status=0,
                           error="client disconnected before the node answered",
                           choice=choice, model=attempt.served_model, node_id=node.node_id)
            raise
        finally:
            if waiting:  # it ended without a byte of an answer
                node.answered(rreq.model)

    async def _relay_response(
        self,
        up: UpstreamResponse,
        response: Response,
        node: Node,
        rreq: scoring.RouteRequest,
        attempt: Attempt,
        choice: scoring.Choice,
        *,
        first: bytes,
        chunks: AsyncIterator[bytes] | None = None,
        complete: bool = False,
    ) -> None:
        out = RelayOutcome(LineRelay(framing_of(up.header("content-type"))), keep=4 * MiB)
        try:
            await relay_answer(
                up, response, herd_headers(node.node_id, attempt), out,
                node_id=node.node_id, stall_timeout_s=self.r.config.stall_timeout_s,
                first=first, chunks=chunks, complete=complete,
            )  # fmt: skip
        except (ClientGone, asyncio.CancelledError):
            self._finish(attempt, node, rreq, choice, out, up.status)
            raise
        self._finish(attempt, node, rreq, choice, out, up.status)

    def _finish(
        self,
        attempt: Attempt,
        node: Node,
        rreq: scoring.RouteRequest,
        choice: scoring.Choice,
        out: RelayOutcome,
        http_status: int,
    ) -> None:
        status, error, first_at, relay, raw_body = (
            out.status, out.error, out.first_at, out.relay, out.body
        )
        if status == TraceStatus.REAPED:
            self.r.metrics.reaped += 1
        now = time.time()
        final = relay.final_object()
        if final is None and raw_body:
            with contextlib.suppress(ValueError):
                obj = json.loads(bytes(raw_body))
                final = obj if isinstance(obj, dict) else None
        m = metrics_from_final(final)
        ok = status == TraceStatus.COMPLETED and http_status < 400
        total_ms = (time.monotonic() - attempt.started) * 1000
        ttft_ms = (first_at - attempt.started) * 1000 if first_at is not None else None
        if ok:
            self.r.fleet.breaker_success(node.node_id, rreq.model, now)
            self.r.fleet.mark_loaded(node, rreq.model, rreq.num_ctx, now)
        elif status in ("incomplete", "reaped"):
            self.r.fleet.breaker_failure(node.node_id, rreq.model, "reset", now)
        if status != TraceStatus.CLIENT_DISCONNECTED and http_status < 400:
            obs = scoring.Observation(
                ok=ok,
                load_ms=m["load_ms"] or 0.0,
                prompt_tokens=m["prompt_tokens"] or 0,
                prompt_eval_ms=m["prompt_eval_ms"] or 0.0,
                completion_tokens=m["completion_tokens"] or 0,
                eval_ms=m["eval_ms"] or 0.0,
                ttft_ms=ttft_ms,
                total_ms=total_ms,
                streams=max(0, attempt.dispatch_streams),
                load_queued=attempt.dispatch_load_queued,
            )
            key = (node.node_id, rreq.model)
            stats = self.r.fleet.stats
            stats[key] = scoring.observe(stats.get(key), obs, self.r.policy)
            if ok:
                self.r.learner.learn_timings(attempt, node.node_id, rreq.model, final, m)
                if attempt.dispatch_hot and obs.load_ms >= self.r.policy.unseen_load_ms:
                    self.r.fleet.refresh_soon(node)  # it had been evicted unseen
        if ok and attempt.affinity_key is not None:
            self.r.learner.remember_prefix(attempt.affinity_key, node.node_id,
                                 attempt.affinity_tokens + (m["completion_tokens"] or 0), now)
        if status == TraceStatus.COMPLETED and http_status >= 400:
            # a relayed error answer (the client's own 4xx): keep the text the client got
            status = scoring.classify_answer(http_status).trace_status
            error = error or error_text(bytes(raw_body))
        self.trace(
            attempt,
            status=status,
            http_status=http_status,
            error=error,
            choice=choice,
            model=attempt.served_model,
            node_id=node.node_id,
            ttft_ms=ttft_ms,
            metrics=m,
        )

    def trace(
        self,
        attempt: Attempt,
        *,
        status: TraceStatus,
        http_status: int,
        error: str = "",
        choice: scoring.Choice | None = None,
        model: str | None = None,
        node_id: str | None = None,
        ttft_ms: float | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> None:
        latency_ms = (time.monotonic() - attempt.started) * 1000
        m = metrics or {}
        winner = choice.winner if choice is not None else None
        rec = store.TraceRecord(
            request_id=attempt.request_id,
            timestamp=attempt.received_at,
            kind=attempt.kind,
            endpoint=attempt.endpoint,
            model=scoring.normalize_model(model or attempt.served_model or attempt.original_model),
            original_model=attempt.original_model,
            node_id=node_id if node_id is not None else attempt.node_id,
            score=winner.total if winner is not None else None,
            # lazy: built as JSON text on the store's writer thread
            scores_breakdown=(functools.partial(choice.breakdown_json, self.factor_json,
                                                self.factor_json.listed)
                              if choice is not None else None),
            status=status,
            http_status=http_status,
            error_message=error if len(error) <= TRACE_ERROR_MAX
            else error[: TRACE_ERROR_MAX - 1] + "\u2026",
            latency_ms=latency_ms,
            time_to_first_token_ms=ttft_ms,
            queue_ms=attempt.queue_ms,
            prompt_tokens=m.get("prompt_tokens"),
            completion_tokens=m.get("completion_tokens"),
            load_ms=m.get("load_ms"),
            prompt_eval_ms=m.get("prompt_eval_ms"),
            eval_ms=m.get("eval_ms"),
            retry_count=attempt.retries,
            fallback_used=attempt.fallback_used,
            tags=list(attempt.tags),
            client_ip=attempt.client_ip,
        )
        self.r.store.record_trace(rec, owned=True)  # made here, never changed again
        if status != TraceStatus.RETRIED:
            self.r.metrics.observe(attempt.endpoint, attempt.kind, status, latency_ms / 1000)
            if attempt.fallback_used:
                self.r.metrics.fallbacks += 1
        log.info(
            "%s %s %s model=%s node=%s status=%s http=%s retries=%d %.0fms%s",
            attempt.request_id,
            attempt.kind,
            attempt.endpoint,
            rec.model,
            rec.node_id,
            status,
            http_status,
            attempt.retries,
            latency_ms,
            f" error={error}" if error else "",
            extra={"request_id": attempt.request_id, "node": rec.node_id, "model": rec.model},
        )


class MediaJobs:
    """Image generation and speech-to-text: the endpoints (validation, multipart uploads,
    OpenAI shapes) of jobs an agent's service runs. Each job goes through Proxy's one attempt
    loop (``route_with_retries``) and its answer through the one relay (``relay_answer``).
    Owns no state: the capability models come from the fleet's reports."""

    def __init__(self, router: Router) -> None:
        self.r = router

    def capability_models(self, kind: str) -> dict[str, list[Node]]:
        """Models of a capability (``image`` / ``stt``) → healthy nodes whose agent serves it."""
        out: dict[str, list[Node]] = {}
        for node in self.r.fleet.healthy_nodes():
            url = node.capabilities.get("service_url")
            if not isinstance(url, str) or not url:
                continue
            for k, name in node.capabilities_report.models:
                if k == kind:
                    out.setdefault(name, []).append(node)
        return out

    def capability_slots(self, node: Node, kind: str, model: str) -> int:
        # agents run one job per backend at a time unless they say otherwise
        return node.capabilities_report.slots.get((kind, model), 1)

    def resolve_capability_model(self, kind: str, requested: str | None) -> str:
        toggle = "image_generation" if kind == "image" else "transcription"
        if not self.r.settings.get(toggle):
            raise HttpError(503, f"{toggle.replace('_', ' ')} is disabled on this router; enable "
                                 f"it with POST /dashboard/api/settings {{\"{toggle}\": true}}")
        models = self.capability_models(kind)
        if not models:
            what = "image generation" if kind == "image" else "speech-to-text"
            raise HttpError(503, f"no online node offers {what}; run herd-node with a "
                                 f"{'image' if kind == 'image' else 'transcription'} backend")
        if not requested:
            return sorted(models, key=lambda m: -len(models[m]))[0]
        name = scoring.normalize_model(requested)
        if name not in models:
            raise HttpError(404, f"model '{requested}' not found; available "
                                 f"{'image' if kind == 'image' else 'speech-to-text'} models: "
                                 f"{', '.join(sorted(models))}")
        return name

    async def capability_call(
        self, request: Request, response: Response, attempt: Attempt, path: str,
        body: bytes | AsyncIterator[bytes], headers: Headers,
        handle: Callable[[UpstreamResponse, Node], Awaitable[None]],
    ) -> None:
        """Route an image/STT job through the one attempt loop: ``path`` on the chosen
        agent's job service; ``handle`` turns its answer into the client's, in the slot."""
        model = attempt.original_model

        async def send(node: Node, rreq: scoring.RouteRequest, choice: scoring.Choice) -> None:
            base = str(node.capabilities.get("service_url"))
            up = await self.r.pool.request(base, "POST", path, headers, body,
                                           head_timeout=self.r.config.first_byte_timeout_s)
            if up.status >= 500:
                data = await up.read(limit=MiB, idle_timeout=10)
                raise UpstreamFailure("status_5xx", f"node {node.node_id} answered "
                                      f"{up.status}: {error_text(data)}",
                                      status=up.status, body=data, headers=up.headers)
            self.r.fleet.breaker_success(node.node_id, model, time.time())
            await handle(up, node)

        rreq = scoring.RouteRequest(model=model, kind=attempt.kind)
        await self.r.proxy.route_with_retries(request, response, rreq, attempt, model, send,
                                      replayable=isinstance(body, bytes))

    async def relay_job(self, up: UpstreamResponse, node: Node, response: Response,
                        attempt: Attempt) -> None:
        """Relay a job's answer as it is (the one relay) and trace it."""
        keep = 64 * 1024 if up.status >= 400 else 0  # an error's text, for the trace
        out = RelayOutcome(LineRelay(framing_of(up.header("content-type"))), keep=keep)

        def trace() -> None:
            status = out.status
            if status == TraceStatus.COMPLETED:
                status = scoring.classify_answer(up.status).trace_status
            self.r.proxy.trace(attempt, status=status, http_status=up.status,
                       error=out.error or error_text(bytes(out.body)), model=attempt.served_model)

        try:
            await relay_answer(up, response, herd_headers(node.node_id, attempt), out,
                               node_id=node.node_id,
                               stall_timeout_s=self.r.config.stall_timeout_s)
        except (ClientGone, asyncio.CancelledError):
            trace()
            raise
        trace()

    def capability_attempt(self, request: Request, kind: str, model: str) -> Attempt:
        return Attempt(request_id=request.request_id, kind=kind, endpoint=request.path,
                       original_model=model, tags=[t for t in [request.key_id] if t],
                       client_ip=request.client_ip, received_at=request.received_at,
                       started=time.monotonic())

    async def h_generate_image(self, request: Request, response: Response) -> None:
        body = await request.json(4 * MiB)
        requested = body.get("model")
        if requested is not None and not isinstance(requested, str):
            raise HttpError(400, "model must be a string")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise HttpError(400, "prompt is required")
        for key in ("width", "height", "steps", "seed"):
            value = body.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value <= 1 << 31):
                raise HttpError(400, f"{key} must be a non-negative integer")
        model = self.resolve_capability_model("image", requested)
        attempt = self.capability_attempt(request, "image", model)
        body["model"] = model

        async def relay(up: UpstreamResponse, node: Node) -> None:
            await self.relay_job(up, node, response, attempt)

        await self.capability_call(request, response, attempt, "/api/generate-image",
                                   dumps(body), [(b"content-type", b"application/json")], relay)

    async def h_v1_images(self, request: Request, response: Response) -> None:
        body = await request.json(4 * MiB)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise HttpError(400, "prompt is required")
        requested = body.get("model")
        model = self.resolve_capability_model(
            "image", requested if isinstance(requested, str) else None)
        size = str(body.get("size") or "1024x1024")
        try:
            width, height = (int(x) for x in size.lower().split("x", 1))
        except ValueError:
            raise HttpError(400, f"size must look like 1024x1024, got {size!r}") from None
        if body.get("response_format") == "url":
            raise HttpError(400, "response_format 'url' is not supported; use 'b64_json'")
        n = body.get("n", 1)
        if not isinstance(n, int) or not 1 <= n <= 4:
            raise HttpError(400, "n must be between 1 and 4")
        attempt = self.capability_attempt(request, "image", model)
        images: list[JSON] = []
        node_ids: list[str] = []

        async def collect(up: UpstreamResponse, node: Node) -> None:
            data = await up.read(limit=256 * MiB, idle_timeout=self.r.config.stall_timeout_s)
            if up.status >= 400:
                message = error_text(data, 500)
                await response.send(up.status, error_body(request.path, up.status, message),
                                    "application/json")
                self.r.proxy.trace(attempt, status=scoring.classify_answer(up.status).trace_status,
                           http_status=up.status, error=message, model=model)
                return
            images.append({"b64_json": base64.b64encode(data).decode(),
                           "revised_prompt": prompt})
            node_ids.append(node.node_id)

        for i in range(n):
            job = {"model": model, "prompt": prompt, "width": width, "height": height}
            if isinstance(body.get("seed"), int):
                job["seed"] = int(body["seed"]) + i
            await self.capability_call(request, response, attempt, "/api/generate-image",
                                       dumps(job), [(b"content-type", b"application/json")],
                                       collect)
            if response.headers_sent:
                return  # an error answer went out
        await response.json({"created": int(time.time()), "data": images},
                            headers=[("x-herd-node", ",".join(node_ids)),
                                     ("x-herd-model", model),
                                     ("x-herd-retries", str(attempt.retries))])
        self.r.proxy.trace(attempt, status=TraceStatus.COMPLETED, http_status=200, model=model)

    async def multipart_prefix(self, request: Request, limit: int
                               ) -> tuple[dict[str, str], bytes, AsyncIterator[bytes]]:
        """Read just enough of a multipart body to learn its small fields (model, language,
        response_format…) that clients send before the file; the rest stays a stream."""
        ctype = request.header("content-type") or ""
        if "multipart/form-data" not in ctype.lower() or "boundary=" not in ctype:
            raise HttpError(400, "expected multipart/form-data with an 'audio' (or 'file') part")
        boundary = ctype.split("boundary=", 1)[1].split(";")[0].strip().strip('"').encode()
        chunks = request.body_chunks(limit)
        prefix = bytearray()
        async for chunk in chunks:
            prefix += chunk
            if b"filename=" in prefix or len(prefix) > 256 * 1024:
                break
        fields: dict[str, str] = {}
        has_file = False
        for part in bytes(prefix).split(b"--" + boundary):
            head, sep, value = part.partition(b"\r\n\r\n")
            if not sep:
                continue
            head_text = head.decode("utf-8", "replace")
            if "filename=" in head_text:
                has_file = has_file or 'name="audio"' in head_text or 'name="file"' in head_text
                continue
            if 'name="' in head_text and value.endswith(b"\r\n"):
                name = head_text.split('name="', 1)[1].split('"', 1)[0]
                fields[name] = value[:-2].decode("utf-8", "replace")[:256]
        if not has_file and request.body_consumed:
            raise HttpError(400, "multipart body has no 'audio' (or 'file') part")

        async def rest() -> AsyncIterator[bytes]:
            yield bytes(prefix)
            async for chunk in chunks:
                yield chunk

        return fields, bytes(prefix), rest()

    async def h_transcribe(self, request: Request, response: Response) -> None:
        fields, _, body = await self.multipart_prefix(request, self.r.limits.max_upload_bytes)
        requested = request.query.get("model") or fields.get("model")
        model = self.resolve_capability_model("stt", requested)
        attempt = self.capability_attempt(request, "stt", model)
        headers = [(b"content-type", (request.header("content-type") or "").encode())]

        async def relay(up: UpstreamResponse, node: Node) -> None:
            await self.relay_job(up, node, response, attempt)

        await self.capability_call(request, response, attempt,
                                   f"/api/transcribe?model={model}", body, headers, relay)

    async def h_v1_transcriptions(self, request: Request, response: Response) -> None:
        fields, _, body = await self.multipart_prefix(request, self.r.limits.max_upload_bytes)
        model = self.resolve_capability_model("stt", fields.get("model") or None)
        fmt = fields.get("response_format", "json")
        if fmt not in ("json", "text", "verbose_json", "srt", "vtt"):
            raise HttpError(400, f"unsupported response_format {fmt!r}")
        attempt = self.capability_attempt(request, "stt", model)
        headers = [(b"content-type", (request.header("content-type") or "").encode())]
        answers: list[tuple[UpstreamResponse, Node, bytes]] = []

        async def read(up: UpstreamResponse, node: Node) -> None:
            data = await up.read(limit=64 * MiB, idle_timeout=self.r.config.stall_timeout_s)
            answers.append((up, node, data))

        await self.capability_call(request, response, attempt,
                                   f"/api/transcribe?model={model}", body, headers, read)
        up, node, data = answers[0]
        herd_headers = [("x-herd-node", node.node_id), ("x-herd-model", model),
                        ("x-herd-retries", str(attempt.retries))]
        if up.status >= 400:
            message = error_text(data, 500)
            self.r.proxy.trace(attempt, status=scoring.classify_answer(up.status).trace_status,
                       http_status=up.status, error=message, model=model)
            await response.send(up.status, error_body(request.path, up.status, message),
                                "application/json", herd_headers)
            return
        result = json.loads(data)
        text = str(result.get("text") or "")
        chunks = [c for c in result.get("chunks") or [] if isinstance(c, dict)]
        self.r.proxy.trace(attempt, status=TraceStatus.COMPLETED, http_status=200, model=model)
        if fmt == "text":
            await response.send(200, text.encode(), "text/plain; charset=utf-8", herd_headers)
        elif fmt in ("srt", "vtt"):
            await response.send(200, subtitles(chunks, fmt).encode(), "text/plain; charset=utf-8",
                                herd_headers)
        elif fmt == "verbose_json":
            end = max((float(c.get("end") or 0) for c in chunks), default=0.0)
            await response.json({"task": "transcribe", "language": result.get("language"),
                                 "duration": end, "text": text,
                                 "segments": [{"id": i, "start": c.get("start"),
                                               "end": c.get("end"), "text": c.get("text")}
                                              for i, c in enumerate(chunks)]},
                                headers=herd_headers)
        else:
            await response.json({"text": text}, headers=herd_headers)


# =======================================================================================
# The router
# =======================================================================================


class Router:
    """Owns the fleet model, the queues and every handler. Built once in ``serve()``."""

    def __init__(self, config: Config, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.policy = config.policy
        self.limits = config.limits
        self.router_id = uuid.uuid4().hex[:12]
        self.rng = rng or random.Random()
        self.pool = Pool(connect_timeout_s=config.connect_timeout_s)
        self.store = store.Store(config.data_dir, retention_days=config.retention_days)
        self.settings: dict[str, object] = dict(DEFAULT_SETTINGS)
        self.metrics = Metrics()
        self.server = HttpServer(self.dispatch, self.limits, self.render_error)
        self.address: tuple[str, int] = ("", 0)
        self.started_at = time.time()
        self.background: set[asyncio.Task[Any]] = set()
        self.admission = Admission(self)
        self.learner = Learner(self.policy, config.slots)
        self.fleet = Fleet(self, self.learner, on_change=self.admission._wake_waiters,
                           on_node_gone=self._node_gone)
        self.proxy = Proxy(self)
        self.jobs = MediaJobs(self)
        self.dashboard = DashboardApi(self)
        self.model_admin = ModelAdmin(self)
        self.learning = LearningKeeper(self)
        self.routes: dict[str, dict[str, Handler]] = self._route_table()
        self.draining = False  # SIGTERM received: /healthz answers 503
        self.mdns_state = "starting" if config.mdns else "off"
        self.peers: RouterBrowser | None = None  # the other routers of the fleet (mDNS)
        self.peer_health: dict[str, JSON] = {}  # mDNS name → their /healthz, probed

    # ---------------------------------------------------------------- lifecycle ----------

    async def start(self) -> tuple[str, int]:
        await self.store.open()
        stored = await self.store.get_settings()
        for key, value in stored.items():
            if key in DEFAULT_SETTINGS:
                self.settings[key] = value
        await self.fleet.consent.load_admissions()
        now = time.time()
        if self.config.persist_learning:
            await self.learning.restore(now)
        else:
            log.info("learning is not kept across restarts (--no-persist-learning)")
        for url in self.config.nodes:
            self.fleet.add_static_node(url, "static", now)
        self.address = await self.server.start(self.config.host, self.config.port)
        if not is_loopback_host(self.config.host) and not self.config.api_keys:
            log.warning(
                "listening on %s with no API key: anyone who can reach this address can use "
                "the fleet; pass --api-key (or HERD_API_KEYS), or --host 127.0.0.1",
                self.config.host or "every address",
            )
        self._spawn(self.fleet._poll_loop(), "poller")
        self._spawn(self.fleet._monitor_loop(), "monitor")
        if self.config.persist_learning:
            self._spawn(self.learning.run(), "learning")
        if self.config.local_ollama:
            self._spawn(self.fleet._probe_local(self.config.local_ollama), "local-probe")
        elif not self.config.nodes:
            log.warning("no node is configured (--node) and the local Ollama probe is off: %s",
                        EMPTY_FLEET)
        if self.config.mdns:
            self._spawn(self._advertise(), "mdns")
        return self.address

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(f"herd-{name}")
        self.background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed: %r", task.get_name(), task.exception())

    def _node_gone(self, node_id: str) -> None:
        """A node left the fleet (held for consent): per-node state that is cheap to
        rebuild goes (idle queues, blob pins); stats, breakers and what was learned stay,
        for when it is approved again."""
        self.admission.forget_node(node_id)
        self.model_admin.forget_node(node_id)

    def begin_drain(self) -> None:
        """SIGTERM: from now on /healthz answers 503, so health-checking load balancers
        take this router out before it stops accepting connections."""
        if not self.draining:
            self.draining = True
            log.info("draining: /healthz answers 503 from now on")

    async def stop(self) -> None:
        self.begin_drain()
        await self.server.stop(self.config.grace_s)
        for task in list(self.background):
            task.cancel()
        if self.background:
            await asyncio.wait(list(self.background), timeout=3)
        self.pool.close()
        if self.learning.restored is not None:  # the store is open and learning is kept
            written = await self.learning.save()
            log.info("learning saved at stop: %d facts changed since the last save", written)
        await self.store.close()

    # ---------------------------------------------------------------- polling -------------

    # ---------------------------------------------------------------- queues --------------

    # ---------------------------------------------------------------- learning ------------

    # ---------------------------------------------------------------- routes --------------

    def _route_table(self) -> dict[str, dict[str, Handler]]:
        r: dict[str, dict[str, Handler]] = {
            "/": {"GET": self.h_root, "HEAD": self.h_root},
            "/api/version": {"GET": self.h_version, "HEAD": self.h_version},
            "/api/tags": {"GET": self.h_tags, "HEAD": self.h_tags},
            "/api/ps": {"GET": self.h_ps},
            "/api/show": {"POST": self.model_admin.h_show},
            "/api/pull": {"POST": self.model_admin.h_pull},
            "/api/push": {"POST": self.model_admin.h_push},
            "/api/create": {"POST": self.model_admin.h_create},
            "/api/copy": {"POST": self.model_admin.h_copy},
            "/api/delete": {"DELETE": self.model_admin.h_delete},
            "/v1/models": {"GET": self.h_v1_models},
            "/fleet/status": {"GET": self.fleet.h_fleet_status},
            "/healthz": {"GET": self.h_healthz, "HEAD": self.h_healthz},
            "/heartbeat": {"POST": self.fleet.h_heartbeat},
            "/metrics": {"GET": self.h_metrics},
        }
        for path in INFERENCE_PATHS:
            r[path] = {"POST": self.proxy.h_inference}
        r["/api/generate-image"] = {"POST": self.jobs.h_generate_image}
        r["/v1/images/generations"] = {"POST": self.jobs.h_v1_images}
        r["/api/transcribe"] = {"POST": self.jobs.h_transcribe}
        r["/v1/audio/transcriptions"] = {"POST": self.jobs.h_v1_transcriptions}
        return r

    async def dispatch(self, request: Request, response: Response) -> None:
        path = request.path
        origin = cross_origin(request)
        if origin is not None and origin_allowed(origin):
            response.cors_origin = origin.encode("latin-1")
        if request.method == "OPTIONS":
            await self.h_options(request, response)
            return
        methods = self.routes.get(path)
        if methods is None and len(path) > 1 and path.endswith("/"):
            methods = self.routes.get(path.rstrip("/"))
        if methods is None:
            if path.startswith("/api/blobs/"):
                ma = self.model_admin
                methods = {"HEAD": ma.h_blob_head, "POST": ma.h_blob_post}
            elif path.startswith("/v1/models/"):
                methods = {"GET": self.h_v1_model}
        if methods is None:
            methods = self.extra_route(path)
        if methods is None:
            if path.startswith(("/dashboard/api/", "/fleet/")):
                raise HttpError(404, f"no such endpoint: {path}")
            await response.send(404, b"404 page not found", "text/plain")
            return
        handler = methods.get(request.method)
        if self.config.api_keys and handler is not None:
            self.check_api_key(request)
        if handler is None:
            await response.send(
                405,
                b"405 method not allowed",
                "text/plain",
                [("allow", ", ".join(sorted(methods)))],
            )
            return
        await handler(request, response)

    def check_api_key(self, request: Request) -> None:
        """With ``--api-key`` set, everything but liveness, heartbeats (fleet key) and the
        dashboard page itself needs ``Authorization: Bearer <key>``."""
        if request.path in ("/", "/healthz", "/heartbeat", "/dashboard"):
            return
        auth = request.header("authorization") or ""
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        given = given or (request.header("x-api-key") or "")
        for key in self.config.api_keys:
            if given and hmac.compare_digest(given.encode(), key.encode()):
                request.key_id = "key:" + hashlib.sha256(key.encode()).hexdigest()[:8]
                return
        raise HttpError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                        headers=[("www-authenticate", 'Bearer realm="herd"')])

    def extra_route(self, path: str) -> dict[str, Handler] | None:
        """Routes outside the Ollama surface: dashboard and its API."""
        if path == "/dashboard" or path.startswith("/dashboard/"):
            return self.dashboard_routes(path)
        return None

    async def render_error(
        self, request: Request | None, response: Response | None, exc: HttpError
    ) -> None:
        if response is None:
            return
        path = request.path if request is not None else "/"
        headers = list(exc.headers)
        if request is not None and request.body_error:
            headers.append(("connection", "close"))
        if (is_openai_path(path) and exc.status in (429, 503)
                and not any(k.lower() == "x-should-retry" for k, _ in headers)):
            headers.append(("x-should-retry", "true"))
        await response.send(
            exc.status,
            error_body(path, exc.status, exc.message),
            "application/json; charset=utf-8",
            headers,
        )

    async def h_options(self, request: Request, response: Response) -> None:
        """Preflight: Ollama's methods and headers (the openai SDKs' ``x-stainless-*`` too),
        herd's own ``X-Herd-*``, and whatever else the page asks for; the origin grant
        itself comes from ``dispatch`` (allowed origins only); a foreign origin is refused
        with 403, as Ollama does."""
        origin = cross_origin(request)
        if origin is not None and not origin_allowed(origin):
            raise HttpError(403, f"cross-origin request from {origin} refused")
        asked = request.header("access-control-request-headers") or ""
        allowed = dict.fromkeys([*CORS_ALLOW_HEADERS, *(h.strip() for h in asked.split(","))])
        headers = [
            ("access-control-allow-methods", "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"),
            ("access-control-allow-headers", ",".join(h for h in allowed if h)),
            ("access-control-max-age", "43200"),
        ]
        await response.send(204, b"", "text/plain", headers)

    # ---------------------------------------------------------------- local answers -------

    async def h_root(self, request: Request, response: Response) -> None:
        await response.send(200, OLLAMA_RUNNING, "text/plain; charset=utf-8")

    async def h_healthz(self, request: Request, response: Response) -> None:
        """Readiness for load balancers: 200 while this router accepts work, 503 from the
        moment it starts draining (SIGTERM). No API key needed, like ``/``."""
        body = {
            "status": "draining" if self.draining else "ok",
            "router_id": self.router_id,
            "fleet_id": self.config.fleet_id,
            "nodes_online": sum(1 for n in self.fleet.nodes.values() if n.status == "online"),
            "requests_active": self.proxy.active_requests,
        }
        headers = [("cache-control", "no-store")]
        if self.draining:
            headers.append(("connection", "close"))
        await response.json(body, 503 if self.draining else 200, headers)

    async def h_version(self, request: Request, response: Response) -> None:
        versions = [n.version for n in self.fleet.healthy_nodes() if n.version]
        if not versions:
            versions = [n.version for n in self.fleet.nodes.values() if n.version]
        if not versions:
            raise HttpError(503, "no Ollama node has reported its version yet")
        lowest = min(versions, key=version_key)
        await response.json({"version": lowest})

    def merged_tags(self) -> list[JSON]:
        """Union of /api/tags over healthy nodes, one entry per model name."""
        by_name: dict[str, list[JSON]] = {}
        for node in self.fleet.healthy_nodes():
            for name, m in node.available_models.named:
                by_name.setdefault(name, []).append(m)
        merged: list[JSON] = []
        for entries in by_name.values():
            digests: dict[str, int] = {}
            for e in entries:
                d = str(e.get("digest") or "")
                digests[d] = digests.get(d, 0) + 1
            best = max(
                entries,
                key=lambda e: (
                    digests[str(e.get("digest") or "")],
                    str(e.get("modified_at") or ""),
                ),
            )
            merged.append(best)
        merged.sort(key=lambda e: str(e.get("modified_at") or ""), reverse=True)
        return merged

    async def h_tags(self, request: Request, response: Response) -> None:
        await response.json({"models": self.merged_tags()})

    async def h_ps(self, request: Request, response: Response) -> None:
        nodes = self.fleet.healthy_nodes()

        async def one(node: Node) -> list[JSON]:
            try:
                data = await self.pool.get_json(node.url, "/api/ps", 2.0)
                if isinstance(data, dict) and isinstance(data.get("models"), list):
                    node.set_loaded([m for m in data["models"] if isinstance(m, dict)], time.time())
            except (UpstreamFailure, ValueError, TimeoutError, OSError):
                pass  # the last known state is the best answer we have
            return [{**m, "node": node.node_id} for m in node.loaded]

        parts = await asyncio.gather(*(one(n) for n in nodes))
        await response.json({"models": [m for part in parts for m in part]})

    def v1_model_entry(self, m: JSON) -> JSON:
        name = str(m.get("name") or m.get("model") or "")
        created = parse_rfc3339(m.get("modified_at")) or 0.0
        owner = name.split("/")[-2] if "/" in name else "library"
        return {"id": name, "object": "model", "created": int(created), "owned_by": owner}

    async def h_v1_models(self, request: Request, response: Response) -> None:
        await response.json(
            {"object": "list", "data": [self.v1_model_entry(m) for m in self.merged_tags()]}
        )

    async def h_v1_model(self, request: Request, response: Response) -> None:
        wanted = request.path[len("/v1/models/") :]
        key = scoring.normalize_model(wanted)
        for m in self.merged_tags():
            if _entry_name(m) == key:
                await response.json(self.v1_model_entry(m))
                return
        raise self.model_not_found(f'"{wanted}"')

    # ---------------------------------------------------------------- model admin ---------

    def pick_node(self, request: Request, body: JSON | None) -> Node | None:
        """Explicit target: ``node_id`` in the body or ``X-Herd-Node``."""
        wanted = (body or {}).get("node_id") if body else None
        wanted = wanted or request.header("x-herd-node")
        if not wanted:
            return None
        node = self.fleet.nodes.get(str(wanted))
        if node is None:
            raise HttpError(404, f"node '{wanted}' is not in the fleet")
        if node.status not in scoring.ROUTABLE_STATUSES:
            raise HttpError(503, f"node '{wanted}' is {node.status}")
        return node

    def model_of(self, body: JSON) -> str:
        raw = body.get("model") or body.get("name")
        if not isinstance(raw, str) or not raw.strip():
            raise HttpError(400, "model is required")
        if not scoring.is_valid_model_name(raw):
            raise HttpError(400, f"invalid model name {raw!r}")
        return raw

    # ---------------------------------------------------------------- inference -----------

    def model_not_found(self, quoted: str, *, kind: str | None = None) -> HttpError:
        """404 for a model no node has; with no node online, say that the fleet is empty
        (that is why, and the fix is not a pull)."""
        message = f"model {quoted} not found"
        if not self.fleet.healthy_nodes():
            message += f"; {EMPTY_FLEET}"
        return HttpError(404, message, kind=kind)

    def require_admin(self, request: Request) -> None:
        """Mutations must not be forgeable by a foreign web page (CSRF, DNS rebinding).

        JSON content type (forces a CORS preflight that foreign origins fail), an
        ``Origin`` that is the router itself or a local page, a ``Host`` that is not a
        rebinding name, and the admin token when one is configured.
        """
        token = self.config.admin_token
        if token:
            given = request.header("x-herd-admin-token") or ""
            auth = request.header("authorization") or ""
            if auth.lower().startswith("bearer "):
                given = given or auth[7:].strip()
            if not hmac.compare_digest(given.encode(), token.encode()):
                raise HttpError(401, "admin token required for this endpoint")
        ctype = (request.header("content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HttpError(415, "this endpoint changes the fleet: send Content-Type: "
                                 "application/json")
        origin = request.header("origin")
        host = request.header("host") or ""
        if origin and origin != "null":
            parts = urlsplit(origin)
            if parts.netloc != host and not origin_allowed(origin):
                raise HttpError(403, f"cross-origin request from {origin} refused")
        elif origin == "null":
            raise HttpError(403, "requests from opaque origins are refused")
        if not token and not host_is_trusted(host, self.config.trusted_hosts):
            raise HttpError(403, f"Host {host!r} is not trusted for admin requests "
                                 "(DNS rebinding guard; use --trusted-host or --admin-token)")

    def guard_browser_mutation(self, request: Request) -> None:
        """Ollama's own mutating endpoints (pull, delete, copy, create, push, blobs).

        Browsers send ``Origin`` on every cross-site POST/DELETE, so a request with a
        foreign or opaque Origin, or one whose Host is a rebinding name, is refused. Requests
        without Origin (curl, the CLI, SDKs) pass unchanged: ``curl -d`` sends a form
        content type and real Ollama accepts it, so requiring JSON here would break the
        documented usage. The dashboard's own admin endpoints use ``require_admin``.
        """
        token = self.config.admin_token
        if token and request.header("origin") is not None:
            self.require_admin(request)
            return
        origin = request.header("origin")
        if origin is None:
            return
        host = request.header("host") or ""
        if origin == "null" or (urlsplit(origin).netloc != host and not origin_allowed(origin)):
            raise HttpError(403, f"cross-origin request from {origin} refused")
        if not host_is_trusted(host, self.config.trusted_hosts):
            raise HttpError(403, f"Host {host!r} is not trusted (DNS rebinding guard)")

    # ---------------------------------------------------------------- dashboard -----------

    def dashboard_routes(self, path: str) -> dict[str, Handler] | None:
        ma = self.model_admin
        table: dict[str, dict[str, Handler]] = {
            "/dashboard": {"GET": self.dashboard.h_dashboard},
            "/dashboard/api/traces": {"GET": self.dashboard.h_dash_traces},
            "/dashboard/api/usage": {"GET": self.dashboard.h_dash_usage},
            "/dashboard/api/models": {"GET": self.dashboard.h_dash_models},
            "/dashboard/api/apps": {"GET": self.dashboard.h_dash_apps},
            "/dashboard/api/trends": {"GET": self.dashboard.h_dash_trends},
            "/dashboard/api/settings": {"GET": self.dashboard.h_dash_settings,
                                        "POST": self.dashboard.h_dash_settings_post},
            "/dashboard/api/model-management": {"GET": ma.h_dash_model_management},
            "/dashboard/api/pull": {"GET": ma.h_dash_pull_jobs, "POST": ma.h_dash_pull},
            "/dashboard/api/delete": {"POST": self.model_admin.h_dash_delete},
            "/dashboard/api/benchmarks": {"GET": self.dashboard.h_dash_benchmarks,
                                          "POST": self.dashboard.h_dash_benchmark_start,
                                          "DELETE": self.dashboard.h_dash_benchmark_cancel},
            "/dashboard/api/events": {"GET": self.dashboard.h_dash_events},
        }
        table.update(self.analytics_routes())
        table.update(self.consent_routes())
        return table.get(path.rstrip("/") if path != "/" else path)

    def analytics_routes(self) -> dict[str, dict[str, Handler]]:
        """Health and recommendations endpoints (see the analytics section)."""
        return {
            "/dashboard/api/health": {"GET": self.dashboard.h_dash_health},
            "/dashboard/api/recommendations": {"GET": self.dashboard.h_dash_recommendations},
        }

    # Analytics: the router gathers facts (fleet model + store reads) into frozen inputs;
    # scoring.health_checks / scoring.recommendations decide. Answers are cached 10 s.

    # ---------------------------------------------------------------- fleet endpoints -----

    def routers_public(self, now: float) -> JSON:
        """This router and the other routers of its fleet that mDNS shows (each keeps its
        own traces and settings; the nodes report to all of them)."""
        peers: list[JSON] = []
        mono = time.monotonic()
        for name, c in sorted((self.peers.candidates if self.peers else {}).items()):
            probe = self.peer_health.get(name, {})
            peers.append({
                "router_id": c.router_id, "url": c.url, "urls": list(c.urls),
                "version": c.version, "announced_at": round(now - (mono - c.seen), 1),
                "state": probe.get("state", "unknown"), "checked_at": probe.get("checked_at"),
            })
        return {
            "self": {"router_id": self.router_id, "fleet_id": self.config.fleet_id,
                     "version": __version__, "draining": self.draining},
            "mdns": self.mdns_state,
            "peers": peers,
        }

    # ---------------------------------------------------------------- consent (issue 18) -
    # An unsigned beat from another machine joins only with the operator's approval, which
    # binds the node id to the source address and Ollama URL approved; anything else is
    # held (pending or rejected) and never routed to. Trusted without a click: --node
    # nodes (never beat), agents on this machine (own source address and Ollama URL),
    # beats signed with the fleet key, and everyone with --open-fleet.

    def consent_routes(self) -> dict[str, dict[str, Handler]]:
        return {
            "/dashboard/api/nodes/approve": {"POST": self.fleet.consent.h_node_approve},
            "/dashboard/api/nodes/reject": {"POST": self.fleet.consent.h_node_reject},
        }

    async def h_metrics(self, request: Request, response: Response) -> None:
        await response.send(
            200,
            self.metrics.render(self.fleet.nodes.values(), self.admission.queues.values(),
                                self.proxy.active_requests).encode(),
            "text/plain; version=0.0.4; charset=utf-8",
        )

    # ---------------------------------------------------------------- discovery -----------

    async def _advertise(self) -> None:
        """Announce ``_herd._tcp.local.`` so node agents find the router by mDNS, and list
        the other routers of the fleet (``/fleet/status`` → ``routers.peers``)."""
        try:
            from zeroconf import InterfaceChoice, IPVersion
            from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
        except ImportError:
            self.mdns_state = "unavailable"
            log.warning(
                "zeroconf is not installed: no mDNS advertisement; start agents with --router-url"
            )
            return
        host, port = self.address
        addresses = [host] if host not in ("0.0.0.0", "::", "") else local_addresses()
        info = AsyncServiceInfo(
            MDNS_TYPE,
            f"herd-{self.router_id}.{MDNS_TYPE}",
            port=port,
            parsed_addresses=addresses,
            properties={
                "fleet_id": self.config.fleet_id,
                "router_id": self.router_id,
                "version": __version__,
            },
            server=f"herd-{self.router_id}.local.",
        )
        interfaces: Any = addresses if host not in ("0.0.0.0", "::", "") else InterfaceChoice.All
        try:
            azc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        except Exception:
            self.mdns_state = "failed"
            raise
        peers = RouterBrowser(self.config.fleet_id, exclude=self.router_id)
        try:
            await azc.async_register_service(info)
            log.info("advertising %s on port %d (mDNS)", MDNS_TYPE, port)
            await peers.attach(azc.zeroconf)
            self.peers = peers
            self.mdns_state = "on"
            await self._probe_peers(peers)
        finally:
            self.peers = None
            await peers.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    # the goodbye is sent by the returned task: wait for it, so agents and
                    # peers drop this router at once instead of at the record's expiry
                    await (await azc.async_unregister_service(info))
            await azc.async_close()

    async def _probe_peers(self, peers: RouterBrowser) -> None:
        """Ask each peer's /healthz now and then: a router killed without a goodbye stays
        in mDNS for a while; the operator sees it as unreachable."""
        every = max(2.0, self.config.poll_interval_s)
        while True:
            names = list(peers.candidates)

            async def probe(name: str) -> None:
                url = peers.candidates[name].url
                try:
                    async with asyncio.timeout(2.0):
                        resp = await self.pool.request(url, "GET", "/healthz", [], b"")
                        await resp.read(limit=64 * 1024, idle_timeout=2.0)
                    state = {200: "ready", 503: "draining"}.get(resp.status, f"http {resp.status}")
                except (UpstreamFailure, ConnectionClosed, TimeoutError, OSError):
                    state = "unreachable"
                self.peer_health[name] = {"state": state, "checked_at": time.time()}

            await asyncio.gather(*(probe(n) for n in names))
            for gone in set(self.peer_health) - set(peers.candidates):
                del self.peer_health[gone]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    peers.changed.clear()
                    await peers.changed.wait()


MDNS_TYPE = "_herd._tcp.local."


@dataclass(slots=True)
class RouterCandidate:
    """A router of our fleet seen by mDNS."""

    name: str  # the mDNS service name
    urls: list[str]
    router_id: str
    seen: float  # monotonic time of the last Added/Updated
    version: str = ""
    failures: int = 0

    @property
    def url(self) -> str:
        """Rotates through the advertised addresses as failures accumulate."""
        return self.urls[(self.failures // 2) % len(self.urls)]


def rank_addresses(addresses: Sequence[str]) -> list[str]:
    """LAN addresses first; loopback last (it only works when the router is on this host)."""
    return sorted(addresses, key=lambda a: (a.startswith("127."), a))


class RouterBrowser:
    """Keeps the list of ``_herd._tcp.local.`` routers of one fleet current: Added/Updated
    resolve the record, Removed (a goodbye or an expired record) drops it. The node agent
    reports to every router it lists; a router lists its peers (``exclude`` = its own id).
    Runs on a zeroconf instance the owner made (``attach``)."""

    def __init__(self, fleet_id: str, exclude: str = "") -> None:
        self.fleet_id = fleet_id
        self.exclude = exclude
        self.candidates: dict[str, RouterCandidate] = {}
        self.changed = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.zc: Any = None
        self.browser: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def attach(self, zc: Any) -> None:
        from zeroconf.asyncio import AsyncServiceBrowser

        self.loop = asyncio.get_running_loop()
        self.zc = zc
        self.browser = AsyncServiceBrowser(zc, MDNS_TYPE, handlers=[self._on_service_change])

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.browser is not None:
            with contextlib.suppress(Exception):
                await self.browser.async_cancel()

    def _on_service_change(self, **kwargs: Any) -> None:
        name = str(kwargs["name"])
        state = str(getattr(kwargs["state_change"], "name", kwargs["state_change"]))
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._schedule, name, state)

    def _schedule(self, name: str, state: str) -> None:
        if state == "Removed":
            gone = self.candidates.pop(name, None)
            if gone is not None:
                log.info("router %s (%s) left (mDNS goodbye)", gone.router_id, gone.url)
                self.changed.set()
            return
        task = asyncio.ensure_future(self._resolve(name))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _resolve(self, name: str) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(MDNS_TYPE, name)
        if not await info.async_request(self.zc, 3000):
            log.debug("mDNS: could not resolve %s", name)
            return
        props = {
            k.decode(errors="replace"): (v or b"").decode(errors="replace")
            for k, v in info.properties.items()
        }
        if props.get("fleet_id", "default") != self.fleet_id:
            log.debug("mDNS: ignoring %s of fleet %r", name, props.get("fleet_id"))
            return
        router_id = props.get("router_id", "")
        if self.exclude and router_id == self.exclude:
            return
        addresses = rank_addresses(info.parsed_addresses(IPVersion.V4Only))
        if not addresses or not info.port:
            return
        urls = [f"http://{a}:{info.port}" for a in addresses]
        old = self.candidates.get(name)
        if old is None or old.urls != urls:
            self.candidates[name] = RouterCandidate(
                name, urls, router_id, time.monotonic(), props.get("version", "")
            )
            log.info("router %s found by mDNS at %s", router_id or "?", urls[0])
            self.changed.set()
        else:
            old.seen = time.monotonic()


def subtitles(chunks: Sequence[JSON], fmt: str) -> str:
    """SRT or WebVTT from transcription chunks ``{text, start, end}``."""

    def stamp(t: object) -> str:
        secs = float(t) if isinstance(t, int | float) else 0.0
        h, rem = divmod(secs, 3600)
        m, s = divmod(rem, 60)
        sep = "," if fmt == "srt" else "."
        return f"{int(h):02d}:{int(m):02d}:{int(s):02d}{sep}{int((s % 1) * 1000):03d}"

    lines = ["WEBVTT", ""] if fmt == "vtt" else []
    for i, c in enumerate(chunks, 1):
        if fmt == "srt":
            lines.append(str(i))
        lines += [f"{stamp(c.get('start'))} --> {stamp(c.get('end'))}",
                  str(c.get("text") or "").strip(), ""]
    return "\n".join(lines)


def find_dashboard() -> Path | None:
    """dashboard.html beside herd.py (checkout) or in ``share/herd`` (pip install)."""
    for candidate in (Path(__file__).with_name("dashboard.html"),
                      Path(sys.prefix) / "share" / "herd" / "dashboard.html"):
        if candidate.is_file():
            return candidate
    return None


def host_is_trusted(host: str, extra: Sequence[str]) -> bool:
    """A Host header that cannot be an attacker's rebinding name: an IP, localhost, the
    machine's own names, ``*.local``, or one configured with ``--trusted-host``."""
    name = host.rsplit(":", 1)[0].strip("[]").lower() if host else ""
    if not name:
        return True
    if name in ("localhost", socket.gethostname().lower(), socket.getfqdn().lower()):
        return True
    if name.endswith((".localhost", ".local")) or name in (h.lower() for h in extra):
        return True
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in name else socket.AF_INET, name)
        return True
    except OSError:
        return False


def percentile(values: Sequence[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * pct / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return round(ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo), 3)


def own_addresses() -> frozenset[str]:
    """Every address of this host's interfaces (loopback included), as the kernel lists
    them (ifaddr); blocking: called through a thread."""
    addrs: set[str] = set()
    with contextlib.suppress(ImportError, OSError):
        import ifaddr

        for adapter in ifaddr.get_adapters():
            for ip in adapter.ips:
                addrs.add(ip.ip if isinstance(ip.ip, str) else str(ip.ip[0]))
    return frozenset(addrs)


def local_addresses() -> list[str]:
    """IPv4 addresses of this host's up interfaces, loopback only when there is nothing else.

    The interfaces are asked (ifaddr comes with zeroconf), not the hostname: Debian maps the
    hostname to 127.0.1.1 and a network namespace does not own the addresses /etc/hosts lists,
    and advertising either would send every agent to an address it cannot reach.
    """
    addrs: set[str] = set()
    try:
        import ifaddr

        for adapter in ifaddr.get_adapters():
            for ip in adapter.ips:
                if isinstance(ip.ip, str) and not ip.ip.startswith(("127.", "169.254.")):
                    addrs.add(ip.ip)
    except (ImportError, OSError):
        with contextlib.suppress(OSError):
            for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
                if not str(info[4][0]).startswith("127."):
                    addrs.add(str(info[4][0]))
    return sorted(addrs) or ["127.0.0.1"]


def version_key(v: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in v.split("-")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


CORS_ALLOW_HEADERS = (
    "Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With", "OpenAI-Beta",
    *(f"x-stainless-{h}" for h in ("arch", "async", "custom-poll-interval", "helper-method",
                                   "lang", "os", "package-version", "poll-helper",
                                   "retry-count", "runtime", "runtime-version", "timeout")),
    "X-Herd-Node", "X-Herd-Tags", "X-Herd-No-Fallback", "X-Api-Key",
)


def cross_origin(request: Request) -> str | None:
    """The request's ``Origin`` when it is a CORS request (not the router's own origin)."""
    origin = request.header("origin")
    if not origin:
        return None
    host = request.header("host") or ""
    return None if origin in (f"http://{host}", f"https://{host}") else origin


def origin_allowed(origin: str) -> bool:
    """Ollama's default CORS origins: local hosts and app-like schemes."""
    parts = urlsplit(origin)
    if parts.scheme in ("app", "file", "tauri", "vscode-webview", "vscode-file"):
        return True
    return parts.scheme in ("http", "https") and (parts.hostname or "") in (
        "localhost",
        "127.0.0.1",
        "0.0.0.0",
        "::1",
    )


def apply_context_decision(body: JSON, decision: scoring.ContextDecision) -> JSON:
    out = dict(body)
    opts = dict(out.get("options") or {})
    if decision.action == "drop":
        opts.pop("num_ctx", None)
    elif decision.action in ("set", "upgrade") and decision.num_ctx:
        opts["num_ctx"] = decision.num_ctx
    if opts:
        out["options"] = opts
    else:
        out.pop("options", None)
    if decision.action == "upgrade":
        out["model"] = decision.model
    return out


def metrics_from_final(final: JSON | None) -> dict[str, Any]:
    """Token counts and durations (ms) from Ollama's final chunk or an OpenAI usage object."""
    out: dict[str, Any] = {
        "prompt_tokens": None,
        "completion_tokens": None,
        "load_ms": None,
        "prompt_eval_ms": None,
        "eval_ms": None,
    }
    if not final:
        return out

    def ms(v: object) -> float | None:
        return v / 1e6 if isinstance(v, int | float) and not isinstance(v, bool) else None

    def count(v: object) -> int | None:
        return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    if "eval_count" in final or "prompt_eval_count" in final or "load_duration" in final:
        out["prompt_tokens"] = count(final.get("prompt_eval_count"))
        out["completion_tokens"] = count(final.get("eval_count"))
        out["load_ms"] = ms(final.get("load_duration"))
        out["prompt_eval_ms"] = ms(final.get("prompt_eval_duration"))
        out["eval_ms"] = ms(final.get("eval_duration"))
    usage = usage_of(final)
    if isinstance(usage, dict):
        out["prompt_tokens"] = count(usage.get("prompt_tokens") or usage.get("input_tokens"))
        out["completion_tokens"] = count(
            usage.get("completion_tokens") or usage.get("output_tokens")
        )
    return out


# =======================================================================================
# Lifecycle and CLI
# =======================================================================================


def env_default(name: str, default: str | None) -> str | None:
    return os.environ.get(name, default)


# (flag, environment twin, type, default, help): every value option of the router, in one
# table so that each flag and its twin are defined once.
ROUTER_OPTIONS: tuple[tuple[str, str, type, object, str], ...] = (
    ("--host", "HERD_HOST", str, "0.0.0.0", "address to listen on"),
    ("--port", "HERD_PORT", int, 11435, "port; 0 picks a free one and prints it"),
    ("--data-dir", "HERD_DATA_DIR", str, str(Path.home() / ".fleet-manager"),
     "database and logs"),
    ("--local-ollama", "HERD_LOCAL_OLLAMA", str, "http://127.0.0.1:11434",
     "local Ollama added as a node when it answers; 'off' to disable"),
    ("--poll-interval", "HERD_POLL_INTERVAL", float, 5.0,
     "seconds between polls of static nodes"),
    ("--heartbeat-interval", "HERD_HEARTBEAT_INTERVAL", float, 5.0,
     "expected agent heartbeat interval, seconds"),
    ("--first-byte-timeout", "HERD_FIRST_BYTE_TIMEOUT", float, 300.0,
     "seconds to wait for a node's first byte before retrying elsewhere"),
    ("--stall-timeout", "HERD_STALL_TIMEOUT", float, 300.0,
     "reap streams with no progress for this many seconds"),
    ("--max-queue-wait", "HERD_MAX_QUEUE_WAIT", float, 30.0,
     "seconds a request may wait for a slot before 503"),
    ("--retention-days", "HERD_RETENTION_DAYS", float, 30.0, "keep raw traces this long"),
    ("--drain-delay", "HERD_DRAIN_DELAY", float, 0.0,
     "seconds between SIGTERM (GET /healthz turns 503) and closing the listener; set it "
     "above your load balancer's health-check interval"),
    ("--grace", "HERD_GRACE", float, 10.0,
     "seconds in-flight requests (streams too) may take to finish after the listener closes"),
    ("--max-body-mb", "HERD_MAX_BODY_MB", float, 512.0, "JSON request body limit in MiB"),
    ("--max-connections", "HERD_MAX_CONNECTIONS", int, 1024, "concurrent client connections"),
    ("--fleet-key", "HERD_FLEET_KEY", str, None, "shared secret that signs heartbeats"),
    ("--fleet-id", "HERD_FLEET_ID", str, "default", "fleet name advertised by mDNS"),
    ("--admin-token", "HERD_ADMIN_TOKEN", str, None,
     "token required by endpoints that change the fleet"),
    ("--api-keys-file", "HERD_API_KEYS_FILE", str, None, "file with one API key per line"),
    ("--log-level", "HERD_LOG_LEVEL", str, "INFO", "console log level"),
)


def add_env_options(
    p: argparse.ArgumentParser,
    options: Iterable[tuple[str, str, type, object, str]],
    group: argparse._ArgumentGroup | None = None,
) -> None:
    """Add ``--flag`` options whose default comes from an environment twin when it is set
    (to ``group`` when given). Used by the router and the node agent alike."""
    for flag, env, kind, default, text in options:
        raw = os.environ.get(env)
        value: object = default
        if raw not in (None, ""):
            try:
                value = kind(raw)
            except ValueError:
                p.error(f"{env}={raw!r} is not a valid {kind.__name__}")
        shown = "" if default is None else f" (default {default})"
        (group or p).add_argument(flag, type=kind, default=value, help=f"{text} [{env}]{shown}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="herd",
        description="One endpoint (Ollama + OpenAI API) for a fleet of Ollama machines. "
        "Every flag has an environment twin, shown in brackets.",
    )
    add_env_options(p, ROUTER_OPTIONS)
    p.add_argument("--version", action="version", version=f"herd {__version__}")
    p.add_argument("--node", action="append", default=None,
                   help="static node URL, repeatable [HERD_NODES, comma separated]")
    p.add_argument("--open-fleet", action="store_true",
                   default=env_default("HERD_OPEN_FLEET", "0") in ("1", "true", "on"),
                   help="let unsigned agents from other machines join without approval, as "
                   "before consent (one warning at start) [HERD_OPEN_FLEET=1]")
    p.add_argument("--no-mdns", action="store_true",
                   default=env_default("HERD_MDNS", "1") in ("0", "false", "off"),
                   help="do not advertise by mDNS [HERD_MDNS=0]")
    p.add_argument("--no-persist-learning", action="store_true",
                   default=env_default("HERD_PERSIST_LEARNING", "1") in ("0", "false", "off"),
                   help="forget what was learned about the nodes (slots, memory, speeds, "
                   "cache affinity) at exit instead of keeping it in latency.db "
                   "[HERD_PERSIST_LEARNING=0]")
    p.add_argument("--slots", action="append", default=[],
                   help="NODE=N parallel slots for a node, repeatable [HERD_SLOTS]")
    p.add_argument("--scoring", action="append", default=[], metavar="KEY=VALUE",
                   help="override one routing constant of scoring.Policy (expert tuning, "
                   "e.g. hot_bonus=20), repeatable [HERD_SCORING, comma separated]")
    p.add_argument("--api-key", action="append", default=None,
                   help="client API key (Bearer), repeatable [HERD_API_KEYS, comma separated]")
    p.add_argument("--trusted-host", action="append", default=[],
                   help="extra Host name trusted for admin requests [HERD_TRUSTED_HOSTS]")
    return p


def config_from_args(argv: Sequence[str] | None = None) -> Config:
    args = build_parser().parse_args(argv)
    nodes = list(args.node or [])
    if not nodes and os.environ.get("HERD_NODES"):
        nodes = [u.strip() for u in os.environ["HERD_NODES"].split(",") if u.strip()]
    slots: dict[str, int] = {}
    for item in list(args.slots) + [s for s in os.environ.get("HERD_SLOTS", "").split(",") if s]:
        name, _, n = item.partition("=")
        if n.isdigit() and int(n) > 0:
            slots[name.strip()] = int(n)
    keys = list(args.api_key or [])
    if not keys and os.environ.get("HERD_API_KEYS"):
        keys = [k.strip() for k in os.environ["HERD_API_KEYS"].split(",") if k.strip()]
    if args.api_keys_file:
        lines = Path(args.api_keys_file).read_text().splitlines()
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    trusted = list(args.trusted_host) + [
        h for h in os.environ.get("HERD_TRUSTED_HOSTS", "").split(",") if h
    ]
    limits = Limits(
        max_json_bytes=int(args.max_body_mb * MiB), max_connections=args.max_connections
    )
    policy = dataclasses.replace(scoring.Policy(), max_queue_wait_s=args.max_queue_wait)
    tuning = list(args.scoring) + [
        t for t in os.environ.get("HERD_SCORING", "").split(",") if t.strip()
    ]
    try:
        policy = scoring.tuned_policy(policy, tuning)
    except ValueError as exc:
        build_parser().error(str(exc))
    local = (
        None if str(args.local_ollama).lower() in ("", "off", "none", "0") else args.local_ollama
    )
    return Config(
        host=args.host,
        port=args.port,
        nodes=nodes,
        data_dir=Path(args.data_dir).expanduser(),
        local_ollama=local,
        poll_interval_s=args.poll_interval,
        heartbeat_interval_s=args.heartbeat_interval,
        first_byte_timeout_s=args.first_byte_timeout,
        stall_timeout_s=args.stall_timeout,
        retention_days=args.retention_days,
        drain_delay_s=max(0.0, args.drain_delay),
        grace_s=max(0.0, args.grace),
        fleet_key=args.fleet_key or None,
        open_fleet=args.open_fleet,
        fleet_id=args.fleet_id,
        mdns=not args.no_mdns,
        slots=slots,
        limits=limits,
        policy=policy,
        log_level=args.log_level,
        admin_token=args.admin_token or None,
        api_keys=keys,
        trusted_hosts=trusted,
        persist_learning=not args.no_persist_learning,
    )


def configure_logging(level: str, jsonl_path: Path, logger_name: str) -> None:
    """Human-readable console log at ``level``; JSON lines (INFO and up) in ``jsonl_path``.
    Shared by the router and the node agent."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level.upper())
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root.addHandler(console)
    try:
        handler = store.setup_jsonl_logging(jsonl_path, logger_name=logger_name)
        handler.setLevel(logging.INFO)
    except OSError as exc:
        logging.getLogger(logger_name).warning("JSONL log disabled: %s", exc)


def setup_logging(config: Config) -> None:
    configure_logging(config.log_level, config.data_dir / "logs" / "herd.jsonl", "herd")


async def serve(config: Config) -> None:
    router = Router(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    host, port = await router.start()
    tune_gc()
    shown = config.host if config.host not in ("", "0.0.0.0", "::") else host
    print(f"herd listening on {shown}:{port}", flush=True)
    try:
        await stop.wait()
        router.begin_drain()
        if config.drain_delay_s > 0:
            # keep serving while load balancers see /healthz 503 and move away; a second
            # signal skips the rest of the wait
            log.info("drain delay: still serving for %.1fs", config.drain_delay_s)
            stop.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(config.drain_delay_s):
                    await stop.wait()
    finally:
        log.info("shutting down: finishing in-flight requests (grace %.0fs)", config.grace_s)
        await router.stop()


GC_YOUNG_ALLOCATIONS = 20_000  # young collections: every this many allocations (CPython: 700)


def tune_gc(logger: logging.Logger = log) -> None:
    """For a long-running server, once started: what is alive now (modules, classes, the
    router's tables) is frozen out of the cyclic collector, so a full collection does not
    walk it again and again; and young collections run every ``GC_YOUNG_ALLOCATIONS``
    allocations instead of 700 (a request allocates hundreds of short-lived objects, most
    freed by reference counting anyway). With 1,000 streams in flight the collector took
    about 5 % of herd's CPU, with full collections of ~55 ms each."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG_ALLOCATIONS), middle, old)
    logger.info("garbage collector: %d startup objects frozen, young collections every %d "
                "allocations", gc.get_freeze_count(), gc.get_threshold()[0])


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop when installed, else asyncio's own — as a loop factory, which works on
    every Python (``uvloop.install()`` is deprecated from 3.12)."""
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed: using the standard asyncio event loop")
        return asyncio.new_event_loop
    return cast(Callable[[], asyncio.AbstractEventLoop], uvloop.new_event_loop)


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop.Loop`` or e.g. ``asyncio.unix_events._UnixSelectorEventLoop``."""
    return f"{type(loop).__module__}.{type(loop).__qualname__}"


def run_main(main: Coroutine[Any, Any, None], logger: logging.Logger = log) -> None:
    """Run a program's main coroutine on the best event loop and say which one it is."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        logger.info("event loop: %s", loop_name(runner.get_loop()))
        runner.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    config = config_from_args(argv)
    setup_logging(config)
    with contextlib.suppress(KeyboardInterrupt):
        run_main(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
