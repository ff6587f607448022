"""Hardening: a real router on loopback against hostile and broken clients (issue 9, 4-5).

Every hostile exchange is followed by the same health check: a normal request is served,
no connection is left behind in the router, no unhandled error was logged, and the store
still records traces. Limits are shrunk through ``make_router(limits={...})`` so deadlines
fire in fractions of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import herd
from tests.conftest import RouterFactory, RunningRouter, router_config
from tests.fake_ollama import FakeModel, FakeOllama
from tests.http_helpers import parse_response

MODEL = "llama3.2:3b"
MiB = 1024 * 1024
VERSION = b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n"
GEN = json.dumps({"model": MODEL, "prompt": "hi", "stream": False}).encode()


# =======================================================================================
# Raw-socket helpers
# =======================================================================================


@dataclass
class Reply:
    status: int | None
    raw: bytes
    closed: bool  # the router closed the connection (EOF) within the read timeout
    elapsed: float

    @property
    def body(self) -> bytes:
        return self.raw.partition(b"\r\n\r\n")[2]


def _status_of(data: bytes) -> int | None:
    if not data.startswith(b"HTTP/1."):
        return None
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def _complete(data: bytes) -> bool:
    """A whole response with a Content-Length body is in ``data``."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            return len(rest) >= int(v.strip())
    return False


async def exchange(
    port: int,
    parts: bytes | list[bytes],
    *,
    delay: float = 0.0,
    read_timeout: float = 5.0,
    until_eof: bool = False,
    half_close: bool = False,
) -> Reply:
    """Send ``parts`` (``delay`` s apart) while reading; stop at EOF, a complete response
    (unless ``until_eof``), or ``read_timeout`` s after the last part was sent."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunks = [parts] if isinstance(parts, bytes) else parts
    buf = bytearray()
    eof = asyncio.Event()
    answered = asyncio.Event()

    async def read_all() -> None:
        try:
            while True:
                try:
                    got = await reader.read(65536)
                except ConnectionError:
                    got = b""
                if not got:
                    return
                buf.extend(got)
                if _complete(bytes(buf)):
                    answered.set()
        finally:
            eof.set()

    reading = asyncio.ensure_future(read_all())
    try:
        for i, part in enumerate(chunks):
            if i and delay:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await eof.wait()
            if eof.is_set():
                break
            writer.write(part)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        if half_close and writer.can_write_eof() and not eof.is_set():
            with contextlib.suppress(OSError):
                writer.write_eof()
        waits = [asyncio.ensure_future(eof.wait())]
        if not until_eof:
            waits.append(asyncio.ensure_future(answered.wait()))
        _, pending = await asyncio.wait(
            waits, timeout=read_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for w in pending:
            w.cancel()
        closed = eof.is_set()
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    data = bytes(buf)
    return Reply(_status_of(data), data, closed, time.monotonic() - t0)


def post(
    path: str, body: bytes, *, extra: bytes = b"", ctype: bytes = b"application/json"
) -> bytes:
    return (
        b"POST "
        + path.encode()
        + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
        + ctype
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n"
        + extra
        + b"\r\n"
        + body
    )


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def herd_errors() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    logger = logging.getLogger("herd")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def normal_request(port: int) -> Reply:
    reply = await exchange(port, post("/api/generate", GEN), read_timeout=10)
    assert reply.status == 200, reply.raw[:300]
    assert json.loads(reply.body)["done"] is True
    return reply


async def trace_count(r: RunningRouter) -> int:
    await r.router.store.flush()
    return len(await r.router.store.traces(limit=100_000))


async def assert_healthy(r: RunningRouter, errors: ErrorLog | None = None) -> None:
    """Normal request served, no connection left behind, store still writes, no ERROR log."""
    before = await trace_count(r)
    await normal_request(r.port)
    async with asyncio.timeout(5):
        while r.router.server.connections:
            await asyncio.sleep(0.01)
    assert not r.router.server.busy
    assert await trace_count(r) == before + 1
    if errors is not None:
        assert not errors.records, [rec.getMessage() for rec in errors.records]


@pytest.fixture
async def fake() -> Any:
    node = FakeOllama([FakeModel(MODEL)], tokens_per_s=0, load_delay_s=0)
    await node.start()
    yield node
    await node.stop()


async def start_router(
    make_router: RouterFactory, node: FakeOllama, **limits: Any
) -> RunningRouter:
    base = {"header_timeout_s": 0.5, "body_idle_timeout_s": 0.5, "keepalive_idle_s": 1.0}
    r = await make_router([node.url], limits={**base, **limits})
    await r.wait_ready()
    return r


# =======================================================================================
# Malformed HTTP
# =======================================================================================

BAD_HTTP: dict[str, tuple[bytes, set[int]]] = {
    "garbage request line": (b"\x00\x01\x02garbage\xff\r\n\r\n", {400}),
    "no http version": (b"GET /\r\nHost: x\r\n\r\n", {400}),
    "missing host": (b"GET / HTTP/1.1\r\n\r\n", {400}),
    "space in header name": (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", {400}),
    "bad chunk size": (
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nabc\r\n0\r\n\r\n",
        {400},
    ),
    "chunk longer than announced": (
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nabcdef\r\n0\r\n\r\n",
        {400},
    ),
    "unsupported transfer-encoding": (
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        {400, 501},
    ),
    "conflicting content-length": (
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Content-Length: 6\r\n\r\nhello!",
        {400},
    ),
    "negative content-length": (
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        {400},
    ),
    "huge content-length": (
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
        {400, 413},
    ),
    "header too large": (
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n",
        {431},
    ),
    "too many headers": (
        b"GET / HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(150))
        + b"\r\n",
        {431},
    ),
    "request line too long": (
        b"GET /" + b"a" * 300_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        {414, 431},
    ),
    "http/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400, 404, 505}),
}


@pytest.mark.parametrize("case", list(BAD_HTTP))
async def test_malformed_http_gets_4xx_and_router_stays_healthy(
    make_router: RouterFactory, fake: FakeOllama, herd_errors: ErrorLog, case: str
) -> None:
    r = await start_router(make_router, fake)
    payload, statuses = BAD_HTTP[case]
    reply = await exchange(r.port, payload, until_eof=True)
    assert reply.status in statuses, reply.raw[:300]
    assert reply.closed, "the router must close a connection after a framing error"
    await assert_healthy(r, herd_errors)


async def test_content_length_with_transfer_encoding_is_rejected_or_closed(
    make_router: RouterFactory, fake: FakeOllama, herd_errors: ErrorLog
) -> None:
    """RFC 9112 §6.3: TE overrides CL, and the server MUST close the connection afterwards
    (a pipelined request behind it could be a smuggling attempt)."""
    r = await start_router(make_router, fake)
    body = GEN
    smuggled = b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n"
    payload = (
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(body)
        + body
        + b"\r\n0\r\n\r\n"
        + smuggled
    )
    reply = await exchange(r.port, payload, until_eof=True, read_timeout=5)
    assert reply.status in (200, 400)
    assert reply.closed
    assert reply.raw.count(b"HTTP/1.1 ") == 1, "no second response on a CL+TE connection"
    await assert_healthy(r, herd_errors)


async def test_header_over_limit_in_one_read_is_431(
    make_router: RouterFactory, fake: FakeOllama
) -> None:
    r = await start_router(make_router, fake)
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    reply = await exchange(r.port, big, until_eof=True, read_timeout=3)
    assert reply.status == 431


async def test_duplicate_identical_content_length_is_accepted(
    make_router: RouterFactory, fake: FakeOllama, herd_errors: ErrorLog
) -> None:
    r = await start_router(make_router, fake)
    reply = await exchange(
        r.port, post("/api/generate", GEN, extra=b"Content-Length: %d\r\n" % len(GEN))
    )
    assert reply.status == 200
    await assert_healthy(r, herd_errors)


# =======================================================================================
# Malformed JSON and wrong types
# =======================================================================================

DEEP = b'{"model":"llama3.2:3b","prompt":"x","options":' + b"[" * 100_000 + b"]" * 100_000 + b"}"

BAD_JSON: dict[str, tuple[str, bytes]] = {
    "not json": ("/api/generate", b"{nope"),
    "truncated": ("/api/generate", b'{"model": "llama3.2:3b", "prompt": '),
    "array body": ("/api/generate", b"[1, 2, 3]"),
    "string body": ("/api/chat", b'"hello"'),
    "empty body": ("/api/generate", b""),
    "invalid utf-8": ("/api/generate", b'{"model": "llama3.2:3b", "prompt": "\xff\xfe\xc3("}'),
    "invalid utf-8 openai": ("/v1/chat/completions", b'{"model": "\xc3\x28", "messages": []}'),
    "lone surrogate escape": ("/api/generate", b'{"model": "llama3.2:3b\\ud800", "prompt": "x"}'),
    "nul in model": ("/api/generate", b'{"model": "llama3.2\\u0000:3b", "prompt": "x"}'),
    "huge integer": (
        "/api/generate",
        b'{"model": "llama3.2:3b", "options": {"num_ctx": 1' + b"0" * 5000 + b"}}",
    ),
    "model is a number": ("/api/generate", b'{"model": 123, "prompt": "x"}'),
    "model is a list": ("/api/chat", b'{"model": ["llama3.2:3b"], "messages": []}'),
    "model is null": ("/v1/chat/completions", b'{"model": null, "messages": []}'),
    "model is empty": ("/api/generate", b'{"model": "", "prompt": "x"}'),
    "messages is a string": ("/api/chat", b'{"model": "llama3.2:3b", "messages": "x"}'),
    "messages items are numbers": ("/api/chat", b'{"model": "llama3.2:3b", "messages": [1, 2]}'),
    "options is a list": (
        "/api/generate",
        b'{"model": "llama3.2:3b", "prompt": "x", "options": []}',
    ),
    "prompt is an object": ("/api/generate", b'{"model": "llama3.2:3b", "prompt": {"a": 1}}'),
    "node_id is a number": (
        "/api/generate",
        b'{"model": "llama3.2:3b", "prompt": "x", "node_id": 5}',
    ),
    "fallback_models is a dict": (
        "/api/generate",
        b'{"model": "nope:1b", "prompt": "x", "fallback_models": {"a": 1}}',
    ),
    "deeply nested": ("/api/generate", DEEP),
    "show model is a number": ("/api/show", b'{"model": 5}'),
    "copy wrong types": ("/api/copy", b'{"source": 1, "destination": []}'),
    "embed input is a number": ("/api/embed", b'{"model": "llama3.2:3b", "input": 5}'),
}


@pytest.mark.parametrize("case", list(BAD_JSON))
async def test_bad_json_gets_clear_4xx_not_500(
    make_router: RouterFactory, fake: FakeOllama, herd_errors: ErrorLog, case: str
) -> None:
    r = await start_router(make_router, fake)
    path, body = BAD_JSON[case]
    reply = await exchange(r.port, post(path, body), read_timeout=10)
    assert reply.status is not None, reply.raw[:300]
    assert 400 <= reply.status < 500, reply.raw[:500]
    err = json.loads(reply.body)
    message = err["error"]["message"] if path.startswith("/v1/") else err["error"]
    assert isinstance(message, str) and message
    await assert_healthy(r, herd_errors)


# Fields herd does not interpret: the node judges them (real Ollama 400s a string num_ctx,
# ignores unknown fields); herd must pass them through and never turn them into a 500.
PASSTHROUGH: dict[str, bytes] = {
    "metadata is a string": b'{"model": "llama3.2:3b", "prompt": "x", "metadata": "x"}',
    "num_ctx is a string": b'{"model": "llama3.2:3b", "prompt": "x", "options": {"num_ctx": "a"}}',
    "huge num_predict": b'{"model": "llama3.2:3b", "prompt": "x", "options": {"num_predict": '
    + b"9" * 300
    + b"}}",
    "keep_alive is a dict": b'{"model": "llama3.2:3b", "prompt": "x", "keep_alive": {}}',
    "stream is a string": b'{"model": "llama3.2:3b", "prompt": "x", "stream": "no"}',
}


@pytest.mark.parametrize("case", list(PASSTHROUGH))
async def test_unknown_typed_fields_never_give_a_500(
    make_router: RouterFactory, fake: FakeOllama, herd_errors: ErrorLog, case: str
) -> None:
    r = await start_router(make_router, fake)
    reply = await exchange(r.port, post("/api/generate", PASSTHROUGH[case]), read_timeout=10)
    assert reply.status is not None and reply.status < 500, reply.raw[:300]
    await assert_healthy(r, herd_errors)


async def test_images_of_the_wrong_type_is_a_400(
    make_router: RouterFactory, fake: FakeOllama
) -> None:
    r = await start_router(make_router, fake)
    body = b'{"model": "llama3.2:3b", "prompt": "x", "stream": false, "images": 3}'
    reply = await exchange(r.port, post("/api/generate", body))
    assert reply.status == 400, reply.raw[:300]


@pytest.mark.parametrize(
    "number", [b"NaN", b"Infinity", b"-Infinity", b"1e999"], ids=["nan", "inf", "-inf", "1e999"]
)
async def test_non_finite_numbers_are_a_400(
    make_router: RouterFactory, fake: FakeOllama, number: bytes
) -> None:
    r = await start_router(make_router, fake)
    body = b'{"model": "llama3.2:3b", "prompt": "x", "stream": false, "options": {"temperature": '
    reply = await exchange(r.port, post("/api/generate", body + number + b"}}"))
    assert reply.status == 400, reply.raw[:300]


async def test_nested_json_just_under_the_parser_limit_is_not_a_500(
    make_router: RouterFactory, fake: FakeOllama, herd_errors: ErrorLog
) -> None:
    r = await start_router(make_router, fake)
    depth = 950
    body = (
        b'{"model":"llama3.2:3b","prompt":"'
        + b"x" * (MiB + 10)
        + b'","options":{"stop":'
        + b"[" * depth
        + b"]" * depth
        + b"}}"
    )
    reply = await exchange(r.port, post("/api/generate", body), read_timeout=20)
    assert reply.status is not None and reply.status < 500, reply.raw[:300]


async def test_json_body_over_limit_is_413(
    make_router: RouterFactory, fake: FakeOllama, herd_errors: ErrorLog
) -> None:
    r = await start_router(make_router, fake, max_json_bytes=1000)
    body = json.dumps({"model": MODEL, "prompt": "x" * 5000}).encode()
    reply = await exchange(r.port, post("/api/generate", body), until_eof=True)
    assert reply.status == 413
    chunked = (
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"100\r\n" + b"a" * 256 + b"\r\n" for _ in range(10))
        + b"0\r\n\r\n"
    )
    reply = await exchange(r.port, chunked, until_eof=True)
    assert reply.status == 413
    await assert_healthy(r, herd_errors)


# =======================================================================================
# Deadlines and caps
# =======================================================================================


async def test_slowloris_headers_get_408_within_the_header_deadline(
    make_router: RouterFactory, fake: FakeOllama, herd_errors: ErrorLog
) -> None:
    r = await start_router(make_router, fake, header_timeout_s=0.5)
    head = b"GET /api/version HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40 + b"\r\n\r\n"
    reply = await exchange(r.port, [bytes([b]) for b in head], delay=0.05, until_eof=True)
    assert reply.closed
    assert reply.status in (408, None)
    assert reply.elapsed < 3.0  # sending the whole head would take 0.05 * 80 = 4 s
    # a client that connects and sends nothing at all
    reply = await exchange(r.port, b"", until_eof=True)
    assert reply.closed and reply.status in (408, None) and reply.elapsed < 2.0
    await assert_healthy(r, herd_errors)


async def test_body_that_stops_gets_408(
    make_router: RouterFactory, fake: FakeOllama, herd_errors: ErrorLog
) -> None:
    r = await start_router(make_router, fake, body_idle_timeout_s=0.3)
    head = post("/api/generate", GEN)
    partial = head[: -len(GEN) // 2]
    reply = await exchange(r.port, partial, until_eof=True, read_timeout=5)
    assert reply.status == 408 and reply.closed and reply.elapsed < 3
    await assert_healthy(r, herd_errors)


async def test_body_trickle_gets_408_within_an_absolute_deadline(
    make_router: RouterFactory, fake: FakeOllama
) -> None:
    r = await start_router(make_router, fake, header_timeout_s=0.5, body_idle_timeout_s=0.5)
    body = json.dumps({"model": MODEL, "prompt": "x" * 200, "stream": False}).encode()
    msg = post("/api/generate", body)
    head_len = len(msg) - len(body)
    parts = [msg[:head_len]] + [bytes([b]) for b in body[:25]]
    reply = await exchange(r.port, parts, delay=0.15, until_eof=True, read_timeout=1)
    # 25 bytes x 0.15 s = 3.75 s of trickle, each byte well inside the idle timeout: an
    # absolute receipt deadline of a few multiples of the limits must cut it before 3 s
    assert reply.status == 408 and reply.elapsed < 3


async def test_header_deadline_applies_to_the_second_request_on_a_connection(
    make_router: RouterFactory, fake: FakeOllama
) -> None:
    r = await start_router(make_router, fake, header_timeout_s=0.3, keepalive_idle_s=5.0)
    slow = b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n"
    parts = [post("/api/generate", GEN)] + [bytes([b]) for b in slow]
    # the second head takes 38 x 0.04 s = 1.5 s: past header_timeout_s, within keepalive
    reply = await exchange(r.port, parts, delay=0.04, until_eof=True, read_timeout=1)
    assert reply.raw.count(b"HTTP/1.1 200") == 1
    assert b"HTTP/1.1 408" in reply.raw


async def test_idle_keepalive_connection_is_closed(
    make_router: RouterFactory, fake: FakeOllama, herd_errors: ErrorLog
) -> None:
    r = await start_router(make_router, fake, keepalive_idle_s=0.4)
    reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
    writer.write(b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    t0 = time.monotonic()
    data = b""
    async with asyncio.timeout(5):
        while chunk := await reader.read(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    assert 0.3 < time.monotonic() - t0 < 3.0
    writer.close()
    await assert_healthy(r, herd_errors)


async def test_max_connections_gives_503_and_existing_connections_keep_working(
    make_router: RouterFactory, fake: FakeOllama, herd_errors: ErrorLog
) -> None:
    r = await start_router(make_router, fake, max_connections=3, keepalive_idle_s=10.0)
    conns = [await asyncio.open_connection("127.0.0.1", r.port) for _ in range(3)]
    for rd, wr in conns:  # each one served once, kept alive
        wr.write(post("/api/generate", GEN))
        await wr.drain()
        async with asyncio.timeout(5):
            assert (await rd.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    extra = await exchange(r.port, b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n", until_eof=True)
    assert extra.status == 503 and extra.closed
    assert b"retry-after" in extra.raw.lower()
    for rd, wr in conns:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.2):
                await rd.read(65536)  # rest of the first response body
        wr.write(b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")
        await wr.drain()
        async with asyncio.timeout(5):
            assert (await rd.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    for _, wr in conns:
        wr.close()
    await assert_healthy(r, herd_errors)


async def test_long_slow_stream_is_not_cut_by_any_deadline(
    make_router: RouterFactory, herd_errors: ErrorLog
) -> None:
    node = FakeOllama([FakeModel(MODEL)], tokens_per_s=20, load_delay_s=0.3, response_tokens=30)
    await node.start()
    try:
        r = await start_router(
            make_router,
            node,
            header_timeout_s=0.2,
            body_idle_timeout_s=0.2,
            keepalive_idle_s=0.2,
        )
        body = json.dumps(
            {"model": MODEL, "prompt": "hi", "stream": True, "options": {"num_predict": 30}}
        ).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
        writer.write(post("/api/generate", body, extra=b"Connection: close\r\n"))
        await writer.drain()
        t0 = time.monotonic()
        async with asyncio.timeout(15):
            data = await reader.read(-1)
        elapsed = time.monotonic() - t0
        writer.close()
        assert elapsed > 1.0  # 30 tokens at 20/s: longer than every deadline above
        assert data.startswith(b"HTTP/1.1 200")
        lines = [ln for ln in parse_response(data, "POST").body.splitlines() if ln]
        assert len(lines) >= 30
        assert json.loads(lines[-1])["done"] is True
        await assert_healthy(r, herd_errors)
    finally:
        await node.stop()


# =======================================================================================
# Hypothesis: the request parser path never crashes and never wedges
# =======================================================================================


@dataclass
class ThreadedStack:
    loop: asyncio.AbstractEventLoop
    router: herd.Router
    fake: FakeOllama
    port: int
    errors: ErrorLog


@pytest.fixture(scope="module")
def threaded_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedStack]:
    """Fake node + router on a loop in a thread, so a sync hypothesis test can hit it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    errors = ErrorLog()
    logging.getLogger("herd").addHandler(errors)

    async def up() -> tuple[FakeOllama, herd.Router]:
        node = FakeOllama([FakeModel(MODEL)], tokens_per_s=0, load_delay_s=0)
        await node.start()
        cfg = router_config(
            Path(tmp_path_factory.mktemp("fuzz")),
            [node.url],
            limits={"header_timeout_s": 0.15, "body_idle_timeout_s": 0.15, "keepalive_idle_s": 0.5},
        )
        router = herd.Router(cfg)
        await router.start()
        async with asyncio.timeout(10):
            while not router.merged_tags():
                await asyncio.sleep(0.02)
        return node, router

    node, router = asyncio.run_coroutine_threadsafe(up(), loop).result(20)
    try:
        yield ThreadedStack(loop, router, node, router.address[1], errors)
    finally:

        async def down() -> None:
            await router.stop()
            await node.stop()

        asyncio.run_coroutine_threadsafe(down(), loop).result(20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        logging.getLogger("herd").removeHandler(errors)


def blocking_exchange(port: int, data: bytes, *, half_close: bool, timeout: float = 3.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = s.recv(65536)
            except TimeoutError:
                break
            except OSError:
                break
            if not got:
                return out
            out += got
            if _complete(out):
                return out
        raise AssertionError(f"router neither answered nor closed within {timeout}s: {out[:200]!r}")


METHODS = [b"GET", b"POST", b"HEAD", b"DELETE", b"PUT", b"OPTIONS", b"PATCH", b"BREW", b"get", b""]
PATHS = [
    b"/",
    b"/api/generate",
    b"/api/chat",
    b"/api/tags",
    b"/api/show",
    b"/v1/chat/completions",
    b"/api/blobs/sha256:00",
    b"/%00",
    b"/api/../api/tags",
    b"*",
    b"http://evil/api/tags",
    b"/\xff\xfe",
]
HEADER_NAMES = [
    b"Host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Content-Type",
    b"Connection",
    b"Expect",
    b"Origin",
    b"X-Herd-Node",
    b"Authorization",
    b"X-Request-Id",
    b"\x00",
]
HEADER_VALUES = [
    b"x",
    b"0",
    b"5",
    b"-1",
    b"chunked",
    b"gzip",
    b"close",
    b"keep-alive",
    b"100-continue",
    b"application/json",
    b"\xff",
    b"a" * 300,
    b"1, 2",
    b"",
]
BODIES = [
    b"",
    GEN,
    b"{",
    b"[]",
    b"null",
    b'{"model": 1}',
    b"0\r\n\r\n",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"zz\r\n",
    b"\x00" * 10,
]


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    method = draw(st.one_of(st.sampled_from(METHODS), st.binary(max_size=8)))
    path = draw(st.one_of(st.sampled_from(PATHS), st.binary(max_size=30)))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1x", b""]))
    headers = draw(
        st.lists(
            st.tuples(
                st.one_of(st.sampled_from(HEADER_NAMES), st.binary(max_size=10)),
                st.one_of(st.sampled_from(HEADER_VALUES), st.binary(max_size=20)),
            ),
            max_size=8,
        )
    )
    if draw(st.booleans()):
        headers.insert(0, (b"Host", b"127.0.0.1"))
    eol = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
    body = draw(st.one_of(st.sampled_from(BODIES), st.binary(max_size=200)))
    msg = method + b" " + path + b" " + version + eol
    msg += b"".join(k + b": " + v + eol for k, v in headers) + eol + body
    # random corruption: truncation, byte flips, duplication (pipelining)
    op = draw(st.sampled_from(["none", "truncate", "flip", "double"]))
    if op == "truncate" and msg:
        msg = msg[: draw(st.integers(0, len(msg)))]
    elif op == "flip" and msg:
        i = draw(st.integers(0, len(msg) - 1))
        msg = msg[:i] + bytes([draw(st.integers(0, 255))]) + msg[i + 1 :]
    elif op == "double":
        msg = msg + msg
    return msg


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.one_of(http_requests(), st.binary(max_size=400)), half_close=st.booleans())
def test_fuzzed_requests_never_crash_or_wedge_the_router(
    threaded_stack: ThreadedStack, data: bytes, half_close: bool
) -> None:
    s = threaded_stack
    reply = blocking_exchange(s.port, data, half_close=half_close)
    status = _status_of(reply)
    assert reply == b"" or status is not None, reply[:200]
    assert status is None or status < 500 or status in (501, 502, 503, 505), reply[:300]
    # the next normal request works
    ok = blocking_exchange(s.port, VERSION, half_close=False)
    assert _status_of(ok) == 200, ok[:200]
    assert not s.errors.records, [rec.getMessage() for rec in s.errors.records]


def fuzz_corpus(seed: int, count: int) -> list[tuple[bytes, bool]]:
    """Seeded malformed requests from the same pieces as ``http_requests`` (and raw noise),
    each with a half-close flag: the same on every run, whichever tests ran before."""
    rnd = random.Random(seed)
    out: list[tuple[bytes, bool]] = []
    for _ in range(count):
        if rnd.random() < 0.25:
            out.append((rnd.randbytes(rnd.randint(0, 400)), rnd.random() < 0.5))
            continue
        eol = rnd.choice([b"\r\n", b"\n", b"\r"])
        headers = [(rnd.choice(HEADER_NAMES), rnd.choice(HEADER_VALUES))
                   for _ in range(rnd.randint(0, 6))]
        msg = (rnd.choice(METHODS) + b" " + rnd.choice(PATHS) + b" "
               + rnd.choice([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1x", b""]) + eol
               + b"".join(k + b": " + v + eol for k, v in headers) + eol + rnd.choice(BODIES))
        op = rnd.choice(["none", "truncate", "flip", "double"])
        if op == "truncate":
            msg = msg[: rnd.randint(0, len(msg))]
        elif op == "flip":
            i = rnd.randrange(len(msg))
            msg = msg[:i] + bytes([rnd.randrange(256)]) + msg[i + 1 :]
        elif op == "double":
            msg += msg
        out.append((msg, rnd.random() < 0.5))
    return out


def test_fuzz_leaves_no_connection_behind(threaded_stack: ThreadedStack) -> None:
    """After a batch of malformed requests of its own (so it means the same run alone or
    after the hypothesis test), every connection they opened is gone."""
    s = threaded_stack
    corpus = fuzz_corpus(seed=13, count=60)
    for data, half_close in corpus:
        blocking_exchange(s.port, data, half_close=half_close)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and s.router.server.connections:
        time.sleep(0.05)
    assert not s.router.server.connections
    assert not s.fake.errors
